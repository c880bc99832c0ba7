"""A tiny mlx-lm DeepSeek-V4.1 model with seeded random weights, and MoE-only
sharding of a whole model: attention replicated, every MoE block's routed
and shared experts split over the ranks, one all_sum per layer."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from dsv4shard.shard import check_shardable_mlps, shard_experts

# The MoE intermediate size, 96, splits over 2, 3, 4, 6 and 8 ranks (``--ranks``).
TINY_V41 = dict(
    vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
    q_lora_rank=32, qk_rope_head_dim=16, o_groups=2, o_lora_rank=32,
    moe_intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, sliding_window=16,
    index_n_heads=2, index_head_dim=16, index_topk=8, hc_mult=2, compress_ratios=(0, 0),
)


def splits_over(ranks: int) -> bool:
    """Whether the tiny model's MoE splits evenly over ``ranks`` ranks."""
    return TINY_V41["moe_intermediate_size"] % ranks == 0


def tiny_v41(seed: int, layers: int = 2, intermediate: int | None = None):
    """mlx_lm.models.deepseek_v41.Model, tiny, every matrix seeded normal/sqrt(fan-in)
    (``intermediate``: another MoE intermediate size than TINY_V41's)."""
    from mlx_lm.models import deepseek_v41

    fields = {**TINY_V41, "num_hidden_layers": layers}
    if intermediate is not None:
        fields["moe_intermediate_size"] = intermediate
    model = deepseek_v41.Model(deepseek_v41.ModelArgs(**fields))
    rng = np.random.default_rng(seed)
    params = []
    for name, value in tree_flatten(model.parameters()):
        if value.ndim >= 2 and mx.issubdtype(value.dtype, mx.floating):
            fan_in = value.shape[-1]
            value = mx.array(rng.normal(0, fan_in**-0.5, value.shape), dtype=value.dtype)
        params.append((name, value))
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


def v41_moe_blocks(model):
    return [layer.mlp for layer in model.layers]


def shard_moe_only(model, group, fuse=None):
    """Shard every MoE block of a deepseek_v41 model for this rank, leaving
    attention whole; then, if given, fuse gate+up on the local slices."""
    size, rank = group.size(), group.rank()
    blocks = v41_moe_blocks(model)
    for moe in blocks:  # every precondition before any weight moves
        check_shardable_mlps([("experts.switch_mlp", moe.experts.switch_mlp),
                              ("shared_experts", moe.shared_experts)], size)
    for moe in blocks:
        shard_experts(moe.experts.switch_mlp, rank, size)
        shard_experts(moe.shared_experts, rank, size)
        moe.sharding_group = group
        if fuse is not None:
            fused = fuse(moe.experts.switch_mlp)
            if fused is not None:
                moe.experts.switch_mlp = fused
    mx.eval(model.parameters())
    return model


def near_ties(seed: int, layers: int, tokens: list[int], intermediate: int | None = None
              ) -> list[str]:
    """The discrete decisions of the unsharded tiny model's forward on
    ``tokens`` that lie near a flip: expert top-k, the indexer's top-k, the
    fp8 rounding of the compressed KV.  Sharding moves the values they see by
    float32 roundings (a different order of additions), so such a decision
    may rightly go the other way on a rank; watched as
    ``dsv4shard.variants.sharded_model.watch_discrete`` watches a variant's
    Model (TIE_ULPS units of u * sqrt(R), R the Model's summed fan-ins)."""
    import math

    from dsv4shard.backend import on_model_device
    from dsv4shard.testing.tolerance import matmul_roundoff
    from dsv4shard.variants.sharded_model import TIE_ULPS, reduction_length, watch_discrete

    with on_model_device():  # where the whole-model comparison runs
        model = tiny_v41(seed, layers, intermediate)
        tau = TIE_ULPS * matmul_roundoff("float32") * math.sqrt(reduction_length(model))
        with watch_discrete(tau) as ties:
            mx.eval(model(mx.array([tokens], dtype=mx.int32)))
    return list(ties)


def discard_near_ties(seed: int, layers: int, tokens: list[int]) -> None:
    """Discard (hypothesis ``assume``) a model case whose unsharded forward
    takes a discrete decision near a flip (:func:`near_ties`), the way the
    block's properties discard near-tied router scores: never tolerated by a
    looser bound."""
    from hypothesis import assume

    assume(not near_ties(seed, layers, tokens))
