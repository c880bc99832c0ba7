"""Where a slow backend's time goes: every example's seconds, and those of
every MLX operation in it, written to a file as each example ends.

    DSV4SHARD_EXAMPLE_LOG=PATH pytest ...         # each hypothesis example, each engine run's
    python -m dsv4shard.testing.example_log PATH   # the slowest examples and operations

With the log on, each call of an operation the attribution knows
(``attribution.OPS``: ``quantized_matmul``, ``gather_qmm``, ``gather_mm``,
``dequantize``, ``quantize``, the fp8 codecs, ``matmul``) is evaluated
where it is made and timed three ways: its inputs' evaluation, its own first
evaluation, and a repeat of the same call.  The repeat finds the kernel
compiled and loaded, so a first evaluation far above its repeat is a
compile (MLX's, or the CUDA driver's on load), and both high is the kernel
itself.  Evaluating each call where it is made is not how the suite runs
(MLX fuses what stays lazy), so this is a mode for measuring, never on by
default.  ``all_sum`` is not timed: a repeat would be one more collective
than the other ranks make.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

ENV = "DSV4SHARD_EXAMPLE_LOG"
TIMED_OPS = ("quantized_matmul", "gather_qmm", "gather_mm", "dequantize", "quantize",
             "from_fp8", "to_fp8", "matmul")
MAX_OPS = 400  # timed calls kept a line; the rest are counted
CASE_CHARS = 600

_STACK: list[dict] = []  # the examples now running, innermost last
_RESTORE: list[tuple] = []
_BUSY = [False]  # inside a timing: calls made there are not timed again


def path() -> str | None:
    return os.environ.get(ENV) or None


def active() -> bool:
    """Whether an example is being timed now (a call made here is its own)."""
    return bool(_STACK)


@contextmanager
def example(test: str, case):
    """Time one example of ``test`` (the drawn ``case``) and the operations
    it calls; write its line when it ends, whatever the outcome."""
    if not path():
        yield
        return
    entry = {"test": test, "case": _clipped(repr(case)), "ops": [], "untimed_ops": 0,
             "worker": os.environ.get("PYTEST_XDIST_WORKER", ""), "pid": os.getpid()}
    if not _STACK:
        _install()
    _STACK.append(entry)
    start = time.perf_counter()
    outcome = "ok"
    try:
        yield
    except BaseException as error:
        outcome = type(error).__name__
        raise
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 4)
        entry["outcome"] = outcome
        _STACK.pop()
        if not _STACK:
            _uninstall()
        _write(entry)


def timed_test(test: str, inner):
    """A hypothesis test's inner function with each call an :func:`example`."""
    def run(*args, **kwargs):
        drawn = next(iter(kwargs.values())) if len(kwargs) == 1 else (kwargs or args)
        with example(test, drawn):
            return inner(*args, **kwargs)

    run.__wrapped__ = inner
    return run


def _clipped(text: str) -> str:
    return text if len(text) <= CASE_CHARS else text[:CASE_CHARS] + "..."


def _write(entry: dict) -> None:
    line = (json.dumps(entry) + "\n").encode()
    fd = os.open(path(), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


# --- the operations' timing -----------------------------------------------------------------


def _install() -> None:
    from dsv4shard.attribution import OPS

    for name in TIMED_OPS:
        spec = OPS[name]
        fn = getattr(spec.owner, spec.attr)
        _RESTORE.append((spec.owner, spec.attr, fn))
        setattr(spec.owner, spec.attr, _timed(name, fn))


def _uninstall() -> None:
    while _RESTORE:
        owner, attr, fn = _RESTORE.pop()
        setattr(owner, attr, fn)


def _timed(op: str, fn):
    import mlx.core as mx

    # A recorder's wrapper (attribution.Recorder) keeps the first call; the
    # repeat goes to the function it wraps, so nothing is recorded twice.
    plain = getattr(fn, "__wrapped__", fn)

    def call(*args, **kwargs):
        if _BUSY[0] or not _STACK:
            return fn(*args, **kwargs)
        entry = _STACK[-1]
        arrays = [a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)]
        _BUSY[0] = True
        try:
            t0 = time.perf_counter()
            try:
                mx.eval(arrays)
            except Exception:  # noqa: BLE001 - traced (mx.compile): not timed
                return fn(*args, **kwargs)
            t1 = time.perf_counter()
            out = fn(*args, **kwargs)
            try:
                mx.eval(out)
            except Exception:  # noqa: BLE001 - as above; the error, if any, is the caller's
                return out
            t2 = time.perf_counter()
            try:
                mx.eval(plain(*args, **kwargs))
                repeat = round(time.perf_counter() - t2, 5)
            except Exception:  # noqa: BLE001 - the first call's answer stands
                repeat = None
        finally:
            _BUSY[0] = False
        if len(entry["ops"]) < MAX_OPS:
            entry["ops"].append({"op": op, "call": describe(op, args, kwargs),
                                 "inputs": round(t1 - t0, 5), "first": round(t2 - t1, 5),
                                 "repeat": repeat})
        else:
            entry["untimed_ops"] += 1
        return out

    call.__wrapped__ = fn
    return call


