"""The named conformance checks of a variant's MoE block (issue 5).

Each check returns a one-line detail when it passes, raises
:class:`Departure` with a one-line diagnosis when the variant departs from
the reference, or :class:`Skip` with the reason when there is nothing to
check.  A check is REQUIRED when a departure changes what a DeepSeek-V4
checkpoint (Flash or Pro: sqrtsoftplus scores, k = 6 of 256 or 384
experts, L = 10, hash layers, mxfp4 experts, bfloat16 activations,
sharded and fused) computes; INFORMATIONAL when it is only reached at
settings no V4 checkpoint uses (softmax scores, k = 1, k = E, L <= 0,
scores that all underflow) or when it names a choice between published
revisions of DeepSeek's code (which revision the shared expert follows).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

import reference as ref
from dsv4shard import backend
from dsv4shard.testing import tolerance
from dsv4shard.variants import data
from dsv4shard.variants.adapter import (
    HIDDEN,
    INTER,
    Setting,
    StructureError,
    Variant,
    signature_text,
    takes_ids,
)
from dsv4shard.weights import DTYPES, to_numpy
from reference.moe_block import MoEWeights, Revision
from reference.quantization import QuantFormat

MXFP4 = QuantFormat("mxfp4", 32, 4)
AFFINE8 = QuantFormat("affine", 32, 8)
F32 = tolerance.F32


class Skip(Exception):
    """Nothing to check; the message says why."""


class Departure(AssertionError):
    """The variant departs from the reference; the message is the diagnosis."""


@dataclass(frozen=True)
class Check:
    name: str
    required: bool
    func: object  # func(variant) -> detail
    summary: str


@dataclass
class Result:
    check: str
    required: bool
    status: str  # PASS, FAIL or SKIP
    detail: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"check": self.check, "required": self.required, "status": self.status,
                "detail": self.detail, "seconds": self.seconds}


CHECKS: list[Check] = []


def check(name: str, required: bool):
    def register(func):
        summary = (func.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        CHECKS.append(Check(name, required, func, " ".join(summary.split())))
        return func

    return register


def by_name(name: str) -> Check:
    for c in CHECKS:
        if c.name == name:
            return c
    raise KeyError(f"no check named {name!r}; checks: {[c.name for c in CHECKS]}")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def run_check(variant: Variant, chk: Check) -> Result:
    start = time.perf_counter()
    try:
        if chk.name != "structure":
            try:
                _ = variant.layout
            except StructureError as error:
                raise Skip(f"no MoE block found (see structure): {one_line(error)[:200]}") from None
        status, detail = "PASS", chk.func(variant)
    except Skip as reason:
        status, detail = "SKIP", str(reason)
    except Departure as diagnosis:
        status, detail = "FAIL", str(diagnosis)
    except StructureError as error:
        status, detail = "FAIL", f"adapter: {error}"
    except Exception as error:  # the variant's code raised: a finding, never a crash
        status, detail = "FAIL", f"raised {type(error).__name__}: {error}{where(error)}"
    return Result(chk.name, chk.required, status, one_line(detail),
                  round(time.perf_counter() - start, 2))


def where(error: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename.rsplit('/', 1)[-1]}:{f.lineno})"


def run_all(variant: Variant, names=None) -> list[Result]:
    return [run_check(variant, c) for c in CHECKS if names is None or c.name in names]


# --- shared helpers ------------------------------------------------------------------


def fmt_set(indices) -> str:
    return "{" + ", ".join(str(int(i)) for i in sorted(indices)) + "}"


def same_sets(a, b) -> np.ndarray:
    return np.all(np.sort(a, axis=-1) == np.sort(b, axis=-1), axis=-1)


def clear_tokens(x, weights, config) -> np.ndarray:
    """Tokens whose k-th and (k+1)-th biased scores are far enough apart for
    a float32 router to agree with the reference (SPEC §6: never tolerate a
    near-tie, leave it out)."""
    if config.hash_routing:
        return np.ones(x.shape[0], bool)
    return tolerance.router_gap(x, weights, config) > tolerance.router_margin(x, weights, config)


def compare_route(built, x_mx, weights, config, ids=None, what=""):
    """The router's sets and weights against the reference's, on clear tokens."""
    x = to_numpy(x_mx)
    got_i, got_w = built.route(x_mx, ids)
    want_i, want_w = ref.route(x, weights, config, ids)
    keep = clear_tokens(x, weights, config)
    same = same_sets(got_i, want_i)
    bad = np.nonzero(keep & ~same)[0]
    if bad.size:
        t = bad[0]
        raise Departure(f"{what}token {t} chose experts {fmt_set(got_i[t])}, the reference "
                        f"{fmt_set(want_i[t])} ({bad.size} of {int(keep.sum())} tokens differ)")
    order = np.argsort(got_i, axis=-1)
    got_w = np.take_along_axis(got_w, order, -1)
    want_w = np.take_along_axis(want_w, np.argsort(want_i, axis=-1), -1)
    bound = tolerance.route_weight_error(x, weights, config, np.sort(want_i, -1)) + 1e-30
    return got_i, got_w, want_w, bound, keep


def check_route(built, x_mx, weights, config, ids=None, what="") -> None:
    """The router's sets (compare_route), then its weights (route_diagnosis)."""
    got_i, got_w, want_w, bound, keep = compare_route(built, x_mx, weights, config, ids, what)
    route_diagnosis(got_w, want_w, bound, keep, config,
                    scores_of(to_numpy(x_mx), weights, config), got_i, what)


