"""The ``dsv4shard`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time

from hypothesis import HealthCheck, Phase, given, settings


def run_property(prop, strategy, examples: int) -> dict:
    """Run one property for ``examples`` derandomized examples; PASS or FAIL
    with the first line of the failure."""
    count = 0

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        nonlocal count
        count += 1
        prop(case)

    start = time.perf_counter()
    try:
        run()
        status, detail = "PASS", ""
    except Exception as error:  # report, never crash the report
        status, detail = "FAIL", (str(error).strip().splitlines() or [type(error).__name__])[0]
    return {"check": prop.__name__, "status": status, "examples": count,
            "seconds": round(time.perf_counter() - start, 2), "detail": detail}


def own_checks():
    """The project's own implementations against the reference."""
    from dsv4shard.testing import strategies as s
    from dsv4shard.testing.properties import quantization, reference_edges, unfused

    return [
        (quantization.dequantize_matches_mlx, s.quant_cases(global_scale=True)),
        (reference_edges.clip_probes, s.clip_cases()),
        (reference_edges.renormalisation_rule, s.router_cases()),
        (reference_edges.bias_chooses_never_weights, s.router_cases()),
        (reference_edges.large_logits_stay_finite, s.router_cases()),
        (unfused.switch_glu_matches_reference, s.moe_cases()),
        (unfused.moe_matches_reference, s.moe_cases()),
        (unfused.sorted_matches_unsorted, s.moe_cases()),
    ]


def markdown(rows) -> str:
    lines = ["| check | result | examples | seconds | detail |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['status']} | {r['examples']} | {r['seconds']} | "
                     f"{r['detail'].replace('|', '/')} |")
    return "\n".join(lines)


def check_variants(specs, only=None) -> list:
    """Each variant's conformance report (dsv4shard.variants), printed as it
    completes."""
    from dsv4shard.variants import check_variant
    from dsv4shard.variants import markdown as variant_markdown

    reports = []
    for spec in specs:
        report = check_variant(spec, only)
        print()
        print(variant_markdown(report), flush=True)
        reports.append(report)
    return reports


def check(args) -> int:
    """With --variant: those variants' conformance checks.  Without: the
    project's own implementations' properties (own_checks), then the
    installed mlx-lm's DeepSeek-V4 models and the project's own block,
    sharding and fusion as variants.  Exit status 1 when a property or a
    REQUIRED variant check fails (informational departures do not count)."""
    from dsv4shard.variants import CHECKS, default_variants

    unknown = sorted(set(args.only or []) - {c.name for c in CHECKS})
    if unknown:
        print(f"dsv4shard check: unknown check(s) {unknown}; checks: "
              f"{', '.join(c.name for c in CHECKS)}", file=sys.stderr)
        return 2
    rows = []
    if not args.variant:
        rows = [run_property(prop, strategy, args.examples) for prop, strategy in own_checks()]
        print("### the project's own implementations: properties against the reference\n")
        print(markdown(rows))
    reports = check_variants(args.variant or default_variants(), args.only)
    if args.json:
        result = {"variants": [r.to_dict() for r in reports]}
        if rows:
            result["own"] = rows
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    failed = any(r["status"] == "FAIL" for r in rows) or any(not r.ok for r in reports)
    return 1 if failed else 0


def mutants(args) -> int:
    """Every catalogued mutant against every property of its kind, as a
    Markdown kill matrix with a summary; exit status 1 when a mutant survives
    all of them (those whose property the backend cannot run are skipped)."""
    from dsv4shard.testing import matrix

    return matrix.main(args)


def main(argv=None) -> int:
    from dsv4shard.testing.catch import CI_EXAMPLES

    parser = argparse.ArgumentParser(prog="dsv4shard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check implementations against the reference")
    p.add_argument("--examples", type=int, default=50, help="examples per check")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--variant", action="extend", nargs="+", metavar="MODULE_OR_FILE",
                   help="check these DeepSeek-V4 variants instead (repeatable): a module name "
                        "(mlx_lm.models.deepseek_v41) or a model file importing its siblings "
                        "from mlx_lm.models")
    p.add_argument("--only", action="append", metavar="CHECK",
                   help="run only this variant check (repeatable)")
    p.set_defaults(func=check)
    p = sub.add_parser("mutants", help="the kill matrix: every known-bad implementation "
                                       "against every property of its kind")
    p.add_argument("--json", help="also write the matrix to this file")
    p.add_argument("--examples", type=int, default=CI_EXAMPLES,
                   help="examples per cell (default: the ci profile's, %(default)s)")
    p.add_argument("--jobs", type=int, default=0,
                   help="worker processes (default: one per CPU core)")
    p.add_argument("--only", action="append", metavar="MUTANT",
                   help="run only this mutant (repeatable)")
    p.set_defaults(func=mutants)
    p = sub.add_parser("bench", help="fused against unfused experts on this backend: latency, "
                                     "launches, bytes, bandwidth against the peak, memory")
    from dsv4shard import bench

    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
