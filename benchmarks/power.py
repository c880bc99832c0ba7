"""Power of every value comparison, as a figure: the median over drawn cases
of each comparison's bound-to-signal ratio (median of bound / |expected|
over the compared elements), before and after issue 11's bounds, per
dtype, quantization and arithmetic, on this backend (float32 under TF32
emulated: the bound called with TF32's roundoff).

    python benchmarks/power.py [--cases N] [--markdown FILE]

"Before" is the worst-case stage bound compounded against the float64
reference (``tolerance.moe_bound`` / ``switch_glu_bound``, plus N u |partials|
for the sharded sum); "after" is the expected side the properties use now
(``tolerance.expect_moe`` / ``expect_switch_glu`` / ``expect_sharded_moe``), and for the variant checks in bfloat16 the
precision tier past which a departure fails.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings

import reference as ref
from dsv4shard import backend
from dsv4shard.testing import strategies as s
from dsv4shard.testing import tolerance as tol
from dsv4shard.testing.properties import unfused
from dsv4shard.weights import build_block


def ratio(bound, want) -> float:
    return tol.Expected(want, bound, tol.arithmetic("float32")).ratio()


def old_bounds(case, x, weights, ids, tf32: bool):
    """The bounds before: moe_bound and switch_glu_bound (TF32's roundoff in
    every float32 matmul when ``tf32``)."""
    saved = tol.matmul_roundoff
    if tf32:
        tol.matmul_roundoff = lambda d: tol.TF32 if d == "float32" else tol.UNIT_ROUNDOFF[d]
    try:
        moe = tol.moe_bound(x, weights, case.config, case.dtype, ids)
        glu = tol.switch_glu_bound(x, unfused.data.make_indices(case), weights,
                                   case.config.swiglu_limit, case.dtype)
    finally:
        tol.matmul_roundoff = saved
    return moe, glu


def project_rows(case, rows, tf32: bool):
    block, weights = unfused.built(case, build_block)
    _, x, _, ids = unfused.inputs(case)
    if not case.config.hash_routing and not np.all(
            tol.router_gap(x, weights, case.config) > tol.router_margin(x, weights, case.config)):
        return  # a near-tie: the property discards it
    if tf32:
        block.float32_matmul = "tf32"
    arith = unfused.arithmetic_of(block, case.dtype)
    key = (f"{case.dtype}{' (TF32)' if tf32 else ''}", "quantized" if case.quant else "dense")
    old_moe, old_glu = old_bounds(case, x, weights, ids, tf32)
    moe = unfused.expect_moe(case, block, weights)
    glu = unfused.expect_switch_glu(case, block, weights)
    want_glu = ref.switch_glu(x, unfused.data.make_indices(case), weights,
                              case.config.swiglu_limit)
    rows[("unfused.moe_matches_reference", *key)].append(
        (ratio(old_moe, ref.moe(x, weights, case.config, ids)), moe.ratio(), arith.target))
    rows[("unfused.switch_glu_matches_reference", *key)].append(
        (ratio(old_glu, want_glu), glu.ratio(), arith.target))
    rows[("unfused.sorted_matches_unsorted", *key)].append(
        (2 * ratio(old_glu, want_glu), unfused.expect_sorted(case, block, weights).ratio(),
         arith.target))
    if case.dtype != "float32" and not tf32:
        cuda_rows(case, block, weights, x, ids, old_moe, rows)


def cuda_rows(case, block, weights, x, ids, old_moe, rows):
    """A half-precision case under the model of MLX's CUDA kernels (weights
    in the dtype, float32 sums, the result rounded; the router in TF32), as
    the bound would be on an H200."""
    arith = tol.arithmetic(case.dtype, backend_name="cuda")
    moe = tol.expect_moe(x, weights, case.config, arith, tol.block_kernels(block, weights), ids)
    rows[("unfused.moe_matches_reference", f"{case.dtype} (CUDA model)", "quantized")].append(
        (ratio(old_moe, ref.moe(x, weights, case.config, ids)), moe.ratio(), arith.target))


def shard_rows(case, rows):
    """sharded_matches_unsharded (and real_ranks_match_unsharded): before,
    the unsharded block's stage bound plus N u |partials|; after, each
    rank's partial followed through the sliced kernels and the sum."""
    from dsv4shard.testing.properties import sharded

    m = case.moe
    if backend.unsupported(m.quant, m.dtype):
        return
    block, weights = unfused.built(m, build_block)
    _, x, _, ids = unfused.inputs(m)
    if not m.config.hash_routing and not np.all(
            tol.router_gap(x, weights, m.config) > tol.router_margin(x, weights, m.config)):
        return
    reduce = sharded.reduction_dtype(case)
    partials = sum(np.abs(ref.moe(x, sharded.slice_weights(weights, a, b, r == 0), m.config, ids))
                   for r, (a, b) in enumerate(sharded.rank_bounds(case)))
    old = (tol.moe_bound(x, weights, m.config, m.dtype, ids)
           + case.ranks * tol.UNIT_ROUNDOFF[reduce] * partials)
    new = sharded.expect_sharded(case, block, weights, x, ids)
    key = (f"sharded.sharded_matches_unsharded ({case.reduce} sum)", m.dtype,
           "quantized" if m.quant else "dense")
    rows[key].append((ratio(old, ref.moe(x, weights, m.config, ids)), new.ratio(),
                      new.arith.target))


