"""Properties of MoE-only tensor parallelism (SPEC §4).

A sharding function under test has the contract of ``--shard-impl``:
``shard(block, group) -> block`` (``shard(block, group, weights=(3, 5))``
for an uneven split), returning the block to use (it may shard in place),
an ``nn.Module`` called as ``block(x, input_ids)`` that adds the ranks'
partial outputs with one ``mx.distributed.all_sum`` over ``group``.

A sharder is judged by what it does, not by how it lays its shards out: the
ranks' outputs sum to the unsharded one, and each rank holds its share of
the expert bytes (``shard_holds_its_share``).  The project's own slicing
convention (``shard_holds_its_slice``) is checked for the project's own
sharder only.

Virtual ranks run the sharder in one process, rank by rank, on a
:class:`~dsv4shard.shard.VirtualGroup`; ``mx.distributed.all_sum`` on such a
group is stood in for here (:func:`virtual_outputs`): each rank runs once to
give what it sends to all_sum, then again with all_sum returning the sum of
every rank's.  Real ranks run it in separate processes of an mx.distributed
group.  Properties named ``*_extended`` draw configurations beyond
DeepSeek-V4's (linear biases, other formats), which a sharder may decline
by raising NotImplementedError, as it may an uneven split.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from dsv4shard import backend
from dsv4shard.impl import spec_of as spec
from dsv4shard.ranks import shared, wire
from dsv4shard.shard import VirtualGroup, shard_block, split_bounds
from dsv4shard.shard import shard as our_shard
from dsv4shard.testing import tolerance
from dsv4shard.testing.properties.unfused import (
    arithmetic_of,
    assume_clear_choice,
    built,
    inputs,
)
from dsv4shard.testing.report import fail
from dsv4shard.testing.strategies import ShardCase
from dsv4shard.weights import build_block, read_weights, to_numpy

DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def rank_bounds(shard_case: ShardCase) -> list[tuple[int, int]]:
    """Each rank's [start, stop) of the intermediate dimension."""
    return split_bounds(shard_case.moe.config.intermediate_size, shard_case.ranks,
                        shard_case.split)


def slice_weights(weights, start: int, stop: int, keep_bias: bool):
    """The reference's weights of the rows [start, stop) of the intermediate
    dimension (down's linear bias on one rank only)."""
    s = slice(start, stop)
    b2 = weights.b2
    if b2 is not None and not keep_bias:
        b2 = np.zeros_like(b2)
    return dataclasses.replace(
        weights, w1=weights.w1[:, s], w3=weights.w3[:, s], w2=weights.w2[:, :, s],
        shared_w1=weights.shared_w1[s], shared_w3=weights.shared_w3[s],
        shared_w2=weights.shared_w2[:, s],
        b1=None if weights.b1 is None else weights.b1[:, s],
        b3=None if weights.b3 is None else weights.b3[:, s], b2=b2)


def reduction_dtype(case: ShardCase) -> str:
    """The dtype the ranks' partials are summed in."""
    return case.moe.dtype if case.reduce == "activation" else "float32"


def expect_sharded(case: ShardCase, block, weights, x_ref, ids_ref,
                   reduce: str | None = None) -> tolerance.Expected:
    """The expected side of the sharded comparisons: the block's output
    after the all_sum, each rank's partial following the unsharded block's
    kernels sliced to the rank's rows (``reduce``: the dtype the ranks
    summed in, else the case's).  Judged against the reference's arithmetic
    per rank, not the unsharded block's bound plus slack: partials that
    cancel get no room they do not need."""
    m = case.moe
    return tolerance.expect_sharded_moe(
        x_ref, weights, m.config, arithmetic_of(block, m.dtype), rank_bounds(case),
        reduce or reduction_dtype(case), tolerance.block_kernels(block, weights), ids_ref)


def skip_unsupported(case: ShardCase) -> None:
    """Skip (pytest's skip: never a failure, never a catch) where this
    backend cannot run the case's kernels (an nvfp4 global scale on MLX's
    CPU build)."""
    reason = backend.unsupported(case.moe.quant, case.moe.dtype)
    if reason:
        pytest.skip(f"{reason}: skipped on this backend, neither passed nor caught")


