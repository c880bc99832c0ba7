"""Fused against unfused MoE experts: latency, launches, bytes, bandwidth
against the backend's measured peak, and memory held (``dsv4shard bench``).

The layer is Flash-shaped (D = 4096, I = 2048, k = 6) with random codes and
scales built directly in their packed form, so no float32 copy of the
experts ever exists: E = 256 fits a GPU, and a CPU run uses fewer experts.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from functools import partial

import mlx.core as mx
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from dsv4shard import backend
from dsv4shard.activation import ClippedSwiGLU
from dsv4shard.attribution import unrecorded
from dsv4shard.fuse import install_fused
from reference.quantization import QuantFormat

FORMATS = {
    "mxfp4-g32": QuantFormat("mxfp4", 32, 4),
    "affine-g64-b4": QuantFormat("affine", 64, 4),
    "affine-g64-b6": QuantFormat("affine", 64, 6),
}
DECODE_TOKENS = (1, 2, 4, 8)
PREFILL_TOKENS = 512


def random_quantized(experts: int, out_dims: int, in_dims: int, fmt: QuantFormat, key):
    """A QuantizedSwitchLinear holding random codes and plausible scales."""
    layer = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
    QuantizedSwitchLinear.__base__.__init__(layer)
    layer.group_size, layer.bits, layer.mode = fmt.group_size, fmt.bits, fmt.mode
    k1, k2 = mx.random.split(key)
    words = in_dims * fmt.bits // 32
    layer.weight = mx.random.randint(0, 2**31 - 1, (experts, out_dims, words), key=k1).astype(
        mx.uint32)
    groups = in_dims // fmt.group_size
    if fmt.mode == "affine":
        layer.scales = (mx.random.uniform(0.5, 1.5, (experts, out_dims, groups), key=k2)
                        * (2.0 / (in_dims**0.5 * 2**fmt.bits))).astype(mx.bfloat16)
        layer.biases = (-layer.scales.astype(mx.float32) * 2 ** (fmt.bits - 1)).astype(
            mx.bfloat16)
    else:  # e8m0 codes near 2^-6: elements of order 1/sqrt(in_dims)
        layer.scales = mx.random.randint(118, 124, (experts, out_dims, groups), key=k2).astype(
            mx.uint8)
        layer.biases = None
    layer.global_scale = None
    layer.freeze()
    return layer


def flash_layer(experts: int, fmt: QuantFormat, hidden=4096, inter=2048, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    glu = SwitchGLU(8, 8, 1, activation=ClippedSwiGLU(10.0))
    glu.gate_proj = random_quantized(experts, inter, hidden, fmt, keys[0])
    glu.up_proj = random_quantized(experts, inter, hidden, fmt, keys[1])
    glu.down_proj = random_quantized(experts, hidden, inter, fmt, keys[2])
    mx.eval(glu.parameters())
    return glu


def nbytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def expert_bytes(module, experts: int) -> float:
    return nbytes(module) / experts


def time_call(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Primitives that only re-describe an array (no kernel runs for them).
VIEW_OPS = {"Reshape", "ExpandDims", "Squeeze", "Broadcast", "Flatten", "Unflatten",
            "StopGradient", "Split", "Slice"}


def launches(fn) -> tuple[int, int]:
    """(kernel-launching primitives, gather matmuls) in the graph of one call,
    read from MLX's own graph export; inputs are evaluated first, so only
    the layer's operations count."""
    import re

    out = fn()
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, out)
        ops = re.findall(r'label ="(\w+)", shape=rectangle', f.read())
    kernels = [op for op in ops if op not in VIEW_OPS]
    return len(kernels), sum(op.startswith("Gather") and "MM" in op.upper() for op in kernels)


def measured_peak_bandwidth() -> float:
    """Bytes per second of a streaming reduction over a 1 GiB array: the
    backend's own roofline for reading weights."""
    a = mx.ones((256, 1024, 1024), dtype=mx.float32)
    mx.eval(a)
    seconds = time_call(partial(mx.sum, a), repeats=5)
    del a
    gc.collect()
    return 256 * 1024 * 1024 * 4 / seconds


def touched_experts(indices: mx.array) -> int:
    return len(set(mx.array(indices).flatten().tolist()))


def active_after(make) -> tuple[object, int]:
    """(what ``make()`` returns, the active bytes it holds once garbage is
    collected and MLX's buffer cache is emptied)."""
    with unrecorded():
        return _active_after(make)


def _active_after(make) -> tuple[object, int]:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    out = make()
    gc.collect()
    mx.clear_cache()
    return out, mx.get_active_memory() - base


def memory_held(name: str, fmt: QuantFormat, experts: int) -> dict:
    """Bytes the MoE weights hold unfused, fused by ours, fused by a leaky
    installer that keeps the old gate/up alive, and the extra peak while
    installing (the unfused pair and its concatenation coexist)."""
    from dsv4shard.testing.mutants.fusion import keeps_unfused_alive

    with unrecorded():  # the attribution's record would hold arrays alive
        return _memory_held(name, fmt, experts, keeps_unfused_alive)


