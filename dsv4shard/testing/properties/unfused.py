"""Properties of the unfused MLX block against the float64 reference.

Each property takes a drawn case and ``build``, the function that makes the
MLX block ``build(config, weights, quant, dtype)``; known-bad twins are other
``build`` functions.  The reference always runs on the weights read back
from the built block, so quantization error never enters the comparison.

Every value comparison is split in two: the expected side (``expect_*``: the
value a right block returns, following the block's arithmetic where it
rounds, and the bound; ``dsv4shard.testing.tolerance.Expected``), built
from the case and the block's weights without running the block, and the
actual side, the block's output.  ``dsv4shard.testing.power`` feeds the
expected sides canned wrong answers to show each comparison rejects them.
A passing property returns its bound-to-signal figure.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from hypothesis import assume

import reference as ref
from dsv4shard.backend import cuts_sorting
from dsv4shard.engine.outcome import NotApplicable
from dsv4shard.testing import data, tolerance
from dsv4shard.testing.report import fail
from dsv4shard.testing.strategies import MoECase, unsorted_tokens
from dsv4shard.weights import DTYPES, build_block, read_weights, to_numpy


def inputs(case: MoECase):
    """x as MLX sees it (rounded to the case's dtype) and as the reference
    sees it (the same values in float64), plus token ids for hash layers."""
    x = mx.array(data.make_tokens(case), dtype=mx.float32).astype(DTYPES[case.dtype])
    ids = data.make_input_ids(case)
    return x, to_numpy(x), None if ids is None else mx.array(ids, dtype=mx.int32), ids


def built(case: MoECase, build):
    block = build(case.config, data.make_weights(case), case.quant, case.dtype)
    return block, read_weights(block)


def assume_clear_choice(x_ref, weights, config, tf32: bool | None = None):
    """Near-tied router scores are a discontinuity: a float32 router may pick
    either expert.  Such draws are discarded, never tolerated.  ``tf32``:
    whether the router's matmul runs in TF32 (None: as the backend's does)."""
    if not config.hash_routing:
        assume(np.all(tolerance.router_gap(x_ref, weights, config)
                      > tolerance.router_margin(x_ref, weights, config, tf32)))


def router_in_tf32(block, dtype: str) -> bool:
    return arithmetic_of(block, dtype).float32_matmul == "tf32"


def arithmetic_of(block, dtype: str) -> tolerance.Arithmetic:
    """The arithmetic the bound follows: the running backend's, unless the
    block says its float32 matmuls run in TF32 (``block.float32_matmul``)."""
    return tolerance.arithmetic(dtype, getattr(block, "float32_matmul", None))


def block_output(block, case: MoECase, x, ids=None) -> np.ndarray:
    """``block(x, ids)`` as NumPy.  Where the running backend's sorted path is
    recorded wrong for these experts (``backend.cuts_sorting``), the tokens
    go in chunks small enough to stay unsorted: a property's own probe
    tokens may take the drawn count past the threshold."""
    if not cuts_sorting(case.quant):
        return to_numpy(block(x, ids))
    chunk = unsorted_tokens(case.config.top_k)
    return np.concatenate([to_numpy(block(x[i:i + chunk], None if ids is None else
                                          ids[i:i + chunk]))
                           for i in range(0, x.shape[0], chunk)])


def judge(prop, case, got, expected: tolerance.Expected, build, what: str = "") -> str:
    """Fail ``prop`` where ``got`` leaves the expected side's bound; else
    return the bound-to-signal figure (the pass detail)."""
    bad = expected.check(got)
    if bad:
        fail(prop, case, f"{what}{bad}; {expected.note()}", build=build)
    return expected.note()


def expect_switch_glu(drawn: MoECase, block, weights) -> tolerance.Expected:
    """The expected side of switch_glu_matches_reference (and, doubled, of
    sorted_matches_unsorted): SwitchGLU's [T, k, D] on the case's indices."""
    _, x_ref, _, _ = inputs(drawn)
    return tolerance.expect_switch_glu(x_ref, data.make_indices(drawn), weights,
                                       drawn.config.swiglu_limit,
                                       arithmetic_of(block, drawn.dtype),
                                       tolerance.block_kernels(block, weights))


def expect_moe(drawn: MoECase, block, weights, x_ref=None, ids_ref=None) -> tolerance.Expected:
    """The expected side of moe_matches_reference: the block's [T, D] on the
    case's tokens (or on ``x_ref`` / ``ids_ref``)."""
    if x_ref is None:
        _, x_ref, _, ids_ref = inputs(drawn)
    return tolerance.expect_moe(x_ref, weights, drawn.config,
                                arithmetic_of(block, drawn.dtype),
                                tolerance.block_kernels(block, weights), ids_ref)