def call_sharder(prop, case, what: str, fn, shard):
    """``fn()``: a NotImplementedError declines the case (``scope.declined``),
    a broken contract fails naming it, any other exception fails."""
    from dsv4shard.fuse import ContractError
    from dsv4shard.testing.scope import declined, on_what

    try:
        out = fn()
        mx.eval(out.parameters() if hasattr(out, "parameters") else out)
        return out
    except NotImplementedError as error:
        declined(prop, case, what, error, shard_impl=shard)
    except ContractError as error:
        fail(prop, case, f"broken contract: {error}", shard_impl=shard)
    except Exception as error:  # noqa: BLE001 - any crash is the property failing
        first = (str(error).strip().splitlines() or [""])[0]
        fail(prop, case, f"{what} raised {type(error).__name__}: {first} ({on_what(case)})",
             shard_impl=shard)


def sharded_blocks(prop, case: ShardCase, block, shard):
    """Every virtual rank's block, sharded by ``shard`` (with
    ``weights=case.split`` for an uneven split)."""
    return [call_sharder(prop, case, f"the sharder for rank {r} of {case.ranks}",
                         lambda r=r: shard_block(block, r, case.ranks, shard, case.split),
                         shard)
            for r in range(case.ranks)]


@contextmanager
def standing_in_for_all_sum(answer):
    """``mx.distributed.all_sum`` on a VirtualGroup (or on no group: this
    process's world of one) returns ``answer(x)``; on a real group it is
    MLX's own."""
    original = mx.distributed.all_sum

    def all_sum(x, *args, group=None, stream=None, **kwargs):
        if group is None or isinstance(group, VirtualGroup):
            return answer(x)
        return original(x, *args, group=group, stream=stream, **kwargs)

    mx.distributed.all_sum = all_sum
    try:
        yield
    finally:
        mx.distributed.all_sum = original


def virtual_outputs(prop, case: ShardCase, blocks, x, ids, shard):
    """(the outputs of ``block(x, ids)`` that one all_sum over the ranks
    would give rank 0 and the last rank, the dtype the ranks summed in).
    Each rank must call all_sum exactly once per call of the block; the sum
    of what they send is checked through those two ranks' outputs (real
    ranks check every rank's)."""
    sent = [[] for _ in blocks]
    for r, b in enumerate(blocks):
        def record(a, r=r):
            sent[r].append(a)
            return a

        with standing_in_for_all_sum(record):
            call_sharder(prop, case, f"rank {r}'s sharded block", lambda b=b: b(x, ids), shard)
    for r, calls in enumerate(sent):
        if len(calls) != 1:
            effect = ("the ranks' partial outputs are never added" if not calls else
                      f"the sum is taken {len(calls)} times: {case.ranks} ** "
                      f"{len(calls) - 1} times the answer")
            fail(prop, case, f"rank {r} called mx.distributed.all_sum {len(calls)} times in "
                 f"one call of the block; exactly one per layer adds the ranks' partial "
                 f"outputs ({effect})", shard_impl=shard)
    shapes = {tuple(c[0].shape) for c in sent}
    if len(shapes) != 1:
        fail(prop, case, f"the ranks sent all_sum arrays of different shapes {sorted(shapes)}",
             shard_impl=shard)
    total = sent[0][0]
    for calls in sent[1:]:
        total = total + calls[0]
    mx.eval(total)
    outs = {}
    for r in sorted({0, len(blocks) - 1}):
        with standing_in_for_all_sum(lambda a: total.astype(a.dtype)):
            outs[r] = call_sharder(prop, case, f"rank {r}'s sharded block",
                                   lambda b=blocks[r]: b(x, ids), shard)
    return {r: to_numpy(o) for r, o in outs.items()}, DTYPE_NAMES.get(total.dtype, "float32")


def chosen_experts(blocks, x, ids):
    """Each rank's router choice, sorted per token (None for a block without
    a ``gate`` router returning (indices, weights))."""
    chosen = []
    for b in blocks:
        gate = b.get("gate") if isinstance(b, dict) else None
        if gate is None or not callable(gate):
            return None
        chosen.append(np.sort(np.array(gate(x, ids)[0]), axis=-1))
    return chosen


