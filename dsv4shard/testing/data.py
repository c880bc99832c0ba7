"""Array values for a drawn case, from a NumPy generator seeded by the case.

Inputs are unit normal and every weight is scaled by 1/sqrt(fan-in), so each
projection is of order one before ``activation_scale`` (large values push
gate and up across the clip on both sides).
"""

from __future__ import annotations

import numpy as np

from dsv4shard.testing.strategies import MoECase
from reference.moe_block import MoEWeights

VOCAB = 97  # rows of a drawn tid2eid table
FORCING_BIAS = 10.0  # larger than any score: a bias this big decides the set


def rng_for(case: MoECase, stream: int) -> np.random.Generator:
    """Independent streams for weights (0), inputs (1) and the rest (2)."""
    return np.random.default_rng([case.seed, stream])


def distinct_rows(rng, rows: int, n_experts: int, k: int) -> np.ndarray:
    """``rows`` rows of k distinct experts each."""
    return np.argsort(rng.random((rows, n_experts)), axis=1)[:, :k]


def tid2eid_table(case: MoECase) -> np.ndarray:
    c = case.config
    rng = rng_for(case, 2)
    if case.pattern == "all_experts":
        # Row v holds experts v*k .. v*k + k - 1 (mod E): consecutive ids cover
        # every expert, and a row's k experts are distinct because k <= E.
        v = np.arange(c.vocab_size)[:, None]
        return (v * c.top_k + np.arange(c.top_k)) % c.n_experts
    return distinct_rows(rng, c.vocab_size, c.n_experts, c.top_k)


def router_bias(case: MoECase) -> np.ndarray:
    c = case.config
    rng = rng_for(case, 2)
    bias = rng.normal(0.0, 0.1, c.n_experts)  # small: shifts choices, never weights
    if case.pattern == "one_expert":
        bias[rng.permutation(c.n_experts)[: c.top_k]] += FORCING_BIAS
    elif case.pattern == "mostly_idle":
        bias[rng.permutation(c.n_experts)[: min(c.n_experts, c.top_k + 1)]] += FORCING_BIAS
    return bias


def make_weights(case: MoECase) -> MoEWeights:
    c = case.config
    d, i, e = c.hidden_size, c.intermediate_size, c.n_experts
    rng = rng_for(case, 0)
    s = case.activation_scale

    def normal(*shape, fan_in, scale=1.0):
        return rng.normal(0.0, scale / np.sqrt(fan_in), shape)

    return MoEWeights(
        gate=normal(e, d, fan_in=d),
        bias=router_bias(case),
        w1=normal(e, i, d, fan_in=d, scale=s),
        w3=normal(e, i, d, fan_in=d, scale=s),
        w2=normal(e, d, i, fan_in=i),
        shared_w1=normal(i, d, fan_in=d, scale=s),
        shared_w3=normal(i, d, fan_in=d, scale=s),
        shared_w2=normal(d, i, fan_in=i),
        tid2eid=tid2eid_table(case) if c.hash_routing else None,
        **(linear_biases(case) if case.linear_bias else {}),
    )


def linear_biases(case: MoECase) -> dict:
    c = case.config
    rng = rng_for(case, 3)
    s = case.activation_scale
    return {"b1": rng.normal(0, 0.5 * s, (c.n_experts, c.intermediate_size)),
            "b3": rng.normal(0, 0.5 * s, (c.n_experts, c.intermediate_size)),
            "b2": rng.normal(0, 1.0, (c.n_experts, c.hidden_size))}


def make_tokens(case: MoECase) -> np.ndarray:
    """x [T, D], unit normal."""
    return rng_for(case, 1).normal(0.0, 1.0, (case.n_tokens, case.config.hidden_size))


def make_input_ids(case: MoECase) -> np.ndarray | None:
    """Token ids for a hash layer: consecutive ids, so "all_experts" covers
    every expert once T * k >= E."""
    if not case.config.hash_routing:
        return None
    return np.arange(case.n_tokens) % case.config.vocab_size


def make_indices(case: MoECase) -> np.ndarray:
    """Expert indices [T, k] for driving a SwitchGLU directly, by pattern."""
    c = case.config
    rng = rng_for(case, 2)
    t, k, e = case.n_tokens, c.top_k, c.n_experts
    if case.pattern == "one_expert":
        return np.tile(rng.permutation(e)[:k], (t, 1))
    if case.pattern == "mostly_idle":
        pool = rng.permutation(e)[: min(e, k + 1)]
        return pool[distinct_rows(rng, t, len(pool), k)]
    if case.pattern == "all_experts":
        return (np.arange(t)[:, None] * k + np.arange(k)) % e
    return distinct_rows(rng, t, e, k)