def _memory_held(name: str, fmt: QuantFormat, experts: int, keeps_unfused_alive) -> dict:
    layer, unfused = active_after(lambda: flash_layer(experts, fmt))
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    fused = install_fused(layer)
    del layer
    peak_extra = mx.get_peak_memory() - start
    gc.collect()
    mx.clear_cache()
    fused_held = mx.get_active_memory() - start + unfused
    del fused
    leaky, leaky_held = active_after(
        lambda: keeps_unfused_alive(flash_layer(experts, fmt)))
    del leaky
    gc.collect()
    return {"format": name, "unfused_mb": unfused / 1e6, "fused_mb": fused_held / 1e6,
            "leaky_mb": leaky_held / 1e6, "install_peak_extra_mb": peak_extra / 1e6}


@dataclass
class Row:
    format: str
    tokens: int
    phase: str
    unfused_ms: float
    fused_ms: float
    ratio: float
    unfused_launches: int
    fused_launches: int
    unfused_matmuls: int
    fused_matmuls: int
    weight_mb: float
    unfused_gbps: float
    fused_gbps: float
    peak_gbps: float


def activation_dtype():
    """bfloat16, as models run; float32 on MLX's CPU build, whose half-precision
    gather_qmm is 8-35x slower than its float32 one (SPEC §2)."""
    return mx.float32 if backend.name() == "cpu" else mx.bfloat16


def bench_format(name: str, fmt: QuantFormat, experts: int, repeats: int,
                 prefill_repeats: int, peak: float, tokens=None,
                 progress=None) -> tuple[list[Row], dict]:
    dtype = activation_dtype()
    memory = memory_held(name, fmt, experts)
    glu = flash_layer(experts, fmt)
    per_expert = expert_bytes(glu, experts)
    fused = install_fused(flash_layer(experts, fmt))  # a twin of the same sizes
    rows = []
    key = mx.random.key(1)
    for t in tokens or (*DECODE_TOKENS, PREFILL_TOKENS):
        if progress:
            progress(f"bench: {name}, {t} token{'s' * (t != 1)}")
        x = (mx.random.normal((t, 4096), key=key) * 0.1).astype(dtype)
        idx = mx.random.randint(0, experts, (t, 6), key=key).astype(mx.uint32)
        mx.eval(x, idx)
        reps = repeats if t <= max(DECODE_TOKENS) else prefill_repeats
        unfused_call, fused_call = partial(glu, x, idx), partial(fused, x, idx)
        unfused_s = time_call(unfused_call, reps)
        fused_s = time_call(fused_call, reps)
        weight = touched_experts(idx) * per_expert
        (ul, um), (fl, fm) = launches(unfused_call), launches(fused_call)
        rows.append(Row(name, t, "decode" if t <= max(DECODE_TOKENS) else "prefill",
                        unfused_s * 1e3, fused_s * 1e3, fused_s / unfused_s,
                        ul, fl, um, fm,
                        weight / 1e6, weight / unfused_s / 1e9, weight / fused_s / 1e9,
                        peak / 1e9))
    del glu, fused
    gc.collect()
    return rows, memory


def markdown(rows: list[Row], memory: list[dict], device: str) -> str:
    out = [f"Device: {device}", "",
           "| format | T | phase | unfused ms | fused ms | fused/unfused | kernels (unfused/fused) "
           "| gather matmuls | weights read MB | GB/s (unfused/fused) | peak GB/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.format} | {r.tokens} | {r.phase} | {r.unfused_ms:.3f} | "
                   f"{r.fused_ms:.3f} | {r.ratio:.3f} | {r.unfused_launches}/{r.fused_launches} | "
                   f"{r.unfused_matmuls}/{r.fused_matmuls} | "
                   f"{r.weight_mb:.1f} | {r.unfused_gbps:.2f}/{r.fused_gbps:.2f} | "
                   f"{r.peak_gbps:.2f} |")
    out += memory_table(memory)
    return "\n".join(out)


def memory_table(memory: list[dict]) -> list[str]:
    out = ["", "| format | MoE weights held unfused MB | fused MB | leaky fusion MB "
           "| extra peak during install MB |", "|---|---|---|---|---|"]
    for m in memory:
        out.append(f"| {m['format']} | {m['unfused_mb']:.1f} | {m['fused_mb']:.1f} | "
                   f"{m['leaky_mb']:.1f} | {m['install_peak_extra_mb']:.1f} |")
    return out


def device_name() -> str:
    name = backend.name()
    if name == "cuda":
        try:
            info = mx.device_info()
            return f"cuda: {info.get('device_name', 'GPU')}"
        except Exception:  # older mlx: no device_info
            return "cuda"
    return f"{name}: {platform.processor() or platform.machine()}"


