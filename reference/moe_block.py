"""DeepSeek-V4's MoE block in float64 NumPy: the ground truth of the suite.

One short function per thing the block computes.  Shapes: T tokens, D hidden
size, I expert intermediate size, E routed experts, k experts per token.
Weights use DeepSeek's names (``reference.names`` maps them to MLX's).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Revision",
    "MoEConfig",
    "MoEWeights",
    "router_logits",
    "softplus",
    "sqrtsoftplus",
    "sigmoid",
    "softmax",
    "scores",
    "top_k_experts",
    "hash_experts",
    "route_weights",
    "route",
    "silu",
    "clipped_swiglu",
    "expert_mlp",
    "routed_expert",
    "routed_experts",
    "switch_glu",
    "shared_expert_limit",
    "shared_expert",
    "moe",
    "SCORE_FUNCS",
]


class Revision(str, enum.Enum):
    """The two published revisions of DeepSeek-V4's inference code.

    They differ only in the shared expert: the first release does not clip
    its SwiGLU; the later revision clips it with the same ``swiglu_limit`` as
    the routed experts.
    """

    FIRST_RELEASE = "first-release"
    SHARED_CLIPPED = "shared-clipped"

    def __repr__(self):  # evaluable, so a printed case can be pasted back
        return f"Revision.{self.name}"


SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int  # D
    intermediate_size: int  # I, of every routed expert and of the shared one
    n_experts: int  # E
    top_k: int  # k
    swiglu_limit: float = 10.0  # L; L <= 0 disables the clip
    route_scale: float = 1.5  # routed_scaling_factor
    score_func: str = "sqrtsoftplus"
    hash_routing: bool = False  # a hash layer: experts come from tid2eid
    vocab_size: int = 0  # rows of tid2eid on a hash layer
    revision: Revision = Revision.SHARED_CLIPPED

    def __post_init__(self):
        problems = []
        for name in ("hidden_size", "intermediate_size", "n_experts", "top_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.top_k <= self.n_experts:
            problems.append(
                f"top_k={self.top_k} must lie in [1, n_experts={self.n_experts}]"
            )
        if self.score_func not in SCORE_FUNCS:
            problems.append(f"score_func={self.score_func!r} is not one of {SCORE_FUNCS}")
        if self.hash_routing and self.vocab_size < 1:
            problems.append("a hash layer needs vocab_size >= 1 for its tid2eid table")
        if problems:
            raise ValueError("impossible MoEConfig: " + "; ".join(problems))
        object.__setattr__(self, "revision", Revision(self.revision))


@dataclass
class MoEWeights:
    """One layer's MoE weights, float64, in DeepSeek's layout (out, in)."""

    gate: np.ndarray  # router, [E, D]
    bias: np.ndarray  # e_score_correction_bias, [E]; chooses, never weights
    w1: np.ndarray  # routed gate projections, [E, I, D]
    w3: np.ndarray  # routed up projections, [E, I, D]
    w2: np.ndarray  # routed down projections, [E, D, I]
    shared_w1: np.ndarray  # [I, D]
    shared_w3: np.ndarray  # [I, D]
    shared_w2: np.ndarray  # [D, I]
    tid2eid: np.ndarray | None = None  # hash layers only, [vocab, k] int
    # Linear biases of the routed experts: DeepSeek has none, but SwitchLinear
    # can carry them, and sharding must not count b2 once per rank.
    b1: np.ndarray | None = None  # [E, I]
    b3: np.ndarray | None = None  # [E, I]
    b2: np.ndarray | None = None  # [E, D]

    def expert(self, e):
        """Expert e's (w1, w3, w2, b1, b3, b2); absent biases are None."""
        biases = [None if b is None else b[e] for b in (self.b1, self.b3, self.b2)]
        return (self.w1[e], self.w3[e], self.w2[e], *biases)


# --- router ---------------------------------------------------------------


def router_logits(x, gate):
    """``x @ gate^T``; DeepSeek computes it in float32, we in float64."""
    return x @ gate.T


def softplus(z):
    """log(1 + exp(z)) without overflow at large z."""
    return np.logaddexp(0.0, z)


def sqrtsoftplus(z):
    return np.sqrt(softplus(z))