def switch_glu_matches_reference(case: MoECase, build=build_block):
    """mlx-lm's SwitchGLU with the clipped activation equals the reference's
    per-expert outputs [T, k, D] on the dequantized weights, within the bound."""
    block, weights = built(case, build)
    x, _, _, _ = inputs(case)
    indices = data.make_indices(case)
    got = to_numpy(block.switch_mlp(x, mx.array(indices, dtype=mx.int32)))
    return judge(switch_glu_matches_reference, case, got, expect_switch_glu(case, block, weights),
                 build)


def moe_matches_reference(case: MoECase, build=build_block):
    """The whole MLX block (router, routed experts, shared expert, combine)
    equals ``reference.moe`` within the bound, for [T, D] and [B, L, D] inputs."""
    block, weights = built(case, build)
    x, x_ref, ids, ids_ref = inputs(case)
    assume_clear_choice(x_ref, weights, case.config, router_in_tf32(block, case.dtype))
    shape = case.token_shape
    got = block(x.reshape(*shape, -1), None if ids is None else ids.reshape(shape))
    got = to_numpy(got).reshape(case.n_tokens, -1)
    return judge(moe_matches_reference, case, got, expect_moe(case, block, weights), build)


def expect_sorted(drawn: MoECase, block, weights) -> tolerance.Expected:
    """The expected side of sorted_matches_unsorted: SwitchGLU's own, which
    the sorted whole and the unsorted chunks must each meet (each within
    the bound, not within twice it of each other: on the CPU, where the
    kernels are followed bit for bit, both exactly)."""
    return expect_switch_glu(drawn, block, weights)


def sorted_matches_unsorted(case: MoECase, build=build_block):
    """SwitchGLU on all tokens at once (sorted by expert once indices.size
    reaches the threshold) and SwitchGLU on chunks too small to sort both
    give the expected output; where only the sorted whole departs, the
    failure says so."""
    block, weights = built(case, build)
    x, _, _, _ = inputs(case)
    indices = mx.array(data.make_indices(case), dtype=mx.int32)
    whole = to_numpy(block.switch_mlp(x, indices))
    chunk = unsorted_tokens(case.config.top_k)
    parts = [to_numpy(block.switch_mlp(x[i:i + chunk], indices[i:i + chunk]))
             for i in range(0, case.n_tokens, chunk)]
    pieces = np.concatenate(parts)
    expected = expect_sorted(case, block, weights)
    chunks_agree = expected.check(pieces) is None
    what = ("sorted whole departs, unsorted chunks agree: " if chunks_agree else
            "sorted whole and unsorted chunks both depart: ")
    judge(sorted_matches_unsorted, case, whole, expected, build, what)
    return judge(sorted_matches_unsorted, case, pieces, expected, build,
                 "unsorted chunks depart, sorted whole agrees: ")


# Probe logits (SPEC §1, router): float32's exp overflows past about 88.7, so
# a naive log1p(exp(z)) gives inf at the "large" probe; at the "tiny" probe
# every sigmoid score is below 1.6e-8, so an epsilon in the renormalisation
# shows, while all stay normal float32 numbers (a port's 1e-20 stays invisible).
LARGE_LOGITS = (200.0, 100.0)  # two experts' logits; the others in [-4, 4]
TINY_LOGITS = (-28.0, -18.0)  # every expert's logit in this range


def extreme_probes(case: MoECase):
    """(weights, x [2 + T, D]): the case's weights with router columns 0 and
    1 replaced by probe logits, and tokens e_0 and e_1 (one-hot, so their
    logits are exactly those columns in any precision) before the case's
    own tokens, whose coordinates 0 and 1 are zeroed (their logits are
    untouched by the probe columns)."""
    c = case.config
    weights = data.make_weights(case)
    rng = data.rng_for(case, 4)
    large = rng.uniform(-4.0, 4.0, c.n_experts)
    large[rng.permutation(c.n_experts)[: len(LARGE_LOGITS)]] = LARGE_LOGITS[: c.n_experts]
    weights.gate[:, 0] = large
    weights.gate[:, 1] = rng.uniform(*TINY_LOGITS, c.n_experts)
    tokens = data.make_tokens(case)
    tokens[:, :2] = 0.0
    return weights, np.concatenate([np.eye(2, c.hidden_size), tokens])


def extreme_inputs(drawn: MoECase, x64):
    """(x as MLX sees it, x_ref, ids as MLX sees them, ids_ref) for the probe tokens."""
    x = mx.array(x64, dtype=mx.float32).astype(DTYPES[drawn.dtype])
    c = drawn.config
    ids_ref = np.arange(len(x64)) % c.vocab_size if c.hash_routing else None
    ids = None if ids_ref is None else mx.array(ids_ref, dtype=mx.int32)
    return x, to_numpy(x), ids, ids_ref


