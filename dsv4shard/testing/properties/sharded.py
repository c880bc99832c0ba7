"""Properties of MoE-only tensor parallelism (SPEC §4).

A sharding function under test has the contract ``shard(block, group) ->
block`` (the block to use; it may shard in place).  Virtual ranks run it in
one process, rank by rank, and add the partial outputs here; real ranks run
it in separate processes of an mx.distributed group, where the block's own
all_sum adds them.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference as ref
from dsv4shard import backend
from dsv4shard.impl import spec_of as spec
from dsv4shard.ranks import shared, wire
from dsv4shard.shard import shard as our_shard
from dsv4shard.shard import shard_block
from dsv4shard.testing import tolerance
from dsv4shard.testing.properties.unfused import assume_clear_choice, built, inputs
from dsv4shard.testing.report import fail
from dsv4shard.testing.strategies import ShardCase
from dsv4shard.weights import DTYPES, build_block, read_weights, to_numpy


def sharded_bound(case: ShardCase, x, weights, ids):
    """The unsharded block's bound, plus the cross-rank sum: each rank's
    partial rounded to the reduction dtype and N - 1 additions in it.  It
    scales with the partials, not with |y|: partials may cancel."""
    m = case.moe
    u = tolerance.UNIT_ROUNDOFF[m.dtype if case.reduce == "activation" else "float32"]
    partials = sum(np.abs(ref.moe(x, ref.shard_weights(weights, r, case.ranks), m.config, ids))
                   for r in range(case.ranks))
    return tolerance.moe_bound(x, weights, m.config, m.dtype, ids) + case.ranks * u * partials


def virtual_sum(case: ShardCase, blocks, x, ids):
    """What one all_sum over the ranks gives, done here: float32 partials,
    or partials rounded to the activation dtype and added in it."""
    dtype = DTYPES[case.moe.dtype]
    partials = [b.partial(x, ids) for b in blocks]
    if case.reduce == "activation":
        partials = [p.astype(dtype) for p in partials]
    total = partials[0]
    for p in partials[1:]:
        total = total + p
    return to_numpy(total.astype(dtype))


def skip_unsupported(case: ShardCase) -> None:
    """Skip (pytest's skip: never a failure, never a catch) where this
    backend cannot run the case's kernels (an nvfp4 global scale on MLX's
    CPU build)."""
    reason = backend.unsupported(case.moe.quant, case.moe.dtype)
    if reason:
        pytest.skip(f"{reason}: skipped on this backend, neither passed nor caught")


def sharded_matches_unsharded(case: ShardCase, shard=our_shard):
    """N virtual ranks, each sharded by ``shard``, add up to the reference
    within the bound; and every rank's router chooses the same experts."""
    skip_unsupported(case)
    m = case.moe
    block, weights = built(m, build_block)
    x, x_ref, ids, ids_ref = inputs(m)
    assume_clear_choice(x_ref, weights, m.config)
    blocks = [shard_block(block, r, case.ranks, shard) for r in range(case.ranks)]
    chosen = [np.sort(np.array(b.gate(x, ids)[0]), axis=-1) for b in blocks]
    for r, c in enumerate(chosen[1:], start=1):
        if not np.array_equal(c, chosen[0]):
            fail(sharded_matches_unsharded, case, f"rank {r} chose experts {c[0]} for token 0, "
                 f"rank 0 chose {chosen[0][0]}", shard=shard)
    got = virtual_sum(case, blocks, x, ids)
    want = ref.moe(x_ref, weights, m.config, ids_ref)
    bad = tolerance.worst_mismatch(got, want, sharded_bound(case, x_ref, weights, ids_ref))
    if bad:
        fail(sharded_matches_unsharded, case, f"sum of {case.ranks} ranks: {bad}", shard=shard)


