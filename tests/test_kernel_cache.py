"""The private kernel cache's file handling (kernel_cache), on real files:
what a process seeds from the shared cache, and what it publishes back."""

import os
import subprocess
import sys

from dsv4shard import kernel_cache
from dsv4shard.pytest_plugin import session_args


def entry(directory, name, binary=b"\x7fELF kernel", names="k\t_Z1kv\n"):
    os.makedirs(directory, exist_ok=True)
    if binary is not None:
        with open(os.path.join(directory, name + ".ptx"), "wb") as f:
            f.write(binary)
    if names is not None:
        with open(os.path.join(directory, name + ".txt"), "w") as f:
            f.write(names)


def test_seed_links_complete_entries_only(tmp_path):
    shared, private = str(tmp_path / "shared"), str(tmp_path / "private")
    entry(shared, "whole")
    entry(shared, "torn", names=None)  # a binary whose names were never written
    os.makedirs(private)
    assert kernel_cache.seed(shared, private) == 1
    assert sorted(os.listdir(private)) == ["whole.ptx", "whole.txt"]
    # linked, not copied: seeding a warm cache costs no bytes
    assert os.stat(os.path.join(private, "whole.ptx")).st_ino == \
        os.stat(os.path.join(shared, "whole.ptx")).st_ino


def test_publish_moves_new_entries_names_before_binary(tmp_path, monkeypatch):
    shared, private = str(tmp_path / "shared"), str(tmp_path / "private")
    entry(shared, "old", binary=b"shared copy")
    entry(private, "old", binary=b"private copy")
    entry(private, "new", binary=b"fresh")
    entry(private, "empty", binary=b"")  # a write that never happened
    order = []
    real = os.replace
    monkeypatch.setattr(kernel_cache.os, "replace",
                        lambda a, b: (order.append(os.path.basename(b)), real(a, b)))
    assert kernel_cache.publish(private, shared) == 1
    assert order == ["new.txt", "new.ptx"]
    with open(os.path.join(shared, "new.ptx"), "rb") as f:
        assert f.read() == b"fresh"
    with open(os.path.join(shared, "old.ptx"), "rb") as f:
        assert f.read() == b"shared copy"
    assert not os.path.exists(os.path.join(shared, "empty.ptx"))
    assert not [f for f in os.listdir(shared) if f.startswith(".incoming-")]


def test_a_process_works_privately_and_hands_back_on_exit(tmp_path):
    shared = str(tmp_path / "shared")
    entry(shared, "warm")
    code = ("import os, sys\nfrom dsv4shard import kernel_cache as k\n"
            "p = k.make_private(sys.argv[1])\n"
            "assert sorted(os.listdir(p)) == ['warm.ptx', 'warm.txt'], os.listdir(p)\n"
            "assert os.environ['MLX_PTX_CACHE_DIR'] == p\n"
            "open(os.path.join(p, 'compiled.txt'), 'w').write('k\\t_Z1kv\\n')\n"
            "open(os.path.join(p, 'compiled.ptx'), 'wb').write(b'bin')\n"
            "import atexit; atexit.register(k.finish)\nprint(p)\n")
    done = subprocess.run([sys.executable, "-c", code, shared], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    private = done.stdout.strip().splitlines()[-1]
    assert not os.path.exists(private)
    assert kernel_cache.entries(shared) == ["compiled", "warm"]


def test_private_directories_of_dead_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_cache.tempfile, "tempdir", str(tmp_path))
    root = tmp_path / "dsv4shard-kernels"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=60).stdout.strip()
    (root / f"{dead}-abc").mkdir(parents=True)
    (root / f"{os.getppid()}-live").mkdir()
    # make_private points this process's environment at it: undone after
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "unchanged")
    monkeypatch.delenv(kernel_cache.SHARED_ENV, raising=False)
    private = kernel_cache.make_private(str(tmp_path / "shared"))
    try:
        left = sorted(os.listdir(root))
        assert f"{dead}-abc" not in left and f"{os.getppid()}-live" in left
        assert os.path.basename(private) in left
    finally:
        kernel_cache.finish()
    assert not os.path.exists(private)
    assert os.listdir(root) == [f"{os.getppid()}-live"]  # others' are left be


def test_the_last_process_out_removes_the_private_root(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_cache.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "unchanged")
    monkeypatch.delenv(kernel_cache.SHARED_ENV, raising=False)
    shared = tmp_path / "elsewhere" / "ptx"
    kernel_cache.make_private(str(shared))
    kernel_cache.finish()
    assert sorted(os.listdir(tmp_path)) == ["elsewhere"]