def describe(op: str, args: tuple, kwargs: dict) -> str:
    """A call without its values: where it ran (``cpu``: on ``mx.cpu``, as
    the attribution's reruns do), shapes, dtypes, the other arguments."""
    import mlx.core as mx

    from dsv4shard.attribution import bind, is_cpu, signature

    _, parts = signature(op, bind(op, args, kwargs))
    text = []
    for part in parts:
        if len(part) == 3:
            text.append(f"{part[0]} {'x'.join(map(str, part[1])) or '()'} "
                        f"{part[2].removeprefix('mlx.core.')}")
        elif part[1] is not None:
            text.append(f"{part[0]}={part[1]}")
    where = "cpu" if is_cpu(kwargs.get("stream")) or mx.default_device() == mx.cpu else "device"
    return f"[{where}] {op}({', '.join(text)})"


# --- reading a log ----------------------------------------------------------------------------


def read(paths) -> list[dict]:
    entries = []
    for p in paths:
        with open(p) as f:
            entries.extend(json.loads(line) for line in f if line.strip())
    return entries


def summary(entries: list[dict], top: int = 15) -> str:
    """The slowest examples, the slowest operations (first evaluation
    against repeat) and how much of the examples' time they hold."""
    if not entries:
        return "no examples in the log"
    total = sum(e["seconds"] for e in entries)
    lines = [f"{len(entries)} examples, {total:.1f} s in all", "",
             "slowest examples:", "",
             "| seconds | in ops (first) | test | outcome | case |", "|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: -e["seconds"])[:top]:
        first = sum(o["first"] for o in e["ops"])
        lines.append(f"| {e['seconds']:.2f} | {first:.2f} | `{e['test']}` | {e['outcome']} | "
                     f"`{e['case'][:160]}` |")
    by_call: dict[str, list] = defaultdict(list)
    for e in entries:
        for o in e["ops"]:
            by_call[o["call"]].append(o)
    first_all = sum(o["first"] for ops in by_call.values() for o in ops)
    repeat_all = sum(o["repeat"] or 0 for ops in by_call.values() for o in ops)
    lines += ["", f"operations: {sum(map(len, by_call.values()))} timed calls, first "
              f"evaluations {first_all:.1f} s, their repeats {repeat_all:.1f} s", "",
              "| calls | first (s, summed) | repeat (s, summed) | worst first | call |",
              "|---|---|---|---|---|"]
    ranked = sorted(by_call.items(), key=lambda kv: -sum(o["first"] for o in kv[1]))
    for call, ops in ranked[:top]:
        lines.append(f"| {len(ops)} | {sum(o['first'] for o in ops):.2f} | "
                     f"{sum(o['repeat'] or 0 for o in ops):.2f} | "
                     f"{max(o['first'] for o in ops):.2f} | `{call}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4shard.testing.example_log",
                                     description="The slowest examples and operations of a "
                                     f"log written with {ENV}.")
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        entries = read(args.logs)
    except (OSError, ValueError) as error:
        print(f"example_log: cannot read {' '.join(args.logs)}: {error}", file=sys.stderr)
        return 2
    print(summary(entries, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
