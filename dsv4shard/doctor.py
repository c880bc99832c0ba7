"""``dsv4shard doctor``: a map of the running MLX backend against ``mx.cpu``
and the NumPy reference, for every operation the properties rely on.

Each case of the map (a :class:`~dsv4shard.attribution.OpCase`: quantize,
dequantize, quantized_matmul, gather_qmm unsorted and sorted, gather_mm,
from_fp8, to_fp8; every mode, bits and group; float32, float16, bfloat16;
token counts 1 to 64; a few weight shapes) runs in a child process with a
timeout, so a hang is a finding (the child is killed and the rest of its
batch goes on in a new one), and so is a crash.  A case that departs is
run again alone in a fresh child to confirm it.  Each departure is matched
against the table of known defects (``dsv4shard.backend.DEFECTS``); those
no record explains are the rows to add.

    dsv4shard doctor [--quick] [--jobs N] [--timeout S] [--json FILE] [--markdown FILE]

Exit status 1 when a departure no record explains was found.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from dsv4shard.attribution import OpCase, format_name, replay_line
from dsv4shard.cpu_share import share_cores
from reference.quantization import QUANT_FORMATS, QuantFormat

DTYPES = ("float32", "float16", "bfloat16")
TOKENS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 32, 33, 64)
SHAPES = ((64, 64), (128, 64), (64, 128), (256, 512))  # weight [N, K]
EXPERTS, TOP_K = 4, 2

QUICK_FORMATS = (QuantFormat("affine", 64, 4), QuantFormat("affine", 64, 8),
                 QuantFormat("affine", 32, 3), QuantFormat("affine", 128, 6),
                 QuantFormat("mxfp4", 32, 4), QuantFormat("mxfp8", 32, 8),
                 QuantFormat("nvfp4", 16, 4), QuantFormat("nvfp4", 16, 4, global_scale=True))
QUICK_TOKENS = (1, 3, 64)
QUICK_SHAPES = ((64, 128),)

OK, DEPARTS, RAISES, HANG, CRASH, ERROR = "ok", "departs", "raises", "hang", "crash", "error"
NOT_RUN = "not run"  # the time budget ran out first


def _fmt_fields(fmt: QuantFormat | None) -> dict:
    if fmt is None:
        return {}
    return dict(mode=fmt.mode, bits=fmt.bits, group_size=fmt.group_size,
                global_scale=fmt.global_scale)


def gather_case(op: str, dtype: str, tokens: int, n: int, k: int, sort: bool,
                fmt: QuantFormat | None = None, x_axis_view: bool = False) -> OpCase:
    """A gather op as mlx-lm's SwitchGLU calls it: x [T, 1, 1, K] and
    indices [T, k] unsorted; sorted, x [T*k, 1, K] and indices [T*k]
    (``x_axis_view``: x's size-1 axes a view, OpCase.x_axis_view)."""
    if sort:
        x_shape, indices = (tokens * TOP_K, 1, k), (tokens * TOP_K,)
    else:
        x_shape, indices = (tokens, 1, 1, k), (tokens, TOP_K)
    w_shape = (EXPERTS, k, n) if op == "gather_mm" else (EXPERTS, n, k)
    return OpCase(op, dtype, x_shape, w_shape, indices_shape=indices, sorted_indices=sort,
                  x_axis_view=x_axis_view, **_fmt_fields(fmt))


def cases(quick: bool = False, ops: tuple[str, ...] | None = None) -> list[OpCase]:
    """The map: every operation x format x dtype x shape x token count
    (``quick``: a few formats, one shape, three token counts; the small-T
    affine quantized_matmul case of MLX's CUDA build is in both)."""
    formats = QUICK_FORMATS if quick else QUANT_FORMATS
    tokens = QUICK_TOKENS if quick else TOKENS
    shapes = QUICK_SHAPES if quick else SHAPES
    out: list[OpCase] = []
    for fmt in formats:
        for dtype in DTYPES:
            fields = _fmt_fields(fmt)
            fmt_shapes = [s for s in shapes if s[1] % fmt.group_size == 0]
            for n, k in fmt_shapes:
                out.append(OpCase("quantize", dtype, (), (n, k), **fields))
                out.append(OpCase("dequantize", dtype, (), (n, k), **fields))
                if not fmt.global_scale:  # quantized_matmul takes no global scale
                    out.extend(OpCase("quantized_matmul", dtype, (t, k), (n, k), **fields)
                               for t in tokens)
                # Sorted, x contiguous and x's size-1 axis a view too: the
                # layout MLX's CUDA sorted gather_mm reads wrong.
                for sort, view in ((False, False), (True, False), (True, True)):
                    out.extend(gather_case("gather_qmm", dtype, t, n, k, sort, fmt,
                                           x_axis_view=view)
                               for t in tokens)
    for dtype in DTYPES:
        for n, k in shapes:
            # x contiguous, and x's size-1 axes a view (expand_dims), as
            # callers give rows those axes (MLX's CUDA sorted gather_mm
            # departs in the second way only).
            for sort, view in ((False, False), (True, False), (False, True), (True, True)):
                out.extend(gather_case("gather_mm", dtype, t, n, k, sort, x_axis_view=view)
                           for t in tokens)
    for dtype in DTYPES:
        out.append(OpCase("from_fp8", dtype))
        out.append(OpCase("to_fp8", dtype))
    if quick:  # the shape of MLX's CUDA quantized_matmul defect (issue 12), exactly
        probe = OpCase("quantized_matmul", "float32", (3, 64), (64, 64),
                       **_fmt_fields(QuantFormat("affine", 64, 8)))
        if probe not in out:
            out.append(probe)
    if ops:
        out = [c for c in out if c.op in ops]
    return out


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class Result:
    case: OpCase
    status: str  # ok, departs, raises, hang, crash, error
    backend: str = ""  # whose kernel departs: the device's name, or "cpu"
    measure: dict = field(default_factory=dict)
    seconds: float = 0.0
    detail: str = ""
    known: str | None = None  # the DEFECTS record that explains it
    confirmed: bool | None = None  # rerun alone in a fresh child: same finding?

    def to_dict(self, compact: bool = False) -> dict:
        """JSON-ready; ``compact``: the case's repr and verdict only."""
        if compact:
            return {"repr": repr(self.case), "status": self.status, "backend": self.backend,
                    "known": self.known, "detail": self.detail}
        d = asdict(self)
        d["case"] = asdict(self.case)
        d["repr"] = repr(self.case)
        return d


def classify(case: OpCase, measure: dict, device: str) -> tuple[str, str, str]:
    """(status, whose kernel, detail) of a measured case."""
    if device != "cpu" and measure.get("device_departs"):
        if measure.get("device_error"):
            return RAISES, device, measure["device_error"]
        return DEPARTS, device, _error_text(measure, "device")
    if measure.get("cpu_departs"):
        if measure.get("cpu_error"):
            return RAISES, "cpu", measure["cpu_error"]
        return DEPARTS, "cpu", _error_text(measure, "cpu")
    return OK, "", measure.get("note", "")


def _error_text(m: dict, who: str) -> str:
    if who == "device" and m.get("device_cpu") is not None:
        text = f"relative error {_num(m['device_cpu'])} against mx.cpu"
        if m.get("cpu_ref") is not None:
            text += f" (mx.cpu {_num(m['cpu_ref'])} from NumPy)"
    else:
        value = m.get("device_ref") if who == "device" else m.get("cpu_ref")
        text = f"relative error {_num(value)} against the NumPy reference"
    return text + f", worst row {m.get('row', 0)} of {m.get('rows', 0)}"


def _num(v) -> str:
    if isinstance(v, str):
        return v
    return "-" if v is None else f"{v:.3g}"


# ---------------------------------------------------------------------------
# The child: run cases, one JSON line before and after each
# ---------------------------------------------------------------------------


def child(path: str, start: int) -> int:
    """Run the cases listed in ``path`` from index ``start``, printing
    ``{"i": i, "start": true}`` before and ``{"i": i, "measure": ...}``
    after each, flushed, so the parent knows which one hangs."""
    from dsv4shard import attribution

    with open(path) as f:
        listed = json.load(f)
    for i in range(start, len(listed)):
        print(json.dumps({"i": i, "start": True}), flush=True)
        begin = time.perf_counter()
        try:
            case = attribution.parse_case(listed[i])
            m = attribution.run_case(case).to_dict()
            line = {"i": i, "measure": m}
        except Exception as error:  # noqa: BLE001 - a case the harness cannot build
            line = {"i": i, "error": f"{type(error).__name__}: {error}"}
        line["seconds"] = round(time.perf_counter() - begin, 4)
        print(json.dumps(line), flush=True)
    return 0


def _python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_batch(batch: list[OpCase], timeout: float, device: str,
              command: list[str] | None = None, deadline: float | None = None) -> list[Result]:
    """Run ``batch`` in child processes: one child for the whole batch, and
    after a hang (no answer within ``timeout`` seconds of a case's start) or
    a crash, a new child for the cases after it.  Past ``deadline`` (a
    ``time.monotonic()``), the child is stopped and the cases left are
    NOT_RUN."""
    results: dict[int, Result] = {}
    with tempfile.TemporaryDirectory(prefix="dsv4shard-doctor-") as folder:
        listing = os.path.join(folder, "cases.json")
        with open(listing, "w") as f:
            json.dump([repr(c) for c in batch], f)
        start = 0
        while start < len(batch):
            if deadline is not None and time.monotonic() >= deadline:
                break
            start = _one_child(batch, listing, start, timeout, device, results, folder,
                               command, deadline)
    return [results.get(i) or Result(batch[i], NOT_RUN, detail="the time budget ran out")
            for i in range(len(batch))]


def _one_child(batch, listing, start, timeout, device, results, folder, command,
               deadline=None) -> int:
    """One child from case ``start``; returns the index to go on from."""
    argv = (command or [sys.executable, "-m", "dsv4shard.doctor"]) + [
        "--child", listing, "--start", str(start)]
    err_path = os.path.join(folder, f"stderr-{start}.txt")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=_python_env())
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    current, began = None, time.monotonic()
    try:
        while True:
            wait = timeout - (time.monotonic() - began) if current is not None else timeout * 4
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
            try:
                line = lines.get(timeout=max(wait, 0.01))
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    _kill(proc)
                    return len(batch)
                if current is None:  # the child never started a case
                    _kill(proc)
                    results[start] = Result(batch[start], ERROR,
                                            detail=f"the child did not start within "
                                                   f"{timeout * 4:.0f} s")
                    return start + 1
                _kill(proc)
                results[current] = Result(batch[current], HANG, device,
                                          seconds=round(time.monotonic() - began, 2),
                                          detail=f"no answer within {timeout:g} s "
                                                 f"(the child was killed)")
                return current + 1
            if line is None:  # the child ended
                proc.wait()
                if current is not None and current not in results:
                    results[current] = Result(batch[current], CRASH, device,
                                              seconds=round(time.monotonic() - began, 2),
                                              detail=f"the child died (exit status "
                                                     f"{proc.returncode}): "
                                                     f"{_tail(folder, start)}")
                    return current + 1
                done = [i for i in range(start, len(batch)) if i not in results]
                if done:  # ended early without a case running: the harness failed
                    results[done[0]] = Result(batch[done[0]], ERROR,
                                              detail=f"the child ended (exit status "
                                                     f"{proc.returncode}): "
                                                     f"{_tail(folder, start)}")
                    return done[0] + 1
                return len(batch)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            i = message["i"]
            if message.get("start"):
                current, began = i, time.monotonic()
                continue
            case = batch[i]
            if "error" in message:
                results[i] = Result(case, ERROR, detail=message["error"],
                                    seconds=message.get("seconds", 0.0))
            else:
                status, who, detail = classify(case, message["measure"], device)
                results[i] = Result(case, status, who, message["measure"],
                                    message.get("seconds", 0.0), detail)
            current = None
    finally:
        if proc.poll() is None:
            _kill(proc)
        proc.stdout.close()
        reader.join(timeout=5)