def test_a_shared_directory_that_cannot_be_made_is_one_line_and_no_failure(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = subprocess.run([sys.executable, "-c", "import dsv4shard, os; "
                           "print(os.environ.get('MLX_PTX_CACHE_DIR'))"],
                          env={**os.environ, kernel_cache.SHARED_ENV: str(blocker / "ptx"),
                               "MLX_PTX_CACHE_DIR": "unchanged"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "unchanged", done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no private kernel cache" in lines[0], done.stderr


def test_the_drivers_own_cache_may_grow_unless_the_user_said_otherwise():
    def seen(**env):
        base = {k: v for k, v in os.environ.items()
                if k not in ("CUDA_CACHE_MAXSIZE", kernel_cache.SHARED_ENV)}
        done = subprocess.run([sys.executable, "-c", "import dsv4shard, os; "
                               "print(os.environ.get('CUDA_CACHE_MAXSIZE'))"],
                              env={**base, **env}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done
        return done.stdout.strip()

    assert seen() == str(4 << 30)
    assert seen(CUDA_CACHE_MAXSIZE="123") == "123"
    assert seen(**{kernel_cache.SHARED_ENV: "off"}) == "None"


def test_sync_hands_over_and_takes_without_touching_what_it_has(tmp_path, monkeypatch):
    """Between tests each process hands the shared cache what it compiled
    and takes what the others handed over: a kernel compiled once a run."""
    shared, private = str(tmp_path / "shared"), str(tmp_path / "private")
    entry(shared, "theirs_early")
    monkeypatch.setitem(kernel_cache._state, "shared", shared)
    monkeypatch.setitem(kernel_cache._state, "private", private)
    os.makedirs(private)
    kernel_cache.seed(shared, private)
    entry(private, "mine", binary=b"compiled here")
    entry(shared, "theirs_later", binary=b"compiled there")
    # The shared copy replaced meanwhile (as a rename does): the private one,
    # which MLX may have loaded, stays as it was.
    with open(tmp_path / "replacement", "wb") as f:
        f.write(b"replaced")
    os.replace(tmp_path / "replacement", os.path.join(shared, "theirs_early.ptx"))
    assert kernel_cache.sync() == (1, 1)
    assert kernel_cache.entries(shared) == ["mine", "theirs_early", "theirs_later"]
    assert kernel_cache.entries(private) == ["mine", "theirs_early", "theirs_later"]
    with open(os.path.join(private, "theirs_later.ptx"), "rb") as f:
        assert f.read() == b"compiled there"
    with open(os.path.join(private, "theirs_early.ptx"), "rb") as f:
        assert f.read() == b"\x7fELF kernel"  # left be
    assert kernel_cache.sync() == (0, 0)
    monkeypatch.delitem(kernel_cache._state, "private")
    assert kernel_cache.sync() == (0, 0)  # no private cache: nothing to do


def test_what_a_killed_process_compiled_is_handed_over_by_the_next(tmp_path, monkeypatch):
    """A run stopped by a time limit kills its workers before they hand
    over; the next process to start hands their complete entries over."""
    monkeypatch.setattr(kernel_cache.tempfile, "tempdir", str(tmp_path))
    root = tmp_path / "dsv4shard-kernels"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, timeout=60).stdout.strip()
    entry(str(root / f"{dead}-abc"), "compiled_before_the_kill")
    entry(str(root / f"{dead}-abc"), "being_written", names=None)  # its names never came
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", "unchanged")
    monkeypatch.delenv(kernel_cache.SHARED_ENV, raising=False)
    shared = str(tmp_path / "shared")
    private = kernel_cache.make_private(shared)
    try:
        assert kernel_cache.entries(shared) == ["compiled_before_the_kill"]
        assert not os.path.exists(os.path.join(shared, "being_written.ptx"))
        assert kernel_cache.entries(private) == ["compiled_before_the_kill"]
        assert not (root / f"{dead}-abc").exists()
    finally:
        kernel_cache.finish()


def test_a_pytest_worker_shares_its_kernels_after_each_test(tmp_path):
    """The plugin syncs after every test: a kernel compiled in one test is
    in the shared cache before the session ends."""
    shared = tmp_path / "shared"
    test = tmp_path / "test_compiles.py"
    test.write_text(
        "import os\n"
        "def test_compiles():\n"
        "    d = os.environ['MLX_PTX_CACHE_DIR']\n"
        "    open(os.path.join(d, 'k.txt'), 'w').write('k')\n"
        "    open(os.path.join(d, 'k.ptx'), 'wb').write(b'bin')\n"
        "def test_sees_it_shared():\n"
        f"    assert os.path.exists({str(shared / 'k.ptx')!r})\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", *session_args(), str(test)], cwd=tmp_path,
                          env={**os.environ, kernel_cache.SHARED_ENV: str(shared)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
