"""Someone else's fused installer or sharder, judged by the suite's
properties: what ``dsv4shard check --fuse-impl X --shard-impl Y`` runs.

Every fused property (``fuse_impl`` records) runs against the installer,
every sharding property of a MoE block (``shard`` records on ShardCase)
against the sharder, through the engine's one runner; each in-process
example has a time limit.  The layout convention of dsv4shard's own sharder
(``shard_holds_its_slice``) is checked for that sharder only: another
sharder is judged by its outputs and by the bytes each rank holds.
"""

from __future__ import annotations

import dataclasses

from dsv4shard.engine.run import Verdict

OWN_SHARDER = "dsv4shard.shard:shard"
LAYOUT_ONLY = ("shard_holds_its_slice",)  # dsv4shard's own slicing convention


def records_for(keyword: str, shard_spec: str | None = None, real_ranks: bool = True):
    """The property records an implementation of ``keyword`` is judged by."""
    from dsv4shard.engine.records import project_properties

    found = []
    for record in project_properties():
        if record.keyword != keyword:
            continue
        if keyword == "shard" and record.case != "ShardCase":
            continue  # a whole-model sharder's contract, not a block sharder's
        if record.name in LAYOUT_ONLY and shard_spec != OWN_SHARDER:
            continue
        if record.ranks and not real_ranks:
            continue
        found.append(record)
    return found


def impl_verdicts(fuse_impl: str | None, shard_impl: str | None, examples: int = 25,
                  *, real_ranks: bool = True, timeout: float | None = None,
                  shrink: bool = True) -> list[Verdict]:
    """The verdict of every fused property on ``fuse_impl`` and of every
    block-sharding property on ``shard_impl`` (each a ``module:function``
    spec; either may be None), ``examples`` examples each.  ``real_ranks``:
    also the properties over 2 real ranks (the module must load in the rank
    processes; checked first).  Raises ValueError for a spec that does not
    load, or a rank count this machine's memory cannot hold.  ``shrink``:
    shrink a failing case to its simplest (slower, clearer)."""
    from dsv4shard import impl
    from dsv4shard.engine.run import run
    from dsv4shard.testing.guard import example_timeout, limited

    timeout = example_timeout() if timeout is None else timeout
    verdicts = []
    plan = []
    if fuse_impl:
        plan.append(("fuse_impl", fuse_impl, "--fuse-impl", impl.load(fuse_impl)))
    if shard_impl:
        plan.append(("shard", shard_impl, "--shard-impl", impl.load(shard_impl)))
    if real_ranks and shard_impl:
        check_ranks(2, [s for s in (fuse_impl, shard_impl) if s])
    for keyword, spec, option, fn in plan:
        for record in records_for(keyword, spec, real_ranks):
            kwargs = {"shard_impl" if keyword == "shard" else keyword: fn}
            if record.ranks:
                guarded = record  # the rank pool bounds each job itself
                if fuse_impl and "fuse_impl" in _parameters(record.fn):
                    kwargs["fuse_impl"] = impl.load(fuse_impl)
            else:
                guarded = dataclasses.replace(
                    record, fn=limited(record.fn, timeout, f"{record.name} on one example"))
            verdicts.append(run(guarded, kwargs, subject=spec, examples=examples,
                                shrink=shrink, subject_option=f"{option}={spec}"))
    return verdicts


def _parameters(fn) -> list[str]:
    import inspect

    return list(inspect.signature(fn).parameters)


def check_ranks(size: int, specs: list[str]) -> None:
    """Before any rank starts: this machine holds ``size`` ranks, and every
    spec loads in a process started as the rank processes are."""
    from dsv4shard.pytest_plugin import rank_import_problems
    from dsv4shard.rank_memory import check

    check(size)
    trouble = rank_import_problems(specs)
    if trouble:
        raise ValueError("importable here but not in a rank process (started as `python -m "
                         "dsv4shard.ranks.worker` in this folder, with it on PYTHONPATH): "
                         + "; ".join(trouble))
