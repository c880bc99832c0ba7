"""The rank pool itself: real processes, bounded failures, nothing left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dsv4shard.ranks import hostfile as hf
from dsv4shard.ranks.pool import RankFailure, RankPool

pytestmark = pytest.mark.distributed


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_dead_or_hung_rank_fails_within_bounded_time(how):
    pool = RankPool(hf.local(2), timeout=4).start()
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        pool.run({"task": "die", "rank": 1, "how": how})
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"took {elapsed:.1f} s"
    message = str(failure.value)
    assert "rank 1" in message and "stderr" in message
    assert all(p.poll() is not None for p in pool.procs), "a rank process was left running"


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie left for a container's
    init to reap has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


# A test process that starts two ranks, prints their pids, and sends them a
# job in which rank 1 sleeps and rank 0 waits for it in a collective:
# neither reads its stdin again.
_KILLED_MID_JOB = """
from dsv4shard.ranks import hostfile as hf
from dsv4shard.ranks.pool import RankPool
pool = RankPool(hf.local(2), timeout=600).start()
print(" ".join(str(p.pid) for p in pool.procs), flush=True)
pool.run({"task": "die", "rank": 1, "how": "hang"})
"""


@pytest.mark.slow
def test_ranks_exit_when_their_test_process_is_killed():
    test_process = subprocess.Popen([sys.executable, "-c", _KILLED_MID_JOB],
                                    stdout=subprocess.PIPE, text=True)
    try:
        ranks = [int(p) for p in test_process.stdout.readline().split()]
        assert len(ranks) == 2, "the test process did not start its ranks"
        time.sleep(1.0)  # the job is in the ranks' hands
    finally:
        test_process.kill()
        test_process.wait()
        test_process.stdout.close()
    deadline = time.monotonic() + 15
    while any(map(_running, ranks)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in ranks if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"rank processes {left} outlived their test process by 15 s"


def test_the_group_is_really_multi_rank():
    with RankPool(hf.local(3)) as pool:
        answers = pool.run({"task": "ping"})
    assert [a["size"] for a in answers] == [3, 3, 3]
    assert [a["rank"] for a in answers] == [0, 1, 2]


def test_a_rank_that_cannot_join_fails_start_up_with_its_stderr():
    pool = RankPool(hf.local(2), start_timeout=20,
                    extra_env={"MLX_HOSTFILE": "/nonexistent/hosts.json"})
    with pytest.raises(RankFailure, match="start-up"):
        pool.start()
    assert all(p.poll() is not None for p in pool.procs), "a rank process was left running"


@pytest.mark.parametrize("content, problem", [
    ([{"ssh": "a", "ips": ["10.0.0.1"]}], "at least 2 hosts"),
    ([{"ips": ["10.0.0.1"]}, {"ssh": "b"}], "no 'ssh'"),
    ({"backend": "jaccl", "hosts": [{"ssh": "a", "ips": ["1.1.1.1"], "rdma": [None]},
                                    {"ssh": "b", "ips": ["1.1.1.2"], "rdma": [None]}]},
     "RDMA entry"),
    ({"backend": "gloo", "hosts": [{"ssh": "a", "ips": ["1.1.1.1"]},
                                   {"ssh": "b", "ips": ["1.1.1.2"]}]}, "not one of"),
])
def test_bad_hostfiles_are_refused_by_name(tmp_path, content, problem):
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(content))
    with pytest.raises(hf.HostfileError, match=problem):
        hf.load(str(path))


def test_one_rank_is_refused():
    with pytest.raises(hf.HostfileError, match="at least 2 ranks"):
        hf.local(1)


def test_the_pools_leave_the_temp_folder_as_they_found_it(tmp_path):
    """Hostfiles and stderr files of the ranks are removed at close, also
    when a rank died: a whole session's pools run with TMPDIR pointing at an
    empty folder, which must be empty again afterwards."""
    import os
    import subprocess
    import sys

    script = (
        "from dsv4shard.ranks import hostfile as hf, shared\n"
        "from dsv4shard.ranks.pool import RankPool, RankFailure\n"
        "with RankPool(hf.local(2)) as pool:\n"
        "    pool.run({'task': 'ping'})\n"
        "pool = RankPool(hf.local(2), timeout=8).start()\n"
        "try:\n"
        "    pool.run({'task': 'die', 'rank': 1, 'how': 'exit'})\n"
        "except RankFailure:\n"
        "    pass\n"
        "shared.pool(2).run({'task': 'ping'})\n"  # closed at exit
    )
    # Every process keeps a private kernel cache there too (kernel_cache, as
    # on MLX's CUDA build), seeded from a shared one elsewhere.
    shared = tmp_path.parent / f"{tmp_path.name}-kernels"
    env = {**os.environ, "TMPDIR": str(tmp_path), "DSV4SHARD_KERNEL_CACHE": str(shared)}
    done = subprocess.run([sys.executable, "-c", script], env=env, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == []


def test_preflight_refuses_a_host_that_runs_other_versions(tmp_path):
    """Rank 1's host reports another mlx-lm (a distribution of that version
    first on its path): the pool refuses at start, naming the host."""
    import os

    shim = tmp_path / "shim"
    info = shim / "mlx_lm-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-lm\nVersion: 0.0.1\n")
    path = os.pathsep.join([str(shim), os.getcwd(), os.environ.get("PYTHONPATH", "")])
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps({"backend": "ring", "hosts": [
        {"ssh": "localhost", "ips": ["127.0.0.1"]},
        {"ssh": "localhost", "ips": ["127.0.0.1"], "env": {"PYTHONPATH": path}}]}))
    pool = RankPool(hf.load(str(hosts)))
    with pytest.raises(RankFailure) as failure:
        pool.start()
    message = str(failure.value)
    assert message.startswith("preflight: host localhost (rank 1) differs: mlx_lm 0.0.1 there")
    assert "\n" not in message
    assert all(p.poll() is not None for p in pool.procs)


def test_preflight_compares_the_variant_file_too():
    from dsv4shard.ranks.preflight import versions

    with RankPool(hf.local(2)) as pool:
        pool.preflight(files=[__file__])  # the same file on every rank: passes
    assert len(versions([__file__])["files"][__file__]) == 16
