"""One private kernel cache per process on MLX's CUDA build.

MLX's CUDA backend compiles a kernel with NVRTC on first use and keeps it in
one directory (``MLX_PTX_CACHE_DIR``, else ``<tmp>/mlx/<version>/ptx``) as
``NAME.ptx`` (the binary) and ``NAME.txt`` (its kernel names), written in
place.  A run of this suite has many processes compiling at once (pytest
workers, rank processes, doctor children); one that finds ``NAME.ptx`` while
another is still writing it loads a torn binary, and the test fails with an
error that does not recur on replay.

So each process works in a directory of its own, seeded with hard links to
the shared cache's complete entries, and when it exits publishes what it
compiled back by atomic renames: the names first, the binary last, so that
a reader who finds a binary finds its names.  The shared directory is only
ever written by renames.  Nothing changes off CUDA (the CPU build compiles
nothing; Metal keeps no such cache) unless ``DSV4SHARD_KERNEL_CACHE`` names
the shared directory (so the mechanics run anywhere), nor with
``DSV4SHARD_KERNEL_CACHE=off``.

Between tests a process syncs (:func:`sync`): it hands over what it
compiled and takes what the others handed over, so that a kernel is
compiled about once a run, not once in every worker that needs it.  A
process killed before it could hand over (a run stopped by a time limit)
leaves its directory behind; the next process to start hands that over
before removing it.

The binaries MLX keeps are compiled for the GPU already (``NAME.ptx`` holds
an ELF cubin for the device's architecture; seen with MLX 0.32.4 on an
H200).  The CUDA driver keeps its own cache of what it compiles from PTX
(``~/.nv/ComputeCache``), and a run there filled its 1 GiB default, so it
may grow to its largest size, 4 GiB (``CUDA_CACHE_MAXSIZE``, unless set
already; it is read when CUDA starts, before MLX is imported).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The shared directory, as the first process of a run found it: children
# seed from it too, not from their parent's private directory.
SHARED_ENV = "DSV4SHARD_KERNEL_CACHE"
_PRIVATE_ROOT = "dsv4shard-kernels"
DRIVER_CACHE_BYTES = 4 << 30  # CUDA_CACHE_MAXSIZE's largest value
_state: dict[str, str] = {}


def shared_directory(version: str) -> str:
    """Where MLX would keep its kernels in this environment."""
    return (os.environ.get(SHARED_ENV) or os.environ.get("MLX_PTX_CACHE_DIR")
            or os.path.join(tempfile.gettempdir(), "mlx", version, "ptx"))


def entries(directory: str) -> list[str]:
    """Names of complete entries: a binary whose kernel names are there too."""
    try:
        files = set(os.listdir(directory))
    except OSError:
        return []
    return sorted(f[:-4] for f in files if f.endswith(".ptx") and f[:-4] + ".txt" in files)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def seed(shared: str, private: str) -> int:
    """Link ``shared``'s complete entries that ``private`` lacks into it; how
    many (an entry ``private`` has already is never touched)."""
    have = set(entries(private))
    names = [n for n in entries(shared) if n not in have]
    for name in names:
        for ext in (".txt", ".ptx"):
            try:
                _link_or_copy(os.path.join(shared, name + ext), os.path.join(private, name + ext))
            except OSError:  # gone meanwhile: this process compiles it
                break
    return len(names)


def _publish_file(source: str, shared: str, filename: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".incoming-", dir=shared)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, os.path.join(shared, filename))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def publish(private: str, shared: str) -> int:
    """Move the entries compiled in ``private`` into ``shared`` (names before
    binary, each by rename); entries ``shared`` has already are left be."""
    done = 0
    have = set(entries(shared))
    for name in entries(private):
        binary = os.path.join(private, name + ".ptx")
        if name in have or os.path.getsize(binary) == 0:
            continue
        try:
            _publish_file(os.path.join(private, name + ".txt"), shared, name + ".txt")
            cu = os.path.join(private, name + ".cu")
            if os.path.exists(cu):
                _publish_file(cu, shared, name + ".cu")
            _publish_file(binary, shared, name + ".ptx")
            done += 1
        except OSError:
            return done
    return done


def _remove_stale(root: str, shared: str | None = None) -> None:
    """Private directories of processes that died without publishing: what
    they compiled is handed to ``shared`` first (a run stopped by a time
    limit kills its workers; MLX writes an entry's names after its binary,
    so a complete entry is a whole one), then they are removed."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if shared:
                try:
                    publish(os.path.join(root, name), shared)
                except OSError:
                    pass
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:
            pass


def hand_over_orphans(shared: str) -> None:
    """Publish to ``shared`` what dead processes compiled into their private
    directories (a child killed at a time limit), and remove those."""
    _remove_stale(os.path.join(tempfile.gettempdir(), _PRIVATE_ROOT), shared)


def make_private(shared: str) -> str:
    """A fresh private directory seeded from ``shared``; the environment
    points MLX (and every child process) at it from now on."""
    os.makedirs(shared, exist_ok=True)
    root = os.path.join(tempfile.gettempdir(), _PRIVATE_ROOT)
    os.makedirs(root, exist_ok=True)
    _remove_stale(root, shared)
    private = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
    seed(shared, private)
    os.environ[SHARED_ENV] = shared
    os.environ["MLX_PTX_CACHE_DIR"] = private
    _state.update(shared=shared, private=private)
    return private


def sync() -> tuple[int, int]:
    """Between two tests (or cells, or rank jobs): hand the shared cache what
    this process compiled, and take what the others handed it meanwhile, so
    that a kernel is compiled about once a run, not once a process; (handed,
    taken).  A no-op without a private cache."""
    shared, private = _state.get("shared"), _state.get("private")
    if not private:
        return 0, 0
    try:
        return publish(private, shared), seed(shared, private)
    except OSError:  # the cache is an economy
        return 0, 0


def finish() -> None:
    """Publish this process's new kernels and remove its private directory."""
    shared, private = _state.pop("shared", None), _state.pop("private", None)
    if not private:
        return
    try:
        publish(private, shared)
    except OSError:
        pass
    shutil.rmtree(private, ignore_errors=True)
    try:  # the last process out leaves the temp folder as it found it
        os.rmdir(os.path.dirname(private))
    except OSError:
        pass


def keep_private() -> None:
    """On MLX's CUDA build, or on any with ``DSV4SHARD_KERNEL_CACHE`` naming
    the shared directory, give this process its own kernel cache (once)."""
    named = os.environ.get(SHARED_ENV)
    if _state or named == "off":
        return
    os.environ.setdefault("CUDA_CACHE_MAXSIZE", str(DRIVER_CACHE_BYTES))
    try:
        import mlx.core as mx

        if not (named or mx.cuda.is_available()):
            return
        make_private(shared_directory(mx.__version__))
    except AttributeError:  # an MLX without mx.cuda
        return
    except OSError as error:  # the cache is an economy: say so, and go on without it
        import sys

        print(f"dsv4shard: no private kernel cache ({SHARED_ENV}={named or '(unset)'}): "
              f"{error}; MLX's own cache directory is used", file=sys.stderr)
        return
    atexit.register(finish)
    # multiprocessing's children leave by os._exit, past atexit, but run
    # its finalizers.
    from multiprocessing.util import Finalize

    Finalize(None, finish, exitpriority=1)
