"""Compile the suite's quantized-matmul kernels up front, many at a time.

MLX's CUDA build compiles each quantized matmul kernel with NVRTC the first
time a process meets it, about 30 s apiece on an H200, and keeps it in its
kernel cache (``dsv4shard.kernel_cache``).  A test that meets several new
ones compiles them one after another, so on a fresh machine the first run
spent minutes inside a handful of tests while the other workers idled.

The kernels a run meets are known: :data:`SUITE_KERNELS` lists the modules
the suite's ``ci`` profile compiled on MLX 0.32.4's CUDA build
(``benchmarks/results/cuda-kernels-h200.txt``).  A module's name says what
it was compiled for (path, activation dtype, row or column tile, bits,
group size, mode), and :func:`call_for` rebuilds from it one small matmul
that MLX dispatches to that module.  :func:`warm` compiles those the shared
cache lacks, one child process each, as many at once as there are cores;
the pytest plugin runs it on the controller before the workers start.  A
name this MLX would not produce is harmless: its call compiles some other
module, and the tests compile whatever they still need themselves.

The rules mirrored here are MLX's CUDA dispatch (``QuantizedMatmul`` and
``GatherQMM``'s ``eval_gpu``): a half-precision 4- or 8-bit matmul whose
output width is a multiple of 128 takes the sm80 path; an affine 4- or
8-bit one whose group covers the whole contraction (a multiple of 64) takes
the sm90 path on a Hopper GPU, its tile the output width; everything else
whose contraction is a multiple of max(64, group) the naive path; fewer
than 8 rows a precompiled matrix-vector kernel.  The row tile is the next
power of two of the rows, kept within 16..64.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# The quantized matmul modules of a `CI=true pytest -n auto` run on one H200
# (MLX 0.32.4, run 17 B); the gathers and compiled graphs it also compiles
# take a second or two each and are left to the tests.
SUITE_KERNELS = (
    "gather_qmm_rhs_sm80_tn_bfloat16_m32_b4_g32_mxfp4",
    "gather_qmm_rhs_sm80_tn_bfloat16_m64_b4_g16_nvfp4",
    "gather_qmm_rhs_sm80_tn_bfloat16_m64_b4_g32_mxfp4",
    "gather_qmm_rhs_sm80_tn_float16_m64_b4_g16_nvfp4",
    "qmm_naive_tn_aligned_bfloat16_m16_b4_g16_nvfp4",
    "qmm_naive_tn_aligned_bfloat16_m16_b4_g32_affine",
    "qmm_naive_tn_aligned_bfloat16_m16_b4_g32_mxfp4",
    "qmm_naive_tn_aligned_bfloat16_m16_b6_g32_affine",
    "qmm_naive_tn_aligned_bfloat16_m16_b8_g32_affine",
    "qmm_naive_tn_aligned_bfloat16_m32_b4_g16_nvfp4",
    "qmm_naive_tn_aligned_bfloat16_m32_b4_g32_affine",
    "qmm_naive_tn_aligned_bfloat16_m32_b4_g32_mxfp4",
    "qmm_naive_tn_aligned_bfloat16_m32_b6_g32_affine",
    "qmm_naive_tn_aligned_bfloat16_m64_b4_g16_nvfp4",
    "qmm_naive_tn_aligned_bfloat16_m64_b4_g32_affine",
    "qmm_naive_tn_aligned_bfloat16_m64_b4_g32_mxfp4",
    "qmm_naive_tn_aligned_bfloat16_m64_b8_g32_affine",
    "qmm_naive_tn_aligned_float16_m16_b2_g32_affine",
    "qmm_naive_tn_aligned_float16_m16_b4_g16_nvfp4",
    "qmm_naive_tn_aligned_float16_m32_b2_g32_affine",
    "qmm_naive_tn_aligned_float32_m16_b3_g64_affine",
    "qmm_naive_tn_aligned_float32_m16_b4_g128_affine",
    "qmm_naive_tn_aligned_float32_m16_b4_g32_mxfp4",
    "qmm_naive_tn_aligned_float32_m16_b5_g32_affine",
    "qmm_naive_tn_aligned_float32_m16_b6_g64_affine",
    "qmm_naive_tn_aligned_float32_m16_b8_g32_mxfp8",
    "qmm_naive_tn_aligned_float32_m64_b3_g64_affine",
    "qmm_naive_tn_aligned_float32_m64_b4_g32_mxfp4",
    "qmm_naive_tn_aligned_float32_m64_b6_g64_affine",
    "qmm_naive_tn_aligned_float32_m64_b8_g32_mxfp8",
    "qmm_sm80_tn_bfloat16_m16_b4_g16_nvfp4",
    "qmm_sm80_tn_bfloat16_m16_b4_g32_affine",
    "qmm_sm80_tn_bfloat16_m16_b4_g32_mxfp4",
    "qmm_sm80_tn_bfloat16_m16_b8_g32_affine",
    "qmm_sm80_tn_bfloat16_m32_b4_g16_nvfp4",
    "qmm_sm80_tn_bfloat16_m64_b4_g16_nvfp4",
    "qmm_sm80_tn_bfloat16_m64_b8_g32_affine",
    "qmm_sm80_tn_float16_m16_b4_g16_nvfp4",
    "qmm_sm80_tn_float16_m16_b4_g64_affine",
    "qmm_sm80_tn_float16_m16_b8_g64_affine",
    "qmm_sm80_tn_float16_m32_b4_g64_affine",
    "qmm_sm80_tn_float16_m32_b8_g64_affine",
    "qmm_sm80_tn_float16_m64_b8_g64_affine",
    "qmm_sm90_tn_float16_n64_b4_g64_affine",
    "qmm_sm90_tn_float32_n128_b4_g128_affine",
    "qmm_sm90_tn_float32_n64_b8_g64_affine",
)

_NAME = re.compile(
    r"(?P<path>qmm_naive_tn_aligned|qmm_sm80_tn|qmm_sm90_tn|gather_qmm_rhs_sm80_tn)"
    r"_(?P<dtype>float32|float16|bfloat16)_(?P<tile>[mn])(?P<size>\d+)"
    r"_b(?P<bits>\d+)_g(?P<group>\d+)_(?P<mode>affine|mxfp4|nvfp4|mxfp8)$")


@dataclass(frozen=True)
class KernelCall:
    """One matmul that MLX dispatches to a named module: ``rows`` x ``k``
    activations against an ``n`` x ``k`` weight (``experts`` of them, the
    rows sorted by expert, for a gather)."""

    module: str
    dtype: str
    mode: str
    bits: int
    group: int
    rows: int
    n: int
    k: int
    experts: int = 0  # 0: quantized_matmul; else gather_qmm with sorted indices


def call_for(module: str) -> KernelCall | None:
    """The call that compiles ``module``, or None for a name of another kind."""
    m = _NAME.match(module)
    if m is None:
        return None
    path, size = m["path"], int(m["size"])
    bits, group = int(m["bits"]), int(m["group"])
    # Two groups' worth of contraction (at least 2 x 64): aligned for the
    # naive and sm80 paths, and wider than a group, so never sm90.
    k = 2 * max(64, group)
    common = dict(module=module, dtype=m["dtype"], mode=m["mode"], bits=bits, group=group)
    if path == "qmm_sm90_tn":  # one group spans the contraction; the tile is the width
        return KernelCall(**common, rows=16, n=size, k=group)
    if path == "qmm_sm80_tn":
        return KernelCall(**common, rows=size, n=128, k=k)
    if path == "gather_qmm_rhs_sm80_tn":
        return KernelCall(**common, rows=size, n=128, k=k, experts=2)
    return KernelCall(**common, rows=size, n=64, k=k)  # a width sm80 does not take


def run_call(call: KernelCall) -> None:
    """Evaluate ``call`` on the default device (its values are not checked:
    this compiles a kernel, it tests nothing)."""
    import mlx.core as mx

    dtype = getattr(mx, call.dtype)
    key = mx.random.key(0)
    experts = max(call.experts, 1)
    w = mx.random.normal((experts, call.n, call.k), key=key).astype(dtype) / call.k ** 0.5
    packed = mx.quantize(w, group_size=call.group, bits=call.bits, mode=call.mode)
    wq, scales = packed[0], packed[1]
    biases = packed[2] if len(packed) > 2 else None
    x = mx.random.normal((call.rows, call.k), key=key).astype(dtype)
    quant = dict(transpose=True, group_size=call.group, bits=call.bits, mode=call.mode)
    if call.experts:
        rhs = mx.sort(mx.arange(call.rows, dtype=mx.uint32) % call.experts)
        out = mx.gather_qmm(x[:, None, :], wq, scales, biases, rhs_indices=rhs,
                            sorted_indices=True, **quant)
    else:
        out = mx.quantized_matmul(x, wq[0], scales[0], None if biases is None else biases[0],
                                  **quant)
    mx.eval(out)


@dataclass(frozen=True)
class Warmed:
    """What :func:`warm` did: modules compiled, those whose call did not
    produce them (with why), and the seconds it took."""

    compiled: tuple[str, ...]
    missed: tuple[tuple[str, str], ...]
    seconds: float

    def line(self) -> str:
        text = (f"dsv4shard: compiled {len(self.compiled)} of MLX's CUDA matmul kernels "
                f"in {self.seconds:.0f} s before the tests")
        if self.missed:
            text += (f"; {len(self.missed)} not produced, left to the tests: "
                     + ", ".join(f"{name} ({why})" for name, why in self.missed))
        return text


def missing(names, cache: str) -> list[str]:
    """``names`` whose module ``cache`` has no complete entry for."""
    from dsv4shard.kernel_cache import entries

    have = set(entries(cache))
    return [n for n in names if n not in have and call_for(n) is not None]


def _child(module: str, timeout: float) -> tuple[str, str | None]:
    """Compile ``module`` in a child process; (module, None) or (module, why not)."""
    command = [sys.executable, "-m", "dsv4shard.kernel_warmup", module]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return module, f"no answer in {timeout:.0f} s"
    except OSError as error:
        return module, f"cannot start a child: {error}"
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return module, last[:200]
    return module, None


def warm(names, cache: str, jobs: int | None = None, timeout: float = 300.0) -> Warmed:
    """Compile the modules of ``names`` that ``cache`` lacks, ``jobs`` child
    processes at once (default: one per core); each child keeps a private
    cache and hands what it compiled to ``cache`` as it exits."""
    start = time.monotonic()
    todo = missing(names, cache)
    if not todo:
        return Warmed((), (), 0.0)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(lambda name: _child(name, timeout), todo))
    from dsv4shard.kernel_cache import entries, hand_over_orphans

    hand_over_orphans(cache)  # what a child killed at its time limit had compiled
    have = set(entries(cache))
    missed = tuple((name, why or "another module came of its call")
                   for name, why in results if name not in have)
    compiled = tuple(name for name in todo if name in have)
    return Warmed(compiled, missed, time.monotonic() - start)


def main(argv=None) -> int:
    """A child: compile the named modules into this process's private cache."""
    from dsv4shard import kernel_cache

    kernel_cache.keep_private()
    for module in argv if argv is not None else sys.argv[1:]:
        call = call_for(module)
        if call is None:
            print(f"not a quantized matmul module name: {module}", file=sys.stderr)
            return 2
        run_call(call)
        kernel_cache.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
