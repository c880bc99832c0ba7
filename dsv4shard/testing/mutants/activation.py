"""Known-bad clipped SwiGLUs, in MLX (for the block) and NumPy (for the
reference's own edge properties).  Each stands for a bug seen in ports."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import reference as ref
from dsv4shard.activation import ClippedSwiGLU
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
