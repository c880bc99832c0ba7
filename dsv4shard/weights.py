"""Weights both ways between ``reference.MoEWeights`` and MLX modules.

Into MLX: float64 reference weights become float32 module weights, then
(optionally) a quantization format and an activation dtype are applied.
Out of MLX: module weights are read back through ``reference.dequantize``, so
the reference runs on exactly the values the kernels see.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dsv4shard.block import MoEBlock
from reference.moe_block import MoEConfig, MoEWeights
from reference.names import mlx_name
from reference.quantization import QuantFormat, dequantize

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

EXPERT_WEIGHTS = ("w1", "w3", "w2")


def to_numpy(a: mx.array) -> np.ndarray:
    """float64 (or integer) NumPy copy; bfloat16 widens exactly through float32."""
    if mx.issubdtype(a.dtype, mx.floating):
        return np.array(a.astype(mx.float32)).astype(np.float64)
    return np.array(a)


def load_weights(block: MoEBlock, weights: MoEWeights) -> None:
    """Copy reference weights into an unquantized float32 block."""
    block.gate.weight = mx.array(weights.gate, dtype=mx.float32)
    block.gate.bias = mx.array(weights.bias, dtype=mx.float32)
    if block.gate.hash_routing:
        block.gate.tid2eid = mx.array(weights.tid2eid, dtype=mx.int32)
    for name in EXPERT_WEIGHTS:
        block.switch_mlp[mlx_name(name)].weight = mx.array(
            getattr(weights, name), dtype=mx.float32
        )
        bias = getattr(weights, name.replace("w", "b"))
        if bias is not None:
            block.switch_mlp[mlx_name(name)].bias = mx.array(bias, dtype=mx.float32)
        block.shared_experts[mlx_name(name)].weight = mx.array(
            getattr(weights, f"shared_{name}"), dtype=mx.float32
        )


def quantize_experts(block: MoEBlock, fmt: QuantFormat) -> None:
    """Quantize routed and shared experts through mlx's own ``to_quantized``.

    A global scale is per routed expert; the shared expert's plain Linear has
    none, so it takes the same format without it."""
    for name in EXPERT_WEIGHTS:
        proj = mlx_name(name)
        block.switch_mlp[proj] = block.switch_mlp[proj].to_quantized(
            fmt.group_size, fmt.bits, mode=fmt.mode, global_scale=fmt.global_scale
        )
        block.shared_experts[proj] = block.shared_experts[proj].to_quantized(
            fmt.group_size, fmt.bits, mode=fmt.mode
        )


def cast_experts(block: MoEBlock, dtype: str) -> None:
    """Cast the experts' float arrays to ``dtype``; the router stays float32
    and an nvfp4 global scale stays float32, as checkpoints keep them."""
    target = DTYPES[dtype]
    for module in (block.switch_mlp, block.shared_experts):
        for _, leaf in module.named_modules():
            for key, value in list(leaf.items()):
                if (
                    isinstance(value, mx.array)
                    and key != "global_scale"
                    and mx.issubdtype(value.dtype, mx.floating)
                ):
                    leaf[key] = value.astype(target)


def build_block(config: MoEConfig, weights: MoEWeights, quant: QuantFormat | None = None,
                dtype: str = "float32") -> MoEBlock:
    """The unfused MLX block holding ``weights`` in format ``quant`` and ``dtype``."""
    block = MoEBlock(config, linear_bias=weights.b1 is not None)
    load_weights(block, weights)
    if quant is not None:
        quantize_experts(block, quant)
    if dtype != "float32":
        cast_experts(block, dtype)
    mx.eval(block.parameters())
    return block


def format_of(layer) -> QuantFormat | None:
    if not hasattr(layer, "scales"):
        return None
    return QuantFormat(layer.mode, layer.group_size, layer.bits,
                       getattr(layer, "global_scale", None) is not None)


def dense_weight(layer) -> np.ndarray:
    """A (Switch)Linear's weight as float64: scale * q + bias in float32.

    Half-precision scales are exact in float32, so this is the weight the
    format stores; a kernel that dequantizes in half precision rounds it
    further, and that rounding counts as kernel error in the bound."""
    fmt = format_of(layer)
    if fmt is None:
        return to_numpy(layer.weight)
    biases = layer.get("biases")
    global_scale = getattr(layer, "global_scale", None)
    return dequantize(
        np.array(layer.weight),
        to_numpy(layer.scales) if fmt.mode == "affine" else np.array(layer.scales),
        None if biases is None else to_numpy(biases),
        fmt,
        global_scale=None if global_scale is None else to_numpy(global_scale),
    )


def read_weights(block: MoEBlock) -> MoEWeights:
    """The block's weights as the reference sees them (dequantized, float64)."""
    experts = {n: dense_weight(block.switch_mlp[mlx_name(n)]) for n in EXPERT_WEIGHTS}
    biases = {n.replace("w", "b"): to_numpy(block.switch_mlp[mlx_name(n)].bias)
              for n in EXPERT_WEIGHTS if "bias" in block.switch_mlp[mlx_name(n)]}
    shared = {f"shared_{n}": dense_weight(block.shared_experts[mlx_name(n)])
              for n in EXPERT_WEIGHTS}
    tid2eid = np.array(block.gate.tid2eid) if block.gate.hash_routing else None
    return MoEWeights(
        gate=to_numpy(block.gate.weight), bias=to_numpy(block.gate.bias),
        tid2eid=tid2eid, **experts, **shared, **biases,
    )

