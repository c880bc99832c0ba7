"""DeepSeek-V4's clipped SwiGLU as an MLX module with mlx-lm's call order."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


class ClippedSwiGLU(nn.Module):
    """``activation(up, gate)``: up first, as mlx-lm's SwitchGLU calls it.

    Computed in float32 (DeepSeek's code does the same) and returned in the
    input's dtype.  ``limit <= 0`` disables both clips.
    """

    def __init__(self, limit: float):
        super().__init__()
        self.limit = float(limit)

    def clip(self, gate: mx.array, up: mx.array) -> tuple[mx.array, mx.array]:
        """Both clips, before silu: gate from above only, up on both sides."""
        if self.limit > 0:
            gate = mx.minimum(gate, self.limit)
            up = mx.clip(up, -self.limit, self.limit)
        return gate, up

    def __call__(self, up: mx.array, gate: mx.array) -> mx.array:
        dtype = up.dtype
        gate, up = self.clip(gate.astype(mx.float32), up.astype(mx.float32))
        return (nn.silu(gate) * up).astype(dtype)
