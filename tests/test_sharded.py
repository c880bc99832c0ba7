"""MoE-only tensor parallelism: virtual ranks in one process, real ranks in
separate processes (ring backend on localhost)."""

import pytest
from hypothesis import given

from dsv4shard.testing import strategies as s
from dsv4shard.testing.properties import sharded


@given(case=s.shard_cases())
def test_sharded_matches_unsharded(case, shard_impl):
    sharded.sharded_matches_unsharded(case, shard=shard_impl)


@given(case=s.shard_cases())
def test_shard_holds_its_slice(case, shard_impl):
    sharded.shard_holds_its_slice(case, shard=shard_impl)


@given(case=s.global_scale_shard_cases())
def test_shard_keeps_global_scale_whole(case, shard_impl):
    # Structural, so it runs on every backend, the CPU build included.
    sharded.shard_holds_its_slice(case, shard=shard_impl)


@pytest.mark.distributed
def test_real_ranks_match_unsharded(rank_pool, shard_impl):
    @given(case=s.shard_cases(ranks=rank_pool.size))
    def run(case):
        sharded.real_ranks_match_unsharded(case, shard=shard_impl, pool=rank_pool)

    run()


def test_refusals_name_the_problem_before_touching_weights():
    """Indivisible sizes and an already-fused block are refused with a clear
    error, and the block is left as it was."""
    import mlx.core as mx

    from dsv4shard.fuse import fuse_block
    from dsv4shard.shard import ShardingError, VirtualGroup, shard
    from dsv4shard.testing import data
    from dsv4shard.weights import build_block
    from reference import MoEConfig
    from reference.quantization import QuantFormat

    case = s.MoECase(MoEConfig(64, 96, 4, 2), QuantFormat("affine", 32, 4), "float32", 4,
                     "router", 1.0, 0)
    block = build_block(case.config, data.make_weights(case), case.quant, case.dtype)
    before = mx.array(block.switch_mlp.gate_proj.weight)
    with pytest.raises(ShardingError, match=r"intermediate size 96 is not divisible by 5"):
        shard(block, VirtualGroup(0, 5))
    with pytest.raises(ShardingError, match=r"3 groups of group size 32.*not divisible by 2"):
        shard(block, VirtualGroup(0, 2))
    assert mx.array_equal(block.switch_mlp.gate_proj.weight, before)
    fuse_block(block)
    with pytest.raises(ShardingError, match="fuse AFTER sharding"):
        shard(block, VirtualGroup(0, 3))
