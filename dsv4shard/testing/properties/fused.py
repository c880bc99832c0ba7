"""Properties of a fused gate+up SwitchGLU (SPEC §3), for any installer.

Each property takes a drawn :class:`FusionCase` and ``fuse_impl``, an
installer with the contract of ``--fuse-impl``: ``fuse_impl(switch_glu)``
returns the module to use in place of the SwitchGLU, or None when it changed
the module in place.  Known-bad installers live in
``dsv4shard.testing.mutants.fusion``.

The properties are drawn on DeepSeek-V4's own configurations (quantized in
a checkpoint format; ``fused_matches_unfused_dense`` for dense experts);
the ``*_extended`` ones on the rest (linear biases, other formats, a global
scale), which an installer may decline by raising NotImplementedError
(``dsv4shard.testing.scope``).  A failure names the bug class where the
probes of ``dsv4shard.testing.diagnose`` recognise it.

Checks that run no kernel (concat order, freeing, bytes, save/load) run on
every backend; checks that run the fused module skip, with the reason, where
the backend cannot run the case (an nvfp4 global scale on MLX's CPU build).
"""

from __future__ import annotations

import gc
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import assume
from mlx.utils import tree_flatten

from dsv4shard import backend
from dsv4shard.attribution import unrecorded
from dsv4shard.fuse import fuse_block, install_fused
from dsv4shard.shard import shard_block
from dsv4shard.testing import data, tolerance
from dsv4shard.testing.properties.unfused import arithmetic_of
from dsv4shard.testing.report import fail
from dsv4shard.testing.strategies import FusionCase
from dsv4shard.weights import DTYPES, build_block, read_weights, to_numpy

GATE_UP = ("gate_proj", "up_proj")
ROW_KEYS = ("weight", "scales", "biases", "bias")


# --- building the case -------------------------------------------------------


def share_global_scale(switch_mlp, weights, quant) -> None:
    """Requantize gate and up (nvfp4 with a global scale) with ONE global scale
    per expert, max |w| over both: gather_qmm takes one per expert, so only
    such a pair can be fused bit for bit (``install_fused`` refuses others)."""
    gate = np.asarray(weights.w1, np.float32)
    up = np.asarray(weights.w3, np.float32)
    shared = np.maximum(np.abs(gate).max(axis=(1, 2)), np.abs(up).max(axis=(1, 2)))
    shared = mx.array(shared, dtype=mx.float32)
    for name, w in (("gate_proj", gate), ("up_proj", up)):
        layer = switch_mlp[name]
        packed = [mx.quantize(mx.array(w[e]), quant.group_size, quant.bits, mode=quant.mode,
                              global_scale=shared[e]) for e in range(w.shape[0])]
        layer.weight = mx.stack([q for q, _ in packed])
        layer.scales = mx.stack([s for _, s in packed])
        layer.global_scale = mx.array(shared)  # each its own, as when loaded


def build(case: FusionCase):
    """The unfused block of the case (routed experts with linear biases when
    the case has them)."""
    m = case.moe
    weights = data.make_weights(m)
    block = build_block(m.config, weights, m.quant, m.dtype)
    if m.quant is not None and m.quant.global_scale:
        share_global_scale(block.switch_mlp, weights, m.quant)
    mx.eval(block.parameters())
    return block


def inputs(case: FusionCase):
    """x [*token_shape, D] in the case's dtype, expert indices
    [*token_shape, k], and token ids for the router of a hash layer."""
    m = case.moe
    x = mx.array(data.make_tokens(m), dtype=mx.float32).astype(DTYPES[m.dtype])
    indices = mx.array(data.make_indices(m), dtype=mx.int32)
    ids = data.make_input_ids(m)
    ids = None if ids is None else mx.array(ids, dtype=mx.int32)
    shape = m.token_shape
    return x.reshape(*shape, -1), indices.reshape(*shape, -1), x, ids


