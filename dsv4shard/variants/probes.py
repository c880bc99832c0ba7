"""How a variant's MoE block is probed: the clip's probe tokens and its
look-alikes, the router's sets and weights against the reference's, the
whole block against ``reference.moe``, and the combines seen in ports.

The properties of ``dsv4shard.testing.properties.variant`` are written
with these; every comparison goes through ``dsv4shard.testing.tolerance``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np

import reference as ref
from dsv4shard import backend
from dsv4shard.engine.outcome import Departure, Minor, carried
from dsv4shard.testing import power, tolerance
from dsv4shard.variants import data
from dsv4shard.variants.adapter import HIDDEN, INTER, Setting, Variant, takes_ids
from dsv4shard.weights import to_numpy
from reference.moe_block import MoEWeights, Revision

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
    expected = expect_route(x, weights, config, ids)
    return got_i, got_w, expected.want, expected.bound, keep


def expect_route(x, weights, config, ids=None, tf32: bool | None = None) -> tolerance.Expected:
    """The route weights' expected side: the reference's, each token's in
    the order of its experts, within the float32 router's error (``tf32``:
    its logits' matmul in TF32; None: as this backend runs it)."""
    want_i, want_w = ref.route(x, weights, config, ids)
    order = np.argsort(want_i, axis=-1)
    bound = tolerance.route_weight_error(x, weights, config, np.take_along_axis(
        want_i, order, -1), tf32) + 1e-30
    matmul = None if tf32 is None else ("tf32" if tf32 else "float32")
    return tolerance.Expected(np.take_along_axis(want_w, order, -1), bound,
                              tolerance.arithmetic("float32", matmul))


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
    got, room = got_w[keep], 2 * bound[keep]  # the router's own error, on either side
    if tolerance.within(got, raw, room):
        kind = "not renormalised: weights are score x route_scale"
    elif tolerance.within(got, renorm, room):
        kind = f"renormalised to sum to route_scale = {rs:g}"
    elif tolerance.within(got, renorm / rs, room):
        kind = "renormalised but route_scale never applied (weights sum to 1)"
    elif tolerance.within(got, chosen, room):
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
    if limit is not None and limit > 0:
        values = [-20.0, -limit - 1.5, -limit, -0.6 * limit, -0.125, 0.3 * limit, limit,
                  limit + 1.5, 20.0]
    else:
        values = [-20.0, -12.0, -3.25, -0.125, 0.75, 12.0, 20.0]
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
    """The probes' bound: gate and up reach the activation exactly (one-hot
    weights, probe values exact in TF32), the activation is float32 (1e-5
    relative covers any order of its few operations), and down's one-hot
    product gives it back exactly, or, where float32 matmuls round their
    operands to TF32, rounded to 10 bits (2^-11 relative more)."""
    relative = 1e-5 + (tolerance.TF32 if backend.tf32_matmuls() else 0.0)
    return relative * np.abs(want) + 1e-6


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


def block_kernels(built, weights) -> tolerance.Kernels:
    """The kernels of a variant's routed and shared projections."""
    roles = ("gate", "up", "down")
    return tolerance.kernels_of({r: built.projection("routed", r) for r in roles},
                                {r: built.projection("shared", r) for r in roles}, weights)


@dataclass(frozen=True)
class BlockExpectation:
    """The expected sides of compare_block: ``tight`` follows MLX's
    arithmetic with DeepSeek's float32 activation and combine; ``precision``
    lets the variant's own activation and combine round once or twice more
    in the activation dtype (past it, a departure is a failure); ``keep``:
    the tokens with a clear router choice (the others are discarded)."""

    tight: tolerance.Expected
    precision: tolerance.Expected
    keep: np.ndarray
    scene: power.Scene


def expect_block(built, x_mx, config, dtype: str) -> BlockExpectation:
    """compare_block's expected sides, from the block's own (read-back)
    weights and kernels, without running the block."""
    weights = built.read()
    x = to_numpy(x_mx)
    ids = data.input_ids(x.shape[0]) if config.hash_routing else None
    kernels = block_kernels(built, weights)
    tight, loose = (tolerance.expect_moe(x, weights, config, tolerance.arithmetic(
        dtype, precision=tier), kernels, ids) for tier in (False, True))
    return BlockExpectation(tight, loose, clear_tokens(x, weights, config),
                            power.Scene(x, weights, config, dtype, ids))


def compare_block(built, x_mx, config, dtype: str, what: str, shape=None) -> str:
    """The block's output against ``reference.moe`` on its own (read-back)
    weights, on tokens with a clear router choice, within the stage bound;
    returns the bound-to-signal figure.  In half precision, an output off
    MLX's arithmetic as DeepSeek computes it but within the precision tier
    is a precision departure (Minor), not a failure."""
    found = expect_block(built, x_mx, config, dtype)
    x = to_numpy(x_mx)
    ids = data.input_ids(x.shape[0])
    call_ids = ids if (config.hash_routing or takes_ids(built.moe.__call__)) else None
    xin = x_mx if shape is None else x_mx.reshape(*shape, -1)
    got = built(xin, None if call_ids is None else call_ids.reshape(xin.shape[:-1]))
    got = to_numpy(got).reshape(x.shape[0], -1)
    keep = found.keep
    tight, loose = found.tight.take(keep), found.precision.take(keep)
    bad = tight.check(got[keep])
    if bad is None and dtype in tolerance.HALF:
        # Its pass is the tight comparison's: weak only where that one is.
        return carried(f"{tight.note()}; fails only past the precision tier "
                       f"({loose.note()})", tight.note())
    if bad is None:
        return tight.note()
    if dtype in tolerance.HALF and loose.check(got[keep]) is None:
        raise Minor(f"{what}: within the precision tier ({loose.note()}), not MLX's arithmetic "
                    f"with DeepSeek's float32 activation and combine: {bad}")
    worst = loose if dtype in tolerance.HALF else tight
    scene = replace(found.scene, x=found.scene.x[keep],
                    ids=None if found.scene.ids is None else found.scene.ids[keep])
    named = power.diagnosis(scene, got[keep], worst.want)
    raise Departure(f"{what}: {named}{worst.check(got[keep])}; {worst.note()}")


def block_revision(variant: Variant) -> Revision:
    return revision_of(variant) or Revision.SHARED_CLIPPED


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


def bf16(a: np.ndarray) -> np.ndarray:
    return to_numpy(mx.array(np.asarray(a, np.float32)).astype(mx.bfloat16))


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


def raw(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


