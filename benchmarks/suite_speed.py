"""Run the default suite and report its speed: wall time, examples per second
for each hypothesis property, and time per tier.

    python benchmarks/suite_speed.py [--markdown FILE] [-- extra pytest args]

Figures come from pytest's own durations and hypothesis's own statistics
(``--hypothesis-show-statistics``), which pytest-xdist carries back from its
workers.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections import defaultdict

# Which tier a test file belongs to.
TIERS = {
    "test_reference_edges": "reference (NumPy)",
    "test_quantization": "reference (NumPy)",
    "test_reference_pure": "reference (NumPy)",
    "test_unfused": "MLX kernels",
    "test_fused": "MLX kernels",
    "test_sharded": "MLX kernels + real ranks",
    "test_backend_defects": "MLX kernels",
    "test_rank_pool": "real ranks",
    "test_end_to_end": "real ranks",
    "test_hardware": "hardware",
    "test_variants": "variants",
    "test_known_bad": "known-bad twins",
    "test_kill_matrix": "known-bad twins",
    "test_power": "power (wrong answers rejected)",
    "test_sharded_model": "real ranks",
    "test_third_party": "third-party code",
    "test_attribution": "attribution and doctor",
    "test_doctor": "attribution and doctor",
    "test_cli": "command and tooling",
    "test_bench": "command and tooling",
    "test_schedule": "command and tooling",
    "test_kernel_cache": "command and tooling",
    "test_example_log": "command and tooling",
    "test_records": "command and tooling",
}

DURATION = re.compile(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)")
STATS_HEAD = re.compile(r"^(tests/\S+::\S+):\s*$")
PASSING = re.compile(r"- (\d+) passing, (\d+) failing, and (\d+) invalid")
PHASE = re.compile(r"- during (\w+) phase \(([\d.]+) seconds\)")


def tier_of(nodeid: str) -> str:
    module = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return TIERS.get(module, "other")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", help="also write the report here")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    cmd = [sys.executable, "-m", "pytest", "-n", "auto", "-q", "-p", "no:cacheprovider",
           "--durations=0", "--durations-min=0", "--hypothesis-show-statistics",
           *args.pytest_args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    out = proc.stdout.splitlines()

    seconds: dict[str, float] = defaultdict(float)
    for line in out:
        m = DURATION.match(line)
        if m:
            seconds[m.group(3)] += float(m.group(1))
    examples: dict[str, int] = {}
    generate: dict[str, float] = {}
    node = None
    for line in out:
        head = STATS_HEAD.match(line)
        if head:
            node = head.group(1)
            examples[node] = 0
            continue
        if node is None:
            continue
        m = PHASE.search(line)
        if m and m.group(1) == "generate":
            generate[node] = float(m.group(2))
        m = PASSING.search(line)
        if m:
            examples[node] += int(m.group(1)) + int(m.group(2))

    tiers: dict[str, float] = defaultdict(float)
    for nodeid, s in seconds.items():
        tiers[tier_of(nodeid)] += s
    summary = [line for line in out if re.search(r"\d+ passed", line)]
    lines = [f"`{' '.join(cmd[1:])}`", "",
             f"wall time: {wall:.1f} s; {summary[-1].strip('= ') if summary else 'no summary'}",
             "", "| tier | test seconds (summed over workers) |", "|---|---|"]
    lines += [f"| {t} | {s:.1f} |" for t, s in sorted(tiers.items(), key=lambda i: -i[1])]
    lines += ["", "| property test | examples | seconds | examples/s |", "|---|---|---|---|"]
    for nodeid in sorted(examples, key=lambda n: -seconds.get(n, 0)):
        s = seconds.get(nodeid, 0.0)
        rate = examples[nodeid] / s if s else float("nan")
        lines.append(f"| {nodeid} | {examples[nodeid]} | {s:.2f} | {rate:.1f} |")
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report + "\n")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
