"""``pytest --variant X``: the variant's verdicts as test items, one per
property of the table.

The variant is checked once, in a process of its own (its import and its
rank workers touch nothing of this session's), and each item reports its
verdict: FAIL fails the item; DEPARTS is an xfail whose reason is the
diagnosis (``-rx`` shows it) and never fails the run; WEAK passes with a
warning (``WeakCheck``: its bound missed its power target); SKIP and DECLINED
skip with the reason.  A variant that cannot be checked (an import that
fails, no MoE block) gives one failing item, ``load``.  All items carry the
``variant`` marker: ``pytest --variant X -m variant`` runs only them.
"""

from __future__ import annotations

import functools
import warnings

import pytest

from dsv4shard.engine import outcome as o
from dsv4shard.engine.records import variant_properties


class VariantCheckFailed(AssertionError):
    """A required check failed: the message is its diagnosis."""


@functools.lru_cache(maxsize=None)
def report_for(spec: str):
    from dsv4shard.variants.checking import check_isolated

    return check_isolated(spec, progress=None)


@functools.lru_cache(maxsize=None)
def load_error(spec: str) -> str | None:
    """Why ``spec`` cannot be imported, asked of a child process (an import
    here could change this session: a port may patch mlx at import)."""
    import subprocess
    import sys

    code = ("import sys\nfrom dsv4shard.variants.loading import load_module, VariantLoadError\n"
            "try:\n    load_module(sys.argv[1])\nexcept VariantLoadError as e:\n"
            "    print(' '.join(str(e).split()))\n")
    proc = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True,
                          timeout=300)
    text = proc.stdout.strip().splitlines()
    if text:
        return text[-1]
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()]
        return tail[-1] if tail else f"loading exited {proc.returncode}"
    return None


class VariantCheckItem(pytest.Item):
    def __init__(self, *, spec: str, check: str | None, required: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.spec, self.check_name = spec, check
        self.add_marker(pytest.mark.variant)
        if check is not None and required:
            self.add_marker(pytest.mark.variant_required)

    def runtest(self):
        report = report_for(self.spec)
        if report.error:
            raise VariantCheckFailed(report.error)
        if self.check_name is None:
            return
        v = report.by_check().get(self.check_name)
        if v is None:
            raise VariantCheckFailed(f"no verdict for {self.check_name}")
        self.user_properties.append(("detail", v.detail))
        if v.status in (o.SKIP, o.DECLINED):
            pytest.skip(f"{v.status}: {v.detail}")
        if v.status == o.DEPARTS:
            pytest.xfail(f"departs (informational): {v.detail}")
        if v.status == o.WEAK:
            warnings.warn(WeakCheck(f"{self.spec}::{self.check_name} passed only weakly: "
                                    f"{v.detail}"), stacklevel=1)
            return
        if v.status != o.PASS:
            raise VariantCheckFailed(f"{v.status}: {v.detail}"
                                     + (f"\n  reproduce: {v.reproduce}" if v.reproduce else ""))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, VariantCheckFailed):
            what = "load" if self.check_name is None else self.check_name
            return f"variant {self.spec}: {what} (required): {excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"variant {self.spec}::{self.check_name or 'load'}"


class WeakCheck(UserWarning):
    """A variant check passed, but its comparison's bound missed its power
    target on this backend: the pass is no evidence."""


class VariantCollector(pytest.Collector):
    def __init__(self, *, spec: str, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec

    def collect(self):
        if load_error(self.spec):
            return [VariantCheckItem.from_parent(self, name="load", spec=self.spec, check=None)]
        return [VariantCheckItem.from_parent(self, name=r.name, spec=self.spec, check=r.name,
                                             required=r.required)
                for r in variant_properties()]


def items_for(session, specs) -> list[pytest.Item]:
    items = []
    for spec in specs:
        collector = VariantCollector.from_parent(session, name=f"variant[{spec}]", spec=spec)
        items.extend(collector.collect())
    return items