def plot(rows: list[Row], path: str, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r.format for r in rows):
        mine = [r for r in rows if r.format == name]
        ts = [r.tokens for r in mine]
        ax.plot(ts, [r.unfused_ms for r in mine], "o-", label=f"{name} unfused")
        ax.plot(ts, [r.fused_ms for r in mine], "s--", label=f"{name} fused")
        ax.plot(ts, [r.weight_mb * 1e6 / (r.peak_gbps * 1e9) * 1e3 for r in mine], ":",
                color="gray", label=f"{name} roofline (bytes / peak)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens T")
    ax.set_ylabel("latency per MoE layer (ms)")
    ax.set_title(f"Fused vs unfused experts, D=4096 I=2048 k=6 ({device})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(experts: int | None = None, repeats: int = 20, prefill_repeats: int = 5,
        formats=None, json_path=None, markdown_path=None, plot_path=None, tokens=None,
        progress=None) -> str:
    if experts is None:
        experts = 256 if backend.name() != "cpu" else 32
    device = device_name()
    peak = measured_peak_bandwidth()
    rows, memory = [], []
    for name in formats or FORMATS:
        r, m = bench_format(name, FORMATS[name], experts, repeats, prefill_repeats, peak,
                            tokens, progress)
        rows += r
        memory.append(m)
    table = markdown(rows, memory, f"{device}, E={experts}, activations "
                     f"{str(activation_dtype()).split('.')[-1]}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"device": device, "experts": experts, "rows": [asdict(r) for r in rows],
                       "memory": memory}, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(table + "\n")
    if plot_path:
        plot(rows, plot_path, device)
    return table


# ``--quick``: one format, a few experts and repeats, decode only: under a
# minute on two CPU cores.
QUICK = {"experts": 8, "repeats": 3, "prefill_repeats": 1, "tokens": "1,8",
         "formats": ["mxfp4-g32"]}
DEFAULTS = {"experts": None, "repeats": 20, "prefill_repeats": 5, "tokens": None,
            "formats": None}


def add_arguments(parser) -> None:
    parser.add_argument("--experts", type=int, help="routed experts (default 256; 32 on CPU)")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                        help="timed decode calls per point")
    parser.add_argument("--prefill-repeats", type=int, default=DEFAULTS["prefill_repeats"])
    parser.add_argument("--tokens", default=None, metavar="T,T,...",
                        help=f"token counts to time (default "
                             f"{','.join(map(str, (*DECODE_TOKENS, PREFILL_TOKENS)))}; up to "
                             f"{max(DECODE_TOKENS)} counts as decode, e.g. --tokens 1,2,8 for "
                             f"decode only)")
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), help="default: all")
    parser.add_argument("--quick", action="store_true",
                        help="a preset that finishes in under a minute on 2 CPU cores "
                             "(mxfp4, 8 experts, 3 repeats, T = 1 and 8)")
    parser.add_argument("--json", help="write the figures as JSON")
    parser.add_argument("--markdown", help="write the table as Markdown")
    parser.add_argument("--plot", help="write a PNG of latency against T with the roofline "
                                       "(needs the plot extra: pip install 'dsv4shard[plot]')")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the bytes held: unfused, fused, leaky fusion, install peak")


def parse_tokens(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--tokens {text!r}: expected comma-separated whole numbers") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--tokens {text!r}: every token count must be at least 1")
    return counts


def validate(args) -> str | None:
    """The first problem with the arguments, in one line, or None."""
    import importlib.util
    import os

    if args.quick:  # the preset fills what the command line left at its default
        for key, value in QUICK.items():
            if getattr(args, key) == DEFAULTS[key]:
                setattr(args, key, value)
    if args.experts is not None and args.experts < 1:
        return f"--experts {args.experts}: at least 1 expert"
    if args.repeats < 1 or args.prefill_repeats < 1:
        return "--repeats and --prefill-repeats must be at least 1"
    if args.tokens is not None:
        try:
            args.tokens = parse_tokens(args.tokens)
        except ValueError as error:
            return str(error)
    for option in ("json", "markdown", "plot"):
        path = getattr(args, option)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return f"--{option} {path}: its folder does not exist"
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'dsv4shard[plot]'"
    return None


def main(args) -> int:
    import sys

    problem = validate(args)
    if problem:
        print(f"dsv4shard bench: {problem}", file=sys.stderr)
        return 2

    def progress(line):
        print(line, file=sys.stderr, flush=True)

    if args.memory_only:
        experts = args.experts or (256 if backend.name() != "cpu" else 32)
        print(f"Device: {device_name()}, E={experts}")
        print("\n".join(memory_table([memory_held(n, FORMATS[n], experts)
                                       for n in args.formats or FORMATS])))
        return 0
    print(run(args.experts, args.repeats, args.prefill_repeats, args.formats, args.json,
              args.markdown, args.plot, args.tokens, progress))
    return 0


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
