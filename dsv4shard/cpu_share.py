"""Each of N parallel processes gets its share of the CPU's cores for its
math libraries' threads.

NumPy's BLAS (OpenBLAS here) starts one thread per core in every process, and
its idle threads spin before they sleep: N pytest workers, rank processes or
doctor children would run N x cores threads on the cores.  Set before the
children start (they read it when their BLAS loads); a value the user set is
kept.
"""

from __future__ import annotations

import os

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def share_cores(processes: int) -> int:
    """Threads per process for ``processes`` running at once; exported for
    the children this process starts."""
    per = max(1, (os.cpu_count() or 1) // max(1, processes))
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(per))
    return per
