"""A variant's own ``Model.shard()`` over 2 real ranks (ring, localhost).

Every rank builds the same tiny Model from the variant's ModelArgs, loads
the same seeded reference weights into one score layer's MoE block, calls
the variant's ``shard(group)`` and runs that block; the test process
compares every rank's output with the reference on the unsharded weights.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np

import reference as ref
from dsv4shard.ranks import wire
from dsv4shard.testing import tolerance
from dsv4shard.variants import data
from dsv4shard.variants.adapter import Setting, Variant, get_path, instantiate, takes_ids
from dsv4shard.weights import to_numpy

RANKS = 2
SEED, TOKENS = 30, 12


def worker_spec(variant: Variant) -> str | None:
    """How a rank process finds the variant: its module name or its file."""
    if isinstance(variant.spec, ModuleType) or variant.fresh:
        return None
    if variant.spec.endswith(".py") or os.sep in variant.spec:
        return os.path.abspath(variant.spec)
    return variant.spec


def local_pool(ranks: int):
    """The shared pool of ``ranks`` local ranks; NotApplicable where this
    machine cannot start them (not the variant's fault)."""
    from dsv4shard.engine.outcome import NotApplicable, first_line
    from dsv4shard.ranks import shared

    try:
        return shared.pool(ranks)
    except Exception as error:
        raise NotApplicable(f"cannot start {ranks} local ranks here: {first_line(error)}") \
            from None


def build_model(variant: Variant, setting: Setting):
    """(tiny Model, path of a score layer's MoE block in it)."""
    model = instantiate(variant.layout.model_cls, variant.args(setting), 0)
    if model is None:
        raise RuntimeError(f"cannot call {variant.layout.model_cls.__name__}(args)")
    for path, module in model.named_modules():
        if isinstance(module, variant.layout.moe_cls) and not variant.wrap(module, setting).has_table:
            return model, path
    raise RuntimeError("the tiny Model holds no score-layer MoE block")


def call_shard(model, group) -> None:
    model.shard(group)


def rank_job(job: dict, group) -> dict:
    """One rank's part (runs in a rank process; see dsv4shard.ranks.worker)."""
    import mlx.core as mx

    variant = Variant(job["variant"])
    setting = Setting()
    model, path = build_model(variant, setting)
    variant.wrap(get_path(model, path), setting).load(data.weights(setting, job["seed"]))
    call_shard(model, group)
    mx.eval(model.parameters())
    built = variant.wrap(get_path(model, path), setting)
    n = job["tokens"]
    x, ids = data.tokens(n, job["seed"]), data.input_ids(n)
    indices, _ = built.route(x, ids)
    y = built(x, ids if takes_ids(built.moe.__call__) else None)
    mx.eval(y)
    return {"y": wire.encode_array(to_numpy(y)),
            "indices": wire.encode_array(np.sort(indices, axis=-1))}


def check(variant: Variant, pool=None) -> str:
    from dsv4shard.engine.outcome import Departure, carried
    from dsv4shard.engine.outcome import NotApplicable as Skip
    from dsv4shard.ranks.pool import RankFailure
    from dsv4shard.variants.probes import block_revision, clear_tokens

    model_cls = variant.layout.model_cls
    if model_cls is None or not callable(getattr(model_cls, "shard", None)):
        raise Skip("the variant's Model has no shard()")
    spec = worker_spec(variant)
    if spec is None:
        raise Skip("the variant is an in-memory module (or a private copy): rank processes "
                   "load it by name or path")
    setting = Setting()
    try:
        model, path = build_model(variant, setting)
    except Exception as error:
        raise Skip(f"a tiny {model_cls.__name__} does not build here: "
                   f"{type(error).__name__}: {error}") from None
    local = variant.wrap(get_path(model, path), setting)
    local.load(data.weights(setting, SEED))
    weights = local.read()
    if pool is None:
        pool = local_pool(RANKS)
    try:
        answers = pool.run({"task": "variant_moe", "variant": spec, "seed": SEED,
                            "tokens": TOKENS}, timeout=120)
    except RankFailure as error:
        last = [line for line in str(error).splitlines() if line.strip()]
        cause = next((line for line in reversed(last) if "Error" in line), last[0])
        raise Departure(f"sharding over {RANKS} ranks failed: {cause.strip()}") from None
    sizes = {a["size"] for a in answers}
    if sizes != {RANKS}:
        raise Departure(f"group sizes {sizes}, expected {RANKS}: the check would pass vacuously")
    chosen = [wire.decode_array(a["indices"]) for a in answers]
    for r, c in enumerate(chosen[1:], start=1):
        if not np.array_equal(c, chosen[0]):
            raise Departure(f"rank {r} chose other experts than rank 0 (token 0: {c[0]} vs "
                            f"{chosen[0][0]})")
    config = setting.config(block_revision(variant))
    x = to_numpy(data.tokens(TOKENS, SEED))
    keep = clear_tokens(x, weights, config)
    expected = expect_ranks(x, weights, config).take(keep)
    note = expected.note()
    for r, a in enumerate(answers):
        got = wire.decode_array(a["y"]).reshape(keep.shape + (-1,))[keep]
        bad = expected.check(got)
        if bad:
            named = diagnose(got, expected, x[keep], weights, config)
            raise Departure(f"rank {r} of {RANKS}: {named}{bad}; {note}")
    return carried(f"every rank of {RANKS} (ring) gives the unsharded output; same experts "
                   f"on every rank; {note}", note)


def expect_ranks(x, weights, config, arith=None) -> tolerance.Expected:
    """The expected side: the float32 block on the reference's weights,
    split evenly over the ranks (each rank's partial in float32, summed in
    float32), as the running backend multiplies float32 matrices."""
    from dsv4shard.shard import split_bounds

    return tolerance.expect_sharded_moe(
        x, weights, config, arith or tolerance.arithmetic("float32"),
        split_bounds(config.intermediate_size, RANKS, None), "float32")


def diagnose(got, expected: tolerance.Expected, x, weights, config) -> str:
    """The look-alike a wrong output matches on tokens ``x``, within the
    comparison's own bound (twice it: the look-alike is a float64 answer,
    ``got`` the kernels'): the sum taken twice, or one rank's partial."""
    room = 2 * expected.bound
    if tolerance.within(got, RANKS * expected.want, RANKS * room):
        return f"the output is {RANKS}x the unsharded one (partials summed twice); "
    for r in range(RANKS):
        if tolerance.within(got, ref.moe(x, ref.shard_weights(weights, r, RANKS), config), room):
            return f"the output is rank {r}'s partial sum (no all_sum); "
    return ""
