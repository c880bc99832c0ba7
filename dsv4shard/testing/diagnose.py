"""Naming the bug of a failing fused gate+up installer.

When a fused property fails, :func:`diagnose` probes the installer on small
blocks of the failing case's format and dtype and names each bug class it
recognises (SPEC section 3):

- wrong (a wrong shape, a crash, other values) only once sorting is on,
  from the ``indices.size`` at which the installer's module starts sorting;
- [gate, up] order: the activation gets gate's rows as up;
- the clip missing: silu(gate) * up without the clipped SwiGLU's clip;
- fused weights hidden from ``parameters()`` (underscore attributes);
- the old gate/up arrays kept alive after install.

A probe that cannot run (the installer crashes on the probe block, the
backend has no kernel for the format) names nothing.  Results are cached per
installer and configuration: hypothesis's shrinking calls the failing
property many times.
"""

from __future__ import annotations

import copy
import gc

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from dsv4shard import backend
from dsv4shard.fuse import apply_installer
from dsv4shard.testing.strategies import SORT_THRESHOLD, MoECase
from dsv4shard.weights import DTYPES
from reference.moe_block import MoEConfig

GATE_UP = ("gate_proj", "up_proj")
MAX_SIZE = 80  # indices.size probed up to (past SwitchGLU's threshold of 64)
_CACHE: dict = {}


def diagnose(fuse_impl, case) -> list[str]:
    """The bug classes of ``fuse_impl`` recognised on blocks like ``case``'s
    (a FusionCase), one short sentence each; [] when none is recognised."""
    moe = getattr(case, "moe", case)
    key = (fuse_impl, moe.quant, moe.dtype, moe.linear_bias, moe.config.swiglu_limit > 0)
    if key in _CACHE:
        return _CACHE[key]
    found: list[str] = []
    runs = backend.unsupported(moe.quant, moe.dtype) is None
    for probe in ((sorted_path,) if runs else ()) + (installed_state,):
        try:
            found += probe(fuse_impl, moe, runs)
        except Exception:  # noqa: BLE001, S112 - a probe that cannot run names nothing
            continue
    if len(_CACHE) > 64:
        _CACHE.clear()
    _CACHE[key] = found
    return found


# --- probe blocks ------------------------------------------------------------------


def probe_case(moe: MoECase, top_k: int, scale: float = 1.0) -> MoECase:
    group = moe.quant.group_size if moe.quant else 1
    size = max(64, group)
    limit = moe.config.swiglu_limit if moe.config.swiglu_limit > 0 else 10.0
    config = MoEConfig(size, size, 4, top_k, swiglu_limit=limit)
    return MoECase(config=config, quant=moe.quant, dtype=moe.dtype, n_tokens=4,
                   pattern="router", activation_scale=scale, seed=1234,
                   linear_bias=moe.linear_bias)


def probe_block(moe: MoECase):
    from dsv4shard.testing.properties.fused import build
    from dsv4shard.testing.strategies import FusionCase

    return build(FusionCase(moe))


def installed(fuse_impl, moe: MoECase, top_k: int, scale: float = 1.0):
    """(a copy of the unfused SwitchGLU, the installed module, the hidden
    size) of a probe block."""
    case = probe_case(moe, top_k, scale)
    block = probe_block(case)
    unfused = copy.deepcopy(block.switch_mlp)
    fused = apply_installer(fuse_impl, block.switch_mlp)
    mx.eval(fused.parameters())
    return unfused, fused, case.config.hidden_size


def tokens(moe: MoECase, t: int, k: int, hidden: int, n_experts: int = 4, seed: int = 0):
    rng = np.random.default_rng([seed, t, k])
    x = mx.array(rng.normal(0, 1, (t, hidden)), dtype=mx.float32).astype(DTYPES[moe.dtype])
    idx = np.argsort(rng.random((t, n_experts)), axis=1)[:, :k]
    return x, mx.array(idx, dtype=mx.int32)


def close(got: mx.array, want: mx.array) -> bool:
    g = np.array(got.astype(mx.float32))
    w = np.array(want.astype(mx.float32))
    if g.shape != w.shape:
        return False
    scale = float(np.abs(w).max()) if w.size else 0.0
    return bool(np.allclose(g, w, rtol=2e-2, atol=2e-2 * scale + 1e-6, equal_nan=True))


def problem(fused, unfused, x, idx) -> str | None:
    """How the fused module's output departs from the unfused one, or None."""
    want = unfused(x, idx)
    mx.eval(want)
    try:
        got = fused(x, idx)
        mx.eval(got)
    except Exception as error:  # noqa: BLE001 - the crash is the finding
        first = (str(error).strip().splitlines() or [""])[0]
        return f"raises {type(error).__name__}: {first}"
    if tuple(got.shape) != tuple(want.shape):
        return (f"has shape {tuple(got.shape)} where mlx-lm's SwitchGLU gives "
                f"{tuple(want.shape)}")
    if not close(got, want):
        return "gives other values than the unfused SwitchGLU"
    return None


# --- the probes ---------------------------------------------------------------------


