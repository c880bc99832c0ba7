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
        return {"variant": self.variant, "ok": self.ok, "error": self.error,
                "identity": self.identity, "properties": _plain(self.properties),
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
    from dsv4shard.versions import running

    path = source_file(spec)
    return {"file": path, "sha256": sha256(path), **running(), "mlx": mx.__version__,
            "backend": backend.name(), "device": str(mx.default_device()),
            "device_gates": device_gates(path)}


# --- checking ------------------------------------------------------------------------


def selected(names=None) -> list:
    records = variant_properties()
    return [r for r in records if names is None or r.name in names]


def check_variant(spec, names=None, examples: int = VARIANT_EXAMPLES, events=None) -> Report:
    """Load ``spec`` and run every variant property (or those named) in this
    process; a variant that cannot be loaded, or holds no MoE block, gives a
    report whose error says so in one line.  ``events(dict)`` hears each
    property start and each verdict as it comes (the child's protocol)."""
    from dsv4shard.variants.adapter import StructureError, Variant
    from dsv4shard.variants.loading import VariantLoadError, describe

    tell = events or (lambda event: None)
    name = describe(spec)
    ident = identity(spec)
    error = None
    try:
        variant = Variant(spec)
        _ = variant.layout
    except VariantLoadError as failure:
        error = f"cannot be loaded: {o.one_line(failure)}"
    except StructureError as failure:
        error = f"no MoE block found: {o.one_line(failure)}"
    tell({"kind": "head", "variant": name, "identity": ident, "error": error})
    if error:
        return Report(name, [], ident, {}, error)
    option = None if isinstance(spec, ModuleType) else f"--variant={spec}"
    verdicts = []
    for record in selected(names):
        tell({"kind": "start", "prop": record.name})
        verdicts.append(run(record, {"variant": variant}, subject=name, examples=examples,
                            subject_option=option))
        tell({"kind": "verdict", "verdict": verdicts[-1].to_dict(),
              "properties": _plain(variant.properties)})
    return Report(name, verdicts, ident, dict(variant.properties))


def _plain(props: dict) -> dict:
    return {k: v for k, v in props.items() if k != "revision_probe"}


# A property that gives no verdict in this long is a finding ("hung"), not a
# wait: the child is killed and the remaining properties run in a new one.
PROPERTY_TIMEOUT = 240.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_isolated(spec: str, names=None, examples: int = VARIANT_EXAMPLES,
                   property_timeout: float = PROPERTY_TIMEOUT, progress=say) -> Report:
    """``check_variant`` in a child process of its own, which writes each
    event as a JSON line; a property that hangs past ``property_timeout``, or
    a child that dies, gives that property an ERROR verdict saying so (with
    the child's last stderr line) and the rest run in a fresh child.
    ``progress(line)`` hears a line per property (None: silent)."""
    from dsv4shard.variants.loading import describe

    wanted = [r.name for r in selected(names)]
    done: dict[str, Verdict] = {}
    head: dict = {}
    props: dict = {}
    tell = progress or (lambda line: None)
    while True:
        remaining = [n for n in wanted if n not in done]
        if head.get("error") or not remaining:
            break
        events, died = _child(spec, remaining, examples, property_timeout)
        current = None
        for event in events:
            if event["kind"] == "head":
                head = event
            elif event["kind"] == "start":
                current = event["prop"]
                tell(f"  [{len(done) + 1}/{len(wanted)}] {current} ...")
            elif event["kind"] == "verdict":
                v = Verdict(**event["verdict"])
                done[v.prop], current = v, None
                props.update(event["properties"])
                tell(f"  [{len(done)}/{len(wanted)}] {v.prop}: {v.status} ({v.seconds} s)"
                     f"{eta(done.values(), len(wanted))}")
        if died and not head:
            return Report(describe(spec), [], {}, {}, f"not checked: {died}")
        if died:
            if current is None:  # died between properties: nothing more to learn
                current = next(n for n in wanted if n not in done)
            record = next(r for r in variant_properties() if r.name == current)
            done[current] = Verdict(current, describe(spec), record.required, o.ERROR, died)
            tell(f"  [{len(done)}/{len(wanted)}] {current}: {o.ERROR} ({died})")
    verdicts = [done[n] for n in wanted if n in done]
    return Report(head.get("variant", describe(spec)), verdicts, head.get("identity", {}),
                  props, head.get("error"))


def eta(verdicts, total: int) -> str:
    """", about N s left" from the mean time of the verdicts so far."""
    times = [v.seconds for v in verdicts]
    left = total - len(times)
    if not times or left <= 0:
        return ""
    return f", about {left * sum(times) / len(times):.0f} s left"


def _child(spec, names, examples, property_timeout):
    """(events, why it died or None): one child checking ``names``."""
    import time

    with tempfile.TemporaryDirectory(prefix="dsv4shard-variant-") as tmp:
        out, err = os.path.join(tmp, "events.jsonl"), os.path.join(tmp, "stderr")
        cmd = [sys.executable, "-m", "dsv4shard.variants.child", "--out", out,
               "--examples", str(examples), spec]
        for n in names:
            cmd += ["--only", n]
        with open(err, "w") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        events, seen, started, why = [], 0, time.monotonic(), None
        try:
            while True:
                finished = proc.poll() is not None
                events, fresh = _read_events(out)
                if fresh > seen:
                    seen, started = fresh, time.monotonic()
                if finished:
                    if proc.returncode != 0:
                        why = f"the checking process exited {proc.returncode}" \
                              f"{_last_line(err)}"
                    break
                if time.monotonic() - started > property_timeout:
                    why = (f"hung: no verdict within {property_timeout:.0f} s (the variant's "
                           f"code or an MLX kernel; rerun it alone with --only)")
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return events, why


def _read_events(path: str) -> tuple[list, int]:
    if not os.path.exists(path):
        return [], 0
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            break
    return events, len(events)


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        tail = [line.strip() for line in f.read().splitlines() if line.strip()]
    return f": {tail[-1]}" if tail else ""


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="check one variant; write its events as "
                                                 "JSON lines")
    parser.add_argument("spec")
    parser.add_argument("--out", required=True)
    parser.add_argument("--examples", type=int, default=VARIANT_EXAMPLES)
    parser.add_argument("--only", action="append")
    args = parser.parse_args(argv)
    with open(args.out, "w") as f:
        def write(event):
            f.write(json.dumps(event, default=str) + "\n")
            f.flush()

        check_variant(args.spec, args.only, args.examples, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