def shard_holds_its_slice(case: ShardCase, shard=our_shard):
    """Structure: rank r's weights, dequantized, are exactly the reference's
    slice r (gate/up rows, down columns, bias once), for every rank, and an
    nvfp4 global scale (one per expert) is kept whole.  Runs no kernel:
    every backend checks it."""
    m = case.moe
    block, weights = built(m, build_block)
    for r in range(case.ranks):
        local_block = shard_block(block, r, case.ranks, shard)
        for name in ("gate_proj", "up_proj", "down_proj"):
            whole = block.switch_mlp[name].get("global_scale")
            if whole is None:
                continue
            kept = local_block.switch_mlp[name].get("global_scale")
            diff = ("absent" if kept is None else
                    tolerance.first_difference(to_numpy(kept), to_numpy(whole)))
            if diff:
                fail(shard_holds_its_slice, case, f"rank {r} switch_mlp.{name}.global_scale "
                     f"(one per expert, never sliced) is not the unsharded one: {diff}",
                     shard=shard)
        local = read_weights(local_block)
        want = ref.shard_weights(weights, r, case.ranks)
        for name in ("w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2", "b1", "b3", "b2"):
            a, b = getattr(local, name), getattr(want, name)
            if (a is None) != (b is None):
                fail(shard_holds_its_slice, case, f"rank {r}: {name} present on one side only",
                     shard=shard)
            diff = None if a is None else tolerance.first_difference(a, b)
            if diff:
                fail(shard_holds_its_slice, case, f"rank {r} {name}: {diff}", shard=shard)


# --- real ranks ---------------------------------------------------------------


def run_on_ranks(case: ShardCase, shard=our_shard, fuse=None, pool=None):
    """Every rank's (y, chosen experts) for ``case`` on a real group."""
    pool = pool or shared.pool(case.ranks)
    answers = pool.run({"task": "moe", "case": repr(case.moe), "shard": spec(shard),
                        "fuse": spec(fuse) if fuse else None, "reduce": case.reduce})
    return answers


def real_ranks_match_unsharded(case: ShardCase, shard=our_shard, pool=None):
    """On a real group of N > 1 ranks: every rank chooses the same experts,
    and the block's output after its all_sum equals the reference within the
    bound, on every rank."""
    skip_unsupported(case)
    answers = run_on_ranks(case, shard, pool=pool)
    sizes = {a["size"] for a in answers}
    if sizes != {case.ranks} or case.ranks < 2:
        fail(real_ranks_match_unsharded, case, f"group sizes {sizes}, expected {case.ranks} > 1",
             shard=shard)
    m = case.moe
    _, weights = built(m, build_block)
    _, x_ref, _, ids_ref = inputs(m)
    assume_clear_choice(x_ref, weights, m.config)
    chosen = [wire.decode_array(a["indices"]) for a in answers]
    for r, c in enumerate(chosen[1:], start=1):
        if not np.array_equal(c, chosen[0]):
            fail(real_ranks_match_unsharded, case, f"rank {r} chose experts {c[0]} for token 0, "
                 f"rank 0 chose {chosen[0][0]}", shard=shard)
    want = ref.moe(x_ref, weights, m.config, ids_ref)
    bound = sharded_bound(case, x_ref, weights, ids_ref)
    for r, a in enumerate(answers):
        bad = tolerance.worst_mismatch(wire.decode_array(a["y"]), want, bound)
        if bad:
            fail(real_ranks_match_unsharded, case, f"rank {r} of {case.ranks}: {bad}",
                 shard=shard)


def real_shard_then_fuse_is_bit_exact(case: ShardCase, shard=our_shard, fuse=None, pool=None):
    """On real ranks, fusing gate+up after sharding changes no bit of any
    rank's output."""
    from dsv4shard.fuse import install_fused

    fuse = fuse or install_fused
    plain = run_on_ranks(case, shard, pool=pool)
    fused = run_on_ranks(case, shard, fuse=fuse, pool=pool)
    for r, (a, b) in enumerate(zip(plain, fused)):
        diff = tolerance.first_difference(wire.decode_array(a["y"]), wire.decode_array(b["y"]))
        if diff:
            fail(real_shard_then_fuse_is_bit_exact, case, f"rank {r}: fused vs unfused: {diff}",
                 shard=shard, fuse=fuse)
