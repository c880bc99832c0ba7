"""A tiny mlx_lm.models.deepseek_v41 model with only its MoE blocks sharded
over 2 real ranks, fused and not."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv4shard.testing.catch import assert_caught
from dsv4shard.testing.mutants.sharding import shard_moe_without_all_sum
from dsv4shard.testing.properties.end_to_end import ModelCase, sharded_model_matches_unsharded

pytestmark = pytest.mark.distributed

MODEL_CASES = st.builds(ModelCase, seed=st.integers(0, 2**16), layers=st.integers(2, 3),
                        n_tokens=st.integers(1, 12))


@settings(max_examples=5)
@given(case=MODEL_CASES)
def test_sharded_model_matches_unsharded(case, rank_pool, fuse_impl):
    sharded_model_matches_unsharded(case, fuse=fuse_impl, pool=rank_pool)


def test_model_level_check_catches_a_missing_all_sum(rank_pool):
    assert_caught(sharded_model_matches_unsharded, MODEL_CASES, max_examples=5,
                  shard=shard_moe_without_all_sum, pool=rank_pool)