def _kill(proc) -> None:
    proc.kill()
    proc.wait()


def _tail(folder: str, start: int) -> str:
    try:
        with open(os.path.join(folder, f"stderr-{start}.txt")) as f:
            text = f.read().strip().splitlines()
        return " / ".join(text[-3:]) if text else "no stderr"
    except OSError:
        return "no stderr"


def batches(listed: list[OpCase], size: int) -> list[list[OpCase]]:
    """Cases grouped so that one child runs one operation, format and dtype
    (its token counts and shapes), at most ``size`` (0: no limit) at a time."""
    groups: dict = defaultdict(list)
    for c in listed:
        groups[(c.op, c.sorted_indices, c.mode, c.bits, c.group_size, c.global_scale,
                c.dtype)].append(c)
    out = []
    for group in groups.values():
        step = size or len(group)
        out.extend(group[i:i + step] for i in range(0, len(group), step))
    return out


def run_map(listed: list[OpCase], *, jobs: int, timeout: float, device: str,
            batch_size: int = 0, confirm: int = 64, progress=None,
            budget: float | None = None) -> list[Result]:
    """Every case, in ``jobs`` parallel children; then every case that is not
    ok and that no record explains (up to ``confirm`` of them) alone in a
    fresh child."""
    groups = batches(listed, batch_size)
    share_cores(jobs)
    deadline = None if budget is None else time.monotonic() + budget
    by_case: dict[OpCase, Result] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for done in pool.map(lambda b: run_batch(b, timeout, device, deadline=deadline),
                             groups):
            for r in done:
                by_case[r.case] = r
            if progress:
                progress(len(by_case), len(listed))
    _match_known(by_case.values())
    # Departures a record explains need no confirming; new ones are rerun alone.
    suspects = [r for r in by_case.values()
                if r.status not in (OK, NOT_RUN) and not r.known][:confirm]
    if suspects and (len(suspects) < len(by_case) or len(listed) == 1):
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            again = list(pool.map(lambda r: run_batch([r.case], timeout, device)[0],
                                  suspects))
        for old, new in zip(suspects, again):
            if new.status == old.status and new.backend == old.backend:
                old.confirmed = True
            else:
                new.confirmed = False
                new.detail = (f"{new.detail} (in its batch: {old.status} {old.backend} "
                              f"{old.detail}; alone in a fresh process: {new.status})").strip()
                by_case[old.case] = new
    results = [by_case[c] for c in listed]
    _match_known(results)
    return results


