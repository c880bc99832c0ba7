"""Known-bad shared experts (SPEC §1, "Shared expert"), MLX side.

The shared expert is summed once into every token's output, and clipped
with the routed experts' limit under the later revision of DeepSeek's code
(not in the first release).  The third bug of its class, a shared expert
summed on every rank, is ``sharding.shard_shared_left_whole``.
"""

from __future__ import annotations

import mlx.core as mx

from dsv4shard.activation import ClippedSwiGLU
from dsv4shard.block import SharedExpert
from dsv4shard.weights import build_block


class SharedExpertDropped(SharedExpert):
    """Contributes nothing: the block returns the routed experts alone."""

    def __call__(self, x):
        return mx.zeros_like(x)


def build_shared_unclipped(config, weights, quant, dtype):
    """Shared expert unclipped under the later revision (shared-clipped).

    The first release's rule kept where the layer says shared-clipped."""
    block = build_block(config, weights, quant, dtype)
    block.shared_experts.activation = ClippedSwiGLU(0.0)
    return block


def build_shared_dropped(config, weights, quant, dtype):
    """Shared expert dropped: never added to the routed output."""
    block = build_block(config, weights, quant, dtype)
    block.shared_experts.__class__ = SharedExpertDropped
    return block
