"""A tiny mlx_lm.models.deepseek_v41 model with only its MoE blocks sharded
over the real ranks (``--ranks``), fused and not."""

import pytest
from hypothesis import strategies as st

from dsv4shard.testing.catch import assert_caught
from dsv4shard.testing.mutants.sharding import shard_moe_without_all_sum
from dsv4shard.testing.properties.end_to_end import (
    ModelCase,
    sharded_model_matches_unsharded,
    tokens,
)
from dsv4shard.tiny_model import TINY_V41, near_ties, splits_over


def model_cases(ranks: int):
    return st.builds(ModelCase, seed=st.integers(0, 2**16), layers=st.integers(2, 3),
                     n_tokens=st.integers(1, 12), ranks=st.just(ranks))


@pytest.fixture
def model_pool(rank_pool):
    if not splits_over(rank_pool.size):
        pytest.skip(f"the tiny model's MoE intermediate size "
                    f"{TINY_V41['moe_intermediate_size']} does not split over "
                    f"{rank_pool.size} ranks")
    return rank_pool


@pytest.mark.distributed
def test_sharded_model_matches_unsharded(model_pool, fuse_impl, judge):
    judge(sharded_model_matches_unsharded, model_cases(model_pool.size), examples=5,
          fuse=fuse_impl, pool=model_pool, timeout=None)


@pytest.mark.distributed
def test_model_level_check_catches_a_missing_all_sum(model_pool):
    assert_caught(sharded_model_matches_unsharded, model_cases(model_pool.size),
                  max_examples=5, shard=shard_moe_without_all_sum, pool=model_pool)


def test_near_ties_outside_the_moe_are_discarded():
    """The case that failed the project's own sharding (1.3e-3 against a
    bound of 2.7e-4) took an fp8 rounding of the compressed KV within
    rounding noise of a flip: the watch sees it (on the model of that day,
    intermediate size 64), and the property discards such cases."""
    failed = ModelCase(seed=43958, layers=3, n_tokens=4)
    ties = near_ties(failed.seed, failed.layers, tokens(failed), intermediate=64)
    assert ties and "to_fp8" in ties[0], ties
    clear = [seed for seed in range(8)
             if not near_ties(seed, 2, tokens(ModelCase(seed, 2, 4)))]
    assert 0 < len(clear) < 8, "some seeds are free of near-ties, not all"
