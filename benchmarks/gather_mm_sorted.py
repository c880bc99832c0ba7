"""Is MLX's gather_mm right on this device, sorted and unsorted, for the
arrays as a model makes them?  (record ``cuda-gather-mm-sorted``)

    python benchmarks/gather_mm_sorted.py [--calls 6]

Each shape (tokens T, K, N, experts E, top-k k) runs ``--calls`` times in a
row, four ways: sorted or not, and the arrays made on the default device
(the weight's transposed view, as mlx-lm's SwitchLinear passes it, taken
there) or made and evaluated on ``mx.cpu`` first (as the doctor's usual
cases are).  Printed: the largest error over the largest output, against
NumPy in float64, of each call.  On MLX's CPU build every figure is at
rounding level; on an H200 the sorted calls on the device's own arrays
were 1.2-1.6 every time.
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


def arrays(t, k_dim, n, e, k, dtype, on_cpu: bool, sort: bool):
    """(x, the weight's transposed view, rhs_indices, the NumPy answer)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((t, k_dim)) / np.sqrt(k_dim)).astype(np.float32)
    w = rng.standard_normal((e, n, k_dim)).astype(np.float32)  # as SwitchLinear holds it
    idx = rng.integers(0, e, (t, k)).astype(np.uint32)
    if sort:  # as SwitchGLU sorts: x [T*k, 1, K], indices [T*k]
        order = np.argsort(idx.ravel(), kind="stable")
        x, idx = x[order // k][:, None, :], idx.ravel()[order]
    else:  # x [T, 1, 1, K], indices [T, k]
        x = x[:, None, None, :]
    stream = mx.cpu if on_cpu else mx.default_device()
    xm = mx.array(x).astype(getattr(mx, dtype), stream=stream)
    wm = mx.swapaxes(mx.array(w).astype(getattr(mx, dtype), stream=stream), -1, -2,
                     stream=stream)
    im = mx.array(idx)
    if on_cpu:
        mx.eval(xm, wm, im)
    # The answer from the same values rounded on mx.cpu, apart: the device's
    # arrays stay unevaluated until gather_mm runs.
    x64, w64 = (np.array(mx.array(v).astype(getattr(mx, dtype), stream=mx.cpu)
                         .astype(mx.float32, stream=mx.cpu), np.float64) for v in (x, w))
    w64 = w64.swapaxes(-1, -2)  # [E, K, N]
    if sort:
        want = np.einsum("tk,tkn->tn", x64[:, 0], w64[idx])
    else:
        want = np.einsum("tk,tekn->ten", x64[:, 0, 0], w64[idx])
    return xm, wm, im, want


def errors(shape, on_cpu: bool, sort: bool, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        x, w, idx, want = arrays(*shape, on_cpu=on_cpu, sort=sort)
        got = mx.gather_mm(x, w, rhs_indices=idx, sorted_indices=sort)
        got = np.array(got.astype(mx.float32), np.float64).reshape(want.shape)
        out.append(float(np.abs(got - want).max() / np.abs(want).max()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=6)
    args = p.parse_args(argv)
    print(f"MLX {mx.__version__} on {mx.default_device()}")
    print(f"{'T, K, N, E, k, dtype':30} {'arrays made':12} {'unsorted':>9} {'sorted':>9}")
    for shape in SHAPES:
        for on_cpu in (False, True):
            label = ", ".join(str(v) for v in shape)
            try:
                worst = [f"{max(errors(shape, on_cpu, sort, args.calls)):9.1e}"
                         for sort in (False, True)]
            except (RuntimeError, ValueError) as error:  # e.g. the CPU build's float32-only
                print(f"{label:30} {'':12} {str(error).splitlines()[0]}")
                break
            print(f"{label:30} {'on mx.cpu' if on_cpu else 'on device':12} "
                  f"{worst[0]} {worst[1]}")


if __name__ == "__main__":
    main()