def _sharded_matches_unsharded(prop, case: ShardCase, shard):
    skip_unsupported(case)
    m = case.moe
    block, weights = built(m, build_block)
    block.reduce_in_activation_dtype = case.reduce == "activation"
    x, x_ref, ids, ids_ref = inputs(m)
    assume_clear_choice(x_ref, weights, m.config)
    blocks = sharded_blocks(prop, case, block, shard)
    chosen = chosen_experts(blocks, x, ids)
    for r, c in enumerate((chosen or [])[1:], start=1):
        if not np.array_equal(c, chosen[0]):
            fail(prop, case, f"rank {r} chose experts {c[0]} for token 0, rank 0 chose "
                 f"{chosen[0][0]}", shard_impl=shard)
    outs, reduced = virtual_outputs(prop, case, blocks, x, ids, shard)
    expected = expect_sharded(case, block, weights, x_ref, ids_ref, reduced)
    for r, got in outs.items():
        judge_rank(prop, case, r, got, expected, shard, "after the sum")
    return expected.note()


def judge_rank(prop, case: ShardCase, r: int, got, expected: tolerance.Expected, shard,
               when: str = "") -> None:
    """Fail ``prop`` where rank ``r``'s output leaves the expected side."""
    want = expected.want
    if got.size != want.size:
        fail(prop, case, f"rank {r}'s output has shape {got.shape}, the unsharded block's "
             f"{want.shape}", shard_impl=shard)
    bad = expected.check(got.reshape(want.shape))
    if bad:
        fail(prop, case, f"rank {r} of {case.ranks}{' ' + when if when else ''}: {bad}; "
             f"{expected.note()}", shard_impl=shard)


def sharded_matches_unsharded(case: ShardCase, shard=our_shard, shard_impl=None):
    """N virtual ranks, each sharded by ``shard``, give the reference's
    output after their one all_sum, within the bound; every rank's router
    (where the block has one) chooses the same experts."""
    return _sharded_matches_unsharded(sharded_matches_unsharded, case, shard_impl or shard)


def sharded_matches_unsharded_extended(case: ShardCase, shard=our_shard, shard_impl=None):
    """sharded_matches_unsharded beyond DeepSeek-V4's configurations (linear
    biases, other formats); a sharder may decline these."""
    return _sharded_matches_unsharded(sharded_matches_unsharded_extended, case,
                                      shard_impl or shard)


# --- what each rank holds -----------------------------------------------------------


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def expert_bytes(block) -> tuple[int, int]:
    """(bytes of the experts' arrays that scale with the intermediate size,
    bytes of those that do not: down's linear bias, nvfp4 global scales)."""
    scaled = fixed = 0
    for mlp in (block.switch_mlp, block.shared_experts):
        for path, value in tree_flatten(mlp.parameters()):
            if path.endswith("global_scale") or path == "down_proj.bias":
                fixed += value.nbytes
            else:
                scaled += value.nbytes
    return scaled, fixed


def _holds_its_share(prop, case: ShardCase, shard):
    m = case.moe
    block, _ = built(m, build_block)
    scaled, fixed = expert_bytes(block)
    router = nbytes(block.gate)
    inter = m.config.intermediate_size
    blocks = sharded_blocks(prop, case, block, shard)
    for r, ((start, stop), local) in enumerate(zip(rank_bounds(case), blocks)):
        share = scaled * (stop - start) // inter
        held = nbytes(local)
        low, high = router + share, router + share + fixed
        if not low <= held <= high:
            extra = held - low
            why = ("more than its share: the unsharded weights, or another rank's, are "
                   "still held" if extra > 0 else
                   "less than its share: weights missing, or hidden from parameters()")
            fail(prop, case, f"rank {r} of {case.ranks} holds {held} parameter bytes; its "
                 f"share ({stop - start} of {inter} rows) of the {scaled} expert bytes is "
                 f"{share}, plus {router} for the replicated router"
                 + (f" and up to {fixed} for down's linear bias and global scales"
                    if fixed else "") + f": {abs(extra)} bytes {why}", shard_impl=shard)


