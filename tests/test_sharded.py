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


@pytest.mark.distributed
def test_real_ranks_match_unsharded(rank_pool, shard_impl):
    @given(case=s.shard_cases(ranks=rank_pool.size))
    def run(case):
        sharded.real_ranks_match_unsharded(case, shard=shard_impl, pool=rank_pool)

    run()
