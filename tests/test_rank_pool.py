"""The rank pool itself: real processes, bounded failures, nothing left behind."""

import json
import time

import pytest

from dsv4shard.ranks import hostfile as hf
from dsv4shard.ranks.pool import RankFailure, RankPool

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_dead_or_hung_rank_fails_within_bounded_time(how):
    pool = RankPool(hf.local(2), timeout=8).start()
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        pool.run({"task": "die", "rank": 1, "how": how})
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"took {elapsed:.1f} s"
    message = str(failure.value)
    assert "rank 1" in message and "stderr" in message
    assert all(p.poll() is not None for p in pool.procs), "a rank process was left running"


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
