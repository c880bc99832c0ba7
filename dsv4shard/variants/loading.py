"""Finding a variant's code: an importable module name, or the path of a
single model file written to live in ``mlx_lm/models/`` (its relative
imports, ``from .base import ...``, resolve against the installed mlx-lm).

A file whose imports fail raises :class:`VariantLoadError` naming the
module (or the name) that is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType

SIBLING_PACKAGE = "mlx_lm.models"

_LOADED: dict[str, ModuleType] = {}
_FRESH = 0


class VariantLoadError(ImportError):
    """The variant's code cannot be imported; the message says why."""


def is_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep or os.sep) in spec


def installed_mlx_lm() -> str:
    try:
        from importlib.metadata import version

        return f"mlx-lm {version('mlx-lm')}"
    except Exception:  # an unusual install: say so, never crash on it
        return "the installed mlx-lm"


def _import_failure(spec: str, error: ImportError) -> VariantLoadError:
    missing = getattr(error, "name", None)
    if isinstance(error, ModuleNotFoundError) and missing:
        where = ""
        if missing.startswith(SIBLING_PACKAGE + "."):
            where = f" ({installed_mlx_lm()} has no such module)"
        return VariantLoadError(
            f"cannot load variant {spec}: it imports module {missing!r}, which is missing"
            f"{where}: {error}")
    return VariantLoadError(
        f"cannot load variant {spec}: an import failed"
        f"{f' in module {missing!r}' if missing else ''} ({installed_mlx_lm()}): {error}")


def _exec_failure(spec: str, error: BaseException) -> VariantLoadError:
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return VariantLoadError(f"cannot load variant {spec}: importing it raised "
                            f"{type(error).__name__}{at}: {error}")


def load_file(path: str, fresh: bool = False) -> ModuleType:
    """Import the model file at ``path`` as a module of ``mlx_lm.models``.

    ``fresh``: a new module object even if this file was loaded before (tests
    use it to change one copy without touching the others)."""
    global _FRESH
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise VariantLoadError(f"cannot load variant {path}: no such file")
    key = str(resolved)
    if not fresh and key in _LOADED:
        return _LOADED[key]
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    stem = "".join(c if c.isalnum() else "_" for c in resolved.stem)
    name = f"{SIBLING_PACKAGE}._dsv4shard_{stem}_{digest}"
    if fresh:
        _FRESH += 1
        name += f"_{_FRESH}"
    importlib.import_module(SIBLING_PACKAGE)
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    module.__package__ = SIBLING_PACKAGE
    module.__dsv4shard_source__ = path  # how reports name it
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        module_spec.loader.exec_module(module)
    except ImportError as error:
        del sys.modules[name]
        raise _import_failure(path, error) from error
    except Exception as error:
        del sys.modules[name]
        raise _exec_failure(path, error) from error
    if not fresh:
        _LOADED[key] = module
    return module


def load_module(spec: str | ModuleType, fresh: bool = False) -> ModuleType:
    """The variant's module, from a module object, a dotted name or a path."""
    if isinstance(spec, ModuleType):
        return spec
    if is_path(spec) or Path(spec).is_file():
        return load_file(spec, fresh=fresh)
    try:
        return importlib.import_module(spec)
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name and spec.startswith(error.name):
            raise VariantLoadError(
                f"cannot load variant {spec}: no module named {error.name!r} (give an importable "
                f"module name such as mlx_lm.models.deepseek_v41, or the path of a .py file)"
            ) from error
        raise _import_failure(spec, error) from error
    except Exception as error:
        raise _exec_failure(spec, error) from error


def describe(spec: str | ModuleType) -> str:
    if isinstance(spec, ModuleType):
        return spec.__name__
    return spec