def route_diagnosis(got_w, want_w, bound, keep, config, token_scores, indices, what="") -> None:
    bad = tolerance.worst_mismatch(got_w[keep], want_w[keep], bound[keep])
    if bad is None:
        return
    rs = config.route_scale
    sums = got_w[keep].sum(-1)
    chosen = np.take_along_axis(token_scores, np.sort(indices, -1), -1)[keep]
    raw = chosen * rs
    renorm = chosen / chosen.sum(-1, keepdims=True) * rs
    if np.allclose(got_w[keep], raw, rtol=1e-4, atol=0):
        kind = "not renormalised: weights are score x route_scale"
    elif np.allclose(got_w[keep], renorm, rtol=1e-4, atol=0):
        kind = f"renormalised to sum to route_scale = {rs:g}"
    elif np.allclose(got_w[keep], renorm / rs, rtol=1e-4, atol=0):
        kind = "renormalised but route_scale never applied (weights sum to 1)"
    elif np.allclose(got_w[keep], chosen, rtol=1e-4, atol=0):
        kind = "raw scores: neither renormalised nor scaled"
    else:
        kind = f"weights sum to {sums.min():.6g}..{sums.max():.6g}"
    raise Departure(f"{what}{kind}; {bad}")


def scores_of(x, weights, config):
    return ref.scores(ref.router_logits(x, weights.gate), config.score_func)


# --- probes of the clipped SwiGLU ---------------------------------------------------


def probe_weights(setting: Setting, seed: int = 0) -> MoEWeights:
    """Experts that pass x's first I values as gate and its last I as up, and
    return the activation in the first I outputs: one token probes I pairs."""
    eye, zero = np.eye(INTER), np.zeros((INTER, INTER))
    w1, w3, w2 = np.hstack([eye, zero]), np.hstack([zero, eye]), np.vstack([eye, zero])
    base = data.weights(setting, seed)
    e = setting.n_experts
    return MoEWeights(gate=base.gate, bias=np.zeros(e), tid2eid=base.tid2eid,
                      w1=np.tile(w1, (e, 1, 1)), w3=np.tile(w3, (e, 1, 1)),
                      w2=np.tile(w2, (e, 1, 1)), shared_w1=w1, shared_w3=w3, shared_w2=w2)


