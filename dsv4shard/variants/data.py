"""Seeded weights and tokens for the conformance checks, through the suite's
own generator (``dsv4shard.testing.data``): every value is a function of
(setting, seed), so rank processes rebuild them exactly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from dsv4shard.testing import data as suite_data
from dsv4shard.testing.strategies import MoECase
from dsv4shard.weights import DTYPES
from reference.moe_block import MoEWeights


def case(setting, seed: int, n_tokens: int = 8, scale: float = 1.0) -> MoECase:
    return MoECase(config=setting.config(), quant=None, dtype="float32", n_tokens=n_tokens,
                   pattern="hash" if setting.hash_layer else "router",
                   activation_scale=scale, seed=seed)


def weights(setting, seed: int, scale: float = 1.0) -> MoEWeights:
    """Unit-scale projections (``scale`` > 1 drives gate/up across the clip)."""
    return suite_data.make_weights(case(setting, seed, scale=scale))


def tokens_np(n_tokens: int, seed: int) -> np.ndarray:
    from dsv4shard.variants.adapter import HIDDEN

    return np.random.default_rng([seed, 1]).normal(0.0, 1.0, (n_tokens, HIDDEN))


def tokens(n_tokens: int, seed: int, dtype: str = "float32") -> mx.array:
    return mx.array(tokens_np(n_tokens, seed), dtype=mx.float32).astype(DTYPES[dtype])


def input_ids(n_tokens: int) -> np.ndarray:
    return np.arange(n_tokens) % suite_data.VOCAB