def shard_holds_its_share(case: ShardCase, shard=our_shard, shard_impl=None):
    """Each rank holds its share of the expert bytes (1/N, or its part of an
    uneven split) plus the replicated router, and nothing more (down's
    linear bias and the per-expert global scales, which no split divides,
    may be held by every rank).  Judges bytes, not layout: any sharder."""
    _holds_its_share(shard_holds_its_share, case, shard_impl or shard)


def shard_holds_its_share_extended(case: ShardCase, shard=our_shard, shard_impl=None):
    """shard_holds_its_share beyond DeepSeek-V4's configurations (linear
    biases, other formats); a sharder may decline these."""
    _holds_its_share(shard_holds_its_share_extended, case, shard_impl or shard)


def shard_holds_its_slice(case: ShardCase, shard=our_shard, shard_impl=None):
    """The project's own layout (checked for dsv4shard's sharder and its
    known-bad twins only): rank r's weights, dequantized, are exactly the
    reference's slice r (gate/up rows, down columns, down's linear bias on
    rank 0 only), for every rank, and an nvfp4 global scale (one per
    expert) is kept whole.  Runs no kernel: every backend checks it."""
    prop, shard = shard_holds_its_slice, shard_impl or shard
    m = case.moe
    block, weights = built(m, build_block)
    blocks = sharded_blocks(prop, case, block, shard)
    for r, ((start, stop), local_block) in enumerate(zip(rank_bounds(case), blocks)):
        for name in ("gate_proj", "up_proj", "down_proj"):
            whole = block.switch_mlp[name].get("global_scale")
            if whole is None:
                continue
            kept = local_block.switch_mlp[name].get("global_scale")
            diff = ("absent" if kept is None else
                    tolerance.first_difference(to_numpy(kept), to_numpy(whole)))
            if diff:
                fail(prop, case, f"rank {r} switch_mlp.{name}.global_scale (one per expert, "
                     f"never sliced) is not the unsharded one: {diff}", shard_impl=shard)
        local = read_weights(local_block)
        want = slice_weights(weights, start, stop, r == 0)
        for name in ("w1", "w3", "w2", "shared_w1", "shared_w3", "shared_w2", "b1", "b3", "b2"):
            a, b = getattr(local, name), getattr(want, name)
            if (a is None) != (b is None):
                fail(prop, case, f"rank {r}: {name} present on one side only", shard_impl=shard)
            diff = None if a is None else tolerance.first_difference(a, b)
            if diff:
                fail(prop, case, f"rank {r} {name}: {diff}", shard_impl=shard)


# --- real ranks ---------------------------------------------------------------


def run_on_ranks(case: ShardCase, shard=our_shard, fuse=None, pool=None, prop=None):
    """Every rank's answer (y, chosen experts, bytes held) for ``case`` on a
    real group.  A rank's NotImplementedError declines the case
    (``scope.declined``); a rank's exception fails ``prop``; a rank that
    died or hung stops the run (:class:`~dsv4shard.testing.guard.RanksLost`,
    carrying every rank's stderr), so hypothesis never replays it."""
    from dsv4shard.ranks.pool import RankFailure
    from dsv4shard.shard import accepts_weights
    from dsv4shard.testing.guard import RanksLost
    from dsv4shard.testing.scope import declined

    prop = prop or real_ranks_match_unsharded
    if case.split is not None and not accepts_weights(shard):
        name = getattr(shard, "__qualname__", repr(shard))
        declined(prop, case, "the sharder", NotImplementedError(
            f"{name} takes no weights= argument: it offers even splits only"), shard_impl=shard)
    pool = pool or shared.pool(case.ranks)
    if not pool.alive:
        raise RanksLost(f"{prop.__name__}: {dead_ranks(pool)}\n  case: {case!r}")
    job = {"task": "moe", "case": repr(case.moe), "shard": spec(shard),
           "fuse": spec(fuse) if fuse else None, "reduce": case.reduce,
           "split": list(case.split) if case.split else None}
    try:
        answers = pool.run(job)
    except RankFailure as error:
        if not pool.alive:
            raise RanksLost(f"{prop.__name__}: the rank pool stopped: {error}\n  case: "
                            f"{case!r}") from None
        tail = str(error).strip().splitlines()
        fail(prop, case, f"{tail[0]} {tail[-1].strip()}" if len(tail) > 1 else str(error),
             shard_impl=shard, **({"fuse_impl": fuse} if fuse else {}))
    refusals = [a["declined"] for a in answers if "declined" in a]
    if refusals:
        declined(prop, case, "the sharder on the ranks", NotImplementedError(refusals[0]),
                 shard_impl=shard)
    contract = [a["contract"] for a in answers if "contract" in a]
    if contract:
        fail(prop, case, f"broken contract: {contract[0]}", shard_impl=shard)
    return answers