def probe_tokens(limit: float) -> np.ndarray:
    """x [T, D] holding every (gate, up) pair of a grid around +-L and +-20."""
    if limit > 0:
        values = [-20.0, -limit - 1.5, -limit, -0.6 * limit, -0.1, 0.3 * limit, limit,
                  limit + 1.5, 20.0]
    else:
        values = [-20.0, -12.0, -3.25, -0.1, 0.75, 12.0, 20.0]
    pairs = [(g, u) for g in values for u in values]
    rows = -(-len(pairs) // INTER)
    x = np.zeros((rows, HIDDEN))
    for n, (g, u) in enumerate(pairs):
        x[n // INTER, n % INTER] = g
        x[n // INTER, INTER + n % INTER] = u
    return x


def silu(z):
    return ref.silu(z)


# Look-alikes of DeepSeek's clip (SPEC §1): (name, activation(gate, up, L)).
def _clip(g, u, lim):
    return silu(np.minimum(g, lim)) * np.clip(u, -lim, lim)


LOOKALIKES = [
    ("no clip at all", lambda g, u, L: silu(g) * u),
    ("gate clipped on both sides, to [-L, L] (DeepSeek clips gate from above only)",
     lambda g, u, L: silu(np.clip(g, -L, L)) * np.clip(u, -L, L) if L > 0 else silu(g) * u),
    ("the clip comes after silu (min(silu(gate), L)), not before it",
     lambda g, u, L: np.minimum(silu(g), L) * np.clip(u, -L, L) if L > 0 else silu(g) * u),
    ("up clipped from above only (DeepSeek clips up on both sides)",
     lambda g, u, L: silu(np.minimum(g, L)) * np.minimum(u, L) if L > 0 else silu(g) * u),
    ("gate not clipped (only up is)",
     lambda g, u, L: silu(g) * np.clip(u, -L, L) if L > 0 else silu(g) * u),
    ("up not clipped (only gate is)",
     lambda g, u, L: silu(np.minimum(g, L)) * u if L > 0 else silu(g) * u),
    ("gate and up swapped (activation(gate, up) where SwitchGLU passes (up, gate))",
     lambda g, u, L: silu(np.minimum(u, L)) * np.clip(g, -L, L) if L > 0 else silu(u) * g),
    ("clips at a fixed L = 10 whatever swiglu_limit says", lambda g, u, L: _clip(g, u, 10.0)),
    ("clips even with swiglu_limit <= 0 (a zero limit zeroes up)",
     lambda g, u, L: silu(np.minimum(g, L)) * np.clip(u, -abs(L), abs(L))),
]


def mlp_with(activation, x, w1, w3, w2, limit):
    return activation(x @ w1.T, x @ w3.T, limit) @ w2.T


def probe_diagnosis(got, x, w, limit, bound, want_name="DeepSeek's clip") -> str:
    """Name the look-alike the output matches, or the probe that departs."""
    w1, w3, w2 = w
    for name, act in LOOKALIKES:
        if tolerance.worst_mismatch(got, mlp_with(act, x, w1, w3, w2, limit), bound) is None:
            return name
    want = mlp_with(lambda g, u, L: ref.clipped_swiglu(g, u, L), x, w1, w3, w2, limit)
    bad = tolerance.worst_mismatch(got, want, bound)
    t, j = bad.index[0], bad.index[-1]
    g, u = (x @ w1.T)[t, j % INTER], (x @ w3.T)[t, j % INTER]
    return (f"departs from {want_name} at gate = {g:g}, up = {u:g}: got {bad.actual:.6g}, "
            f"expected {bad.expected:.6g}")


def probe_bound(want) -> np.ndarray:
    return 1e-5 * np.abs(want) + 1e-6


def routed_probe(variant: Variant, limit: float):
    """(got [T, D] from the routed experts, x, dequantized (w1, w3, w2) of
    expert 0, every expert and slot agreeing)."""
    setting = Setting(limit=limit)
    built = variant.build(setting, probe_weights(setting))
    x = probe_tokens(limit)
    e = setting.n_experts
    indices = (np.arange(x.shape[0])[:, None] + np.arange(setting.top_k)) % e
    out = to_numpy(built.experts(mx.array(x, dtype=mx.float32), indices))
    read = built.read()
    outs = []
    for slot in range(setting.top_k):  # every expert must hold the same probe
        outs.append(out[:, slot])
    w = (read.w1[indices[0, 0]], read.w3[indices[0, 0]], read.w2[indices[0, 0]])
    return outs, x, w


def shared_probe(variant: Variant, limit: float):
    setting = Setting(limit=limit)
    built = variant.build(setting, probe_weights(setting))
    x = probe_tokens(limit)
    out = to_numpy(built.shared_out(mx.array(x, dtype=mx.float32)))
    read = built.read()
    return out, x, (read.shared_w1, read.shared_w3, read.shared_w2)


def expect_clip(outs, x, w, limit):
    """None when every output is DeepSeek's clip at ``limit``, else the diagnosis."""
    want = mlp_with(lambda g, u, L: ref.clipped_swiglu(g, u, L), x, *w, limit)
    bound = probe_bound(want)
    for got in outs:
        if tolerance.worst_mismatch(got, want, bound) is not None:
            return probe_diagnosis(got, x, w, limit, bound)
    return None


# --- revision ------------------------------------------------------------------------


def revision_of(variant: Variant) -> Revision | None:
    """Which spec revision the shared expert follows (None: neither)."""
    if "revision_probe" not in variant.properties:
        out, x, w = shared_probe(variant, 10.0)
        clipped = mlp_with(lambda g, u, L: ref.clipped_swiglu(g, u, L), x, *w, 10.0)
        plain = mlp_with(lambda g, u, L: silu(g) * u, x, *w, 10.0)
        found = None
        if tolerance.worst_mismatch(out, clipped, probe_bound(clipped)) is None:
            found = Revision.SHARED_CLIPPED
        elif tolerance.worst_mismatch(out, plain, probe_bound(plain)) is None:
            found = Revision.FIRST_RELEASE
        variant.properties["revision_probe"] = found
        variant.properties["revision"] = found.value if found else "neither"
    return variant.properties["revision_probe"]


# --- whole-block comparison ------------------------------------------------------------


def ids_for(built, n_tokens: int):
    return data.input_ids(n_tokens) if (built.setting.hash_layer or takes_ids(built.moe.__call__)) \
        else None


def compare_block(built, x_mx, config, dtype: str, what: str, shape=None) -> None:
    """The block's output against ``reference.moe`` on its own (read-back)
    weights, on tokens with a clear router choice, within the stage bound."""
    weights = built.read()
    x = to_numpy(x_mx)
    ids = data.input_ids(x.shape[0])
    call_ids = ids if (config.hash_routing or takes_ids(built.moe.__call__)) else None
    xin = x_mx if shape is None else x_mx.reshape(*shape, -1)
    got = built(xin, None if call_ids is None else call_ids.reshape(xin.shape[:-1]))
    got = to_numpy(got).reshape(x.shape[0], -1)
    want = ref.moe(x, weights, config, ids if config.hash_routing else None)
    bound = tolerance.moe_bound(x, weights, config, dtype, ids if config.hash_routing else None)
    keep = clear_tokens(x, weights, config)
    bad = tolerance.worst_mismatch(got[keep], want[keep], bound[keep])
    if bad:
        raise Departure(f"{what}: {bad}")


BLOCK_CASES = [  # (seed, tokens, activation scale, batch shape)
    (0, 5, 1.0, None),
    (1, 40, 30.0, None),  # T * k = 80 >= 64: SwitchGLU sorts by expert
    (2, 12, 30.0, (3, 4)),
]


def block_revision(variant: Variant) -> Revision:
    return revision_of(variant) or Revision.SHARED_CLIPPED


# --- the checks ------------------------------------------------------------------------


@check("structure", required=True)
def structure(variant: Variant) -> str:
    """The adapter finds the router, the routed experts and the shared expert
    by their shapes, builds the block from a tiny ModelArgs and calls it."""
    layout = variant.describe_layout()
    built = variant.build()
    variant.properties.update(
        layout=layout, call=signature_text(built.moe.__call__),
        router_returns=variant.gate_order(variant.build()),
        routed_experts=variant.layout.path("routed"),
        forced_quantization=(f"{built.forced_quant.mode} {built.forced_quant.bits}-bit group "
                             f"{built.forced_quant.group_size}") if built.forced_quant else None)
    if built.forced_quant:
        layout += f"; routed experts forced to {built.forced_quant.mode} (checked on the weights " \
                  f"as they round-trip)"
    return layout


@check("moe_matches_reference", required=True)
def moe_matches_reference(variant: Variant) -> str:
    """The whole block (router, routed and shared experts, combine) equals the
    float64 reference on its own weights, float32, [T, D] and [B, L, D], on
    both sides of SwitchGLU's sort threshold and across the clip."""
    revision = block_revision(variant)
    for seed, n, scale, shape in BLOCK_CASES:
        setting = Setting()
        built = variant.build(setting, data.weights(setting, seed, scale))
        x = data.tokens(n, seed)
        compare_block(built, x, setting.config(revision), "float32",
                      f"seed {seed}, {n} tokens, activation scale {scale:g}", shape)
    quant = variant.build().forced_quant
    fmt = f" ({quant.mode} experts, as the variant forces)" if quant else ""
    return (f"{len(BLOCK_CASES)} cases within the stage bound{fmt}; reference revision "
            f"{revision.value}")


@check("quantized_moe_matches_reference", required=True)
def quantized_moe_matches_reference(variant: Variant) -> str:
    """As checkpoints run it: routed experts mxfp4 (group 32), shared expert
    affine 8-bit, bfloat16 activations; against the reference on the
    dequantized weights."""
    reason = backend.unsupported(MXFP4, "bfloat16")
    if reason:
        raise Skip(reason)
    revision = block_revision(variant)
    # Scale 100 drives gate and up deep past the clip: a bfloat16 path that
    # loses the clip is off by ~scale^2 while the bound grows ~scale.
    for seed, n, scale in ((3, 6, 1.0), (4, 40, 100.0)):
        setting = Setting()
        built = variant.build(setting, data.weights(setting, seed, scale), quant=MXFP4,
                              shared_quant=AFFINE8, dtype="bfloat16")
        x = data.tokens(n, seed, "bfloat16")
        compare_block(built, x, setting.config(revision), "bfloat16",
                      f"mxfp4/bfloat16, seed {seed}, {n} tokens, activation scale {scale:g}")
    return "mxfp4 routed + affine-8 shared experts in bfloat16 within the stage bound"


@check("routed_clip", required=True)
def routed_clip(variant: Variant) -> str:
    """Routed experts clip up to [-L, L] and gate from above at L, both
    before silu (probes at gate = -20, up = -20, +-L, L + 1.5, 20)."""
    outs, x, w = routed_probe(variant, 10.0)
    diagnosis = expect_clip(outs, x, w, 10.0)
    if diagnosis:
        raise Departure(f"routed experts: {diagnosis}")
    return "gate <= L, -L <= up <= L, before silu, in every expert (L = 10, 81 probes)"


@check("spec_revision", required=False)
def spec_revision(variant: Variant) -> str:
    """Whether the shared expert is clipped (the later revision, shared-clipped)
    or not (the first release): which spec revision the variant matches."""
    found = revision_of(variant)
    if found is Revision.SHARED_CLIPPED:
        return "shared expert clipped with the routed experts' L: matches revision " \
               "shared-clipped (DeepSeek's later code)"
    if found is Revision.FIRST_RELEASE:
        return "shared expert not clipped: matches revision first-release"
    out, x, w = shared_probe(variant, 10.0)
    clipped = mlp_with(lambda g, u, L: ref.clipped_swiglu(g, u, L), x, *w, 10.0)
    raise Departure("the shared expert matches neither revision: "
                    + probe_diagnosis(out, x, w, 10.0, probe_bound(clipped)))


@check("limit_disables_clip", required=False)
def limit_disables_clip(variant: Variant) -> str:
    """swiglu_limit <= 0 means no clip at all, in the routed and the shared
    experts."""
    if not variant.has_field("limit"):
        raise Skip("ModelArgs has no swiglu_limit field")
    for limit in (0.0, -1.0):
        outs, x, w = routed_probe(variant, limit)
        shared, xs, ws = shared_probe(variant, limit)
        for what, got, xx, ww in [("routed", o, x, w) for o in outs] + [("shared", shared, xs, ws)]:
            want = mlp_with(lambda g, u, L: silu(g) * u, xx, *ww, limit)
            bound = probe_bound(want)
            if tolerance.worst_mismatch(got, want, bound) is not None:
                name = probe_diagnosis(got, xx, ww, limit, bound, "no clip")
                raise Departure(f"swiglu_limit = {limit:g}: {what} experts: {name}")
    return "swiglu_limit = 0 and -1 leave gate and up unclipped (routed and shared)"


@check("bias_chooses_only", required=True)
def bias_chooses_only(variant: Variant) -> str:
    """The correction bias chooses the experts (top-k of scores + bias) and
    never enters the weights."""
    setting = Setting()
    config = setting.config()
    built = variant.build(setting)
    if "bias" not in built.keys:
        raise Departure("the router holds no correction bias [E] (e_score_correction_bias): "
                        "a V4 checkpoint's gate.bias has nowhere to go")
    x_mx = data.tokens(24, 5)
    x = to_numpy(x_mx)
    weights = data.weights(setting, 5)
    forced = np.random.default_rng(5).permutation(setting.n_experts)[:setting.top_k]
    weights.bias = np.zeros(setting.n_experts)
    weights.bias[forced] = 10.0
    built.load(weights)
    got_i, got_w = built.route(x_mx)
    wrong = ~np.all(np.sort(got_i, -1) == np.sort(forced), axis=-1)
    if wrong.any():
        t = int(np.nonzero(wrong)[0][0])
        raise Departure(f"a +10 bias on experts {fmt_set(forced)} did not choose them: token {t} "
                        f"chose {fmt_set(got_i[t])} (the bias is not added before top-k)")
    s = scores_of(x, weights, config)
    order = np.argsort(got_i, -1)
    got_w = np.take_along_axis(got_w, order, -1)
    chosen = s[:, np.sort(forced)]
    want = chosen / chosen.sum(-1, keepdims=True) * config.route_scale
    bound = tolerance.route_weight_error(x, weights, config, np.tile(np.sort(forced), (len(x), 1)))
    if tolerance.worst_mismatch(got_w, want, bound) is not None:
        biased = chosen + 10.0
        if np.allclose(got_w, biased / biased.sum(-1, keepdims=True) * config.route_scale,
                       rtol=1e-4):
            raise Departure("the bias entered the weights: they are renormalised (score + bias)")
        raise Departure(f"with a +10 bias the weights are not the unbiased scores': "
                        f"{tolerance.worst_mismatch(got_w, want, bound)}")
    weights = data.weights(setting, 6)  # a small random bias: shifts choices only
    built.load(weights)
    x_mx = data.tokens(24, 6)
    check_route(built, x_mx, weights, config, what="random bias: ")
    return "a +10 bias forces the set; the weights stay the unbiased scores'"


@check("renormalisation", required=True)
def renormalisation(variant: Variant) -> str:
    """sqrtsoftplus weights (k = 2 and 6) are the chosen scores renormalised
    to sum to 1, times route_scale."""
    for k in (2, 6):
        setting = Setting(top_k=k)
        config = setting.config()
        weights = data.weights(setting, 10 + k)
        built = variant.build(setting, weights)
        x_mx = data.tokens(32, 10 + k)
        check_route(built, x_mx, weights, config, what=f"k = {k}: ")
    return "weights sum to route_scale and equal the renormalised scores (k = 2, 6)"


@check("softmax_not_renormalised", required=False)
def softmax_not_renormalised(variant: Variant) -> str:
    """With softmax scores the weights are the raw chosen probabilities times
    route_scale: DeepSeek renormalises every score function but softmax."""
    if not variant.has_field("score_func"):
        raise Skip("ModelArgs has no scoring_func field")
    setting = Setting(score_func="softmax")
    config = setting.config()
    weights = data.weights(setting, 20)
    built = variant.build(setting, weights)
    x_mx = data.tokens(32, 20)
    got_i, got_w, want_w, bound, keep = compare_route(built, x_mx, weights, config)
    try:  # the sets agree; only how the weights depart says "renormalised"
        route_diagnosis(got_w, want_w, bound, keep, config,
                        scores_of(to_numpy(x_mx), weights, config), got_i)
    except Departure as d:
        variant.properties["softmax_renormalised"] = "renormalised" in str(d) \
            and "not renormalised" not in str(d)
        raise Departure(f"softmax: {d}") from None
    variant.properties["softmax_renormalised"] = False
    return "softmax weights are the raw probabilities x route_scale (not renormalised)"


@check("k1_renormalised", required=False)
def k1_renormalised(variant: Variant) -> str:
    """With k = 1 the one weight is renormalised too: exactly route_scale."""
    setting = Setting(top_k=1)
    config = setting.config()
    weights = data.weights(setting, 21)
    built = variant.build(setting, weights)
    x_mx = data.tokens(32, 21)
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


@check("epsilon_underflow", required=False)
def epsilon_underflow(variant: Variant) -> str:
    """DeepSeek renormalises with no epsilon: chosen scores of ~4e-18 (logits
    near -80) still sum to route_scale, and all-zero scores give NaN."""
    setting = Setting()
    config = setting.config()
    weights = data.weights(setting, 22)
    weights.bias = np.zeros(setting.n_experts)
    logits = -(80.0 + 0.5 * np.arange(setting.n_experts))  # exact in float32
    weights.gate = np.tile((logits / HIDDEN)[:, None], (1, HIDDEN))
    built = variant.build(setting, weights)
    x_mx = mx.ones((4, HIDDEN), dtype=mx.float32)
    x = to_numpy(x_mx)
    got_i, got_w = built.route(x_mx)
    want_i, want_w = ref.route(x, weights, config)
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
    built.load(weights)
    _, zero_w = built.route(x_mx)
    if np.all(np.isnan(zero_w)):
        notes.append("all-zero scores give NaN, as DeepSeek's")
    else:
        ok = False
        notes.append(f"all-zero scores give {zero_w[0].tolist()} (DeepSeek: NaN)")
    if not ok:
        raise Departure("; ".join(notes))
    return "no epsilon: tiny chosen scores renormalise exactly; " + notes[-1]


@check("softplus_overflow", required=True)
def softplus_overflow(variant: Variant) -> str:
    """sqrtsoftplus stays finite and right at logits 89, 100 and 1000 (a
    naive log1p(exp(z)) gives inf/NaN near 89 in float32)."""
    setting = Setting()
    config = setting.config()
    weights = data.weights(setting, 23)
    built = variant.build(setting, weights)
    x = data.tokens_np(6, 23)
    g0 = weights.gate[0]
    for row, z in enumerate((89.0, 100.0, 1000.0)):
        x[row] = g0 * (z / (g0 @ g0))
    x_mx = mx.array(x, dtype=mx.float32)
    got_i, got_w = built.route(x_mx)
    if not np.all(np.isfinite(got_w)):
        t = int(np.nonzero(~np.all(np.isfinite(got_w), -1))[0][0])
        raise Departure(f"non-finite weights {got_w[t].tolist()} at a logit of "
                        f"{[89, 100, 1000, 0, 0, 0][t]} (softplus overflows)")
    check_route(built, x_mx, weights, config, what="large logits: ")
    return "finite and equal to the reference at logits 89, 100, 1000"


@check("k_equals_experts", required=False)
def k_equals_experts(variant: Variant) -> str:
    """k = E: every expert is chosen, and the block still equals the reference."""
    setting = Setting(top_k=8, n_experts=8)
    config = setting.config(block_revision(variant))
    weights = data.weights(setting, 24)
    built = variant.build(setting, weights)
    x_mx = data.tokens(6, 24)
    got_i, _ = built.route(x_mx)
    if not np.all(np.sort(got_i, -1) == np.arange(8)):
        raise Departure(f"k = E = 8 chose {fmt_set(got_i[0])} for token 0")
    check_route(built, x_mx, weights, config, what="k = E: ")
    compare_block(built, x_mx, config, "float32", "k = E block")
    return "k = E = 8 chooses every expert; the block equals the reference"


@check("hash_routing", required=True)
def hash_routing(variant: Variant) -> str:
    """A hash layer's experts are tid2eid[input_ids] whatever the bias, its
    weights the renormalised scores of those experts, and the block called
    with input_ids equals the reference."""
    setting = Setting(hash_layer=True)
    built = variant.build(setting)
    if not built.has_table:
        variant.properties["hash_routing"] = False
        if variant.declares_hash_layers:
            raise Departure("ModelArgs declares num_hash_layers, but layer 0's router holds no "
                            "[vocab, k] token table (tid2eid)")
        if variant.model_type == "deepseek_v4":
            raise Departure("no hash routing, yet ModelArgs says model_type 'deepseek_v4': a V4 "
                            "checkpoint's num_hash_layers would be dropped and its first layers "
                            "routed by score instead of tid2eid[input_ids]")
        raise Skip(f"no hash routing: ModelArgs declares no num_hash_layers, no router holds a "
                   f"token table, the block is called as {signature_text(built.moe.__call__)} "
                   f"(DeepSeek-V4's hash layers cannot run on it)")
    variant.properties["hash_routing"] = True
    if not takes_ids(built.moe.__call__):
        raise Departure(f"layer 0's router holds a token table, but the block's call "
                        f"{signature_text(built.moe.__call__)} takes no input_ids")
    config = setting.config(block_revision(variant))
    weights = data.weights(setting, 25)
    weights.bias = np.zeros(setting.n_experts)
    weights.bias[np.random.default_rng(25).permutation(setting.n_experts)[:setting.top_k]] = 10.0
    built.load(weights)
    n = 40
    x_mx, ids = data.tokens(n, 25), data.input_ids(n)
    got_i, _ = built.route(x_mx, ids)
    table = weights.tid2eid[ids]
    bad = np.nonzero(~same_sets(got_i, table))[0]
    if bad.size:
        t = int(bad[0])
        raise Departure(f"token {t} (id {ids[t]}) routed to {fmt_set(got_i[t])}, its table row is "
                        f"{fmt_set(table[t])} ({bad.size} of {n} tokens differ)")
    check_route(built, x_mx, weights, config, ids, "hash layer: ")
    compare_block(built, x_mx, config, "float32", "hash layer block")
    return "layer 0 routes by tid2eid[input_ids] (bias ignored); the block equals the reference"


def precision_weights(setting: Setting, n_tokens: int):
    """A router where, per token, two experts' logits differ by 2^-10, below
    bfloat16's resolution at 1.0 (2^-7) and exact in float32; every value is
    exact in bfloat16."""
    e, d = setting.n_experts, HIDDEN
    gate = np.zeros((e, d))
    gate[:, 0] = -1.0 - 0.125 * np.arange(e)
    gate[0, 0], gate[1, 0], gate[2, 0] = 2.0, 1.0, 1.0
    favour = np.arange(n_tokens) % 2 == 0
    gate[1, 1:1 + n_tokens] = np.where(favour, 2.0**-10, 0.0)
    gate[2, 1:1 + n_tokens] = np.where(favour, 0.0, 2.0**-10)
    x = np.zeros((n_tokens, d))
    x[:, 0] = 1.0
    x[np.arange(n_tokens), 1 + np.arange(n_tokens)] = 1.0
    base = data.weights(setting, 26)
    base.gate, base.bias = gate, np.zeros(e)
    return base, x


@check("router_precision", required=True)
def router_precision(variant: Variant) -> str:
    """The router computes in float32: bfloat16 tokens whose two best
    candidate logits differ by less than bfloat16's resolution choose the
    same set as a float32 router (router weight stored in float32 and, as
    checkpoints cast it, in bfloat16)."""
    setting = Setting()
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
            raise Departure(f"router weight in {router_dtype}, bfloat16 tokens: {bad.size} of {n} "
                            f"tokens chose the wrong one of two experts whose logits differ by "
                            f"2^-10 (token {t}: {fmt_set(got_i[t])}, float32 router "
                            f"{fmt_set(want_i[t])}): the logits are not computed in float32")
    return "bfloat16 tokens, logits 2^-10 apart: same sets as a float32 router (weight f32, bf16)"


def bf16(a: np.ndarray) -> np.ndarray:
    return to_numpy(mx.array(np.asarray(a, np.float32)).astype(mx.bfloat16))


@check("combine_precision", required=True)
def combine_precision(variant: Variant) -> str:
    """Routed and shared outputs are added in float32 and rounded to the
    activation dtype once: a block whose shared expert nearly cancels its
    routed experts, in bfloat16, must equal the one-rounding combine of its
    own parts."""
    reason = backend.unsupported(MXFP4, "bfloat16")
    if reason:
        raise Skip(reason)
    setting = Setting()
    weights = data.weights(setting, 27)
    for name in ("w1", "w3", "w2"):  # identical experts: routed = route_scale * f(x)
        w = getattr(weights, name)
        w[:] = w[0]
    built = variant.build(setting, weights, quant=MXFP4)
    read = built.read()
    rs = setting.route_scale
    shared = {"gate": read.w1[0], "up": read.w3[0], "down": -rs * read.w2[0]}
    from dsv4shard.variants.adapter import set_weight

    for role, w in shared.items():  # the shared expert undoes the routed ones
        set_weight(built.projection("shared", role), w)
    built.cast("bfloat16")
    x_mx = data.tokens(16, 27, "bfloat16")
    got = to_numpy(built(x_mx, ids_for(built, 16)))
    idx, w = built.route(x_mx)
    ys = to_numpy(built.experts(x_mx, idx))
    sh = to_numpy(built.shared_out(x_mx))
    routed = (w[..., None] * ys).sum(1)
    exact = routed + sh
    scale = np.abs(w[..., None] * ys).sum(1) + np.abs(sh)
    bound = 2.0**-7 * np.abs(exact) + 8 * F32 * scale + 1e-30
    bad = tolerance.worst_mismatch(got, exact, bound)
    if bad:
        for name, candidate in combine_lookalikes(w, ys, sh):
            if tolerance.first_difference(got, candidate) is None:
                raise Departure(f"{name}: {bad}")
        raise Departure(f"the output is not the float32 combine of the block's own parts "
                        f"rounded once: {bad}")
    cancel = float(np.median(np.abs(exact) / np.maximum(scale, 1e-30)))
    return f"one rounding of a float32 combine (shared cancels routed to ~{cancel:.1g} of it)"


def combine_lookalikes(w, ys, sh):
    """Combines seen in ports, computed bit for bit as MLX would."""
    w32, y32 = w.astype(np.float32), ys.astype(np.float32)
    routed32 = (w32[..., None] * y32).sum(1, dtype=np.float32)
    yield ("the routed sum is rounded to bfloat16 before the shared expert is added "
           "(combine not in float32)", bf16(bf16(routed32) + sh))
    wb = bf16(w)
    acc = bf16(wb[:, 0, None] * ys[:, 0])
    for slot in range(1, ys.shape[1]):
        acc = bf16(acc + bf16(wb[:, slot, None] * ys[:, slot]))
    yield ("the combine runs in bfloat16 (weights, products and sums rounded to bfloat16)",
           bf16(acc + sh))


@check("output_dtype", required=True)
def output_dtype(variant: Variant) -> str:
    """The block returns x's dtype and shape: bfloat16 [B, L, D] in,
    bfloat16 [B, L, D] out; float32 in, float32 out."""
    runs = [("float32", (1, 5), None)]
    if backend.unsupported(MXFP4, "bfloat16") is None:
        runs.append(("bfloat16", (2, 4), MXFP4))
    for dtype, shape, quant in runs:
        setting = Setting()
        built = variant.build(setting, data.weights(setting, 28), quant=quant,
                              shared_quant=AFFINE8 if quant else None, dtype=dtype)
        n = int(np.prod(shape))
        x = data.tokens(n, 28, dtype).reshape(*shape, HIDDEN)
        ids = ids_for(built, n)
        out = built(x, None if ids is None else ids.reshape(shape))
        if out.dtype != DTYPES[dtype]:
            raise Departure(f"returned {out.dtype} for {dtype} input of shape {tuple(x.shape)}")
        if tuple(out.shape) != tuple(x.shape):
            raise Departure(f"returned shape {tuple(out.shape)} for input of shape "
                            f"{tuple(x.shape)}")
    return "x's dtype and shape come back (float32 [1, 5, D]; bfloat16 [2, 4, D])"


@check("sharded_2_ranks", required=True)
def sharded_2_ranks(variant: Variant) -> str:
    """When the variant's Model has shard(): a tiny Model sharded by it over 2
    real ranks (ring, localhost) gives, on every rank, the unsharded MoE
    output, and every rank chooses the same experts."""
    from dsv4shard.variants import sharded

    return sharded.check(variant)


@check("fused_bit_exact", required=True)
def fused_bit_exact(variant: Variant) -> str:
    """dsv4shard's fused gate+up installer, applied to the variant's routed
    experts, changes no bit of their output (dense, mxfp4, affine-8 in
    bfloat16; token counts on both sides of every sort threshold)."""
    from mlx_lm.models.switch_layers import SwitchGLU

    from dsv4shard.fuse import install_fused

    setting = Setting()
    probe = variant.build(setting)
    if not isinstance(probe.routed, SwitchGLU):
        raise Skip(f"the routed experts are a {type(probe.routed).__name__}, not an mlx-lm "
                   f"SwitchGLU: the installer fuses SwitchGLUs only")
    forced = probe.forced_quant
    runs = [(forced, "float32"), (forced, "bfloat16")] if forced else \
        [(None, "float32"), (MXFP4, "float32"), (AFFINE8, "bfloat16")]
    threshold = getattr(probe.routed, "sort_threshold", 64)
    counts = (1, max(64, int(threshold)) // setting.top_k + 8)
    checked = 0
    for quant, dtype in runs:
        if backend.unsupported(quant, dtype):
            continue
        built = variant.build(setting, data.weights(setting, 29, 30.0), quant=quant, dtype=dtype)
        unfused = built.routed
        fused = install_fused(copy.deepcopy(unfused))
        for n in counts:
            x = data.tokens(n, 29 + n, dtype)
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


def raw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


REQUIRED = [c.name for c in CHECKS if c.required]
INFORMATIONAL = [c.name for c in CHECKS if not c.required]


@dataclass
class Report:
    variant: str
    results: list[Result]
    properties: dict = field(default_factory=dict)
    error: str | None = None  # the variant could not be loaded

    @property
    def failed_required(self) -> list[Result]:
        return [r for r in self.results if r.required and r.status == "FAIL"]

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed_required

    def to_dict(self) -> dict:
        props = {k: v for k, v in self.properties.items() if k != "revision_probe"}
        return {"variant": self.variant, "ok": self.ok, "error": self.error,
                "properties": props, "checks": [r.to_dict() for r in self.results]}


def check_variant(spec, names=None) -> Report:
    """Load ``spec`` and run every check (or those named); a variant that
    cannot be loaded gives a report whose error says why."""
    from dsv4shard.variants.loading import VariantLoadError, describe

    try:
        variant = Variant(spec)
    except VariantLoadError as error:
        return Report(describe(spec), [Result("load", True, "FAIL", one_line(error))], {},
                      one_line(error))
    results = run_all(variant, names)
    return Report(variant.name, results, dict(variant.properties))

