"""The hardware tier: the real-rank properties across the hosts (or GPUs) of a
hostfile: a two-Mac Thunderbolt RDMA pair (jaccl), hosts over TCP (ring), or
the GPUs of one host (nccl).  Without a hostfile every test here skips."""

import pytest
from hypothesis import given

from dsv4shard.testing import strategies as s
from dsv4shard.testing.properties import sharded
from reference.quantization import QuantFormat

pytestmark = pytest.mark.hardware

GLOBAL_SCALE = QuantFormat("nvfp4", 16, 4, global_scale=True)


def test_group_is_real(hardware_pool):
    answers = hardware_pool.run({"task": "ping"})
    assert [a["size"] for a in answers] == [hardware_pool.size] * hardware_pool.size
    assert hardware_pool.size > 1


def test_real_ranks_match_unsharded(hardware_pool, shard_impl):
    @given(case=s.shard_cases(ranks=hardware_pool.size))
    def run(case):
        sharded.real_ranks_match_unsharded(case, shard=shard_impl, pool=hardware_pool)

    run()


def test_real_ranks_with_global_scale(hardware_pool, shard_impl):
    reason = hardware_pool.run({"task": "unsupported", "quant": repr(GLOBAL_SCALE)})[0]["reason"]
    if reason:
        pytest.skip(f"the ranks' backend: {reason}")

    @given(case=s.shard_cases(ranks=hardware_pool.size, formats=[GLOBAL_SCALE]))
    def run(case):
        sharded.real_ranks_match_unsharded(case, shard=shard_impl, pool=hardware_pool)

    run()


def test_real_shard_then_fuse_is_bit_exact(hardware_pool, shard_impl, fuse_impl):
    @given(case=s.shard_cases(ranks=hardware_pool.size))
    def run(case):
        sharded.real_shard_then_fuse_is_bit_exact(case, shard=shard_impl, fuse=fuse_impl,
                                                  pool=hardware_pool)

    run()

