"""Bytes held by a Flash-shaped layer's routed experts before, during and
after fusing gate+up, with our installer and with a leaky one.

    python benchmarks/fusion_memory.py [--hidden 4096 --intermediate 2048 --experts 16
                                        --mode mxfp4 --group 32 --bits 4]

DeepSeek-V4-Flash has D = 4096, I = 2048 and 256 experts; 16 experts keep
the layer at about 200 MiB of mxfp4.  "parameters()" is what the module
reports (the bytes ``nbytes``/``save_weights`` see); "active" is MLX's
allocator (``mx.get_active_memory``), which also sees arrays that a module
hides from parameters(); "peak" is ``mx.get_peak_memory`` during install
(reset just before), all less the active memory before the layer was built.
"""

from __future__ import annotations

import argparse
import gc
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from dsv4shard.activation import ClippedSwiGLU
from dsv4shard.fuse import apply_installer, install_fused
from dsv4shard.testing.mutants.fusion import keeps_unfused_alive

MIB = 2**20


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def quantized_projection(a, rows: int, cols: int, seed: int) -> QuantizedSwitchLinear:
    """A QuantizedSwitchLinear of random weights [E, rows, cols], quantized
    expert by expert (its own constructor would quantize a throwaway too)."""
    layer = QuantizedSwitchLinear.__new__(QuantizedSwitchLinear)
    nn.Module.__init__(layer)
    layer.group_size, layer.bits, layer.mode = a.group, a.bits, a.mode
    parts = []
    for e in range(a.experts):
        w = mx.random.normal((rows, cols), key=mx.random.key(seed * 1000 + e)) * cols**-0.5
        parts.append(mx.quantize(w, a.group, a.bits, mode=a.mode))
        mx.eval(parts[-1])
    layer.weight = mx.stack([q[0] for q in parts])
    layer.scales = mx.stack([q[1] for q in parts])
    layer.biases = mx.stack([q[2] for q in parts]) if len(parts[0]) > 2 else None
    layer.global_scale = None
    del parts
    mx.eval(layer.parameters())
    layer.freeze()
    return layer


def make_layer(a) -> SwitchGLU:
    """A quantized SwitchGLU of random weights (its float init is never
    evaluated: every projection is replaced first)."""
    layer = SwitchGLU(a.hidden, a.intermediate, a.experts, activation=ClippedSwiGLU(10.0))
    shapes = {"gate_proj": (a.intermediate, a.hidden), "up_proj": (a.intermediate, a.hidden),
              "down_proj": (a.hidden, a.intermediate)}
    for seed, (name, (rows, cols)) in enumerate(shapes.items()):
        layer[name] = quantized_projection(a, rows, cols, seed)
        gc.collect()
        mx.clear_cache()
    return layer


def measure(installer, a, baseline: int) -> dict:
    layer = make_layer(a)
    gc.collect()
    mx.clear_cache()
    row = {"before": nbytes(layer), "active_before": mx.get_active_memory() - baseline}
    mx.reset_peak_memory()
    start = time.perf_counter()
    fused = apply_installer(installer, layer)
    del layer  # the caller drops the SwitchGLU it replaced
    gc.collect()
    row["seconds"] = time.perf_counter() - start
    row["peak"] = mx.get_peak_memory() - baseline
    row["after"] = nbytes(fused)
    row["active_after"] = mx.get_active_memory() - baseline
    del fused
    gc.collect()
    mx.clear_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--mode", default="mxfp4")
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--bits", type=int, default=4)
    a = p.parse_args(argv)
    mx.set_cache_limit(0)  # no reuse of larger cached buffers: exact byte counts
    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    rows = {"ours (install_fused)": measure(install_fused, a, baseline),
            "leaky (keeps_unfused_alive)": measure(keeps_unfused_alive, a, baseline)}
    print(f"routed experts D={a.hidden} I={a.intermediate} E={a.experts} {a.mode} "
          f"group {a.group} {a.bits}-bit, on {mx.default_device()} (MiB)\n")
    head = ("installer", "parameters() before", "parameters() after", "active before",
            "peak during install", "active after", "after / before", "install s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, r in rows.items():
        cells = [name, f"{r['before'] / MIB:.1f}", f"{r['after'] / MIB:.1f}",
                 f"{r['active_before'] / MIB:.1f}", f"{r['peak'] / MIB:.1f}",
                 f"{r['active_after'] / MIB:.1f}",
                 f"{r['active_after'] / r['active_before']:.2f}x", f"{r['seconds']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    ours = rows["ours (install_fused)"]
    per_projection = ours["before"] / 3
    print(f"\none projection (gate, up or down): {per_projection / MIB:.1f} MiB; the peak "
          f"holds the unfused gate+up and their fused copy at once "
          f"({(ours['peak'] - ours['active_before']) / MIB:.1f} MiB above the layer).")


if __name__ == "__main__":
    main()
