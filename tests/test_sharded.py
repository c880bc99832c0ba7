"""MoE-only tensor parallelism: virtual ranks in one process, real ranks in
separate processes (ring backend on localhost).  A sharder under test
(``--shard-impl``) is judged by its outputs and by the bytes each rank
holds; dsv4shard's own slicing convention is checked for its own sharder."""

import mlx.core as mx
import pytest
from hypothesis import strategies as st

from dsv4shard.engine.records import project_properties
from dsv4shard.shard import ShardingError, VirtualGroup, shard, split_bounds
from dsv4shard.testing import data
from dsv4shard.testing import strategies as s
from dsv4shard.testing.properties import sharded
from dsv4shard.weights import build_block
from reference import MoEConfig
from reference.quantization import QuantFormat

VIRTUAL = [r for r in project_properties() if r.keyword == "shard" and r.case == "ShardCase"
           and not r.ranks and r.name != "shard_holds_its_slice"]


@pytest.mark.parametrize("record", VIRTUAL, ids=[r.name for r in VIRTUAL])
def test_sharded_property(record, judge, shard_impl):
    # The extended region draws the largest blocks (groups of 128): fewer examples.
    judge(record.fn, record.cases(), share=0.3 if record.name.endswith("_extended") else None,
          shard=shard_impl)


@pytest.fixture
def own_sharder_only(own_shard_impl):
    if not own_shard_impl:
        pytest.skip("dsv4shard's own layout convention, checked for its own sharder only: "
                    "--shard-impl is judged by its outputs and shard_holds_its_share")


def test_shard_holds_its_slice(judge, own_sharder_only):
    judge(sharded.shard_holds_its_slice, s.shard_cases(uneven=True), share=0.3)


def test_shard_keeps_global_scale_whole(judge, own_sharder_only):
    # Structural, so it runs on every backend, the CPU build included.
    judge(sharded.shard_holds_its_slice, s.global_scale_shard_cases(), share=0.2)


@pytest.mark.distributed
def test_real_ranks_match_unsharded(rank_pool, shard_impl, judge):
    # Each example is a job on every rank (and the virtual ranks above draw
    # the same cases at the full budget): 40% of the profile's examples.
    judge(sharded.real_ranks_match_unsharded, s.v4_shard_cases(ranks=rank_pool.size),
          share=0.4, shard=shard_impl, pool=rank_pool, timeout=None)


def three_to_five(case) -> bool:
    return case.split is not None and case.split[0] * 5 == case.split[1] * 3


@pytest.mark.distributed
def test_real_ranks_uneven_split(rank_pool, shard_impl, judge):
    """3:5 over 2 real ranks (on more, the uneven splits drawn for them)."""
    cases = s.v4_shard_cases(ranks=rank_pool.size)
    if rank_pool.size == 2:
        cases = st.one_of(
            s.shard_cases(ranks=2, quantized=True, formats=s.V4_FORMATS, linear_bias=False,
                          uneven=True),
            s.shard_cases(ranks=2, quantized=False, linear_bias=False, uneven=True),
        ).filter(three_to_five)
    judge(sharded.real_ranks_match_unsharded, cases, share=0.3, shard=shard_impl,
          pool=rank_pool, timeout=None)


AFFINE4 = QuantFormat("affine", 32, 4)


def small_block(inter=96, quant=AFFINE4):
    case = s.MoECase(MoEConfig(64, inter, 4, 2), quant, "float32", 4, "router", 1.0, 0)
    return build_block(case.config, data.make_weights(case), case.quant, case.dtype)


def test_refusals_name_the_problem_before_touching_weights():
    """Indivisible sizes and an already-fused block are refused with a clear
    error, and the block is left as it was."""
    from dsv4shard.fuse import fuse_block

    block = small_block()
    before = mx.array(block.switch_mlp.gate_proj.weight)
    with pytest.raises(ShardingError, match=r"intermediate size 96 is not divisible by 5"):
        shard(block, VirtualGroup(0, 5))
    with pytest.raises(ShardingError, match=r"3 groups of group size 32.*not divisible by 2"):
        shard(block, VirtualGroup(0, 2))
    assert mx.array_equal(block.switch_mlp.gate_proj.weight, before)
    fuse_block(block)
    with pytest.raises(ShardingError, match="fuse AFTER sharding"):
        shard(block, VirtualGroup(0, 3))


def test_uneven_split_takes_group_aligned_slices_and_refuses_others():
    block = small_block(inter=256)
    assert split_bounds(256, 2, (3, 5)) == [(0, 96), (96, 256)]
    local = shard(small_block(inter=256), VirtualGroup(1, 2), weights=(3, 5))
    assert local.switch_mlp.gate_proj.weight.shape[1] == 160
    assert local.switch_mlp.down_proj.scales.shape[-1] == 5  # five groups of 32
    before = mx.array(block.switch_mlp.gate_proj.weight)
    with pytest.raises(ShardingError, match=r"rank 0's columns \[0, 80\).*quantization groups "
                                            r"of 32"):
        shard(block, VirtualGroup(0, 2), weights=(5, 11))
    with pytest.raises(ShardingError, match="not a whole number of rows"):
        shard(block, VirtualGroup(0, 2), weights=(1, 2))
    with pytest.raises(ShardingError, match="weights must be 2 positive integers"):
        shard(block, VirtualGroup(0, 2), weights=(3, 5, 1))
    assert mx.array_equal(block.switch_mlp.gate_proj.weight, before)


def test_sharding_a_sharded_block_again_is_refused():
    from dsv4shard.shard import ShardingError, VirtualGroup, shard
    from dsv4shard.testing import data
    from dsv4shard.weights import build_block
    from reference import MoEConfig

    case = s.MoECase(MoEConfig(64, 64, 4, 2), None, "float32", 4, "router", 1.0, 0)
    block = build_block(case.config, data.make_weights(case), None, "float32")
    shard(block, VirtualGroup(0, 2))
    with pytest.raises(ShardingError, match="already sharded"):
        shard(block, VirtualGroup(0, 2))
