"""A variant's verdicts: every ``variant`` property of the table run by the
engine against it, with what ran named (file, sha256, versions, device).

``check_variant`` runs in this process; ``check_isolated`` runs it in a
child process of its own (its import, its rank workers), so that nothing a
variant's import does (one real port replaces ``mx.distributed.all_sum``)
can change the verdict on another.  ``dsv4shard check`` and
``pytest --variant`` use ``check_isolated``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from types import ModuleType

from dsv4shard.engine import outcome as o
from dsv4shard.engine.records import variant_properties
from dsv4shard.engine.run import Verdict, run

# Variant properties get a few examples each: every one builds fresh tiny
# blocks, and most vary only seeds and sizes.
VARIANT_EXAMPLES = 4
ISOLATED_TIMEOUT = 900.0  # seconds for one variant's whole check


@dataclass
class Report:
    variant: str
    verdicts: list[Verdict]
    identity: dict = field(default_factory=dict)
    properties: dict = field(default_factory=dict)
    error: str | None = None  # not checked: cannot be loaded, no MoE block, died

    @property
    def failed(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.fatal]

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed

    def by_check(self) -> dict[str, Verdict]:
        return {v.prop: v for v in self.verdicts}

    def to_dict(self) -> dict:
        props = {k: v for k, v in self.properties.items() if k != "revision_probe"}
        return {"variant": self.variant, "ok": self.ok, "error": self.error,
                "identity": self.identity, "properties": props,
                "checks": [v.to_dict() for v in self.verdicts]}

    @classmethod
    def from_dict(cls, d: dict) -> Report:
        return cls(d["variant"], [Verdict(**v) for v in d["checks"]], d.get("identity", {}),
                   d.get("properties", {}), d.get("error"))


# --- identity ------------------------------------------------------------------------


def source_file(spec) -> str | None:
    from dsv4shard.variants.loading import is_path

    if isinstance(spec, ModuleType):
        return getattr(spec, "__dsv4shard_source__", getattr(spec, "__file__", None))
    if is_path(spec) or os.path.isfile(spec):
        return os.path.abspath(spec)
    import importlib.util

    try:
        found = importlib.util.find_spec(spec)
    except (ImportError, ValueError):
        return None
    return found.origin if found else None


def sha256(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def version_of(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


# Expressions a file branches on to take a path only some devices run.
DEVICE_GATES = (r"mx\.metal\.is_available\(\)", r"mx\.cuda\.is_available\(\)",
                r"mx\.default_device\(\)", r"metal_kernel", r"mx\.fast\.metal_kernel",
                r"mx\.fast\.cuda_kernel")


def device_gates(path: str | None) -> list[str]:
    """The device-gating expressions a variant's source uses, in order seen."""
    if not path or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    found = []
    for pattern in DEVICE_GATES:
        for m in re.finditer(pattern, text):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"{m.group(0)} (line {line})")
    return found


def identity(spec) -> dict:
    import mlx.core as mx

    from dsv4shard import backend

    path = source_file(spec)
    return {"file": path, "sha256": sha256(path), "mlx": mx.__version__,
            "mlx_lm": version_of("mlx-lm"), "dsv4shard": version_of("dsv4shard"),
            "python": platform.python_version(), "backend": backend.name(),
            "device": str(mx.default_device()), "device_gates": device_gates(path)}


# --- checking ------------------------------------------------------------------------


def selected(names=None) -> list:
    records = variant_properties()
    return [r for r in records if names is None or r.name in names]


def check_variant(spec, names=None, examples: int = VARIANT_EXAMPLES) -> Report:
    """Load ``spec`` and run every variant property (or those named) in this
    process; a variant that cannot be loaded, or holds no MoE block, gives a
    report whose error says so in one line."""
    from dsv4shard.variants.adapter import StructureError, Variant
    from dsv4shard.variants.loading import VariantLoadError, describe

    name = describe(spec)
    ident = identity(spec)
    try:
        variant = Variant(spec)
    except VariantLoadError as error:
        return Report(name, [], ident, {}, f"cannot be loaded: {o.one_line(error)}")
    try:
        _ = variant.layout
    except StructureError as error:
        return Report(name, [], ident, {}, f"no MoE block found: {o.one_line(error)}")
    option = None if isinstance(spec, ModuleType) else f"--variant={spec}"
    verdicts = [run(r, {"variant": variant}, subject=name, examples=examples,
                    subject_option=option) for r in selected(names)]
    return Report(name, verdicts, ident, dict(variant.properties))


def check_isolated(spec: str, names=None, examples: int = VARIANT_EXAMPLES,
                   timeout: float = ISOLATED_TIMEOUT) -> Report:
    """``check_variant`` in a child process of its own; a child that dies or
    hangs gives a report saying so, with its last stderr line."""
    from dsv4shard.variants.loading import describe

    with tempfile.TemporaryDirectory(prefix="dsv4shard-variant-") as tmp:
        out = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "dsv4shard.variants.child", "--out", out,
               "--examples", str(examples), spec]
        for n in names or ():
            cmd += ["--only", n]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=timeout, text=True)
        except subprocess.TimeoutExpired:
            return Report(describe(spec), [], {}, {},
                          f"not checked: no verdict within {timeout:.0f} s (hung)")
        if proc.returncode != 0 or not os.path.exists(out):
            tail = [line for line in proc.stderr.splitlines() if line.strip()]
            return Report(describe(spec), [], {}, {},
                          f"not checked: the checking process exited {proc.returncode}"
                          + (f": {tail[-1].strip()}" if tail else ""))
        with open(out) as f:
            return Report.from_dict(json.load(f))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="check one variant; write its report as JSON")
    parser.add_argument("spec")
    parser.add_argument("--out", required=True)
    parser.add_argument("--examples", type=int, default=VARIANT_EXAMPLES)
    parser.add_argument("--only", action="append")
    args = parser.parse_args(argv)
    report = check_variant(args.spec, args.only, args.examples)
    with open(args.out, "w") as f:
        json.dump(report.to_dict(), f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
