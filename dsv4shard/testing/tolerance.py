"""Error bounds for comparing MLX against the float64 reference (SPEC §6).

A length-K dot product in a precision of unit roundoff u is off by about
c * u * sqrt(K) * (|a| @ |b|).  The bound is carried stage by stage through
the block, on the same (dequantized) weights the kernels use, so that only
kernel arithmetic is measured: router, gate/up, activation, down, combine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

import reference as ref

# Unit roundoff of each dtype: the one table of per-dtype tolerances.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
F32 = UNIT_ROUNDOFF["float32"]
# MLX's CUDA backend multiplies float32 matrices on tensor cores in TF32
# (10-bit mantissa): its float32 matmuls round like this, not like float32.
TF32 = 2.0**-11


def underflow_floor(dtype: str, terms: int) -> float:
    """Absolute error of ``terms`` roundings that may underflow: each can lose
    up to the smallest subnormal of ``dtype`` or of float32, whichever is
    larger (values far below it, such as 1e-91, come back as 0)."""
    tiny = max(float(np.finfo(np.float32).smallest_subnormal),
               {"float32": 0.0, "float16": 2.0**-24, "bfloat16": 2.0**-133}[dtype])
    return terms * tiny


def matmul_roundoff(dtype: str) -> float:
    """Unit roundoff of a matmul in ``dtype`` on the running backend."""
    from dsv4shard import backend

    if dtype == "float32" and backend.name() == "cuda":
        return TF32
    return UNIT_ROUNDOFF[dtype]
C = 4.0  # the c of c * u * sqrt(K): room for rounding in the stored result too
SILU_SLOPE = 1.1  # max |silu'(z)| = 1.0998...


def dot_error(a_abs, b_abs_t, k, u):
    """Bound of a matmul's rounding error: c * u * sqrt(k) * (|a| @ |b|^T)."""
    return C * u * np.sqrt(k) * (a_abs @ b_abs_t)


def mlp_bound(x, w1, w3, w2, limit, u, b1=None, b3=None, b2=None):
    """(value, error bound) of one clipped-SwiGLU expert on tokens x, where
    every matmul, bias add and the stored activation round in precision u,
    and the activation itself runs in float32."""
    d, i = w1.shape[1], w1.shape[0]
    ax = np.abs(x)
    gate, up = x @ w1.T, x @ w3.T
    if b1 is not None:
        gate, up = gate + b1, up + b3
    e_gate = dot_error(ax, np.abs(w1).T, d, u) + u * np.abs(gate)
    e_up = dot_error(ax, np.abs(w3).T, d, u) + u * np.abs(up)
    if limit > 0:  # clips are 1-Lipschitz: errors pass through, values shrink
        gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
    h = ref.silu(gate) * up
    e_h = (SILU_SLOPE * e_gate * np.abs(up) + np.abs(ref.silu(gate)) * e_up
           + (u + 4 * F32) * np.abs(h))
    y = h @ w2.T if b2 is None else h @ w2.T + b2
    e_y = dot_error(np.abs(h), np.abs(w2).T, i, u) + e_h @ np.abs(w2).T + u * np.abs(y)
    return y, e_y


def score_slope(logits, score_func, token_scores):
    """|d score / d logit| per expert (softmax: through its own logit and the
    normaliser, bounded by 2 * score)."""
    if score_func == "sigmoid":
        return token_scores * (1 - token_scores)
    if score_func == "softmax":
        return 2 * token_scores
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = ref.sigmoid(logits) / (2 * token_scores)
    return np.where(np.isfinite(slope), slope, 0.5)


def route_weight_error(x, weights, config, indices):
    """Bound on |w_mlx - w_ref| at the chosen experts, router in float32."""
    d = x.shape[1]
    logits = ref.router_logits(x, weights.gate)
    s = ref.scores(logits, config.score_func)
    e_logit = (dot_error(np.abs(x), np.abs(weights.gate).T, d, matmul_roundoff("float32"))
               + F32 * np.abs(logits))
    if config.score_func == "softmax":
        e_score = score_slope(logits, "softmax", s) * e_logit.max(axis=-1, keepdims=True)
    else:
        e_score = score_slope(logits, config.score_func, s) * e_logit
    e_score = e_score + 4 * F32 * s
    chosen = np.take_along_axis(s, indices, axis=-1)
    e_chosen = np.take_along_axis(e_score, indices, axis=-1)
    if config.score_func == "softmax":
        e_w = e_chosen
    else:
        total = chosen.sum(axis=-1, keepdims=True)
        w = chosen / total
        e_w = (e_chosen + w * e_chosen.sum(axis=-1, keepdims=True)) / total + 4 * F32 * w
    return e_w * config.route_scale