def moe_matches_reference_at_extremes(case: MoECase, build=build_block):
    """The whole MLX block equals ``reference.moe`` within the bound on two
    probe tokens whose router logits sit at the extremes, besides the case's
    own tokens: logits of +200 and +100 (a naive float32 softplus
    overflows), and all logits in [-28, -18] (tiny chosen scores: an
    epsilon in the renormalisation shows)."""
    c = case.config
    weights, x64 = extreme_probes(case)
    block = build(c, weights, case.quant, case.dtype)
    weights = read_weights(block)
    x, x_ref, ids, ids_ref = extreme_inputs(case, x64)
    assume_clear_choice(x_ref, weights, c, router_in_tf32(block, case.dtype))
    got = block_output(block, case, x, ids)
    return judge(moe_matches_reference_at_extremes, case, got,
                 expect_moe(case, block, weights, x_ref, ids_ref), build,
                 f"probe tokens 0 (logits {LARGE_LOGITS}) and 1 (logits in {TINY_LOGITS}) "
                 f"first: ")


# The router probe (SPEC §1: the router's logits are float32).  Tokens of
# 10 significant bits over a power of two, gate entries in -3..3: every
# product has at most 12 bits and every sum of D <= 128 of them stays below
# 2^19 units, so a float32 matmul's logits are exact, and so are TF32's
# (operands of 11 bits, float32 accumulation): on any backend a float32
# router's logits equal the reference's.  bfloat16 keeps 8 bits: it rounds
# the tokens (float32 and float16 cases) or the logits (every case).
EXACT_TOKEN_BITS = 10
EXACT_GATE = 3


def exact_router_inputs(case: MoECase):
    """(weights with an integer gate, tokens x [T, D] in float64): the
    router probe's inputs, scaled so that logits are of order 1."""
    c = case.config
    weights = data.make_weights(case)
    rng = data.rng_for(case, 5)
    weights.gate = rng.integers(-EXACT_GATE, EXACT_GATE + 1, weights.gate.shape).astype(float)
    top = 2**EXACT_TOKEN_BITS - 1
    shift = EXACT_TOKEN_BITS + int(np.ceil(np.log2(np.sqrt(c.hidden_size) * EXACT_GATE)))
    x = rng.integers(-top, top + 1, (case.n_tokens, c.hidden_size)) * 2.0**-shift
    return weights, x


def expect_exact_route(drawn: MoECase, x_ref, weights, ids_ref=None) -> tolerance.Expected:
    """The expected side of router_matches_reference_on_exact_inputs: the
    reference's route weights, each token's in the order of its experts."""
    indices, w = ref.route(x_ref, weights, drawn.config, ids_ref)
    order = np.argsort(indices, axis=-1)
    want = np.take_along_axis(w, order, -1)
    return tolerance.Expected(want, tolerance.exact_route_error(want) + 1e-30,
                              tolerance.arithmetic("float32"))


def router_matches_reference_on_exact_inputs(case: MoECase, build=build_block):
    """The block's router (``block.gate``) chooses the reference's experts
    and gives its route weights to float32's element-wise error, on tokens
    and a gate whose logits are exact in float32 and in TF32: a router that
    multiplies in bfloat16 departs on every backend."""
    c = case.config
    weights, x64 = exact_router_inputs(case)
    block = build(c, weights, case.quant, case.dtype)
    router = getattr(block, "gate", None)
    if router is None:
        raise NotApplicable("the block has no gate (router) to call")
    weights = read_weights(block)
    x, x_ref, ids, ids_ref = extreme_inputs(case, x64)
    if not c.hash_routing:
        assume(np.all(tolerance.router_gap(x_ref, weights, c)
                      > tolerance.exact_router_margin(x_ref, weights, c)))
    indices, w = router(x, ids)
    got_i, got_w = to_numpy(indices).astype(np.int64), to_numpy(w)
    want_i = np.sort(ref.route(x_ref, weights, c, ids_ref)[0], axis=-1)
    order = np.argsort(got_i, axis=-1)
    got_i, got_w = np.take_along_axis(got_i, order, -1), np.take_along_axis(got_w, order, -1)
    differ = np.flatnonzero((got_i != want_i).any(axis=-1))
    if differ.size:
        t = int(differ[0])
        fail(router_matches_reference_on_exact_inputs, case,
             f"token {t} chose experts {got_i[t].tolist()}, the reference "
             f"{want_i[t].tolist()} ({differ.size} of {len(got_i)} tokens differ; "
             f"their logits are exact in float32)", build=build)
    return judge(router_matches_reference_on_exact_inputs, case, got_w,
                 expect_exact_route(case, x_ref, weights, ids_ref), build,
                 "route weights on exact logits: ")
