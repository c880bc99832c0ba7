"""``pytest --variant X``: the variant checks as test items, one per check.

A REQUIRED check that fails is a failed test; an INFORMATIONAL departure is
reported as xfail (``-rx`` shows its diagnosis) and never fails the run; a
check with nothing to check is skipped with its reason.  A variant that
cannot be imported gives one failing item, ``load``, naming what is missing.
All items carry the ``variant`` marker: ``pytest --variant X -m variant``
runs only them.
"""

from __future__ import annotations

import functools

import pytest

from dsv4shard.variants.adapter import Variant
from dsv4shard.variants.checks import CHECKS, by_name, run_check
from dsv4shard.variants.loading import VariantLoadError


class VariantCheckFailed(AssertionError):
    """A required check failed: the message is its diagnosis."""


@functools.lru_cache(maxsize=None)
def loaded(spec: str):
    """The variant (one per process, shared by its items), or its load error."""
    try:
        return Variant(spec)
    except VariantLoadError as error:
        return error


class VariantCheckItem(pytest.Item):
    def __init__(self, *, spec: str, check: str | None, **kwargs):
        super().__init__(**kwargs)
        self.spec, self.check_name = spec, check
        self.add_marker(pytest.mark.variant)
        if check is not None and by_name(check).required:
            self.add_marker(pytest.mark.variant_required)

    def runtest(self):
        variant = loaded(self.spec)
        if isinstance(variant, VariantLoadError):
            raise VariantCheckFailed(str(variant))
        if self.check_name is None:
            return
        chk = by_name(self.check_name)
        result = run_check(variant, chk)
        self.user_properties.append(("detail", result.detail))
        if result.status == "SKIP":
            pytest.skip(result.detail)
        if result.status == "FAIL":
            if not chk.required:
                pytest.xfail(f"informational departure: {result.detail}")
            raise VariantCheckFailed(result.detail)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, VariantCheckFailed):
            what = "load" if self.check_name is None else self.check_name
            return f"variant {self.spec}: {what} (required): {excinfo.value}"
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"variant {self.spec}::{self.check_name or 'load'}"


class VariantCollector(pytest.Collector):
    def __init__(self, *, spec: str, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec

    def collect(self):
        if isinstance(loaded(self.spec), VariantLoadError):
            return [VariantCheckItem.from_parent(self, name="load", spec=self.spec, check=None)]
        return [VariantCheckItem.from_parent(self, name=c.name, spec=self.spec, check=c.name)
                for c in CHECKS]


def items_for(session, specs) -> list[pytest.Item]:
    items = []
    for spec in specs:
        collector = VariantCollector.from_parent(session, name=f"variant[{spec}]", spec=spec)
        items.extend(collector.collect())
    return items
