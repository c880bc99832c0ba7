"""Implementations named ``module:function``: how an option, a failure's
reproducer and a rank process all refer to the function under test."""

from __future__ import annotations

import importlib


def spec_of(fn) -> str:
    """``module:function`` for a module-level function or class."""
    return f"{fn.__module__}:{fn.__qualname__}"


def load(spec: str):
    """The callable a ``module:function`` spec names; ValueError naming the
    problem otherwise."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"expected MODULE:FUNCTION, got {spec!r}")
    try:
        found = importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"{spec}: cannot import {module}: {error}") from error
    impl = getattr(found, attr, None)
    if not callable(impl):
        raise ValueError(f"{spec}: {module} has no function {attr!r}")
    return impl
