"""The kill matrix: every catalogued mutant against EVERY property of its kind.

A property's kind is its record's keyword and case type in the property
table (``dsv4shard.engine.records``); a mutant's kind is that of the
property it is listed with.  Each cell runs ``assert_caught`` with the
``ci`` profile's semantics (derandomized, ``CI_EXAMPLES`` examples):
caught (examples until the first failure), missed, or skipped where the
backend cannot run the case.

A cell uses the mutant's own strategy (the region of its bug class) whenever
the property takes the same cases; a property that needs real ranks, run
against a mutant listed with virtual ones, draws the suite's 2-rank cases.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from multiprocessing import get_context

from dsv4shard.cpu_share import share_cores
from dsv4shard.engine import records
from dsv4shard.engine.outcome import first_line
from dsv4shard.testing.catch import CI_EXAMPLES, MutantSurvived, assert_caught, record_for

CAUGHT, MISSED, SKIPPED, ERROR = "caught", "missed", "skipped", "error"


@dataclass
class Cell:
    mutant: str
    prop: str
    listed: bool  # the property the catalogue (and tests/test_known_bad.py) pairs it with
    result: str  # caught, missed, skipped or error
    examples: int  # until the first failure (caught), or all run (missed)
    seconds: float
    detail: str  # the failure's first line, the skip reason, or the error


# --- properties and their kinds ---------------------------------------------------


def properties() -> list:
    """Every property function of the project (the table's non-variant records)."""
    return [r.fn for r in records.project_properties()]


def case_type(prop) -> str:
    return record_for(prop).case


def needs_real_ranks(prop) -> bool:
    return record_for(prop).ranks > 0


def kin(mutant, props=None) -> list:
    """The properties of ``mutant``'s kind, its own first."""
    return [r.fn for r in records.kind_of(record_for(mutant.prop))
            if props is None or r.fn in props]


def strategy_for(mutant, prop):
    if needs_real_ranks(prop) and not needs_real_ranks(mutant.prop):
        from dsv4shard.testing import strategies as s

        return s.shard_cases(ranks=2)
    return mutant.strategy()


# --- running cells ----------------------------------------------------------------

_CATALOGUE: dict = {}


def _lookup(name: str):
    if not _CATALOGUE:
        from dsv4shard.testing.mutants import catalogue

        _CATALOGUE.update({m.name: m for m in catalogue()})
    return _CATALOGUE[name]


def run_cell(mutant, prop, examples: int = CI_EXAMPLES) -> Cell:
    """One mutant against one property of its kind."""
    import pytest

    name, listed = qualified(prop), prop is mutant.prop
    start = time.perf_counter()
    try:
        kill = assert_caught(prop, strategy_for(mutant, prop), max_examples=examples,
                             **mutant.impl)
        return Cell(mutant.name, name, listed, CAUGHT, kill.examples,
                    round(kill.seconds, 3), kill.error)
    except MutantSurvived as survived:
        result, count, detail = MISSED, survived.examples, str(survived)
    except pytest.skip.Exception as skip:
        result, count, detail = SKIPPED, 0, first_line(skip)
    except Exception as error:  # noqa: BLE001 - a cell that cannot run is reported
        result, count, detail = ERROR, 0, f"{type(error).__name__}: {first_line(error)}"
    return Cell(mutant.name, name, listed, result, count,
                round(time.perf_counter() - start, 3), detail)


def _run_named(mutant_name: str, prop_name: str, examples: int) -> Cell:
    """``run_cell`` in a worker process, by names (catalogue entries only)."""
    from dsv4shard import kernel_cache

    mutant = _lookup(mutant_name)
    prop = next(p for p in kin(mutant, properties()) if qualified(p) == prop_name)
    try:
        return run_cell(mutant, prop, examples)
    finally:
        kernel_cache.sync()  # the kernels this cell compiled, for the other workers


def qualified(prop) -> str:
    return record_for(prop).qualified


def _worker_init():
    """Rank pools a worker starts are closed when it exits (multiprocessing
    children skip atexit)."""
    from multiprocessing.util import Finalize

    from dsv4shard.ranks import shared

    Finalize(None, shared.close_all, exitpriority=10)


def run_matrix(mutants, examples: int = CI_EXAMPLES, jobs: int = 1, progress=None,
               worker=None, have=(), listed_only: bool = False) -> list[Cell]:
    """Every cell of ``mutants`` x their kinds' properties, over ``jobs``
    processes (catalogue entries only: workers find them by name; one job
    runs any ``Mutant``); ``progress(cell)`` is called as each completes.
    A worker process that dies (a crash inside a kernel, the memory killer)
    costs its own cell only, an error saying so; the others still run.
    ``have``: cells already run (a resumed run's), kept and not run again.
    ``listed_only``: each mutant's listed cell alone.
    ``worker``: what a worker process runs for a cell (tests)."""
    props = properties()
    tasks = [(m, p) for m in mutants for p in (kin(m, props)[:1] if listed_only
                                                else kin(m, props))]
    kept = {(c.mutant, c.prop): c for c in have}
    done: dict[int, Cell] = {i: kept[(m.name, qualified(p))] for i, (m, p) in enumerate(tasks)
                             if (m.name, qualified(p)) in kept}
    todo = [i for i in range(len(tasks)) if i not in done]
    if jobs <= 1 and worker is None:
        for i in todo:
            done[i] = run_cell(*tasks[i], examples)
            if progress:
                progress(done[i])
        return [done[i] for i in range(len(tasks))]
    share_cores(jobs)
    worker = worker or _run_named
    left = _pooled(tasks, todo, examples, jobs, worker, done, progress)
    # A pool whose worker died fails every cell still in it.  Those run again
    # in batches of ``jobs``, a pool each; the cells of a batch whose pool
    # breaks again run one to a pool, so that only a cell that kills its
    # worker is charged with it, and one crash costs one batch run singly,
    # not the rest of the matrix.
    for start in range(0, len(left), jobs):
        batch = left[start:start + jobs]
        for i in _pooled(tasks, batch, examples, jobs, worker, done, progress):
            _pooled(tasks, [i], examples, 1, worker, done, progress, last=True)
    return [done[i] for i in range(len(tasks))]


def _pooled(tasks, which, examples, jobs, worker, done, progress, last=False) -> list[int]:
    """Run cells ``which`` in one pool into ``done``; return those its broken
    pool left (with ``last``, they are recorded as errors instead)."""
    broken = []
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = {i: pool.submit(worker, tasks[i][0].name, qualified(tasks[i][1]), examples)
                   for i in which}
        for i, future in futures.items():
            try:
                done[i] = future.result()
            except BrokenProcessPool as error:
                if not last:
                    broken.append(i)
                    continue
                mutant, prop = tasks[i]
                done[i] = Cell(mutant.name, qualified(prop), prop is mutant.prop, ERROR, 0, 0.0,
                               f"its worker process died ({first_line(error)})")
            if progress:
                progress(done[i])
    return broken


# --- the report -------------------------------------------------------------------


def verdicts(mutants, cells) -> dict[str, dict]:
    """Per mutant: killed (some property caught it), skipped (its own property
    cannot run here and no other caught it) or survived; and how."""
    out = {}
    for m in mutants:
        mine = [c for c in cells if c.mutant == m.name]
        caught = [c for c in mine if c.result == CAUGHT]
        own = next((c for c in mine if c.listed), None)
        if caught:
            status = "killed"
        elif own is None or len(mine) < len(kin(m)):  # a run cut short: no verdict yet
            status = "incomplete"
        elif own.result == SKIPPED:
            status = "skipped"
        else:
            status = "survived"
        out[m.name] = {
            "status": status, "family": m.family, "bug": m.bug,
            "property": qualified(m.prop), "own_result": own.result if own else "not run",
            "own_examples": own.examples if own else 0,
            "caught_by": [c.prop for c in caught],
            "skip_reason": own.detail if own and own.result == SKIPPED else "",
        }
    return out


def summary(mutants, cells, wall: float, examples: int = CI_EXAMPLES) -> dict:
    v = verdicts(mutants, cells)
    killed = [n for n, x in v.items() if x["status"] == "killed"]
    own_kills = [x["own_examples"] for x in v.values() if x["own_result"] == CAUGHT]
    return {
        "mutants": len(mutants),
        "killed": len(killed),
        "skipped": sorted(n for n, x in v.items() if x["status"] == "skipped"),
        "survived": sorted(n for n, x in v.items() if x["status"] == "survived"),
        "incomplete": sorted(n for n, x in v.items() if x["status"] == "incomplete"),
        "median_examples_to_kill": statistics.median(own_kills) if own_kills else None,
        "max_examples_to_kill": max(own_kills) if own_kills else None,
        "cells": len(cells),
        "cells_caught": sum(c.result == CAUGHT for c in cells),
        "cells_missed": sum(c.result == MISSED for c in cells),
        "cells_skipped": sum(c.result == SKIPPED for c in cells),
        "cells_error": sum(c.result == ERROR for c in cells),
        "cell_seconds": round(sum(c.seconds for c in cells), 2),
        "wall_seconds": round(wall, 2),
        "examples_per_cell": examples,
    }


def _cell_text(cell: Cell | None) -> str:
    if cell is None:
        return ""
    star = "*" if cell.listed else ""
    if cell.result == CAUGHT:
        return f"{star}caught @{cell.examples}, {cell.seconds:.2f}s"
    if cell.result == MISSED:
        return f"{star}missed ({cell.examples}), {cell.seconds:.2f}s"
    return f"{star}{cell.result}"


def markdown(mutants, cells, wall: float, examples: int = CI_EXAMPLES) -> str:
    """Per kind, a table of its mutants x its properties; then the verdicts
    and the summary.  ``*`` marks the property a mutant is listed with."""
    by_mutant = {}
    for c in cells:
        by_mutant.setdefault(c.mutant, {})[c.prop] = c
    kinds: dict[tuple, list] = {}
    for m in mutants:
        kinds.setdefault(record_for(m.prop).kind, []).append(m)
    lines = ["## Kill matrix", "",
             "Cell: caught @N = the first failure came at example N; missed (N) = N examples "
             "passed; `*` = the property the catalogue lists the mutant with "
             "(tests/test_known_bad.py runs that cell).", ""]
    for (key, ctype), members in kinds.items():
        columns = []
        for m in members:
            for prop in by_mutant.get(m.name, {}):
                if prop not in columns:
                    columns.append(prop)
        lines += [f"### `{key}` ({ctype})", "",
                  "| mutant | " + " | ".join(f"`{p}`" for p in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for m in members:
            row = by_mutant.get(m.name, {})
            lines.append(f"| {m.name} | " + " | ".join(_cell_text(row.get(p)) for p in columns)
                         + " |")
        lines.append("")
    v = verdicts(mutants, cells)
    lines += ["## Mutants", "", "| mutant | family | bug class | listed property | examples "
              "to kill | verdict |", "|---|---|---|---|---|---|"]
    for m in mutants:
        x = v[m.name]
        shown = x["own_examples"] if x["own_result"] == CAUGHT else x["own_result"]
        verdict = x["status"] + (f" ({x['skip_reason']})" if x["skip_reason"] else "")
        if x["status"] == "killed" and x["own_result"] != CAUGHT:
            verdict += f" by {', '.join(x['caught_by'])}"
        lines.append(f"| {m.name} | {m.family} | {m.bug.replace('|', '/')} | {x['property']} | "
                     f"{shown} | {verdict.replace('|', '/')} |")
    s = summary(mutants, cells, wall, examples)
    lines += ["", "## Summary", "",
              f"- killed: {s['killed']} / {s['mutants']} mutants"
              + (f"; skipped on this backend: {', '.join(s['skipped'])}" if s["skipped"] else "")
              + (f"; SURVIVED: {', '.join(s['survived'])}" if s["survived"] else "")
              + (f"; not all cells run: {', '.join(s['incomplete'])}" if s["incomplete"]
                 else ""),
              f"- examples to kill by the listed property: median {s['median_examples_to_kill']}"
              f", max {s['max_examples_to_kill']} (budget {examples} a cell, derandomized)",
              f"- cells: {s['cells']} ({s['cells_caught']} caught, {s['cells_missed']} missed, "
              f"{s['cells_skipped']} skipped, {s['cells_error']} errors)",
              f"- seconds: {s['cell_seconds']} in cells, {s['wall_seconds']} wall"]
    return "\n".join(lines)


def to_json(mutants, cells, wall: float, examples: int) -> dict:
    s = summary(mutants, cells, wall, examples)
    return {"summary": s, "mutants": verdicts(mutants, cells),
            "cells": [asdict(c) for c in cells]}


def main(args) -> int:
    """``dsv4shard mutants``: print the matrix; exit 1 if a mutant survives
    every property of its kind (skipped ones do not count)."""
    from dsv4shard.testing.mutants import catalogue

    mutants = catalogue()
    if getattr(args, "merge", None):
        return merge_main(mutants, args.merge)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in mutants})
        if unknown:
            print(f"dsv4shard mutants: unknown mutant(s) {unknown}")
            return 2
        mutants = [m for m in mutants if m.name in args.only]
    if getattr(args, "part", None):
        k, n = args.part
        mutants = mutants[k - 1::n]  # whole mutants: each part's verdicts stand alone
    jobs = args.jobs or os.cpu_count() or 1
    have, wall_before = [], 0.0
    if getattr(args, "resume", False):
        try:
            have, wall_before = resumed(args.json, mutants, args.examples)
        except ValueError as error:
            print(f"dsv4shard mutants: --resume: {error}", file=sys.stderr)
            return 2
    start = time.perf_counter()
    listed_first = getattr(args, "listed_first", False)
    plan = {"total": len(mutants) if listed_first else sum(len(kin(m)) for m in mutants)}
    done = list(have)

    def progress(cell):  # one line a cell on stderr (the run is long), and the JSON so far
        new = len(done) - len(have) + 1
        done.append(cell)
        per_cell = sum(c.seconds for c in done[len(have):]) / new
        left = max(0, plan["total"] - len(done)) * per_cell / max(1, jobs)
        print(f"  [{len(done)}/{plan['total']}] {cell.mutant} x {cell.prop}: {cell.result} "
              f"({cell.seconds:.1f} s), about {left:.0f} s left", file=sys.stderr, flush=True)
        if args.json:  # a run cut short keeps what it ran (--resume goes on from it)
            write_json(args.json, mutants, done, wall_before + time.perf_counter() - start,
                       args.examples)

    if listed_first:
        # Each mutant's listed cell first: the kill verdicts in a sixth of
        # the cells.  Only a mutant that cell did not catch runs the rest of
        # its kind, to see whether another property kills it.
        firsts = run_matrix(mutants, args.examples, jobs, progress, have=have,
                            listed_only=True)
        caught = {c.mutant for c in firsts if c.result == CAUGHT}
        rest = [m for m in mutants if m.name not in caught]
        plan["total"] = len(mutants) + sum(len(kin(m)) - 1 for m in rest)
        cells = firsts + [c for c in run_matrix(rest, args.examples, jobs, progress,
                                                have=list(have) + firsts)
                          if not c.listed]
    else:
        cells = run_matrix(mutants, args.examples, jobs, progress, have=have)
    wall = wall_before + time.perf_counter() - start
    print(markdown(mutants, cells, wall, args.examples))
    if args.json:
        write_json(args.json, mutants, cells, wall, args.examples)
    return 1 if summary(mutants, cells, wall)["survived"] else 0


def write_json(path: str, mutants, cells, wall: float, examples: int) -> None:
    """The matrix so far, replacing ``path`` whole (never half written)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(to_json(mutants, cells, wall, examples), f, indent=2)
    os.replace(tmp, path)


def read_json(path: str) -> tuple[list[Cell], float, int]:
    """The cells, wall seconds and examples a cell of a file ``--json``
    wrote; ValueError naming the file where it is not one."""
    try:
        with open(path) as f:
            part = json.load(f)
        return ([Cell(**c) for c in part["cells"]], float(part["summary"]["wall_seconds"]),
                part["summary"]["examples_per_cell"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a matrix written by --json "
                         f"({type(error).__name__}: {first_line(error)})") from None


def resumed(path: str | None, mutants, examples: int) -> tuple[list[Cell], float]:
    """The cells (and wall seconds) an earlier run of the same selection
    left in ``path``; none where it does not exist yet.  ValueError where
    it is not such a file."""
    if not path:
        raise ValueError("needs --json FILE: the file an earlier run wrote, and this one goes on")
    if not os.path.exists(path):
        return [], 0.0
    cells, wall, ran_with = read_json(path)
    if ran_with != examples:
        raise ValueError(f"{path} ran {ran_with} examples a cell, this run {examples}")
    names = {m.name for m in mutants}
    other = sorted({c.mutant for c in cells} - names)
    if other:
        raise ValueError(f"{path} holds mutants this selection does not run: {other[:3]}")
    # An error (a worker that died) is run again; every other result stands.
    return [c for c in cells if c.result != ERROR], wall


def parse_part(text: str) -> tuple[int, int]:
    """``K/N`` (part K of N, 1 <= K <= N) as (K, N); ValueError saying why."""
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r} is not K/N (part K of N, e.g. 2/3)") from None
    if not 1 <= k <= n:
        raise ValueError(f"{text!r}: K must lie in 1..N")
    return k, n


def merge_main(mutants, paths: list[str]) -> int:
    """Print the matrix of parts run apart (``--part K/N --json F``): cells and
    wall seconds summed; exit as one run would."""
    by_name = {m.name: m for m in mutants}
    cells, wall, examples = {}, 0.0, None
    for path in paths:
        try:
            part_cells, part_wall, part_examples = read_json(path)
        except ValueError as error:
            print(f"dsv4shard mutants: --merge {error}", file=sys.stderr)
            return 2
        # A cell in two files (a part run again): the later file's stands.
        cells.update({(c.mutant, c.prop): c for c in part_cells})
        wall += part_wall
        examples = examples or part_examples
    cells = list(cells.values())
    unknown = sorted({c.mutant for c in cells} - set(by_name))
    if unknown:
        print(f"dsv4shard mutants: --merge: mutant(s) not in this catalogue {unknown}",
              file=sys.stderr)
        return 2
    ran = [m for m in mutants if any(c.mutant == m.name for c in cells)]
    print(markdown(ran, cells, wall, examples or CI_EXAMPLES))
    return 1 if summary(ran, cells, wall)["survived"] else 0