def dead_ranks(pool) -> str:
    """Which ranks of a pool that stopped between jobs exited, and every
    rank's stderr (what the pool reports when a rank dies during a job)."""
    parts = []
    for r, proc in enumerate(getattr(pool, "procs", [])):
        code = proc.poll()
        if code is not None:
            parts.append(f"rank {r} died (exit status {code})")
    tails = []
    for r, f in enumerate(getattr(pool, "stderr_files", [])):
        try:
            f.seek(0)
            text = f.read()[-2000:].strip()
        except (OSError, ValueError):  # closed: the pool reported it already
            continue
        tails.append(f"--- rank {r} stderr ---\n{text or '(empty)'}")
    return ("between jobs: " + "; ".join(parts or ["the rank pool is not running"])
            + ("\n" + "\n".join(tails) if tails else ""))


def real_ranks_match_unsharded(case: ShardCase, shard=our_shard, pool=None, shard_impl=None):
    """On a real group of N > 1 ranks: every rank chooses the same experts,
    the block's output after its all_sum equals the reference within the
    bound on every rank, and each rank holds its share of the expert bytes."""
    prop, shard = real_ranks_match_unsharded, shard_impl or shard
    skip_unsupported(case)
    answers = run_on_ranks(case, shard, pool=pool, prop=prop)
    sizes = {a["size"] for a in answers}
    if sizes != {case.ranks} or case.ranks < 2:
        fail(prop, case, f"group sizes {sizes}, expected {case.ranks} > 1", shard_impl=shard)
    m = case.moe
    block, weights = built(m, build_block)
    _, x_ref, _, ids_ref = inputs(m)
    assume_clear_choice(x_ref, weights, m.config)
    chosen = [wire.decode_array(a["indices"]) for a in answers if a.get("indices")]
    for r, c in enumerate(chosen[1:], start=1):
        if not np.array_equal(c, chosen[0]):
            fail(prop, case, f"rank {r} chose experts {c[0]} for token 0, rank 0 chose "
                 f"{chosen[0][0]}", shard_impl=shard)
    expected = expect_sharded(case, block, weights, x_ref, ids_ref)
    for r, a in enumerate(answers):
        judge_rank(prop, case, r, wire.decode_array(a["y"]), expected, shard)
    scaled, fixed = expert_bytes(block)
    router, inter = nbytes(block.gate), m.config.intermediate_size
    for r, ((start, stop), a) in enumerate(zip(rank_bounds(case), answers)):
        share = router + scaled * (stop - start) // inter
        if "nbytes" in a and not share <= a["nbytes"] <= share + fixed:
            fail(prop, case, f"rank {r} of {case.ranks} holds {a['nbytes']} parameter bytes, "
                 f"its share is {share}" + (f" (+ up to {fixed})" if fixed else ""),
                 shard_impl=shard)
    return expected.note()


def real_shard_then_fuse_is_bit_exact(case: ShardCase, shard=our_shard, fuse=None, pool=None,
                                      shard_impl=None, fuse_impl=None):
    """On real ranks, fusing gate+up after sharding changes no bit of any
    rank's output."""
    from dsv4shard.fuse import install_fused

    prop = real_shard_then_fuse_is_bit_exact
    shard, fuse = shard_impl or shard, fuse_impl or fuse or install_fused
    plain = run_on_ranks(case, shard, pool=pool, prop=prop)
    fused = run_on_ranks(case, shard, fuse=fuse, pool=pool, prop=prop)
    for r, (a, b) in enumerate(zip(plain, fused)):
        diff = tolerance.first_difference(wire.decode_array(a["y"]), wire.decode_array(b["y"]))
        if diff:
            fail(prop, case, f"rank {r}: fused vs unfused: {diff}", shard_impl=shard,
                 fuse_impl=fuse)