def _match_known(results) -> None:
    from dsv4shard import backend

    for r in results:
        if r.status in (DEPARTS, RAISES, HANG, CRASH) and r.backend:
            row = backend.known(r.case, r.backend)
            r.known = row.key if row else None


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def identity() -> dict:
    import mlx.core as mx

    from dsv4shard import backend

    try:
        import mlx_lm

        mlx_lm_version = getattr(mlx_lm, "__version__", "?")
    except ImportError:
        mlx_lm_version = None
    info = {"mlx": mx.__version__, "mlx_lm": mlx_lm_version, "backend": backend.name(),
            "device": str(mx.default_device()), "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(),
            "cpus": os.cpu_count()}
    if info["backend"] == "cuda":
        try:
            info["gpu"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def findings(results: list[Result]) -> list[Result]:
    return [r for r in results if r.status not in (OK,)]


def suggested_rows(results: list[Result]) -> list[dict]:
    """Departures no record explains, grouped (backend, op, format, dtype,
    status) with the token counts and shapes they cover: one row to add each."""
    groups: dict = defaultdict(list)
    for r in results:
        if r.status in (DEPARTS, RAISES, HANG, CRASH) and not r.known:
            c = r.case
            groups[(r.backend, c.op, c.sorted_indices, format_name(c.fmt), c.dtype,
                    r.status)].append(r)
    rows = []
    for (who, op, sort, fmt, dtype, status), members in groups.items():
        tokens = sorted({m.case.tokens for m in members})
        shapes = sorted({tuple(m.case.w_shape) for m in members})
        worst = members[0]
        rows.append({"backend": who, "op": op + (" sorted" if sort else ""), "format": fmt,
                     "dtype": dtype, "status": status, "tokens": tokens,
                     "weights": [list(s) for s in shapes], "cases": len(members),
                     "example": worst.detail, "reproduce": replay_line(worst.case)})
    return rows


def report_json(results: list[Result], info: dict, seconds: float, settings: dict,
                every_case: bool = False) -> dict:
    """The report: identity, settings, counts, rows to add, known records
    seen, exactness, the map (per operation, format and dtype: cases, ok,
    worst errors) and every case that is not ok (every case at all with
    ``every_case``)."""
    from dsv4shard import backend

    counts = Counter(r.status for r in results)
    seen = Counter(r.known for r in results if r.known)
    example = {}
    for r in results:
        if r.known and r.known not in example:
            example[r.known] = repr(r.case)
    return {
        "identity": info, "settings": settings, "seconds": round(seconds, 1),
        "cases": len(results), "summary": dict(counts),
        "new_rows": suggested_rows(results),
        "known": {k: {"cases": seen[k], "example": example[k]} for k in sorted(seen)},
        "unseen_rows": [d.key for d in backend.DEFECTS if d.key not in seen
                        and d.backend in (info["backend"], "cpu")],
        "exactness": exactness(results),
        "map": cell_map(results, info["backend"]),
        # Cases no record explains in full; those a record explains, briefly.
        "results": [r.to_dict(compact=bool(r.known) and not every_case) for r in results
                    if every_case or r.status != OK],
    }


def cell_key(c: OpCase) -> tuple[str, str, str]:
    return (c.op + (" sorted" if c.sorted_indices else ""), format_name(c.fmt) or "-", c.dtype)


def cell_map(results: list[Result], device: str) -> list[dict]:
    """Per operation, format and dtype: cases, ok, and the worst error of the
    running backend (device against mx.cpu on a GPU; mx.cpu against NumPy
    on the CPU build), with the case it was seen on."""
    key_error = "cpu_ref" if device == "cpu" else "device_cpu"
    cells: dict = {}
    for r in results:
        cell = cells.setdefault(cell_key(r.case), {"cases": 0, "ok": 0, "worst": None,
                                                   "worst_case": None})
        cell["cases"] += 1
        cell["ok"] += r.status == OK
        value = r.measure.get(key_error)
        if isinstance(value, str):
            value = float(value)
        if value is not None and (cell["worst"] is None or not value <= cell["worst"]):
            cell["worst"], cell["worst_case"] = value, repr(r.case)
    return [{"op": op, "format": fmt, "dtype": dtype, **{k: (str(v) if isinstance(v, float)
                                                             and v != v else v)
                                                          for k, v in cell.items()}}
            for (op, fmt, dtype), cell in cells.items()]


def exactness(results: list[Result]) -> list[dict]:
    """How the reference's dequantizer matches this backend's, per format and dtype."""
    rows: dict = {}
    for r in results:
        if r.case.op == "dequantize" and r.status == OK:
            key = (format_name(r.case.fmt), r.case.dtype)
            rows.setdefault(key, Counter())[r.measure.get("note", "")] += 1
    return [{"format": f, "dtype": d, "matches": dict(c)} for (f, d), c in sorted(rows.items())]


def markdown(report: dict) -> str:
    info = report["identity"]
    lines = [f"# dsv4shard doctor: MLX {info['mlx']} on {info['backend']}"
             + (f" ({info['gpu']})" if info.get("gpu") else ""), "",
             f"- MLX {info['mlx']}, mlx-lm {info['mlx_lm']}, device `{info['device']}`, "
             f"Python {info['python']}, {info['platform']}, {info['cpus']} CPUs",
             f"- {report['cases']} cases in {report['seconds']} s "
             f"({report['settings']['jobs']} jobs, {report['settings']['timeout']:g} s per "
             f"case{', quick map' if report['settings'].get('quick') else ''}); every case "
             "against mx.cpu (same arrays, same process) and the NumPy reference",
             "", "## Summary", "", "| status | cases |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(report["summary"].items())]
    lines += ["", "## New findings: rows to add to `dsv4shard/backend.py` (DEFECTS)", ""]
    if report["new_rows"]:
        lines += ["| backend | op | format | dtype | status | token counts | weights | cases | "
                  "example | reproduce |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in report["new_rows"]:
            lines.append(f"| {r['backend']} | {r['op']} | {r['format'] or '-'} | {r['dtype']} | "
                         f"{r['status']} | {_ranges(r['tokens'])} | "
                         f"{', '.join('x'.join(map(str, s)) for s in r['weights'])} | "
                         f"{r['cases']} | {_cell(r['example'])} | `{r['reproduce']}` |")
    else:
        lines.append("None: every departure is a known record.")
    lines += ["", "## Known defects seen", ""]
    if report["known"]:
        lines += ["| record | cases | example |", "|---|---|---|"]
        lines += [f"| {k} | {v['cases']} | `{v['example']}` |"
                  for k, v in report["known"].items()]
    else:
        lines.append("None.")
    if report["unseen_rows"]:
        lines += ["", "Records of this backend (and of mx.cpu) that no case of this map showed "
                      "(their probes in tests/test_backend_defects.py still decide): "
                  + ", ".join(f"`{k}`" for k in report["unseen_rows"])]
    lines += ["", "## Exactness of dequantize against the reference", "",
              "| format | dtype | how it matches (cases) |", "|---|---|---|"]
    for r in report["exactness"]:
        lines.append(f"| {r['format']} | {r['dtype']} | "
                     + "; ".join(f"{k or '?'} ({v})" for k, v in r["matches"].items()) + " |")
    what = ("mx.cpu against the NumPy reference" if info["backend"] == "cpu"
            else f"{info['backend']} against mx.cpu on the same arrays")
    lines += ["", "## The map", "",
              f"Per operation, format and dtype: cases ok / all, and the worst relative error "
              f"of {what} (each row's error over its scale, |x| @ |W| for a matmul):", ""]
    lines += _map_table(report["map"])
    new = [r for r in report["results"] if r["status"] != OK and not r["known"]]
    if new:
        lines += ["", "## Every case no record explains", "",
                  "| case | status | backend | confirmed alone | detail |", "|---|---|---|---|---|"]
        for r in new[:300]:
            lines.append(f"| `{r['repr']}` | {r['status']} | {r['backend']} | "
                         f"{r['confirmed']} | {_cell(r['detail'])} |")
        if len(new) > 300:
            lines.append(f"\n({len(new) - 300} more in the JSON)")
    return "\n".join(lines) + "\n"


def _map_table(cells: list[dict]) -> list[str]:
    rows: dict = defaultdict(dict)
    for c in cells:
        worst = c["worst"]
        text = f"{c['ok']}/{c['cases']}" + ("" if c["ok"] == c["cases"] else " **!**")
        if worst is not None:
            text += f" ({_num(worst)})"
        rows[(c["op"], c["format"])][c["dtype"]] = text
    lines = ["| op | format | " + " | ".join(DTYPES) + " |", "|---|---|" + "---|" * len(DTYPES)]
    for (op, fmt), by_dtype in rows.items():
        lines.append(f"| {op} | {fmt} | " + " | ".join(by_dtype.get(d, "") for d in DTYPES)
                     + " |")
    return lines


def _ranges(values: list[int]) -> str:
    return ", ".join(map(str, values))


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:200]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a small map: 8 formats, one weight shape, 1/3/64 tokens "
                             "(seconds on a CPU); without it the full map")
    parser.add_argument("--jobs", type=int, default=0,
                        help="child processes at once (default: one per CPU core)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a case may take before it counts as a hang "
                             "(default %(default)s)")
    parser.add_argument("--only", action="append", metavar="OP",
                        help="only this operation (repeatable): quantize, dequantize, "
                             "quantized_matmul, gather_qmm, gather_mm, from_fp8, to_fp8")
    parser.add_argument("--batch", type=int, default=0, metavar="N",
                        help="at most N cases per child process (default: one operation, "
                             "format and dtype per child; 1 isolates every case)")
    parser.add_argument("--confirm", type=int, default=64, metavar="N",
                        help="rerun up to N departing cases alone to confirm them "
                             "(default %(default)s)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="stop starting cases after this many seconds (the rest are "
                             "'not run'); default: no limit")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--every-case", action="store_true",
                        help="list every case in the JSON, not only those that are not ok")
    parser.add_argument("--markdown", metavar="FILE", help="write the report as Markdown "
                                                           "(default: print it)")


def main(args) -> int:
    from dsv4shard import backend

    listed = cases(args.quick, tuple(args.only) if args.only else None)
    if not listed:
        print("dsv4shard doctor: no case to run", file=sys.stderr)
        return 2
    for path in (args.json, args.markdown):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            print(f"dsv4shard doctor: {path}: its folder does not exist", file=sys.stderr)
            return 2
    jobs = args.jobs or os.cpu_count() or 1
    device = backend.name()
    start = time.perf_counter()

    def progress(done, total):
        print(f"\r{done}/{total} cases", end="", file=sys.stderr, flush=True)

    results = run_map(listed, jobs=jobs, timeout=args.timeout, device=device,
                      batch_size=args.batch, confirm=args.confirm,
                      progress=progress if sys.stderr.isatty() else None, budget=args.budget)
    settings = {"quick": args.quick, "jobs": jobs, "timeout": args.timeout,
                "batch": args.batch, "only": args.only, "budget": args.budget}
    report = report_json(results, identity(), time.perf_counter() - start, settings,
                         getattr(args, "every_case", False))
    text = markdown(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    else:
        print(text)
    return 1 if report["new_rows"] else 0


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4shard.doctor",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--child", metavar="CASES", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.start)
    return main(args)


if __name__ == "__main__":
    sys.exit(_main())