def skip_unsupported(case: FusionCase) -> None:
    """Skip (pytest's skip: never counted as a failure, nor as a catch) where
    this backend cannot run the case's kernels."""
    reason = backend.unsupported(case.moe.quant, case.moe.dtype)
    if reason:
        pytest.skip(f"{reason}: skipped on this backend, neither passed nor caught")


def fail_fused(prop, case, message: str, fuse_impl, **impl):
    """Fail ``prop``, leading with the bug classes the probes recognise in
    ``fuse_impl`` (the first line of a failure is what reports show)."""
    from dsv4shard.testing.diagnose import diagnose

    found = diagnose(fuse_impl, case) if fuse_impl is not None else []
    if found:
        message = f"{'; '.join(found)} [symptom: {message}]"
    fail(prop, case, message, fuse_impl=fuse_impl, **impl)


def attempt(prop, case, what, fn, **impl):
    """``fn()``, evaluated (a module's parameters, or arrays).  A
    NotImplementedError declines the case (``scope.declined``: a failure on
    DeepSeek-V4's own configurations); a broken contract fails naming the
    contract; any other exception fails, naming ``what`` raised it."""
    from dsv4shard.fuse import ContractError
    from dsv4shard.testing.scope import declined, on_what

    fuse_impl = impl.pop("fuse_impl", None)
    try:
        out = fn()
        mx.eval(out.parameters() if hasattr(out, "parameters") else out)
        return out
    except NotImplementedError as error:
        declined(prop, case, what, error, fuse_impl=fuse_impl, **impl)
    except ContractError as error:
        fail(prop, case, f"broken contract: {error}", fuse_impl=fuse_impl, **impl)
    except Exception as error:  # noqa: BLE001 - any crash is the property failing
        first = (str(error).strip().splitlines() or [""])[0]
        fail_fused(prop, case, f"{what} raised {type(error).__name__}: {first} "
                   f"({on_what(case)})", fuse_impl, **impl)


def install(prop, case, block, fuse_impl):
    """Fuse ``block.switch_mlp`` in place with ``fuse_impl``; a crash fails."""
    return attempt(prop, case, "the installer", lambda: fuse_block(block, fuse_impl),
                   fuse_impl=fuse_impl)


def same_shapes(prop, case, what: str, got, want, fuse_impl, **impl) -> None:
    """A fused output of another shape than the unfused one fails clearly
    (before any comparison that would index past it)."""
    if tuple(got.shape) != tuple(want.shape):
        fail_fused(prop, case, f"the fused {what} has shape {tuple(got.shape)}, the unfused "
                   f"one {tuple(want.shape)}", fuse_impl, **impl)


def outputs(block, x, indices, flat, ids):
    """(switch_mlp output, the block's float32 pre-sum output)."""
    return block.switch_mlp(x, indices), block.partial(flat, ids)


def exact(a, b):
    return tolerance.first_difference(to_numpy(a), to_numpy(b))


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def raw(a: mx.array) -> np.ndarray:
    """An exact NumPy copy (bfloat16 widens to float32)."""
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


# --- properties --------------------------------------------------------------


def fused_matches_unfused(case: FusionCase, fuse_impl=install_fused):
    """The fused block is bit-identical to the unfused one: the switch_mlp
    output [*, k, D] and the block's pre-sum output, for every format and
    dtype drawn, token count on both sides of the sort threshold, index
    pattern, [T, D] or [B, L, D] tokens (DeepSeek-V4's checkpoint formats;
    the dense and extended regions have properties of their own)."""
    prop = fused_matches_unfused
    skip_unsupported(case)
    block = build(case)
    x, indices, flat, ids = inputs(case)
    want = outputs(block, x, indices, flat, ids)
    mx.eval(want)
    install(prop, case, block, fuse_impl)
    got = attempt(prop, case, "the fused block",
                  lambda: outputs(block, x, indices, flat, ids), fuse_impl=fuse_impl)
    for what, g, w in zip(("switch_mlp output", "block output"), got, want, strict=True):
        same_shapes(prop, case, what, g, w, fuse_impl)
        diff = exact(g, w)
        if diff:
            fail_fused(prop, case, f"fused {what} differs from the unfused one "
                       f"(bit-exact compare): {diff}", fuse_impl)