def sorted_path(fuse_impl, moe: MoECase, runs: bool = True) -> list[str]:
    """Right below some indices.size, wrong from there on: the sorted path."""
    unfused, fused, hidden = installed(fuse_impl, moe, top_k=1)

    def at(size, k=1):
        x, idx = tokens(moe, max(1, size // k), k, hidden)
        return problem(fused, unfused, x, idx)

    if at(1) is not None or at(MAX_SIZE) is None:
        return []
    low, high = 1, MAX_SIZE  # at(low) is right, at(high) wrong
    while high - low > 1:
        mid = (low + high) // 2
        if at(mid) is None:
            low = mid
        else:
            high = mid
    if any(at(s) is None for s in (high + 1, (high + MAX_SIZE) // 2)):
        return []  # not wrong from there on: something else
    what = at(high)
    two = at(2 * ((high + 1) // 2), k=2)
    text = (f"wrong only when sorting is on: from indices.size >= {high} (where this "
            f"implementation starts sorting tokens by expert; mlx-lm's SwitchGLU sorts from "
            f"{SORT_THRESHOLD}) the fused output {what}")
    if two and two != what:
        text += f", and with k = 2 it {two}"
    if "shape" in what or "Unflatten" in (two or "") + what:
        text += ("; the sorted path unsorts to the wrong shape (it must scatter back to "
                 "indices.shape, not indices.shape[:-1])")
    return [text]


class _Unclipped(nn.Module):
    def __call__(self, up, gate):
        return (nn.silu(gate.astype(mx.float32)) * up.astype(mx.float32)).astype(up.dtype)


def installed_state(fuse_impl, moe: MoECase, runs: bool = True) -> list[str]:
    """One probe block (k = 2, activations past the clip), installed: the
    old arrays kept alive, the fused ones hidden from parameters(), and
    (where the backend runs the format) the output against the unfused one,
    the one with gate and up exchanged, and the one without the clip."""
    from dsv4shard.testing.properties.fused import (
        extra_references,
        referrers,
        unfused_arrays,
        young_gc,
    )

    found = []
    with young_gc():
        case = probe_case(moe, top_k=2, scale=30.0)
        block = probe_block(case)
        unfused = copy.deepcopy(block.switch_mlp)  # copies: no reference to the old arrays
        names, held = unfused_arrays(block)
        old_ids, old_bytes = {id(v) for v in held}, sum(v.nbytes for v in held)
        held.append(mx.zeros((1,)))  # the control
        block.switch_mlp = fused = apply_installer(fuse_impl, block.switch_mlp)
        mx.eval(fused.parameters())
        gc.collect()
        extra = extra_references(held)
        alive = [(names[i], referrers(held[i], held, block)) for i, c in enumerate(extra)
                 if c > 0]
    del held
    if alive:
        name, who = alive[0]
        found.append(f"old gate/up arrays kept alive after install ({len(alive)} of "
                     f"{len(names)}, e.g. {name}, held by "
                     f"{', '.join(who[:2]) or 'an unknown object'})")
    # The old arrays themselves, still held, are kept alive (above), not hidden.
    visible = {id(v) for _, v in tree_flatten(fused.parameters())} | old_ids
    hidden = [(p, v) for p, v in arrays_in(fused, "switch_mlp") if id(v) not in visible
              and v.ndim >= 2]
    if hidden and sum(v.nbytes for _, v in hidden) >= old_bytes // 2:
        names_shown = ", ".join(f"{p} {tuple(v.shape)}" for p, v in hidden[:4])
        found.append(f"fused weights hidden from parameters(): {names_shown} (underscore "
                     f"attributes, or not module parameters: nbytes, save_weights and "
                     f"load_weights miss them)")
    if runs:
        found += order_and_clip(fused, unfused, moe, case.config.hidden_size)
    return found


def order_and_clip(fused, unfused, moe: MoECase, hidden: int) -> list[str]:
    """The fused output against the unfused one, the one with gate and up
    exchanged, and the one without the clip, on activations past the clip."""
    x, idx = tokens(moe, 3, 2, hidden, seed=1)  # indices.size 6: no sorting
    got = fused(x, idx)
    mx.eval(got)
    if close(got, unfused(x, idx)):
        return []
    swapped = copy.deepcopy(unfused)
    swapped.gate_proj, swapped.up_proj = swapped.up_proj, swapped.gate_proj
    if close(got, swapped(x, idx)):
        return ["[gate, up] order: the activation gets gate's rows as up (the fused "
                "arrays must be [up, gate] on the output axis, split at I_local)"]
    unclipped = copy.deepcopy(unfused)
    unclipped.activation = _Unclipped()
    if close(got, unclipped(x, idx)):
        return ["clip missing: the fused path computes silu(gate) * up without the clipped "
                "SwiGLU's clip (it must call the module's own activation)"]
    return []


def arrays_in(module, prefix: str = "") -> list[tuple[str, mx.array]]:
    """Every array a module tree holds: its items (underscore keys too) and
    its plain attributes."""
    found, seen = [], set()

    def walk(value, path):
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, mx.array):
            found.append((path, value))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key))
            if isinstance(value, nn.Module):
                for key, item in vars(value).items():
                    walk(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}.{i}" if path else str(i))

    walk(module, prefix)
    return found
