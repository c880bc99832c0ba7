"""Known-bad sharding functions, with the contract ``shard(block, group) ->
block`` of ``dsv4shard.shard.shard``; each stands for a bug seen in the wild."""

from __future__ import annotations

import mlx.core as mx

from dsv4shard.block import MoEBlock
from dsv4shard.shard import (
    check_shardable,
    group_size_of,
    shard,
    shard_columns,
    shard_experts,
    shard_rows,
    split_bounds,
)


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


def shard_uneven_down_one_group_off(block, group, weights=None):
    """Uneven split, down one group off: the last rank's down columns start one group early.

    Its gate/up rows are [a, b) of the intermediate dimension, its down_proj
    columns [a - g, b - g), g a quantization group (8 columns when dense):
    every rank holds its share of the bytes, but the last rank's h meets the
    wrong columns of down."""
    size, rank = group.size(), group.rank()
    check_shardable(block, size, weights)
    for mlp in (block.switch_mlp, block.shared_experts):
        inter = mlp.gate_proj.weight.shape[-2]
        rows = split_bounds(inter, size, weights)[rank]
        group_size = group_size_of(mlp.down_proj)
        step = group_size if group_size > 1 else 8
        cols = (rows[0] - step, rows[1] - step) if 0 < rank == size - 1 else rows
        for name in ("gate_proj", "up_proj"):
            shard_rows(mlp[name], rank, size, rows)
        shard_columns(mlp.down_proj, rank, size, cols, inter)
    block.sharding_group = group
    mx.eval(block.parameters())
    return block


def shard_keeps_unsharded_copy(block, group):
    """Unsharded copy kept: each rank holds its slice and the whole routed experts beside it.

    The outputs are right; the memory a rank needs is not cut."""
    import copy

    whole = copy.deepcopy(block.switch_mlp)
    shard(block, group)
    block.unsharded_experts = whole
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

    def uneven():
        return s.shard_cases(uneven=True).filter(lambda c: c.split is not None)

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
        # Linear biases lie beyond DeepSeek-V4's configurations: the extended
        # property draws them.
        Mutant("shard_bias_on_every_rank", p.sharded_matches_unsharded_extended, biased,
               {"shard": shard_bias_on_every_rank}),
        Mutant("shard_bias_on_every_rank_structure", p.shard_holds_its_slice, biased,
               {"shard": shard_bias_on_every_rank}),
        Mutant("shard_rank_dependent_routing", p.real_ranks_match_unsharded, real,
               {"shard": shard_rank_dependent_routing}),
        Mutant("shard_uneven_down_one_group_off", p.sharded_matches_unsharded, uneven,
               {"shard": shard_uneven_down_one_group_off}),
        Mutant("shard_keeps_unsharded_copy", p.shard_holds_its_share, virtual,
               {"shard": shard_keeps_unsharded_copy}),
        Mutant("shard_keeps_unsharded_copy_extended", p.shard_holds_its_share_extended,
               lambda: s.extended_shard_cases().filter(lambda c: c.ranks > 1),
               {"shard": shard_keeps_unsharded_copy}),
        # Runs gather_qmm with a global scale: skips, with the reason, on a
        # backend without it (MLX's CPU build), never passing for a catch.
        Mutant("shard_global_scale_by_expert", p.sharded_matches_unsharded, global_scale,
               {"shard": shard_global_scale_by_expert}),
        # Structural: runs no kernel, so every backend catches it.
        Mutant("shard_global_scale_by_expert_structure", p.shard_holds_its_slice,
               global_scale, {"shard": shard_global_scale_by_expert}),
    ]
