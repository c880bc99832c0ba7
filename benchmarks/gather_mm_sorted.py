"""Is MLX's gather_mm right on this device, sorted and unsorted, for each
layout of x a caller may hand it?  (record ``cuda-gather-mm-sorted``)

    python benchmarks/gather_mm_sorted.py [--calls 3]

Each shape (tokens T, K, N, experts E, top-k k) runs ``--calls`` times,
sorted as SwitchGLU sorts (x [T*k, 1, K], indices [T*k]) and unsorted
(x [T, 1, 1, K], indices [T, k]), with x's size-1 axes made three ways: a
contiguous array of that shape, ``mx.expand_dims`` of the rows (a view),
and ``mx.array`` of a NumPy ``rows[:, None, :]`` view.  The weight is the
transposed view of [E, N, K], as mlx-lm's SwitchLinear passes it.  Printed:
the largest error over the largest output, against NumPy in float64.

On MLX's CPU build every figure is at rounding level.  On an H200 (MLX
0.32.4), for the first shape in float32 (run 12 of
benchmarks/results/gpu-h200.md, the same constructions in a script of
their own), sorted x with either view was wrong, 1.2-1.4, on every call and
seed; contiguous x was right (2.8e-04, TF32 rounding), and so was every
unsorted call.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import numpy as np

SHAPES = (  # (T, K, N, E, k, dtype)
    (8, 64, 72, 4, 2, "float32"),
    (32, 64, 128, 16, 9, "float32"),
    (69, 128, 128, 1, 1, "bfloat16"),
    (8, 64, 64, 8, 4, "bfloat16"),
)
LAYOUTS = ("contiguous", "expand_dims", "numpy view")


def x_of(rows: np.ndarray, axes: int, layout: str, dtype) -> mx.array:
    """``rows`` [R, K] given ``axes`` size-1 axes before K, made as ``layout``."""
    shape = (rows.shape[0],) + (1,) * axes + (rows.shape[1],)
    if layout == "contiguous":
        return mx.array(np.ascontiguousarray(rows.reshape(shape))).astype(dtype)
    if layout == "expand_dims":
        return mx.expand_dims(mx.array(rows).astype(dtype), tuple(range(1, 1 + axes)))
    view = rows[(slice(None),) + (None,) * axes]  # NumPy: a zero stride on each new axis
    return mx.array(view).astype(dtype)


def error(shape, layout: str, sort: bool, seed: int) -> float:
    t, k_dim, n, e, k, dtype = shape
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, k_dim)) / np.sqrt(k_dim)).astype(np.float32)
    w = rng.standard_normal((e, n, k_dim)).astype(np.float32)  # as SwitchLinear holds it
    idx = rng.integers(0, e, (t, k)).astype(np.uint32)
    mdtype = getattr(mx, dtype)
    # The values the device sees, rounded to the dtype, in float64.
    x64, w64 = (np.array(mx.array(v).astype(mdtype).astype(mx.float32), np.float64)
                for v in (x, w))
    wt = mx.swapaxes(mx.array(w).astype(mdtype), -1, -2)
    if sort:
        order = np.argsort(idx.ravel(), kind="stable")
        rows, ids = x[order // k], idx.ravel()[order]
        want = np.einsum("rk,rnk->rn", x64[order // k], w64[ids])
        got = mx.gather_mm(x_of(rows, 1, layout, mdtype), wt, rhs_indices=mx.array(ids),
                           sorted_indices=True)
    else:
        want = np.einsum("tk,tenk->ten", x64, w64[idx])
        got = mx.gather_mm(x_of(x, 2, layout, mdtype), wt, rhs_indices=mx.array(idx))
    got = np.array(got.astype(mx.float32), np.float64).reshape(want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=3, help="seeds per cell (one call each)")
    args = p.parse_args(argv)
    print(f"MLX {mx.__version__} on {mx.default_device()}")
    print(f"{'T, K, N, E, k, dtype':30} {'x made':12} {'unsorted':>9} {'sorted':>9}")
    for shape in SHAPES:
        label = ", ".join(str(v) for v in shape)
        for layout in LAYOUTS:
            try:
                worst = [f"{max(error(shape, layout, s, i) for i in range(args.calls)):9.1e}"
                         for s in (False, True)]
            except (RuntimeError, ValueError) as err:  # e.g. the CPU build's float32-only
                print(f"{label:30} {'':12} {str(err).splitlines()[0]}")
                break
            print(f"{label:30} {layout:12} {worst[0]} {worst[1]}")


if __name__ == "__main__":
    main()