def router_margin(x, weights, config):
    """How far apart the k-th and (k+1)-th biased scores must be for a float32
    router to choose the reference's set: twice the score error, plus the
    rounding of adding the bias."""
    d = x.shape[1]
    logits = ref.router_logits(x, weights.gate)
    s = ref.scores(logits, config.score_func)
    e_logit = (dot_error(np.abs(x), np.abs(weights.gate).T, d, matmul_roundoff("float32"))
               + F32 * np.abs(logits))
    e_score = np.maximum(score_slope(logits, config.score_func, s), 0.25) * e_logit.max(
        axis=-1, keepdims=True)
    return 2 * (e_score.max(axis=-1) + 4 * F32 * (np.abs(s + weights.bias).max(axis=-1)))


def router_gap(x, weights, config):
    """Per token: k-th minus (k+1)-th biased score (inf when k = E)."""
    k = config.top_k
    if k == config.n_experts:
        return np.full(x.shape[0], np.inf)
    biased = ref.scores(ref.router_logits(x, weights.gate), config.score_func) + weights.bias
    top = -np.sort(-biased, axis=-1)
    return top[:, k - 1] - top[:, k]


def expert_args(weights, e, limit, u):
    """mlp_bound's arguments after x for routed expert e."""
    w1, w3, w2, b1, b3, b2 = weights.expert(e)
    return w1, w3, w2, limit, u, b1, b3, b2


def switch_glu_bound(x, indices, weights, limit, dtype):
    """Error bound of mlx-lm's SwitchGLU output [T, k, D] in ``dtype``."""
    u = matmul_roundoff(dtype)
    bound = np.zeros(indices.shape + (weights.w2.shape[1],))
    for e in np.unique(indices):
        token, slot = np.nonzero(indices == e)
        _, err = mlp_bound(x[token], *expert_args(weights, e, limit, u))
        bound[token, slot] = err
    return bound + underflow_floor(dtype, x.shape[1] + weights.w1.shape[1] + 4)


def moe_bound(x, weights, config, dtype, input_ids=None):
    """Error bound of the whole block's output [T, D] in ``dtype``: routed
    outputs with their weights' errors, the float32 combine, the shared expert,
    and the final rounding to ``dtype``."""
    u = matmul_roundoff(dtype)
    indices, route_w = ref.route(x, weights, config, input_ids)
    e_route_w = route_weight_error(x, weights, config, indices)
    k = indices.shape[1]
    routed = np.zeros(x.shape)
    bound = np.zeros(x.shape)
    for e in np.unique(indices):
        token, slot = np.nonzero(indices == e)
        y, e_y = mlp_bound(x[token], *expert_args(weights, e, config.swiglu_limit, u))
        w, e_w = route_w[token, slot, None], e_route_w[token, slot, None]
        np.add.at(bound, token, np.abs(w) * e_y + e_w * np.abs(y)
                  + C * F32 * np.sqrt(k) * np.abs(w * y))
        np.add.at(routed, token, w * y)
    shared, e_shared = mlp_bound(x, weights.shared_w1, weights.shared_w3, weights.shared_w2,
                                 ref.shared_expert_limit(config), u)
    out = routed + shared
    terms = x.shape[1] + weights.w1.shape[1] + indices.shape[1] + 8
    return (bound + e_shared + C * F32 * np.abs(out) + u * np.abs(out)
            + underflow_floor(dtype, terms))


@dataclass(frozen=True)
class Mismatch:
    index: tuple[int, ...]
    actual: float
    expected: float
    bound: float
    ratio: float

    def __str__(self):
        return (f"worst element {self.index}: got {self.actual!r}, expected "
                f"{self.expected!r}, |diff| = {abs(self.actual - self.expected):.3e}, "
                f"bound {self.bound:.3e}, ratio {self.ratio:.3g}")


def worst_mismatch(actual, expected, bound) -> Mismatch | None:
    """The element with the largest |actual - expected| / bound, if any
    exceeds its bound (NaN where the other side is finite counts as infinite)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), expected.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(actual - expected)
        ratio = np.where(diff == 0, 0.0, diff / bound)
    both_nan = np.isnan(actual) & np.isnan(expected)
    ratio = np.where(both_nan, 0.0, np.where(np.isnan(ratio), np.inf, ratio))
    if ratio.size == 0 or ratio.max() <= 1.0:
        return None
    index = np.unravel_index(np.argmax(ratio), ratio.shape)
    return Mismatch(tuple(int(i) for i in index), float(actual[index]),
                    float(expected[index]), float(bound[index]), float(ratio[index]))


def first_difference(a, b) -> str | None:
    """For bit-exact comparisons: where two arrays first differ, or None."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    same = (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b
    if same.all():
        return None
    index = tuple(int(i) for i in np.argwhere(~same)[0])
    return (f"{int((~same).sum())} of {a.size} elements differ; first at {index}: "
            f"{a[index]!r} vs {b[index]!r}")
