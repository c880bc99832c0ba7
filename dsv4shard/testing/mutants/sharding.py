"""Known-bad sharding functions, with the contract ``shard(block, group) ->
block`` of ``dsv4shard.shard.shard``; each stands for a bug seen in the wild."""

from __future__ import annotations

import mlx.core as mx

from dsv4shard.block import MoEBlock
from dsv4shard.shard import check_shardable, shard, shard_experts, shard_rows


def shard_without_all_sum(block, group):
    """No all_sum: the ranks' partial outputs are never added."""
    shard(block, group)
    block.sharding_group = None
    return block


class TwiceSummed(MoEBlock):
    def __call__(self, x, input_ids=None):
        out = self.partial(x, input_ids)
        out = mx.distributed.all_sum(out, group=self.sharding_group)
        out = mx.distributed.all_sum(out, group=self.sharding_group)
        return out.astype(x.dtype).reshape(x.shape)


def shard_with_two_all_sums(block, group):
    """Two all_sums: one in the MoE wrapper, one in the layer: N times the answer."""
    shard(block, group)
    block.__class__ = TwiceSummed
    return block


def shard_down_wrong_axis(block, group):
    """Wrong axis: down_proj sliced along its output axis, not its input axis."""
    size, rank = group.size(), group.rank()
    check_shardable(block, size)
    for mlp in (block.switch_mlp, block.shared_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            shard_rows(mlp[name], rank, size)
    block.sharding_group = group
    return block


def shard_shared_left_whole(block, group):
    """Shared expert summed on every rank: left whole, yet all_summed.

    Routed experts sharded, the shared expert left whole, yet summed over
    ranks: the shared output counted N times."""
    size, rank = group.size(), group.rank()
    check_shardable(block, size)
    shard_experts(block.switch_mlp, rank, size)
    block.sharding_group = group
    return block


def shard_bias_on_every_rank(block, group):
    """Bias counted N times: down_proj's linear bias kept on every rank."""
    bias = block.switch_mlp.down_proj.get("bias")
    shard(block, group)
    if bias is not None:
        block.switch_mlp.down_proj.bias = bias
    return block


def shard_global_scale_by_expert(block, group):
    """Global scale sliced by expert: nvfp4's per-expert scale split like a weight.

    An nvfp4 global scale (one per expert) sliced along the expert axis as
    if it were a weight."""
    shard(block, group)
    size, rank = group.size(), group.rank()
    for name in ("gate_proj", "up_proj", "down_proj"):
        layer = block.switch_mlp[name]
        scale = getattr(layer, "global_scale", None)
        if scale is not None and scale.ndim and scale.shape[0] >= size:
            n = scale.shape[0] // size
            layer.global_scale = scale[rank * n:(rank + 1) * n]
    return block


def shard_rank_dependent_routing(block, group):
    """Rank-dependent routing: ranks choose different experts.

    Each rank perturbs its own copy of the router (a rank-local bias update)."""
    shard(block, group)
    rank = group.rank()
    if rank:
        e = block.gate.bias.shape[0]
        bump = mx.zeros((e,)).at[rank % e].add(100.0)
        block.gate.bias = block.gate.bias + bump
    return block


def shard_moe_without_all_sum(model, group, fuse=None):
    """A whole model's MoE blocks sharded but their partials never added."""
    from dsv4shard.tiny_model import shard_moe_only, v41_moe_blocks

    shard_moe_only(model, group, fuse)
    for moe in v41_moe_blocks(model):
        moe.sharding_group = None
    return model


def entries():
    from dsv4shard.testing import strategies as s
    from dsv4shard.testing.mutants import Mutant
    from dsv4shard.testing.properties import sharded as p

    def virtual():
        return s.shard_cases()

    def biased():
        return s.shard_cases().filter(lambda c: c.moe.linear_bias and c.ranks > 1)

    def real():
        return s.shard_cases(ranks=2)

    def global_scale():
        from dsv4shard.testing.mutants import expert_per_rank

        return s.global_scale_shard_cases().filter(expert_per_rank)

    return [
        Mutant("shard_no_all_sum", p.real_ranks_match_unsharded, real,
               {"shard": shard_without_all_sum}),
        Mutant("shard_two_all_sums", p.real_ranks_match_unsharded, real,
               {"shard": shard_with_two_all_sums}),
        Mutant("shard_down_wrong_axis", p.sharded_matches_unsharded, virtual,
               {"shard": shard_down_wrong_axis}),
        Mutant("shard_shared_left_whole", p.sharded_matches_unsharded, virtual,
               {"shard": shard_shared_left_whole}),
        Mutant("shard_bias_on_every_rank", p.sharded_matches_unsharded, biased,
               {"shard": shard_bias_on_every_rank}),
        Mutant("shard_bias_on_every_rank_structure", p.shard_holds_its_slice, biased,
               {"shard": shard_bias_on_every_rank}),
        Mutant("shard_rank_dependent_routing", p.real_ranks_match_unsharded, real,
               {"shard": shard_rank_dependent_routing}),
        # Runs gather_qmm with a global scale: skips, with the reason, on a
        # backend without it (MLX's CPU build), never passing for a catch.
        Mutant("shard_global_scale_by_expert", p.sharded_matches_unsharded, global_scale,
               {"shard": shard_global_scale_by_expert}),
        # Structural: runs no kernel, so every backend catches it.
        Mutant("shard_global_scale_by_expert_structure", p.shard_holds_its_slice,
               global_scale, {"shard": shard_global_scale_by_expert}),
    ]