def concat_order_rows(case, rows):
    """fused_concat_order_behaviour: before, switch_glu_bound against the
    reference; after, the unfused kernels followed."""
    from dsv4shard.testing.properties import fused

    m = case.moe
    if backend.unsupported(m.quant, m.dtype):
        return
    block, weights = unfused.built(m, build_block)
    _, x, _, _ = unfused.inputs(m)
    idx = unfused.data.make_indices(m)
    right, _ = fused.expect_concat_orders(case, block, weights, x, idx)
    old = tol.switch_glu_bound(x, idx, weights, m.config.swiglu_limit, m.dtype)
    want = ref.switch_glu(x, idx, weights, m.config.swiglu_limit)
    rows[("fused.fused_concat_order_behaviour", m.dtype, "quantized" if m.quant else "dense")
         ].append((ratio(old, want), right.ratio(), right.arith.target))


def variant_rows(case, rows):
    """compare_block on the project's own block as a variant."""
    from dsv4shard.testing.properties.variant import AFFINE8, setting_of
    from dsv4shard.variants import OWN, Variant
    from dsv4shard.variants import data as vdata
    from dsv4shard.variants.probes import expect_block

    variant = Variant(OWN)
    setting = setting_of(case)
    runs = [("variant.moe_matches_reference", "float32", None)]
    if backend.unsupported(case.routed_quant, "bfloat16") is None:
        runs.append(("variant.quantized_moe_matches_reference", "bfloat16", case.routed_quant))
    for name, dtype, quant in runs:
        built = variant.build(setting, vdata.weights(setting, case.seed, case.activation_scale),
                              quant=quant, shared_quant=AFFINE8 if quant else None, dtype=dtype)
        x_mx = vdata.tokens(case.n_tokens, case.seed, dtype)
        found = expect_block(built, x_mx, setting.config(), dtype)
        keep = found.keep
        scene = found.scene
        old = tol.moe_bound(scene.x, scene.weights, scene.config, dtype, scene.ids)
        want = ref.moe(scene.x, scene.weights, scene.config, scene.ids)
        tight, loose = found.tight.take(keep), found.precision.take(keep)
        kind = "quantized" if quant else "dense"
        rows[(name, dtype, kind)].append((ratio(old[keep], want[keep]), tight.ratio(),
                                          tight.arith.target))
        if dtype != "float32":
            rows[(name + " (precision tier)", dtype, kind)].append(
                (ratio(old[keep], want[keep]), loose.ratio(), loose.arith.target))


def draw(strategy, n, fn):
    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case=strategy)
    def body(case):
        fn(case)

    body()


def table(rows) -> str:
    lines = ["| comparison | dtype | experts | cases | before: median bound/signal | "
             "after: median | after: p90 | target | after meets it |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (name, dtype, kind), values in sorted(rows.items()):
        v = np.array(values)
        after = float(np.median(v[:, 1]))
        lines.append(f"| {name} | {dtype} | {kind} | {len(v)} | {np.median(v[:, 0]):.3g} | "
                     f"{after:.3g} | {np.percentile(v[:, 1], 90):.3g} | {v[0, 2]:g} | "
                     f"{'yes' if after <= v[0, 2] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=120, help="drawn cases per strategy")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows: dict = defaultdict(list)

    def project(case):
        project_rows(case, rows, tf32=False)
        if case.dtype == "float32":
            project_rows(case, rows, tf32=True)

    draw(s.moe_cases(), args.cases, project)
    draw(s.shard_cases(), max(8, args.cases // 3), lambda c: shard_rows(c, rows))
    draw(s.fusion_cases(), max(8, args.cases // 3), lambda c: concat_order_rows(c, rows))
    draw(s.variant_cases(), max(8, args.cases // 4), lambda c: variant_rows(c, rows))
    import mlx.core as mx

    head = (f"# Power: bound-to-signal per comparison ({backend.name()}, "
            f"{mx.default_device()}, mlx {mx.__version__})\n\n"
            f"Median over drawn cases of each comparison's median bound / |expected|; "
            f"{time.perf_counter() - start:.0f} s.  TF32 rows: the bound with TF32's "
            f"roundoff in every float32 matmul, as MLX's CUDA build runs them; CUDA-model "
            f"rows: half-precision cases under the bound's model of MLX's CUDA kernels.\n")
    text = head + "\n" + table(rows) + "\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