def fused_matches_unfused_dense(case: FusionCase, fuse_impl=install_fused):
    """fused_matches_unfused on dense (unquantized) routed experts, a
    DeepSeek-V4 configuration reported apart from the checkpoint formats."""
    fused_matches_unfused(case, fuse_impl)


def fused_matches_unfused_extended(case: FusionCase, fuse_impl=install_fused):
    """fused_matches_unfused beyond DeepSeek-V4's configurations: linear
    biases, other formats and groups, an nvfp4 global scale (where the
    backend runs it).  An installer may decline these."""
    fused_matches_unfused(case, fuse_impl)


def find_fused(params, shape, dtype, up, gate):
    """Among ``params`` [(path, array)] of ``shape`` and ``dtype``: the path of
    one holding [up, gate] along axis 1, else a description of what each holds."""
    seen = []
    for path, value in params:
        if tuple(value.shape) != shape or value.dtype != dtype:
            continue
        value = raw(value)
        rows = up.shape[1]
        first, second = value[:, :rows], value[:, rows:]
        if np.array_equal(first, up) and np.array_equal(second, gate):
            return path, None
        if np.array_equal(first, gate) and np.array_equal(second, up):
            seen.append(f"{path} holds [gate, up]: gate's rows come first")
        else:
            seen.append(f"{path}: its first {rows} rows are not up's (or its last "
                        f"{rows} not gate's)")
    return None, seen


def fused_concat_order_structural(case: FusionCase, fuse_impl=install_fused):
    """After install, for each of up's arrays (weight, scales, biases, linear
    bias) some parameter of the fused module has twice its output rows, the
    first I_local being up's and the last gate's; an nvfp4 global scale is
    kept as a parameter.  Runs no kernel: every backend checks it."""
    prop = fused_concat_order_structural
    block = build(case)
    mlp = block.switch_mlp
    before = {name: {k: raw(v) for k, v in mlp[name].items() if isinstance(v, mx.array)}
              for name in GATE_UP}
    kinds = {k: v.dtype for k, v in mlp.up_proj.items() if isinstance(v, mx.array)}
    install(prop, case, block, fuse_impl)
    params = [(p, v) for p, v in tree_flatten(block.switch_mlp.parameters())
              if not p.startswith("down_proj.")]
    up, gate = before["up_proj"], before["gate_proj"]
    for key in ROW_KEYS:
        if key not in up:
            continue
        shape = list(up[key].shape)
        shape[1] *= 2
        path, seen = find_fused(params, tuple(shape), kinds[key], up[key], gate[key])
        if path is None:
            what = "; ".join(seen) if seen else (
                f"no parameter of shape {tuple(shape)} and dtype {kinds[key]} at all: the "
                f"fused {key} is missing or hidden from parameters()")
            fail_fused(prop, case, f"concat order of {key}: no fused parameter holds [up, "
                       f"gate] (up_proj.{key} rows first): {what}", fuse_impl)
    if "global_scale" in up:
        scale = up["global_scale"]
        kept = [p for p, v in params if tuple(v.shape) == scale.shape
                and v.dtype == mx.float32 and np.array_equal(raw(v), scale)]
        if not kept:
            fail_fused(prop, case, "the nvfp4 global scale was dropped: no parameter of the "
                       f"fused module (outside down_proj) holds up/gate's per-expert global "
                       f"scale {scale.tolist()}", fuse_impl)


