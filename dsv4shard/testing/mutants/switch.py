"""Known-bad SwitchGLUs: the sort / unsort machinery gone wrong."""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.switch_layers import SwitchGLU

from dsv4shard.weights import build_block


class SwitchGLUNoUnsort(SwitchGLU):
    """Sorts tokens by expert once indices.size >= 64, but never scatters the
    results back: outputs come out in expert order, not token order."""

    def __call__(self, x, indices):
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= 64
        idx = indices
        if do_sort:
            order = mx.argsort(indices.flatten())
            x = x.flatten(0, -3)[order // indices.shape[-1]]
            idx = indices.flatten()[order]
        h = self.activation(self.up_proj(x, idx, sorted_indices=do_sort),
                            self.gate_proj(x, idx, sorted_indices=do_sort))
        y = self.down_proj(h, idx, sorted_indices=do_sort)
        if do_sort:
            y = mx.unflatten(y, 0, indices.shape)
        return y.squeeze(-2)


def build_no_unsort(config, weights, quant, dtype):
    """No unsort: SwitchGLU sorts tokens by expert and never unsorts them."""
    block = build_block(config, weights, quant, dtype)
    block.switch_mlp.__class__ = SwitchGLUNoUnsort
    return block
