"""The kernels a run would make MLX's CUDA build compile, predicted from an
example log of any backend, and counted against a CUDA kernel cache.

    DSV4SHARD_EXAMPLE_LOG=log.jsonl pytest ...          # on any backend
    python benchmarks/cuda_kernels.py log.jsonl [--cache DIR] [--by-test]

MLX's CUDA build compiles a quantized or gathered matmul with NVRTC the
first time it meets its template (about 30 s each on an H200; see
benchmarks/results/gpu-h200.md), keyed by dtype, row tile, bits, group,
mode and path; other kernels of the suite (qmv, dequantize, quantize, the
fp8 codecs, cuBLAS matmuls) come compiled in the wheel.  This reads each
logged call's shapes and arguments and names the module MLX 0.32 would
compile for it, following its dispatch (``mlx/backend/cuda/quantized``,
``gemms/gather_gemm.cu``) on a compute capability 9 device, and the names
a 0.32.4 cache was seen to hold.  ``--cache`` takes a real cache (or a
listing of its files: their names are the module names) to check the
prediction against; the log must come from the same draws (the same
backend's records) for the two to agree.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv4shard import kernel_cache  # noqa: E402
from dsv4shard.testing.example_log import read  # noqa: E402

_ARRAY = re.compile(r"(\w+) ([\dx()]+) (\w+)")
_VALUE = re.compile(r"(\w+)=([\w.-]+)")


def parse(call: str) -> tuple[str, str, dict, dict]:
    """(where, op, arrays {name: (shape, dtype)}, values {name: text}) of a
    logged call such as ``[device] gather_qmm(x 3x1x1x64 float16, ...)``."""
    where, rest = call[1:].split("] ", 1)
    op, body = rest.split("(", 1)
    arrays, values = {}, {}
    for part in body.rstrip(")").split(", "):
        if m := _ARRAY.fullmatch(part):
            dims = m.group(2)
            shape = () if dims == "()" else tuple(int(d) for d in dims.split("x"))
            arrays[m.group(1)] = (shape, m.group(3))
        elif m := _VALUE.fullmatch(part):
            values[m.group(1)] = m.group(2)
    return where, op, arrays, values


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _tile(m: int, top: int) -> int:
    return max(16, min(top, _pow2(m)))


def quantized_module(op: str, arrays: dict, values: dict) -> str | None:
    """The module ``quantized_matmul`` or ``gather_qmm`` compiles, or None
    where MLX runs a compiled-in kernel (qmv) for the call."""
    x_shape, dtype = arrays["x"]
    w_shape = arrays["w"][0]
    if values.get("transpose", "True") != "True":
        return None  # the suite multiplies transposed weights only
    mode = values.get("mode", "affine")
    bits = int(values.get("bits", 4 if mode != "mxfp8" else 8))
    group = int(values.get("group_size", 64 if mode == "affine" else 32))
    k = x_shape[-1]
    n = w_shape[-2]
    m = x_shape[-2] if len(x_shape) > 1 else 1
    if op == "gather_qmm":
        idx = arrays.get("rhs_indices") or arrays.get("lhs_indices")
        batch = math.prod(idx[0]) if idx else math.prod(x_shape[:-2])
    else:
        batch = max(math.prod(x_shape[:-2]), math.prod(w_shape[:-2]))
    qmv = k % 8 == 0
    if (op == "quantized_matmul" and mode == "affine" and bits in (4, 8)
            and k % 64 == 0 and n % 4 == 0 and group >= k and "biases" in arrays):
        if qmv and m == 1 and batch == 1:
            return None
        return f"qmm_sm90_tn_{dtype}_n{_tile(n, 256)}_b{bits}_g{group}_affine"
    aligned = k % max(64, group) == 0
    half = dtype in ("float16", "bfloat16")
    if (op == "gather_qmm" and values.get("sorted_indices") == "True" and half
            and mode != "affine" and bits in (4, 8)):
        # Seen in 0.32.4's cache, not in the source read: the sorted float
        # formats in half precision take a kernel of their own.
        return f"gather_qmm_rhs_sm80_tn_{dtype}_m{_tile(batch, 64)}_b{bits}_g{group}_{mode}"
    if n % 128 == 0 and aligned and dtype in ("float16", "bfloat16") and bits in (4, 8):
        return None if qmv and m * batch < 8 else \
            f"qmm_sm80_tn_{dtype}_m{_tile(m, 64)}_b{bits}_g{group}_{mode}"
    if aligned:
        return None if qmv and m * batch < 8 else \
            f"qmm_naive_tn_aligned_{dtype}_m{_tile(m, 64)}_b{bits}_g{group}_{mode}"
    return None


def gather_mm_module(arrays: dict) -> str:
    a_shape, dtype = arrays["a"]
    m = a_shape[-2] if len(a_shape) > 1 else 1
    aligned = "aligned" if a_shape[-1] % 8 == 0 else "unaligned"
    return f"gemm_sm70_tn_{dtype}_{aligned}_m{_tile(m, 256)}_n128_k64"


def module(call: str, cpu_calls: bool = False) -> str | None:
    """The module a logged call compiles on the device, or None (also for a
    call made on ``mx.cpu``, unless ``cpu_calls``)."""
    where, op, arrays, values = parse(call)
    if where != "device" and not cpu_calls:
        return None
    if op in ("quantized_matmul", "gather_qmm") and "x" in arrays and "w" in arrays:
        return quantized_module(op, arrays, values)
    if op == "gather_mm" and "a" in arrays:
        return gather_mm_module(arrays)
    return None


MATMUL_FAMILIES = ("qmm_", "gather_qmm_", "gemm_")


def cached_modules(where: str) -> set[str]:
    """The modules of a cache directory, or of a file listing its names."""
    if os.path.isdir(where):
        return set(kernel_cache.entries(where))
    with open(where) as f:
        return {line.strip().removesuffix(".ptx") for line in f
                if line.strip() and not line.startswith("#")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--cache", help="a CUDA kernel cache to compare with")
    parser.add_argument("--by-test", action="store_true", help="modules per test")
    parser.add_argument("--all", action="store_true",
                        help="count calls made on mx.cpu too (a log of the CPU build)")
    args = parser.parse_args(argv)
    per_test: dict[str, set] = defaultdict(set)
    calls = Counter()
    try:
        entries = read(args.logs)
        every = cached_modules(args.cache) if args.cache else set()
    except (OSError, ValueError) as error:  # a missing file, a line that is not JSON
        parser.error(f"cannot read {getattr(error, 'filename', None) or 'the log'}: {error}")
    for entry in entries:
        for o in entry["ops"]:
            name = module(o["call"], args.all)
            if name:
                per_test[entry["test"].split("[")[0]].add(name)
                calls[name] += 1
    modules = set(calls)
    families = Counter(name.split("_")[1] for name in modules)
    pairs = {re.sub(r"_m\d+|_n\d+", "", name) for name in modules}
    print(f"{len(modules)} modules predicted ({dict(families)}), "
          f"{len(pairs)} without their row tile")
    if args.by_test:
        for test, names in sorted(per_test.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(names):4d}  {test}")
    if args.cache:
        # Only the matmul families are predicted (the others, gathers and
        # mx.compile's fused graphs, compile in about a second).
        real = {name for name in every if name.startswith(MATMUL_FAMILIES)}
        print(f"{len(every)} in {args.cache}, {len(real)} matmuls; predicted and there: {len(real & modules)}; "
              f"there only: {len(real - modules)}; predicted only: {len(modules - real)}")
        for name in sorted(real - modules)[:20]:
            print(f"  there only: {name}")


if __name__ == "__main__":
    main()
