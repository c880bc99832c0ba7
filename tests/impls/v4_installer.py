"""A fused gate+up installer written for DeepSeek-V4 checkpoints alone.

It fuses quantized (any mode) or dense experts without linear biases, and
declines, by raising NotImplementedError, what no DeepSeek-V4 checkpoint
holds: linear biases on the experts, an nvfp4 global scale.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class GateUp(nn.Module):
    def __init__(self, weight, scales=None, biases=None, fmt=None):
        super().__init__()
        self.weight = weight
        if scales is not None:
            self.scales = scales
        if biases is not None:
            self.biases = biases
        self.fmt = fmt  # (mode, bits, group_size) or None

    def __call__(self, x, indices, sorted_indices):
        if self.fmt is None:
            return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices,
                                sorted_indices=sorted_indices)
        mode, bits, group = self.fmt
        return mx.gather_qmm(x, self.weight, self.scales, self.get("biases"),
                             rhs_indices=indices, transpose=True, group_size=group, bits=bits,
                             mode=mode, sorted_indices=sorted_indices)


class V4FusedExperts(nn.Module):
    def __init__(self, gate_up, down_proj, activation):
        super().__init__()
        self.gate_up = gate_up
        self.down_proj = down_proj
        self.activation = activation

    def __call__(self, x, indices):
        x = mx.expand_dims(x, (-2, -3))
        sort = indices.size >= 64  # mlx-lm's SwitchGLU's rule
        idx, back = indices, None
        if sort:
            flat = indices.flatten()
            order = mx.argsort(flat)
            back = mx.argsort(order)
            x = x.flatten(0, -3)[order // indices.shape[-1]]
            idx = flat[order]
        y = self.gate_up(x, idx, sort)
        half = y.shape[-1] // 2
        y = self.down_proj(self.activation(y[..., :half], y[..., half:]), idx,
                           sorted_indices=sort)
        if sort:
            y = mx.unflatten(y[back], 0, indices.shape)
        return y.squeeze(-2)


def install(switch_glu):
    gate, up = switch_glu.gate_proj, switch_glu.up_proj
    if "bias" in gate or "bias" in up or "bias" in switch_glu.down_proj:
        raise NotImplementedError("experts with a linear bias are not fused")
    if "global_scale" in gate:
        raise NotImplementedError("nvfp4 experts with a global scale are not fused")
    fmt = (gate.mode, gate.bits, gate.group_size) if "scales" in gate else None
    arrays = {k: mx.concatenate([up[k], gate[k]], axis=1)
              for k in ("weight", "scales", "biases") if k in up}
    mx.eval(list(arrays.values()))
    fused = V4FusedExperts(GateUp(fmt=fmt, **arrays), switch_glu.down_proj,
                           switch_glu.activation)
    del switch_glu["gate_proj"], switch_glu["up_proj"]
    return fused