def sigmoid(z):
    """exp(-softplus(-z)): accurate in both tails, never overflows."""
    return np.exp(-softplus(-z))


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def scores(logits, score_func):
    return {"sqrtsoftplus": sqrtsoftplus, "sigmoid": sigmoid, "softmax": softmax}[
        score_func
    ](logits)


def top_k_experts(biased_scores, k):
    """The k experts of highest score per token (their order is unspecified)."""
    return np.argsort(-biased_scores, axis=-1, kind="stable")[..., :k]


def hash_experts(input_ids, tid2eid):
    """A hash layer's experts: a fixed table row per token id; no bias."""
    return tid2eid[input_ids]


def route_weights(token_scores, indices, config):
    """The unbiased scores of the chosen experts, renormalised to sum to 1 for
    every score_func but softmax (no epsilon: all-zero scores give NaN, as in
    DeepSeek's code), then scaled by ``route_scale``."""
    w = np.take_along_axis(token_scores, indices, axis=-1)
    if config.score_func != "softmax":
        with np.errstate(invalid="ignore", divide="ignore"):
            w = w / w.sum(axis=-1, keepdims=True)
    return w * config.route_scale


def route(x, weights, config, input_ids=None):
    """(indices [T, k], weights [T, k]) for tokens ``x`` [T, D]."""
    token_scores = scores(router_logits(x, weights.gate), config.score_func)
    if config.hash_routing:
        if input_ids is None:
            raise ValueError("a hash layer routes by token id: pass input_ids")
        indices = hash_experts(input_ids, weights.tid2eid)
    else:
        indices = top_k_experts(token_scores + weights.bias, config.top_k)
    return indices, route_weights(token_scores, indices, config)


# --- experts --------------------------------------------------------------


def silu(z):
    return z * sigmoid(z)


def clipped_swiglu(gate, up, limit):
    """DeepSeek-V4's activation: if limit > 0, clip gate from above and up on
    both sides, BEFORE silu; then silu(gate) * up."""
    if limit > 0:
        gate = np.minimum(gate, limit)
        up = np.clip(up, -limit, limit)
    return silu(gate) * up


def expert_mlp(x, w1, w3, w2, limit, b1=None, b3=None, b2=None):
    """One clipped-SwiGLU expert on tokens x [T, D]."""
    gate, up = x @ w1.T, x @ w3.T
    if b1 is not None:
        gate, up = gate + b1, up + b3
    y = clipped_swiglu(gate, up, limit) @ w2.T
    return y if b2 is None else y + b2


def routed_expert(x, weights, e, limit):
    """Routed expert e on tokens x."""
    w1, w3, w2, b1, b3, b2 = weights.expert(e)
    return expert_mlp(x, w1, w3, w2, limit, b1, b3, b2)


def routed_experts(x, indices, route_w, weights, limit):
    """sum over the k chosen experts of weight * expert(x): a loop over the
    experts in use, each applied to all of its tokens at once."""
    y = np.zeros((x.shape[0], weights.w2.shape[1]))
    for e in np.unique(indices):
        token, slot = np.nonzero(indices == e)
        out = routed_expert(x[token], weights, e, limit)
        np.add.at(y, token, route_w[token, slot, None] * out)
    return y


def switch_glu(x, indices, weights, limit):
    """Every chosen expert's output, unweighted: [T, k, D] (mlx-lm's SwitchGLU)."""
    y = np.zeros(indices.shape + (weights.w2.shape[1],))
    for e in np.unique(indices):
        token, slot = np.nonzero(indices == e)
        y[token, slot] = routed_expert(x[token], weights, e, limit)
    return y


def shared_expert_limit(config):
    """The shared expert's clip: none in the first release, L later."""
    if config.revision == Revision.FIRST_RELEASE:
        return 0.0
    return config.swiglu_limit


def shared_expert(x, weights, config):
    return expert_mlp(
        x, weights.shared_w1, weights.shared_w3, weights.shared_w2,
        shared_expert_limit(config),
    )


def moe(x, weights, config, input_ids=None):
    """The whole block on tokens x [T, D]: routed experts plus shared expert."""
    indices, route_w = route(x, weights, config, input_ids)
    routed = routed_experts(x, indices, route_w, weights, config.swiglu_limit)
    return routed + shared_expert(x, weights, config)
