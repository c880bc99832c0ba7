"""End to end: a tiny mlx-lm DeepSeek-V4.1 model whose MoE blocks alone are
sharded over real ranks gives the unsharded model's logits."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from dsv4shard import backend
from dsv4shard.impl import spec_of as spec
from dsv4shard.ranks import shared, wire
from dsv4shard.testing import tolerance
from dsv4shard.testing.report import fail
from dsv4shard.tiny_model import TINY_V41, discard_near_ties, shard_moe_only, tiny_v41


@dataclass(frozen=True)
class ModelCase:
    seed: int
    layers: int
    n_tokens: int
    ranks: int = 2


def tokens(case: ModelCase) -> list[int]:
    rng = np.random.default_rng(case.seed)
    return rng.integers(0, TINY_V41["vocab_size"], case.n_tokens).tolist()


def logits_bound(case: ModelCase, logits: np.ndarray) -> np.ndarray:
    """Sharding changes only how each MoE layer's sums are split and added:
    a few float32 roundings of the layer's partial sums per layer, carried to
    the logits.  Bounded by c * u * sqrt(D * I) * layers * max|logits|, u
    the float32 matmuls' roundoff on this backend (TF32's on MLX's CUDA
    build: each rank's split matmuls round their operands anew)."""
    d, i = TINY_V41["hidden_size"], TINY_V41["moe_intermediate_size"]
    return (tolerance.C * tolerance.matmul_roundoff("float32") * np.sqrt(d * i) * case.layers
            * case.ranks * np.abs(logits).max())


def expect_logits(model: ModelCase, want: np.ndarray) -> tolerance.Expected:
    """The expected side: the unsharded model's logits and the bound."""
    return tolerance.Expected(want, np.broadcast_to(logits_bound(model, want), want.shape),
                              tolerance.arithmetic("float32"))


def run(case: ModelCase, shard, fuse, pool, device: str = "default"):
    answers = pool.run({"task": "model", "seed": case.seed, "layers": case.layers,
                        "tokens": tokens(case), "shard": spec(shard),
                        "fuse": spec(fuse) if fuse else None, "device": device})
    return [wire.decode_array(a["logits"]) for a in answers], {a["size"] for a in answers}


def sharded_model_matches_unsharded(case: ModelCase, shard=shard_moe_only, fuse=None,
                                    pool=None):
    """Every rank's logits equal the unsharded model's within the bound; with
    ``fuse``, fused-after-sharding logits equal unfused ones bit for bit.
    Runs where ``backend.model_device`` says (mx.cpu where float32 matmuls
    round to TF32), the ranks too."""
    device = backend.model_device()
    with backend.on_model_device(device):
        return _sharded_model_matches_unsharded(case, shard, fuse, pool, device)


def _sharded_model_matches_unsharded(case, shard, fuse, pool, device):
    discard_near_ties(case.seed, case.layers, tokens(case))
    pool = pool or shared.pool(case.ranks)
    model = tiny_v41(case.seed, case.layers)
    want = np.array(model(mx.array([tokens(case)], dtype=mx.int32)))
    plain, sizes = run(case, shard, None, pool, device)
    if sizes != {case.ranks} or case.ranks < 2:
        fail(sharded_model_matches_unsharded, case, f"group sizes {sizes}, expected {case.ranks}")
    expected = expect_logits(case, want)
    for r, got in enumerate(plain):
        bad = expected.check(got)
        if bad:
            fail(sharded_model_matches_unsharded, case, f"rank {r} logits: {bad}; "
                 f"{expected.note()}", shard=shard)
    if fuse is not None:
        fused, _ = run(case, shard, fuse, pool, device)
        for r, (a, b) in enumerate(zip(plain, fused)):
            diff = tolerance.first_difference(a, b)
            if diff:
                fail(sharded_model_matches_unsharded, case, f"rank {r}: fused vs unfused "
                     f"logits: {diff}", shard=shard, fuse=fuse)
    note = expected.note()
    return type(note)(note + backend.model_device_note(device))
