"""The reference's own behaviour at the edges, checked against values worked
out from first principles (math on scalars), never against the reference.

Each property takes the function under check as a keyword, so its known-bad
twins in ``dsv4shard.testing.mutants`` run through the very same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import reference as ref
from dsv4shard.testing import data
from dsv4shard.testing.report import fail
from dsv4shard.testing.strategies import MoECase


def silu(z: float) -> float:
    return z / (1.0 + math.exp(-z)) if z > -700 else 0.0


@dataclass(frozen=True)
class ClipCase:
    limit: float
    inside: float  # a value strictly inside (-limit, limit) when limit > 0


def clip_probes(case: ClipCase, clipped_swiglu=ref.clipped_swiglu):
    """gate = -20 passes unclipped (gate is clipped from above only); up = -20
    becomes -L; gate and up at exactly +-L pass; gate = +20 becomes L; with
    L <= 0 nothing is clipped."""
    L, v = case.limit, case.inside
    if L > 0:
        probes = {  # (gate, up): expected
            (-20.0, v): silu(-20.0) * v,
            (v, -20.0): silu(v) * -L,
            (v, 20.0): silu(v) * L,
            (20.0, v): silu(L) * v,
            (L, v): silu(L) * v,
            (v, L): silu(v) * L,
            (v, -L): silu(v) * -L,
            (-L, v): silu(-L) * v,
            (-20.0, -20.0): silu(-20.0) * -L,
        }
    else:
        probes = {(20.0, -20.0): silu(20.0) * -20.0, (-20.0, 20.0): silu(-20.0) * 20.0,
                  (v, v): silu(v) * v}
    for (g, u), want in probes.items():
        got = float(clipped_swiglu(np.array([g]), np.array([u]), L)[0])
        if not math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-300):
            fail(clip_probes, case, f"clipped_swiglu(gate={g}, up={u}, limit={L}) = {got!r}, "
                 f"expected {want!r}", clipped_swiglu=clipped_swiglu)


def _weights_and_tokens(case: MoECase):
    return data.make_weights(case), data.make_tokens(case), data.make_input_ids(case)


def chosen_scores(case, x, weights, indices):
    s = ref.scores(ref.router_logits(x, weights.gate), case.config.score_func)
    return np.take_along_axis(s, indices, axis=-1)


def renormalisation_rule(case: MoECase, route=ref.route):
    """Weights are the unbiased chosen scores, renormalised to sum to 1 for
    every score_func but softmax (k = 1 included), times route_scale."""
    weights, x, ids = _weights_and_tokens(case)
    indices, w = route(x, weights, case.config, ids)
    s = chosen_scores(case, x, weights, indices)
    if case.config.score_func != "softmax":
        s = s / s.sum(axis=-1, keepdims=True)
    want = s * case.config.route_scale
    if not np.allclose(w, want, rtol=1e-12, atol=0):
        fail(renormalisation_rule, case, f"weights {w[0]} expected {want[0]} (token 0)",
             route=route)


def bias_chooses_never_weights(case: MoECase, route=ref.route):
    """On a score layer, a bias of +10 on k experts makes every token choose
    exactly them, and the weights are those of the unbiased scores."""
    c = case.config
    if c.hash_routing:
        return
    weights, x, _ = _weights_and_tokens(case)
    forced = np.random.default_rng(case.seed).permutation(c.n_experts)[: c.top_k]
    weights.bias = np.zeros(c.n_experts)
    weights.bias[forced] = 10.0
    indices, w = route(x, weights, c, None)
    if not all(set(row) == set(forced.tolist()) for row in indices.tolist()):
        fail(bias_chooses_never_weights, case, f"a +10 bias on {sorted(forced)} did not "
             f"choose them: got {indices[0]}", route=route)
    s = chosen_scores(case, x, weights, indices)
    if c.score_func != "softmax":
        s = s / s.sum(axis=-1, keepdims=True)
    if not np.allclose(w, s * c.route_scale, rtol=1e-12, atol=0):
        fail(bias_chooses_never_weights, case, f"the bias entered the weights: {w[0]} vs "
             f"{s[0] * c.route_scale}", route=route)


def hash_ignores_bias(case: MoECase, route=ref.route):
    """On a hash layer the set is tid2eid[input_ids], whatever the bias."""
    c = case.config
    if not c.hash_routing:
        return
    weights, x, ids = _weights_and_tokens(case)
    weights.bias = np.zeros(c.n_experts)
    weights.bias[np.random.default_rng(case.seed).permutation(c.n_experts)[: c.top_k]] = 10.0
    indices, _ = route(x, weights, c, ids)
    want = weights.tid2eid[ids]
    if not np.array_equal(np.sort(indices, axis=-1), np.sort(want, axis=-1)):
        fail(hash_ignores_bias, case, f"token 0 routed to {indices[0]}, its table row is "
             f"{want[0]}", route=route)


def large_logits_stay_finite(case: MoECase, route=ref.route):
    """Router logits of +100 and +1000 give finite scores and weights
    (a naive log1p(exp(z)) overflows)."""
    weights, x, ids = _weights_and_tokens(case)
    x = x.copy()
    x[0] = weights.gate[0] * (1000.0 / (weights.gate[0] @ weights.gate[0]))  # logit 1000
    if len(x) > 1:
        x[1] = weights.gate[0] * (100.0 / (weights.gate[0] @ weights.gate[0]))
    _, w = route(x, weights, case.config, ids)
    if not np.all(np.isfinite(w)):
        fail(large_logits_stay_finite, case, f"non-finite weights {w[:2]}", route=route)


def all_zero_scores_give_nan(case: MoECase, route_weights=ref.route_weights):
    """Documented: DeepSeek renormalises with no epsilon, so chosen scores
    that are all zero give NaN weights (softmax, never renormalised, gives 0)."""
    c = case.config
    zero = np.zeros((1, c.n_experts))
    indices = np.arange(c.top_k)[None]
    w = route_weights(zero, indices, c)
    want_nan = c.score_func != "softmax"
    if want_nan != bool(np.all(np.isnan(w))) or (not want_nan and np.any(w != 0)):
        fail(all_zero_scores_give_nan, case, f"all-zero scores gave {w}",
             route_weights=route_weights)


def k_extremes(case: MoECase, route=ref.route):
    """k = E chooses every expert; k = 1 gives weight route_scale for every
    score_func but softmax, and route_scale * max score for softmax."""
    c = case.config
    weights, x, _ = _weights_and_tokens(case)
    for k in sorted({1, c.n_experts}):
        cfg = ref.MoEConfig(**{**c.__dict__, "top_k": k, "hash_routing": False})
        indices, w = route(x, weights, cfg, None)
        if k == c.n_experts and not all(sorted(r) == list(range(k)) for r in indices.tolist()):
            fail(k_extremes, case, f"k = E chose {indices[0]}", route=route)
        if k == 1:
            s = ref.scores(ref.router_logits(x, weights.gate), c.score_func)
            top = np.take_along_axis(s, np.argmax(s + weights.bias, -1)[:, None], -1)
            want = c.route_scale * (top if c.score_func == "softmax" else np.ones_like(top))
            if not np.allclose(w, want, rtol=1e-12, atol=0):
                fail(k_extremes, case, f"k = 1 weights {w[:2, 0]}, expected {want[:2, 0]}",
                     route=route)
