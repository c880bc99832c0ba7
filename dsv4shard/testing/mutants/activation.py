"""Known-bad clipped SwiGLUs, in MLX (for the block) and NumPy (for the
reference's own edge properties).  Each stands for a bug seen in ports."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import reference as ref
from dsv4shard.activation import ClippedSwiGLU
from dsv4shard.block import MoEBlock
from dsv4shard.weights import build_block

# --- MLX activations, called as activation(up, gate) ------------------------


class ClipAfterSilu(ClippedSwiGLU):
    """Clips silu(gate) instead of gate: the clip applied after the
    nonlinearity (both clips must come before silu)."""

    def __call__(self, up, gate):
        dtype = up.dtype
        h, up = nn.silu(gate.astype(mx.float32)), up.astype(mx.float32)
        if self.limit > 0:
            h, up = mx.minimum(h, self.limit), mx.clip(up, -self.limit, self.limit)
        return (h * up).astype(dtype)


class TwoSidedGateClip(ClippedSwiGLU):
    """Clips gate to [-L, L] (copying up's clip), where DeepSeek clips gate
    from above only: wrong for gate < -L."""

    def clip(self, gate, up):
        if self.limit > 0:
            gate, up = mx.clip(gate, -self.limit, self.limit), mx.clip(up, -self.limit, self.limit)
        return gate, up


class SwappedArguments(ClippedSwiGLU):
    """Reads its arguments as (gate, up) while SwitchGLU passes (up, gate)."""

    def __call__(self, up, gate):
        return super().__call__(gate, up)


class NoUpClip(ClippedSwiGLU):
    """Clips gate from above but lets up through unclipped (the up clip
    forgotten)."""

    def clip(self, gate, up):
        if self.limit > 0:
            gate = mx.minimum(gate, self.limit)
        return gate, up


class LimitNotHonoured(ClippedSwiGLU):
    """Clips to |limit| whatever its sign: limit <= 0 should disable the
    clip (0 then zeroes every output, -1 clips to 1)."""

    def clip(self, gate, up):
        limit = abs(self.limit)
        return mx.minimum(gate, limit), mx.clip(up, -limit, limit)


class SkipsClipInBFloat16(ClippedSwiGLU):
    """Skips both clips when its inputs are bfloat16 (a dtype-gated path,
    say a fast kernel taken only for bfloat16, that forgot the clip)."""

    def clip(self, gate, up):
        return (gate, up) if self.skip else super().clip(gate, up)

    def __call__(self, up, gate):
        self.skip = up.dtype == mx.bfloat16
        return super().__call__(up, gate)


def _with_routed_activation(block, activation):
    block.switch_mlp.activation = activation(block.config.swiglu_limit)
    return block


def build_clip_after_silu(config, weights, quant, dtype):
    """Clip after silu: the MLX routed experts clip silu(gate), not gate."""
    return _with_routed_activation(build_block(config, weights, quant, dtype), ClipAfterSilu)


def build_two_sided_gate_clip(config, weights, quant, dtype):
    """Two-sided gate clip: the MLX routed experts clip gate to [-L, L]."""
    return _with_routed_activation(build_block(config, weights, quant, dtype),
                                   TwoSidedGateClip)


def build_swapped_arguments(config, weights, quant, dtype):
    """Arguments swapped: the MLX routed experts' activation reads (gate, up)."""
    return _with_routed_activation(build_block(config, weights, quant, dtype),
                                   SwappedArguments)


def build_no_up_clip(config, weights, quant, dtype):
    """No up clip: the MLX routed experts never clip up."""
    return _with_routed_activation(build_block(config, weights, quant, dtype), NoUpClip)


def build_limit_not_honoured(config, weights, quant, dtype):
    """Limit <= 0 not honoured: the MLX routed experts clip to |limit| anyway."""
    return _with_routed_activation(build_block(config, weights, quant, dtype),
                                   LimitNotHonoured)


def build_bf16_skips_clip(config, weights, quant, dtype):
    """Clip skipped in bfloat16: the MLX routed experts clip nothing when their inputs are bfloat16."""
    return _with_routed_activation(build_block(config, weights, quant, dtype),
                                   SkipsClipInBFloat16)


# --- the same bugs under TF32 ----------------------------------------------------
#
# MLX's CUDA build runs float32 matmuls in TF32 (operands rounded to 10
# bits), and the bound follows it there (tolerance.TF32): these blocks do
# the same on any backend, rounding x and the dense weights to TF32, and say
# so (``float32_matmul``), so the property judges them with the TF32 bound.


def round_to_tf32(a: mx.array) -> mx.array:
    """float32 values rounded to TF32's 10-bit mantissa (to nearest even, as
    MLX's CUDA build rounds its matmul operands)."""
    bits = np.array(a.astype(mx.float32)).view(np.uint32).astype(np.uint64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return mx.array(bits.astype(np.uint32).view(np.float32))


class TF32Block(MoEBlock):
    """The block with its float32 matmul operands in TF32: x rounded on the
    way in (the dense weights are rounded when built)."""

    float32_matmul = "tf32"

    def __call__(self, x, input_ids=None):
        if x.dtype == mx.float32:
            x = round_to_tf32(x)
        return super().__call__(x, input_ids)


def under_tf32(block):
    """``block`` computing its float32 matmuls in TF32, and saying so."""
    for module in (block.switch_mlp, block.shared_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            layer = module[name]
            if "scales" not in layer and layer.weight.dtype == mx.float32:
                layer.weight = round_to_tf32(layer.weight)
    block.gate.weight = round_to_tf32(block.gate.weight)
    block.__class__ = TF32Block
    return block


def build_clip_after_silu_tf32(config, weights, quant, dtype):
    """Clip after silu, under TF32: the MLX routed experts clip silu(gate), float32 matmuls in TF32."""
    return under_tf32(build_clip_after_silu(config, weights, quant, dtype))


def build_two_sided_gate_clip_tf32(config, weights, quant, dtype):
    """Two-sided gate clip, under TF32: gate clipped to [-L, L], float32 matmuls in TF32."""
    return under_tf32(build_two_sided_gate_clip(config, weights, quant, dtype))


# --- NumPy twins of reference.clipped_swiglu ---------------------------------


def clipped_swiglu_after_silu(gate, up, limit):
    """Clip after silu: the clip applied to silu(gate) rather than to gate."""
    h = ref.silu(gate)
    if limit > 0:
        h, up = np.minimum(h, limit), np.clip(up, -limit, limit)
    return h * up


def clipped_swiglu_two_sided_gate(gate, up, limit):
    """Two-sided gate clip: gate clipped to [-L, L], not from above only."""
    if limit > 0:
        gate, up = np.clip(gate, -limit, limit), np.clip(up, -limit, limit)
    return ref.silu(gate) * up


def clipped_swiglu_no_up_clip(gate, up, limit):
    """No up clip: only gate is clipped; up passes unclipped."""
    if limit > 0:
        gate = np.minimum(gate, limit)
    return ref.silu(gate) * up


def clipped_swiglu_limit_always(gate, up, limit):
    """limit <= 0 not honoured: clips to |limit| whatever its sign."""
    limit = abs(limit)
    return ref.silu(np.minimum(gate, limit)) * np.clip(up, -limit, limit)


def clipped_swiglu_swapped(gate, up, limit):
    """Arguments swapped: clips and gates the wrong projection."""
    return ref.clipped_swiglu(up, gate, limit)