def fused_concat_order_structural_extended(case: FusionCase, fuse_impl=install_fused):
    """fused_concat_order_structural beyond DeepSeek-V4's configurations:
    linear biases concatenated like the weights, an nvfp4 global scale kept.
    An installer may decline these."""
    fused_concat_order_structural(case, fuse_impl)


def expect_concat_orders(case: FusionCase, block, weights, x_ref, idx):
    """(the expected fused switch_mlp output [T, k, D] of the right [up,
    gate] order, that of the [gate, up] order): the unfused block's kernels
    followed, with gate and up trading places for the second."""
    arith = arithmetic_of(block, case.moe.dtype)
    kernels = tolerance.block_kernels(block, weights)
    limit = case.moe.config.swiglu_limit
    swapped_weights = replace(weights, w1=weights.w3, w3=weights.w1, b1=weights.b3,
                              b3=weights.b1)
    right = tolerance.expect_switch_glu(x_ref, idx, weights, limit, arith, kernels)
    swapped = tolerance.expect_switch_glu(x_ref, idx, swapped_weights, limit, arith,
                                          replace(kernels, gate=kernels.up, up=kernels.gate))
    return right, swapped


def fused_concat_order_behaviour(case: FusionCase, fuse_impl=install_fused):
    """On inputs where the [gate, up] order provably gives another answer
    (the clipped SwiGLU is not symmetric in gate and up: gate is clipped from
    above only, then silu'd; up two-sided), the fused switch_mlp output is
    the [up, gate] one, following the unfused kernels within their bound."""
    prop = fused_concat_order_behaviour
    skip_unsupported(case)
    block = build(case)
    weights = read_weights(block)
    x, indices, flat, _ = inputs(case)
    x_ref, idx = to_numpy(flat), data.make_indices(case.moe)
    right, swapped = expect_concat_orders(case, block, weights, x_ref, idx)
    # Only inputs that tell the two orders apart prove anything.
    assume(tolerance.worst_mismatch(swapped.want, right.want, right.bound + swapped.bound)
           is not None)
    install(prop, case, block, fuse_impl)
    got = attempt(prop, case, "the fused switch_mlp",
                  lambda: block.switch_mlp(flat, mx.array(idx, dtype=mx.int32)),
                  fuse_impl=fuse_impl)
    got = to_numpy(got)
    if got.shape != right.want.shape:
        fail_fused(prop, case, f"the fused switch_mlp output has shape {got.shape}, the "
                   f"unfused one's {right.want.shape}", fuse_impl)
    bad = right.check(got)
    if bad:
        if swapped.check(got) is None:
            fail_fused(prop, case, f"the fused output follows the [gate, up] order "
                       f"(activation gets gate as up): {bad}", fuse_impl)
        fail_fused(prop, case, f"the fused output is not the clipped SwiGLU of [up, gate]: "
                   f"{bad}; {right.note()}", fuse_impl)
    return right.note()


def shard_then_fuse(block, rank: int, size: int, fuse_impl):
    """Rank ``rank``'s block (a virtual rank, ``shard_block``): shard first,
    then fuse the local rows (right)."""
    return fuse_block(shard_block(block, rank, size), fuse_impl)


def sharded_fusion_matches(case: FusionCase, fuse_impl=install_fused,
                           pipeline=shard_then_fuse):
    """For every rank of the case's N: the rank's fused block (``pipeline``:
    shard then fuse) equals the same rank's sharded unfused block bit for bit,
    switch_mlp and pre-sum block outputs alike."""
    prop = sharded_fusion_matches
    skip_unsupported(case)
    block = build(case)
    x, indices, flat, ids = inputs(case)
    for rank in range(case.ranks):
        want = outputs(shard_block(block, rank, case.ranks), x, indices, flat, ids)
        mx.eval(want)
        impl = {"fuse_impl": fuse_impl, "pipeline": pipeline}
        local = attempt(prop, case, f"{pipeline.__name__} for rank {rank}",
                        lambda r=rank: pipeline(block, r, case.ranks, fuse_impl), **impl)
        got = attempt(prop, case, f"rank {rank}'s fused block",
                      lambda b=local: outputs(b, x, indices, flat, ids), **impl)
        for what, g, w in zip(("switch_mlp output", "block output"), got, want, strict=True):
            same_shapes(prop, case, f"rank {rank} {what}", g, w, fuse_impl, pipeline=pipeline)
            diff = exact(g, w)
            if diff:
                fail_fused(prop, case, f"rank {rank} of {case.ranks}: the {pipeline.__name__} "
                           f"{what} differs from the sharded unfused one: {diff}",
                           fuse_impl, pipeline=pipeline)


