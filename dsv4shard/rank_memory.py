"""How many real ranks this machine can hold, checked before any starts.

Every rank is a Python process with MLX, mlx-lm and the suite imported, and
the blocks and models of its jobs built.  ``rank_bytes()`` is what one such
process may need: measured with mlx 0.32.4 on Linux (CPU), a rank's peak
resident memory is 125-230 MB after typical MoE and tiny-model jobs of the
suite and 370-420 MB after the largest block it draws (32 experts, I = 256,
D = 128, 70 tokens); 64 ranks of one session filled 22.6 GB (about 350 MB
each).  On a GPU a rank also holds the device's runtime in host memory:
2068-2155 MB measured on an H200 with MLX's CUDA build after that largest
job.  ``tests/test_third_party.py`` measures a rank after that largest job
and insists the figure covers it.
"""

from __future__ import annotations

import os
import sys

# A rank's resident memory after a job: 545-640 MB measured on Linux (MLX,
# mlx-lm and its tokenizer libraries imported, a block built), with room;
# on a GPU backend, the CUDA runtime: 2.1 GB on an H200 with every kernel
# cached, 3.15 GB while NVRTC compiles them (a cold kernel cache), with 8%
# room (resident size counts the CUDA libraries' shared pages in every rank:
# it overstates what ranks take together, and more room would refuse 16
# workers' two ranks each on an H200 host's 125 GB).
RANK_BYTES = {"cpu": 768 * 2**20, "gpu": 3482 * 2**20}


def rank_bytes() -> int:
    """What one rank process may need on this backend."""
    from dsv4shard import backend

    return RANK_BYTES["cpu" if backend.name() == "cpu" else "gpu"]
HEADROOM = 0.9  # of the memory available now, what ranks may take


class RankMemoryError(ValueError):
    """More ranks than this machine's memory holds."""


def available_bytes() -> int | None:
    """Memory available for new processes now (Linux: MemAvailable; macOS:
    the physical memory less what is wired and active), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            total = int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True,
                                       text=True, timeout=5).stdout)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
        return total // 2  # active and wired pages are not cheap to read: assume half
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def check(ranks: int, pools: int = 1, option: str = "--ranks") -> None:
    """Raise :class:`RankMemoryError`, naming the memory ``ranks`` ranks
    (times ``pools``: xdist workers each start their own) would need, when
    this machine does not have it."""
    available = available_bytes()
    if available is None:
        return
    each = rank_bytes()
    need = ranks * pools * each
    if need <= HEADROOM * available:
        return
    most = max(0, int(HEADROOM * available // (pools * each)))
    workers = f" x {pools} test workers, each starting its own ranks," if pools > 1 else ""
    raise RankMemoryError(
        f"{option} {ranks}: {ranks} rank processes{workers} need about {gb(need)} "
        f"({each // 2**20} MB each: the peak memory of a rank running the suite's "
        f"jobs), and this machine has {gb(available)} available; use {option} {most} or "
        f"fewer" + (" (or fewer test workers, -n)" if pools > 1 else ""))
