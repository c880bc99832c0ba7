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


def check(args) -> int:
    rows = [run_property(prop, strategy, args.examples) for prop, strategy in own_checks()]
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4shard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check implementations against the reference")
    p.add_argument("--examples", type=int, default=50, help="examples per check")
    p.add_argument("--json", help="also write the results to this file")
    p.set_defaults(func=check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