def key_of(container: dict, value) -> str:
    for key, item in container.items():
        if item is value:
            return key
    return "?"


def referrers(value, held, block) -> list[str]:
    """Who (besides ``held`` and frames) refers to ``value``: module paths
    where the holder is a module of ``block``."""
    modules = {id(m): name or "<block>" for name, m in block.named_modules()}
    found = []
    for holder in gc.get_referrers(value):
        if holder is held or type(holder).__name__ == "frame":
            continue
        if id(holder) in modules:
            found.append(f"{modules[id(holder)]}.{key_of(holder, value)}")
        elif isinstance(holder, dict):
            found.append(f"a {type(holder).__name__} (key {key_of(holder, value)!r})")
        else:
            found.append(f"a {type(holder).__name__}")
    return found


def unfused_arrays(block) -> tuple[list[str], list[mx.array]]:
    """Names and arrays of the switch_mlp's gate_proj and up_proj."""
    pairs = {id(value): (f"switch_mlp.{name}.{key}", value)
             for name in GATE_UP for key, value in block.switch_mlp[name].items()
             if isinstance(value, mx.array)}  # an array shared by both: once
    return [n for n, _ in pairs.values()], [v for _, v in pairs.values()]


def extra_references(held: list) -> list[int]:
    """References to each of ``held`` beyond those of its last element, a
    control array held the same way (by ``held`` alone)."""
    counts = [sys.getrefcount(v) for v in held]
    return [c - counts[-1] for c in counts[:-1]]


@contextmanager
def young_gc():
    """Inside, ``gc.collect()`` scans only objects made inside (all older ones
    are frozen): a full collection of the test process costs ~0.1 s.  And
    the attribution keeps no array made inside (``unrecorded``): the
    references and memory counted here are the implementation's alone."""
    gc.freeze()
    try:
        with unrecorded():
            yield
    finally:
        gc.unfreeze()


@contextmanager
def exact_memory():
    """MLX's buffer cache off inside: an allocation may otherwise reuse a larger
    cached buffer, and active memory then grows by that buffer's size."""
    mx.clear_cache()
    limit = mx.set_cache_limit(0)
    try:
        yield
    finally:
        mx.set_cache_limit(limit)


