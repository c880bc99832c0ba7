"""What a process pays the first time it calls a quantized kernel, and
whether the next process pays it again.

    python benchmarks/kernel_load.py [--processes 3] [--formats 6]

Each of ``--processes`` fresh processes, one after another, calls
``mx.quantized_matmul`` once in each of the first ``--formats`` formats of
the reference's list (float32 and bfloat16, 16 and 64 rows: MLX's kernels
differ by dtype, row tile, bits, group and mode), then once more.  Printed
per process: the seconds of each first call and of its repeat, how many
kernels MLX's kernel cache gained, and how the CUDA driver's own cache
(``~/.nv/ComputeCache``, where it keeps MLX's kernels compiled for the GPU)
grew.

Reading it: MLX compiles a kernel it has not cached (NVRTC) and the driver
compiles what it loads for the GPU, unless its cache has it.  So a first
call far above its repeat in the first process is a compile.  The same in
the later processes, with MLX's cache not growing, is the driver compiling
again: its cache is not serving them.  First calls near their repeats in
the later processes mean both caches work, and a test's time is elsewhere.
On MLX's CPU build every call is milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
import mlx.core as mx
import numpy as np
from reference.quantization import QUANT_FORMATS

n = int(sys.argv[1])
rng = np.random.default_rng(0)
out = []
for fmt in QUANT_FORMATS[:n]:
    for dtype in (mx.float32, mx.bfloat16):
        for rows in (16, 64):
            k = max(128, fmt.group_size * 2)
            w = mx.array(rng.standard_normal((64, k)) / np.sqrt(k), dtype=mx.float32)
            q = mx.quantize(w, group_size=fmt.group_size, bits=fmt.bits, mode=fmt.mode)
            scales, biases = q[1], (q[2] if len(q) > 2 else None)
            mx.eval(q)
            x = mx.array(rng.standard_normal((rows, k)), dtype=dtype)
            times = []
            for _ in range(2):
                t = time.perf_counter()
                mx.eval(mx.quantized_matmul(x, q[0], scales, biases, transpose=True,
                                            group_size=fmt.group_size, bits=fmt.bits,
                                            mode=fmt.mode))
                times.append(time.perf_counter() - t)
            out.append({"format": f"{fmt.mode} {fmt.bits}-bit g{fmt.group_size}",
                        "dtype": str(dtype).split(".")[-1], "rows": rows,
                        "first": round(times[0], 4), "repeat": round(times[1], 4)})
print(json.dumps(out))
"""


def size_of(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--formats", type=int, default=6)
    args = parser.parse_args(argv)
    import mlx.core as mx

    from dsv4shard import kernel_cache

    driver = os.environ.get("CUDA_CACHE_PATH") or os.path.expanduser("~/.nv/ComputeCache")
    mlx_cache = kernel_cache.shared_directory(mx.__version__)
    print(f"MLX {mx.__version__}, device {mx.default_device()}; MLX's kernel cache {mlx_cache}, "
          f"the driver's {driver}")
    for p in range(args.processes):
        before = (len(kernel_cache.entries(mlx_cache)), size_of(driver))
        start = time.perf_counter()
        # MLX's own cache directory, as a process outside the suite uses it
        # (importing dsv4shard gave this one a private copy).
        env = {**os.environ, "MLX_PTX_CACHE_DIR": mlx_cache}
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.formats)],
                              capture_output=True, text=True, timeout=900, env=env)
        wall = time.perf_counter() - start
        if proc.returncode:
            print(f"process {p + 1}: failed: {proc.stderr.strip().splitlines()[-1:]}")
            return 1
        calls = json.loads(proc.stdout.strip().splitlines()[-1])
        after = (len(kernel_cache.entries(mlx_cache)), size_of(driver))
        print(f"\nprocess {p + 1}: {wall:.1f} s; MLX's cache {before[0]} -> {after[0]} kernels, "
              f"the driver's {before[1] / 2**20:.0f} -> {after[1] / 2**20:.0f} MiB; first calls "
              f"{sum(c['first'] for c in calls):.2f} s, repeats "
              f"{sum(c['repeat'] for c in calls):.2f} s")
        print("| format | dtype | rows | first (s) | repeat (s) |\n|---|---|---|---|---|")
        for c in calls:
            print(f"| {c['format']} | {c['dtype']} | {c['rows']} | {c['first']:.3f} | "
                  f"{c['repeat']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
