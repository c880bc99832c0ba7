"""dsv4shard: check sharded and fused DeepSeek-V4 MoE blocks on MLX against a
float64 NumPy reference.

  dsv4shard check                      the project's own properties, then the
                                       installed DeepSeek-V4 models and the
                                       project's block as variants
  dsv4shard check --variant FILE|MOD   a port's deepseek_v4.py (or a module)
  dsv4shard mutants                    the kill matrix of known-bad code
  dsv4shard bench                      fused against unfused experts
  dsv4shard doctor                     MLX's kernels here against mx.cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# The project's own properties that ``dsv4shard check`` runs (no real ranks:
# those run in the test suite), by their names in the property table.
OWN_CHECKS = ("dequantize_matches_mlx", "clip_probes", "renormalisation_rule",
              "bias_chooses_never_weights", "large_logits_stay_finite",
              "switch_glu_matches_reference", "moe_matches_reference", "sorted_matches_unsorted")


def own_verdicts(examples: int) -> list:
    """The project's own implementations against the reference, through the engine."""
    from dsv4shard.engine.records import by_name, project_properties
    from dsv4shard.engine.run import run

    keyword = {p.name: p.keyword for p in project_properties()}
    return [run(by_name(n, keyword[n]), subject="dsv4shard", examples=examples)
            for n in OWN_CHECKS]


def markdown(verdicts) -> str:
    lines = ["| check | what it checks | result | examples | seconds | detail |",
             "|---|---|---|---|---|---|"]
    for v in verdicts:
        summary = next((p.summary for p in _records() if p.name == v.prop), "")
        lines.append(f"| {v.prop} | {summary} | {v.status} | {v.examples} | {v.seconds} | "
                     f"{v.detail.replace('|', '/')} |")
    return "\n".join(lines)


def _records():
    from dsv4shard.engine.records import project_properties

    return project_properties()


def check_variants(specs, only=None, examples=None) -> list:
    """Each variant's report, each checked in a process of its own, printed
    as it completes."""
    from dsv4shard.variants import check_isolated
    from dsv4shard.variants import markdown as variant_markdown
    from dsv4shard.variants.checking import VARIANT_EXAMPLES

    reports = []
    for spec in specs:
        start = time.perf_counter()
        print(f"checking {spec} in a process of its own ...", file=sys.stderr, flush=True)
        report = check_isolated(spec, only, examples or VARIANT_EXAMPLES)
        print()
        print(variant_markdown(report), flush=True)
        print(f"\n({spec}: {time.perf_counter() - start:.1f} s)", flush=True)
        reports.append(report)
    return reports


def check(args) -> int:
    """With --variant: those variants' verdicts.  Without: the project's own
    implementations' properties, then the installed mlx-lm's DeepSeek-V4
    models and the project's own block, sharding and fusion as variants.
    Exit status 1 when a property or a REQUIRED variant check fails
    (departures of informational checks do not count), 2 on bad usage."""
    import os

    from dsv4shard.engine.records import variant_properties
    from dsv4shard.variants import default_variants

    names = [r.name for r in variant_properties()]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        print(f"dsv4shard check: unknown check(s) {unknown}; checks: {', '.join(names)}",
              file=sys.stderr)
        return 2
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        print(f"dsv4shard check: --json {args.json}: its folder does not exist", file=sys.stderr)
        return 2
    if args.examples < 1:
        print("dsv4shard check: --examples must be at least 1", file=sys.stderr)
        return 2
    started = time.perf_counter()
    own = []
    if args.fuse_impl or args.shard_impl:
        from dsv4shard.third_party import impl_verdicts

        try:
            own = impl_verdicts(args.fuse_impl, args.shard_impl, args.examples)
        except ValueError as error:
            print(f"dsv4shard check: {error}", file=sys.stderr)
            return 2
        print("### your implementations: properties against the unfused block and the "
              "reference\n")
        print(markdown(own), flush=True)
        declined = sorted({d for v in own for d in v.declined})
        if declined:
            print("\ndeclined (NotImplementedError): " + "; ".join(declined))
        if not args.variant:
            print("\n" + summary_line(own, [], time.perf_counter() - started, "your"),
                  flush=True)
            return 1 if any(v.fatal for v in own) else 0
    elif not args.variant:
        own = own_verdicts(args.examples)
        print("### the project's own implementations: properties against the reference\n")
        print(markdown(own), flush=True)
    reports = check_variants(args.variant or default_variants(), args.only,
                             args.variant_examples)
    if args.json:
        result = {"variants": [r.to_dict() for r in reports]}
        if own:
            result["own"] = [v.to_dict() for v in own]
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    print("\n" + summary_line(own, reports, time.perf_counter() - started), flush=True)
    failed = any(v.fatal for v in own) or any(not r.ok for r in reports)
    return 1 if failed else 0