def fusion_frees_unfused(case: FusionCase, fuse_impl=install_fused):
    """After install (and garbage collection) the old gate/up arrays are gone:
    no parameters() entry or attribute is one of them, no live reference
    other than this test's holds any, and MLX's active memory is back to its
    value before install within a small slack."""
    prop = fusion_frees_unfused
    with young_gc():
        block = build(case)
        names, held = unfused_arrays(block)
        old_ids = {id(v) for v in held}
        held.append(mx.zeros((1,)))  # the control
        install(prop, case, block, fuse_impl)
        gc.collect()
        kept = [p for p, v in tree_flatten(block.parameters()) if id(v) in old_ids
                or (p.startswith("switch_mlp.") and set(p.split(".")) & set(GATE_UP))]
        extra = extra_references(held)
    if kept:
        fail_fused(prop, case, f"parameters() still has the unfused gate/up entries {kept}",
                   fuse_impl)
    for i, count in enumerate(extra):
        if count > 0:
            fail_fused(prop, case, f"{names[i]} (shape {tuple(held[i].shape)}) is still "
                       f"referenced by {count} object(s) besides this test after install: "
                       f"{referrers(held[i], held, block)}", fuse_impl)
    del held, block

    with young_gc(), exact_memory():
        block = build(case)
        old_bytes = sum(v.nbytes for v in unfused_arrays(block)[1])
        mx.synchronize()  # a GPU frees the inputs of finished work asynchronously
        before = mx.get_active_memory()
        install(prop, case, block, fuse_impl)
        gc.collect()
        mx.synchronize()
        grown = mx.get_active_memory() - before
    slack = min(old_bytes // 4, 4096)
    if grown > slack:
        fail_fused(prop, case, f"MLX's active memory grew by {grown} bytes across install + "
                   f"gc (slack {slack}); the unfused gate/up arrays are {old_bytes} bytes: "
                   f"something keeps them alive", fuse_impl)


def fusion_keeps_bytes_and_round_trips(case: FusionCase, fuse_impl=install_fused):
    """The fused block holds as many parameter bytes as the unfused one (one
    shared nvfp4 global scale fewer at most), and round-trips through
    save_weights / load_weights into another fused block: same arrays, and
    where the backend runs it, bit-identical outputs."""
    prop = fusion_keeps_bytes_and_round_trips
    block = build(case)
    before = nbytes(block)
    gate_scale = block.switch_mlp.gate_proj.get("global_scale")
    saved = 0 if gate_scale is None else gate_scale.nbytes
    install(prop, case, block, fuse_impl)
    after = nbytes(block)
    if after not in (before, before - saved):
        fail_fused(prop, case, f"parameter bytes went from {before} to {after} on fusing "
                   f"(expected {before}" + (f" or {before - saved}" if saved else "") + ")",
                   fuse_impl)
    other = build(replace(case, moe=replace(case.moe, seed=(case.moe.seed + 1) % 2**32)))
    install(prop, case, other, fuse_impl)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "fused.safetensors")
        attempt(prop, case, "save_weights + load_weights of the fused block",
                lambda: (block.save_weights(path), other.load_weights(path))[1],
                fuse_impl=fuse_impl)
    mine, theirs = dict(tree_flatten(block.parameters())), dict(tree_flatten(other.parameters()))
    if set(mine) != set(theirs):
        fail_fused(prop, case, f"after load_weights the parameter names differ: "
                   f"{sorted(set(mine) ^ set(theirs))}", fuse_impl)
    for key in sorted(mine):
        diff = exact(mine[key], theirs[key])
        if mine[key].dtype != theirs[key].dtype or diff:
            fail_fused(prop, case, f"{key} did not round-trip through save_weights/"
                       f"load_weights: {mine[key].dtype} vs {theirs[key].dtype}; {diff}",
                       fuse_impl)
    if backend.unsupported(case.moe.quant, case.moe.dtype) is None:
        x, indices, flat, ids = inputs(case)
        got = attempt(prop, case, "the reloaded fused block",
                      lambda: outputs(other, x, indices, flat, ids), fuse_impl=fuse_impl)
        for what, g, w in zip(("switch_mlp output", "block output"), got,
                              outputs(block, x, indices, flat, ids), strict=True):
            same_shapes(prop, case, f"reloaded {what}", g, w, fuse_impl)
            if diff := exact(g, w):
                fail_fused(prop, case, f"the reloaded fused block's {what} differs: {diff}",
                           fuse_impl)


def fusion_keeps_bytes_and_round_trips_extended(case: FusionCase, fuse_impl=install_fused):
    """fusion_keeps_bytes_and_round_trips beyond DeepSeek-V4's
    configurations (linear biases, other formats, one shared nvfp4 global
    scale).  An installer may decline these."""
    fusion_keeps_bytes_and_round_trips(case, fuse_impl)
