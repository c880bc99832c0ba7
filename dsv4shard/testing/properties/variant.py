"""Properties of a variant's own MoE block: a port's ``deepseek_v4.py``, or
an installed module, driven through the structural adapter.

Each property takes a drawn :class:`~dsv4shard.testing.strategies.VariantCase`
and ``variant`` (a :class:`~dsv4shard.variants.adapter.Variant`), builds a
FRESH tiny block for every weight set (weights go in before the first call,
as mlx-lm loads them), and raises :class:`Departure` with a one-line
diagnosis, :class:`NotApplicable` with the reason, or returns a one-line
detail.  Which are required and what each means is the table in
``dsv4shard.engine.records``.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np

import reference as ref
from dsv4shard import backend
from dsv4shard.engine.outcome import Departure, Minor, NotApplicable, Weak, carried
from dsv4shard.testing import tolerance
from dsv4shard.testing.strategies import VariantCase
from dsv4shard.variants import data
from dsv4shard.variants.adapter import (
    HIDDEN,
    Setting,
    Variant,
    set_weight,
    signature_text,
    takes_ids,
)
from dsv4shard.variants.probes import (
    bf16,
    block_revision,
    check_route,
    combine_lookalikes,
    compare_block,
    compare_route,
    expect_clip,
    fmt_set,
    ids_for,
    mlp_with,
    precision_weights,
    probe_bound,
    probe_diagnosis,
    raw,
    revision_of,
    route_diagnosis,
    routed_probe,
    same_sets,
    scores_of,
    shared_probe,
    silu,
)
from dsv4shard.weights import DTYPES, to_numpy
from reference.moe_block import Revision
from reference.quantization import QuantFormat

MXFP4 = QuantFormat("mxfp4", 32, 4)
AFFINE8 = QuantFormat("affine", 32, 8)
F32 = tolerance.F32


def setting_of(case: VariantCase, **overrides) -> Setting:
    values = {"n_experts": case.n_experts, "top_k": min(case.top_k, case.n_experts)}
    values.update(overrides)
    return Setting(**values)


def structure(case: VariantCase, variant: Variant) -> str:
    layout = variant.describe_layout()
    built = variant.build()
    forced = built.forced_quant
    variant.properties.update(
        layout=layout, call=signature_text(built.moe.__call__),
        router_returns=variant.gate_order(variant.build()),
        routed_experts=variant.layout.path("routed"),
        forced_quantization=(f"{forced.mode} {forced.bits}-bit group {forced.group_size}"
                             if forced else None))
    if forced:
        layout += (f"; routed experts forced to {forced.mode} (checked on the weights as they "
                   f"round-trip)")
    return layout


def moe_matches_reference(case: VariantCase, variant: Variant) -> str:
    revision = block_revision(variant)
    setting = setting_of(case)
    built = variant.build(setting, data.weights(setting, case.seed, case.activation_scale))
    x = data.tokens(case.n_tokens, case.seed)
    shape = (2, case.n_tokens // 2) if case.batched and case.n_tokens % 2 == 0 else None
    power_note = compare_block(built, x, setting.config(revision), "float32",
                               f"{case.n_tokens} tokens, k = {setting.top_k} of "
                               f"{setting.n_experts}, activation scale "
                               f"{case.activation_scale:g}", shape)
    forced = built.forced_quant
    fmt = f" ({forced.mode} experts, as the variant forces)" if forced else ""
    return carried(f"within the stage bound{fmt}; reference revision {revision.value}; "
                   f"{power_note}", power_note)


# Activations scaled this far drive gate and up deep past the clip (L = 10):
# a bfloat16 path that loses a clip is then off by ~scale^2 / L.
CLIP_SCALE = 30.0


def quantized_moe_matches_reference(case: VariantCase, variant: Variant) -> str:
    fmt = case.routed_quant
    reason = backend.unsupported(fmt, "bfloat16")
    if reason:
        raise NotApplicable(reason)
    revision = block_revision(variant)
    setting = setting_of(case)
    # The case's own activations, and, where they stay inside the clip, ones
    # past it too: the case this check exists for.
    notes = []
    for scale in sorted({case.activation_scale, max(case.activation_scale, CLIP_SCALE)}):
        built = variant.build(setting, data.weights(setting, case.seed, scale), quant=fmt,
                              shared_quant=AFFINE8, dtype="bfloat16")
        forced = built.forced_quant
        what = forced if forced else fmt
        x = data.tokens(case.n_tokens, case.seed, "bfloat16")
        notes.append(compare_block(built, x, setting.config(revision), "bfloat16",
                                   f"{what.mode} {what.bits}-bit group {what.group_size} "
                                   f"routed experts, bfloat16, {case.n_tokens} tokens, "
                                   f"activation scale {scale:g}"))
    return carried("checkpoint formats (routed mxfp4 / affine 4-8, shared affine-8) in "
                   f"bfloat16 within the stage bound; {notes[-1]}", *notes)


def routed_clip(case: VariantCase, variant: Variant) -> str:
    outs, x, w = routed_probe(variant, 10.0)
    diagnosis = expect_clip(outs, x, w, 10.0)
    if diagnosis:
        raise Departure(f"routed experts: {diagnosis}")
    done = "gate <= L, -L <= up <= L, before silu, in every expert (L = 10, 81 probes)"
    if backend.tf32_matmuls():
        # silu(10) = 10 (1 - 4.5e-5): a clip after silu differs from DeepSeek's
        # by less than TF32's rounding of the activation in down's matmul.
        return Weak(f"weak: {done}; float32 matmuls round to TF32 here, so a clip after "
                    f"silu (off by 4.5e-5 of the output at L = 10) passes unseen")
    return done


def spec_revision(case: VariantCase, variant: Variant) -> str:
    found = revision_of(variant)
    if found is Revision.SHARED_CLIPPED:
        return ("shared expert clipped with the routed experts' L: matches revision "
                "shared-clipped (DeepSeek's later code)")
    if found is Revision.FIRST_RELEASE:
        return "shared expert not clipped: matches revision first-release"
    out, x, w = shared_probe(variant, 10.0)
    clipped = mlp_with(lambda g, u, L: ref.clipped_swiglu(g, u, L), x, *w, 10.0)
    raise Departure("the shared expert matches neither revision: "
                    + probe_diagnosis(out, x, w, 10.0, probe_bound(clipped)))


def _no_clip_at(variant: Variant, limit) -> None:
    outs, x, w = routed_probe(variant, limit)
    shared, xs, ws = shared_probe(variant, limit)
    for what, got, xx, ww in [("routed", o, x, w) for o in outs] + [("shared", shared, xs, ws)]:
        want = mlp_with(lambda g, u, L: silu(g) * u, xx, *ww, 0.0)
        bound = probe_bound(want)
        if tolerance.worst_mismatch(got, want, bound) is not None:
            name = probe_diagnosis(got, xx, ww, 0.0 if limit is None else limit, bound, "no clip")
            raise Departure(f"swiglu_limit = {limit}: {what} experts: {name}")


def limit_disables_clip(case: VariantCase, variant: Variant) -> str:
    if not variant.has_field("limit"):
        raise NotApplicable("ModelArgs has no swiglu_limit field")
    for limit in (0.0, -1.0):
        _no_clip_at(variant, limit)
    return "swiglu_limit = 0 and -1 leave gate and up unclipped (routed and shared)"


def limit_none(case: VariantCase, variant: Variant) -> str:
    if not variant.has_field("limit"):
        raise NotApplicable("ModelArgs has no swiglu_limit field")
    try:
        _no_clip_at(variant, None)
    except Departure:
        raise
    except Exception as error:
        from dsv4shard.engine.run import where

        raise Departure(f"swiglu_limit = None (a config.json without the field) raises "
                        f"{type(error).__name__}: {error}{where(error)}") from None
    return "swiglu_limit = None leaves gate and up unclipped (routed and shared)"


def bias_chooses_only(case: VariantCase, variant: Variant) -> str:
    setting = setting_of(case, top_k=max(2, min(case.top_k, case.n_experts - 1)))
    config = setting.config()
    weights = data.weights(setting, case.seed)
    forced = np.random.default_rng(case.seed).permutation(setting.n_experts)[:setting.top_k]
    weights.bias = np.zeros(setting.n_experts)
    weights.bias[forced] = 10.0
    built = variant.build(setting, weights)
    if "bias" not in built.keys:
        raise Departure("the router holds no correction bias [E] (e_score_correction_bias): "
                        "a V4 checkpoint's gate.bias has nowhere to go")
    x_mx = data.tokens(case.n_tokens, case.seed)
    x = to_numpy(x_mx)
    got_i, got_w = built.route(x_mx)
    wrong = ~np.all(np.sort(got_i, -1) == np.sort(forced), axis=-1)
    if wrong.any():
        t = int(np.nonzero(wrong)[0][0])
        raise Departure(f"a +10 bias on experts {fmt_set(forced)} did not choose them: token {t} "
                        f"chose {fmt_set(got_i[t])} (the bias is not added before top-k)")
    s = scores_of(x, weights, config)
    got_w = np.take_along_axis(got_w, np.argsort(got_i, -1), -1)
    chosen = s[:, np.sort(forced)]
    want = chosen / chosen.sum(-1, keepdims=True) * config.route_scale
    bound = tolerance.route_weight_error(x, weights, config, np.tile(np.sort(forced), (len(x), 1)))
    bad = tolerance.worst_mismatch(got_w, want, bound)
    if bad is not None:
        biased = chosen + 10.0
        if tolerance.within(got_w, biased / biased.sum(-1, keepdims=True) * config.route_scale,
                            2 * bound):
            raise Departure("the bias entered the weights: they are renormalised (score + bias)")
        raise Departure(f"with a +10 bias the weights are not the unbiased scores': {bad}")
    weights = data.weights(setting, case.seed + 1)  # a small random bias: shifts choices only
    built = variant.build(setting, weights)
    check_route(built, data.tokens(case.n_tokens, case.seed + 1), weights, config,
                what="random bias: ")
    return "a +10 bias forces the set; the weights stay the unbiased scores'"


def renormalisation(case: VariantCase, variant: Variant) -> str:
    setting = setting_of(case, top_k=max(2, min(case.top_k, case.n_experts)))
    config = setting.config()
    weights = data.weights(setting, case.seed)
    built = variant.build(setting, weights)
    check_route(built, data.tokens(case.n_tokens, case.seed), weights, config,
                what=f"k = {setting.top_k}: ")
    return f"weights sum to route_scale and equal the renormalised scores (k = {setting.top_k})"


def softmax_not_renormalised(case: VariantCase, variant: Variant) -> str:
    if not variant.has_field("score_func"):
        raise NotApplicable("ModelArgs has no scoring_func field")
    setting = setting_of(case, score_func="softmax", top_k=max(2, min(case.top_k,
                                                                    case.n_experts)))
    config = setting.config()
    weights = data.weights(setting, case.seed)
    built = variant.build(setting, weights)
    x_mx = data.tokens(case.n_tokens, case.seed)
    got_i, got_w, want_w, bound, keep = compare_route(built, x_mx, weights, config)
    try:  # the sets agree; only how the weights depart says "renormalised"
        route_diagnosis(got_w, want_w, bound, keep, config,
                        scores_of(to_numpy(x_mx), weights, config), got_i)
    except Departure as d:
        variant.properties["softmax_renormalised"] = ("renormalised" in str(d)
                                                      and "not renormalised" not in str(d))
        raise Departure(f"softmax: {d}") from None
    variant.properties["softmax_renormalised"] = False
    return "softmax weights are the raw probabilities x route_scale (not renormalised)"


def k1_renormalised(case: VariantCase, variant: Variant) -> str:
    setting = setting_of(case, top_k=1)
    config = setting.config()
    weights = data.weights(setting, case.seed)
    built = variant.build(setting, weights)
    x_mx = data.tokens(case.n_tokens, case.seed)
    got_i, got_w, want_w, bound, keep = compare_route(built, x_mx, weights, config)
    try:
        route_diagnosis(got_w, want_w, bound, keep, config,
                        scores_of(to_numpy(x_mx), weights, config), got_i)
    except Departure as d:
        variant.properties["k1_renormalised"] = False
        raise Departure(f"k = 1: {d} (DeepSeek: weight = route_scale = "
                        f"{config.route_scale:g})") from None
    variant.properties["k1_renormalised"] = True
    return f"k = 1 gives weight route_scale = {config.route_scale:g}"


def epsilon_underflow(case: VariantCase, variant: Variant) -> str:
    setting = setting_of(case)
    config = setting.config()
    weights = data.weights(setting, case.seed)
    weights.bias = np.zeros(setting.n_experts)
    logits = -(80.0 + 0.5 * np.arange(setting.n_experts))  # exact in float32
    weights.gate = np.tile((logits / HIDDEN)[:, None], (1, HIDDEN))
    built = variant.build(setting, weights)
    x_mx = mx.ones((4, HIDDEN), dtype=mx.float32)
    x = to_numpy(x_mx)
    got_i, got_w = built.route(x_mx)
    s = scores_of(x, weights, config)
    chosen = np.take_along_axis(s, got_i, -1)
    notes, ok = [], True
    want = chosen / chosen.sum(-1, keepdims=True) * config.route_scale
    variant.properties["epsilon"] = 0.0
    if not np.all(np.isfinite(got_w)):
        ok = False
        notes.append(f"chosen scores of {chosen[0, 0]:.2g} give weights {got_w[0].tolist()}: the "
                     f"scores are lost to underflow (e.g. log(1 + exp(z)) is 0 below z ~ -17), "
                     f"where DeepSeek's renormalise to route_scale = {config.route_scale:g}")
    elif not np.allclose(got_w, want, rtol=1e-5, atol=0):
        ok = False
        with np.errstate(divide="ignore", invalid="ignore"):
            eps = float(np.median(chosen[:, 0] * config.route_scale / got_w[:, 0]
                                  - chosen.sum(-1)))
        what = f"adds eps ~ {eps:.2g} to the sum: " if np.isfinite(eps) and eps > 0 else ""
        if what:
            variant.properties["epsilon"] = eps
        notes.append(f"{what}chosen scores of {chosen[0, 0]:.2g} give weights summing to "
                     f"{got_w[0].sum():.6g}, not route_scale = {config.route_scale:g}")
    weights.gate = np.full((setting.n_experts, HIDDEN), -1000.0 / HIDDEN)
    built = variant.build(setting, weights)  # a fresh block for the new weights
    _, zero_w = built.route(x_mx)
    if np.all(np.isnan(zero_w)):
        notes.append("all-zero scores give NaN, as DeepSeek's")
    else:
        ok = False
        notes.append(f"all-zero scores give {zero_w[0].tolist()} (DeepSeek: NaN)")
    if not ok:
        raise Departure("; ".join(notes))
    return "no epsilon: tiny chosen scores renormalise exactly; " + notes[-1]


def softplus_overflow(case: VariantCase, variant: Variant) -> str:
    setting = setting_of(case)
    config = setting.config()
    weights = data.weights(setting, case.seed)
    built = variant.build(setting, weights)
    x = data.tokens_np(6, case.seed)
    g0 = weights.gate[0]
    for row, z in enumerate((89.0, 100.0, 1000.0)):
        x[row] = g0 * (z / (g0 @ g0))
    x_mx = mx.array(x, dtype=mx.float32)
    got_i, got_w = built.route(x_mx)
    if not np.all(np.isfinite(got_w)):
        t = int(np.nonzero(~np.all(np.isfinite(got_w), -1))[0][0])
        raise Departure(f"non-finite weights {got_w[t].tolist()} at a logit of "
                        f"{[89, 100, 1000, 0, 0, 0][t]} (softplus overflows)")
    built = variant.build(setting, weights)
    check_route(built, x_mx, weights, config, what="large logits: ")
    return "finite and equal to the reference at logits 89, 100, 1000"


def k_equals_experts(case: VariantCase, variant: Variant) -> str:
    e = case.n_experts
    setting = setting_of(case, top_k=e)
    config = setting.config(block_revision(variant))
    weights = data.weights(setting, case.seed)
    x_mx = data.tokens(6, case.seed)
    built = variant.build(setting, weights)
    got_i, _ = built.route(x_mx)
    if not np.all(np.sort(got_i, -1) == np.arange(e)):
        raise Departure(f"k = E = {e} chose {fmt_set(got_i[0])} for token 0")
    check_route(variant.build(setting, weights), x_mx, weights, config, what="k = E: ")
    power_note = compare_block(variant.build(setting, weights), x_mx, config, "float32",
                               "k = E block")
    return carried(f"k = E = {e} chooses every expert; the block equals the reference; "
                   f"{power_note}", power_note)


def hash_routing(case: VariantCase, variant: Variant) -> str:
    setting = setting_of(case, hash_layer=True)
    probe = variant.build(setting)
    if not probe.has_table:
        variant.properties["hash_routing"] = False
        if variant.declares_hash_layers:
            raise Departure("ModelArgs declares num_hash_layers, but layer 0's router holds no "
                            "[vocab, k] token table (tid2eid)")
        if variant.model_type == "deepseek_v4":
            raise Departure("no hash routing, yet ModelArgs says model_type 'deepseek_v4': a V4 "
                            "checkpoint's num_hash_layers would be dropped and its first layers "
                            "routed by score instead of tid2eid[input_ids]")
        raise NotApplicable(
            f"no hash routing: ModelArgs declares no num_hash_layers, no router holds a token "
            f"table, the block is called as {signature_text(probe.moe.__call__)}; a model of "
            f"another model_type ({variant.model_type}) has no hash layers to check")
    variant.properties["hash_routing"] = True
    if not takes_ids(probe.moe.__call__):
        raise Departure(f"layer 0's router holds a token table, but the block's call "
                        f"{signature_text(probe.moe.__call__)} takes no input_ids")
    config = setting.config(block_revision(variant))
    weights = data.weights(setting, case.seed)
    weights.bias = np.zeros(setting.n_experts)
    rng = np.random.default_rng(case.seed)
    weights.bias[rng.permutation(setting.n_experts)[:setting.top_k]] = 10.0
    n = case.n_tokens
    x_mx, ids = data.tokens(n, case.seed), data.input_ids(n)
    got_i, _ = variant.build(setting, weights).route(x_mx, ids)
    table = weights.tid2eid[ids]
    bad = np.nonzero(~same_sets(got_i, table))[0]
    if bad.size:
        t = int(bad[0])
        raise Departure(f"token {t} (id {ids[t]}) routed to {fmt_set(got_i[t])}, its table row is "
                        f"{fmt_set(table[t])} ({bad.size} of {n} tokens differ)")
    check_route(variant.build(setting, weights), x_mx, weights, config, ids, "hash layer: ")
    power_note = compare_block(variant.build(setting, weights), x_mx, config, "float32",
                               "hash layer block")
    return carried("layer 0 routes by tid2eid[input_ids] (bias ignored); the block equals "
                   f"the reference; {power_note}", power_note)


# DeepSeek-V4-Flash's router: D = 4096, E = 256, k = 6, sqrtsoftplus.
FLASH = dict(hidden=4096, experts=256, top_k=6)


def bfloat16_router_flips(tokens: int = 256, seed: int = 0) -> float:
    """The fraction of DeepSeek-V4-Flash-shaped tokens whose chosen set
    changes when the router's logits are computed from bfloat16 operands and
    rounded to bfloat16, against float32 (a model of the departure, in NumPy:
    unit-variance tokens, router rows of norm ~1, no bias)."""
    rng = np.random.default_rng(seed)
    d, e, k = FLASH["hidden"], FLASH["experts"], FLASH["top_k"]
    x = rng.normal(0.0, 1.0, (tokens, d)).astype(np.float32)
    w = (rng.normal(0.0, 1.0, (e, d)) / np.sqrt(d)).astype(np.float32)
    exact = ref.scores(x.astype(np.float64) @ w.T.astype(np.float64), "sqrtsoftplus")
    rounded = ref.scores(bf16(bf16(x).astype(np.float64) @ bf16(w).T), "sqrtsoftplus")
    want = np.sort(np.argsort(-exact, -1)[:, :k], -1)
    got = np.sort(np.argsort(-rounded, -1)[:, :k], -1)
    return float(np.mean(np.any(want != got, -1)))


def router_precision(case: VariantCase, variant: Variant) -> str:
    setting = setting_of(case)
    config = setting.config()
    n = 32
    weights, x = precision_weights(setting, n)
    want_i, _ = ref.route(x, weights, config)
    for router_dtype in ("float32", "bfloat16"):
        built = variant.build(setting, weights)
        built.cast_router(router_dtype)
        got_i, _ = built.route(mx.array(x, dtype=mx.bfloat16))
        bad = np.nonzero(~same_sets(got_i, want_i))[0]
        if bad.size:
            t = int(bad[0])
            flips = bfloat16_router_flips()
            raise Departure(
                f"router weight in {router_dtype}, bfloat16 tokens: {bad.size} of {n} tokens "
                f"chose the wrong one of two experts whose logits differ by 2^-10 (token {t}: "
                f"{fmt_set(got_i[t])}, float32 router {fmt_set(want_i[t])}): the logits are not "
                f"computed in float32; on DeepSeek-V4-Flash-shaped tokens (D = 4096, E = 256, "
                f"k = 6) a bfloat16 router changes the chosen set of ~{flips:.0%} of tokens")
    return "bfloat16 tokens, logits 2^-10 apart: same sets as a float32 router (weight f32, bf16)"


def bf16_ulps(a: np.ndarray, b: np.ndarray, at: np.ndarray | None = None) -> np.ndarray:
    """|a - b| in units of bfloat16's spacing at |at| (default |b|; 8
    significant bits)."""
    at = np.abs(b) if at is None else at
    spacing = 2.0 ** (np.floor(np.log2(np.maximum(at, 1e-30))) - 7)
    return np.abs(a - b) / spacing


def expect_combine(w, ys, sh) -> tolerance.Expected:
    """combine_precision's expected side: the block's own routed outputs
    ``ys`` [T, k, D] weighted by its route ``w`` [T, k] plus its shared
    output ``sh`` [T, D], added in float32 and rounded once to bfloat16
    (2^-8 relative, doubled for the float32 products and sums on the way:
    8 F32 of the terms' magnitude)."""
    exact = (w[..., None] * ys).sum(1) + sh
    scale = np.abs(w[..., None] * ys).sum(1) + np.abs(sh)
    bound = 2.0**-7 * np.abs(exact) + 8 * F32 * scale + 1e-30
    return tolerance.Expected(exact, bound, tolerance.arithmetic("bfloat16"))


def combine_precision(case: VariantCase, variant: Variant) -> str:
    reason = backend.unsupported(MXFP4, "bfloat16")
    if reason:
        raise NotApplicable(reason)
    setting = setting_of(case)
    weights = data.weights(setting, case.seed)
    for name in ("w1", "w3", "w2"):  # identical experts: routed = route_scale * f(x)
        w = getattr(weights, name)
        w[:] = w[0]
    built = variant.build(setting, weights, quant=MXFP4)
    read = built.read()
    rs = setting.route_scale
    shared = {"gate": read.w1[0], "up": read.w3[0], "down": -rs * read.w2[0]}
    for role, w in shared.items():  # the shared expert undoes the routed ones
        set_weight(built.projection("shared", role), w)
    built.cast("bfloat16")
    n = case.n_tokens
    x_mx = data.tokens(n, case.seed, "bfloat16")
    got = to_numpy(built(x_mx, ids_for(built, n)))
    idx, w = built.route(x_mx)
    ys = to_numpy(built.experts(x_mx, idx))
    sh = to_numpy(built.shared_out(x_mx))
    expected = expect_combine(w, ys, sh)
    exact = expected.want
    scale = np.abs(w[..., None] * ys).sum(1) + np.abs(sh)
    bad = expected.check(got)
    if not bad:
        cancel = float(np.median(np.abs(exact) / np.maximum(scale, 1e-30)))
        return f"one rounding of a float32 combine (shared cancels routed to ~{cancel:.1g} of it)"
    # The departure's size where users meet it: ordinary tokens and experts
    # (nothing cancels), the output against the one-rounding combine of the
    # block's own parts, in bfloat16 ulps of the output.
    ulps = ordinary_combine_ulps(variant, setting, case.seed)
    size = (f"on ordinary tokens it moves {np.mean(ulps > 0.01):.0%} of outputs, worst by "
            f"{ulps.max():.2g} bfloat16 ulps of the larger term")
    name = next((name for name, candidate in combine_lookalikes(w, ys, sh)
                 if tolerance.first_difference(got, candidate) is None),
                "the output is not the float32 combine of the block's own parts rounded once")
    # One extra rounding of a term t moves the output by at most ulp(t) / 2,
    # and the final rounding by ulp(out) / 2 <= ulp(max term) (|out| is at
    # most twice the larger term): 1.5 ulps of the larger term, against the
    # exact sum, is what a bfloat16 reference rounding of its parts would
    # do.  Within that: reported with its size, never fatal.
    if ulps.max() <= 1.5 * (1 + 2.0**-10):  # float32 sums on the way: a hair more
        raise Minor(f"{name}: {size}")
    raise Departure(f"{name} ({size}): {bad}")


def ordinary_combine_ulps(variant: Variant, setting: Setting, seed: int) -> np.ndarray:
    """The block's output against the one-rounding combine of its own parts,
    on ordinary tokens, in bfloat16 ulps of the larger of the two terms it
    adds (routed sum, shared output): one extra rounding of a term moves the
    output by at most half of one such ulp."""
    built = variant.build(setting, data.weights(setting, seed + 7), quant=MXFP4,
                          dtype="bfloat16")
    n = 64
    x = data.tokens(n, seed + 7, "bfloat16")
    got = to_numpy(built(x, ids_for(built, n)))
    idx, w = built.route(x)
    ys = to_numpy(built.experts(x, idx))
    sh = to_numpy(built.shared_out(x))
    routed = (w[..., None] * ys).sum(1)
    exact = routed + sh
    return bf16_ulps(got.reshape(exact.shape), exact, np.maximum(np.abs(routed), np.abs(sh)))


def output_dtype(case: VariantCase, variant: Variant) -> str:
    runs = [("float32", (1, 5), None)]
    if backend.unsupported(MXFP4, "bfloat16") is None:
        runs.append(("bfloat16", (2, 4), MXFP4))
    for dtype, shape, quant in runs:
        setting = setting_of(case)
        built = variant.build(setting, data.weights(setting, case.seed), quant=quant,
                              shared_quant=AFFINE8 if quant else None, dtype=dtype)
        n = int(np.prod(shape))
        x = data.tokens(n, case.seed, dtype).reshape(*shape, HIDDEN)
        ids = ids_for(built, n)
        out = built(x, None if ids is None else ids.reshape(shape))
        if out.dtype != DTYPES[dtype]:
            raise Departure(f"returned {out.dtype} for {dtype} input of shape {tuple(x.shape)}")
        if tuple(out.shape) != tuple(x.shape):
            raise Departure(f"returned shape {tuple(out.shape)} for input of shape "
                            f"{tuple(x.shape)}")
    return "x's dtype and shape come back (float32 [1, 5, D]; bfloat16 [2, 4, D])"


def sharded_moe_2_ranks(case: VariantCase, variant: Variant) -> str:
    from dsv4shard.variants import sharded

    return sharded.check(variant)


def sharded_model(case: VariantCase, variant: Variant) -> str:
    from dsv4shard.variants import sharded_model as whole

    results = [whole.check(variant, ranks=2)]
    try:
        results.append(whole.check(variant, ranks=4))
    except NotApplicable as reason:
        results.append(f"4 ranks not checked: {reason}")
    return "; ".join(results)


def fused_bit_exact(case: VariantCase, variant: Variant) -> str:
    from mlx_lm.models.switch_layers import SwitchGLU

    from dsv4shard.fuse import install_fused

    setting = setting_of(case)
    probe = variant.build(setting)
    if not isinstance(probe.routed, SwitchGLU):
        raise NotApplicable(f"the routed experts are a {type(probe.routed).__name__}, not an "
                            f"mlx-lm SwitchGLU: the installer fuses SwitchGLUs only")
    forced = probe.forced_quant
    runs = [(forced, "float32"), (forced, "bfloat16")] if forced else \
        [(None, "float32"), (MXFP4, "float32"), (AFFINE8, "bfloat16")]
    threshold = getattr(probe.routed, "sort_threshold", 64)
    counts = (1, max(64, int(threshold)) // setting.top_k + 8)
    checked = 0
    for quant, dtype in runs:
        if backend.unsupported(quant, dtype):
            continue
        built = variant.build(setting, data.weights(setting, case.seed, 30.0), quant=quant,
                              dtype=dtype)
        unfused = built.routed
        fused = install_fused(copy.deepcopy(unfused))
        for n in counts:
            x = data.tokens(n, case.seed + n, dtype)
            idx = np.argsort(np.random.default_rng(n).random((n, setting.n_experts)), -1)
            idx = mx.array(idx[:, :setting.top_k], dtype=mx.int32)
            a, b = unfused(x, idx), fused(x, idx)
            diff = tolerance.first_difference(raw(a), raw(b))
            if diff:
                what = quant.mode if quant else "dense"
                raise Departure(f"fused differs from the variant's own experts ({what}, {dtype}, "
                                f"{n} tokens): {diff}")
            checked += 1
    note = f"; its own sort threshold is {threshold}" if threshold != 64 else ""
    return f"bit-exact in {checked} runs (formats x token counts){note}"
