"""Validate any mlx-lm DeepSeek-V4 variant (a port's ``deepseek_v4.py``, or an
installed module) against the reference: ``dsv4shard check --variant X`` and
``pytest --variant X``.

- :mod:`~dsv4shard.variants.loading`: a module name or a file path in, a
  module out; a failing import names the missing module.
- :mod:`~dsv4shard.variants.adapter`: the structural adapter that builds the
  variant's MoE block tiny and drives its router, experts and call.
- :mod:`~dsv4shard.variants.probes`: how the block is probed and compared.
- :mod:`~dsv4shard.variants.checking`: the engine's variant properties run
  against it, in a process of its own; :mod:`~dsv4shard.variants.report`
  prints the verdicts.
"""

from __future__ import annotations

import pkgutil
import re

from dsv4shard.variants.adapter import StructureError, Variant
from dsv4shard.variants.checking import Report, check_isolated, check_variant
from dsv4shard.variants.loading import VariantLoadError, load_module
from dsv4shard.variants.report import markdown

OWN = "dsv4shard.variants.own"

__all__ = ["OWN", "Report", "StructureError", "Variant", "VariantLoadError", "check_isolated",
           "check_variant", "installed_variants", "load_module", "markdown"]


def installed_variants() -> list[str]:
    """The installed mlx-lm's DeepSeek-V4 family modules (deepseek_v4, deepseek_v41, ...)."""
    import mlx_lm.models

    return sorted(f"mlx_lm.models.{m.name}" for m in pkgutil.iter_modules(mlx_lm.models.__path__)
                  if re.fullmatch(r"deepseek_v4\d*", m.name))


def default_variants() -> list[str]:
    """What ``dsv4shard check`` checks with no ``--variant``."""
    return installed_variants() + [OWN]
