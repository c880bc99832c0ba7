"""MoE-only tensor parallelism, as ground truth: what rank r of N holds.

Every expert's intermediate dimension I is split in N equal slices: rank r
keeps rows [r*I/N, (r+1)*I/N) of w1 and w3 and the same columns of w2, for
the routed and the shared experts alike.  The router is replicated.  The
ranks' outputs add up to the unsharded block because the clipped SwiGLU acts
on each intermediate unit alone.  A bias on w2's output is added once, so
rank 0 keeps it and the others hold zeros.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reference.moe_block import MoEWeights

__all__ = ["intermediate_slice", "shard_weights"]


def intermediate_slice(intermediate: int, rank: int, size: int) -> slice:
    if intermediate % size:
        raise ValueError(f"intermediate size {intermediate} is not divisible by {size} ranks")
    n = intermediate // size
    return slice(rank * n, (rank + 1) * n)


def shard_weights(weights: MoEWeights, rank: int, size: int) -> MoEWeights:
    """Rank ``rank``'s slice of ``weights`` (router and tid2eid replicated)."""
    s = intermediate_slice(weights.w1.shape[1], rank, size)
    b2 = weights.b2
    if b2 is not None and rank != 0:
        b2 = np.zeros_like(b2)
    return dataclasses.replace(
        weights,
        w1=weights.w1[:, s], w3=weights.w3[:, s], w2=weights.w2[:, :, s],
        shared_w1=weights.shared_w1[s], shared_w3=weights.shared_w3[s],
        shared_w2=weights.shared_w2[:, s],
        b1=None if weights.b1 is None else weights.b1[:, s],
        b3=None if weights.b3 is None else weights.b3[:, s],
        b2=b2,
    )