def summary_line(own, reports, seconds: float, whose: str = "the project's") -> str:
    """One line: what was checked, the verdicts by word, the time."""
    from collections import Counter

    from dsv4shard.engine import outcome as o

    verdicts = list(own) + [v for r in reports for v in r.verdicts]
    counts = Counter(v.status for v in verdicts)
    words = ", ".join(f"{counts[s]} {s}" for s in o.STATUSES if counts[s])
    parts = []
    if own:
        parts.append(f"{len(own)} properties of {whose} implementations")
    if reports:
        conform = sum(r.ok for r in reports)
        parts.append(f"{len(reports)} variant{'s' * (len(reports) != 1)} ({conform} conform, "
                     f"{len(reports) - conform} do not)")
    return f"summary: checked {' and '.join(parts)}; {words or 'no verdicts'}; {seconds:.1f} s"


def mutants(args) -> int:
    """Every catalogued mutant against every property of its kind, as a
    Markdown kill matrix with a summary; exit status 1 when a mutant survives
    all of them (those whose property the backend cannot run are skipped)."""
    import os

    from dsv4shard.testing import matrix

    if args.examples < 1:
        print("dsv4shard mutants: --examples must be at least 1", file=sys.stderr)
        return 2
    if args.jobs < 0:
        print("dsv4shard mutants: --jobs must be 0 (one per core) or more", file=sys.stderr)
        return 2
    if args.part:
        try:
            args.part = matrix.parse_part(args.part)
        except ValueError as error:
            print(f"dsv4shard mutants: --part {error}", file=sys.stderr)
            return 2
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        print(f"dsv4shard mutants: --json {args.json}: its folder does not exist",
              file=sys.stderr)
        return 2
    return matrix.main(args)


def version() -> str:
    from dsv4shard.versions import running

    v = running()
    return f"dsv4shard {v['dsv4shard']} (mlx {v['mlx']}, mlx-lm {v['mlx_lm']})"


def check_arguments(p) -> None:
    p.add_argument("--examples", type=int, default=50,
                   help="examples per property of the project's own (default %(default)s)")
    p.add_argument("--variant-examples", type=int, default=None, metavar="N",
                   help="examples per variant property (default 4)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--variant", action="extend", nargs="+", metavar="MODULE_OR_FILE",
                   help="check these DeepSeek-V4 variants instead (repeatable): a module name "
                        "(mlx_lm.models.deepseek_v41) or a model file importing its siblings "
                        "from mlx_lm.models")
    p.add_argument("--only", action="append", metavar="CHECK",
                   help="run only this variant check (repeatable)")
    p.add_argument("--fuse-impl", metavar="MODULE:FUNCTION",
                   help="run the fused gate+up properties against this installer "
                        "(function(switch_glu) -> module or None)")
    p.add_argument("--shard-impl", metavar="MODULE:FUNCTION",
                   help="run the sharding properties against this sharder "
                        "(function(moe_block, group) -> block)")
    p.set_defaults(func=check)


def mutants_arguments(p) -> None:
    from dsv4shard.testing.catch import CI_EXAMPLES

    p.add_argument("--json", help="also write the matrix to this file")
    p.add_argument("--examples", type=int, default=CI_EXAMPLES,
                   help="examples per cell (default: the ci profile's, %(default)s)")
    p.add_argument("--jobs", type=int, default=0,
                   help="worker processes (default: one per CPU core)")
    p.add_argument("--only", action="append", metavar="MUTANT",
                   help="run only this mutant (repeatable)")
    p.add_argument("--part", metavar="K/N",
                   help="run part K of N (every Nth mutant from the Kth, whole)")
    p.add_argument("--resume", action="store_true",
                   help="go on from the cells the --json file holds (written after every "
                        "cell, so a run cut short keeps them); a cell that errored runs again")
    p.add_argument("--listed-first", action="store_true",
                   help="run each mutant's listed cell first, and the rest of its kind only "
                        "where that cell did not catch it: the verdicts, not the whole matrix")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="print the matrix of parts written with --json (runs nothing)")
    p.set_defaults(func=mutants)


def bench_arguments(p) -> None:
    from dsv4shard import bench

    bench.add_arguments(p)
    p.set_defaults(func=bench.main)


def doctor_arguments(p) -> None:
    from dsv4shard import doctor

    doctor.add_arguments(p)
    p.set_defaults(func=doctor.main)


# The subcommands: (name, help, the function that adds its arguments).  Only
# the chosen one's arguments are built, so that ``--help`` and ``--version``
# import no MLX.
COMMANDS = (
    ("check", "check implementations against the reference", check_arguments),
    ("mutants", "the kill matrix: every known-bad implementation against every property of "
                "its kind", mutants_arguments),
    ("bench", "fused against unfused experts on this backend: latency, launches, bytes, "
              "bandwidth against the peak, memory", bench_arguments),
    ("doctor", "map this backend's MLX operations against mx.cpu and the NumPy reference: "
               "which ones are wrong here", doctor_arguments),
)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="dsv4shard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text, arguments in COMMANDS:
        p = sub.add_parser(name, help=text)
        if name == chosen:
            arguments(p)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
