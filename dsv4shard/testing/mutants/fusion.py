"""Known-bad fused gate+up installers, one per bug class of SPEC §3.

Each is an installer with the contract of ``--fuse-impl``: called as
``twin(switch_glu)``, it returns the module to use in place of the SwitchGLU
(or None when it changed it in place).  Run the fused properties against one:

    pytest tests/test_fused.py --fuse-impl dsv4shard.testing.mutants.fusion:gate_up_order

``entries()`` names the property that must catch each, for test_known_bad.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from dsv4shard.fuse import (
    ROW_ARRAYS,
    FusedGateUp,
    FusedSwitchGLU,
    _format,
    check_fusable,
    empty,
    fuse_block,
)
from dsv4shard.shard import shard_block, shard_columns, shard_experts, shard_rows

UP_FIRST = ("up_proj", "gate_proj")
GATE_FIRST = ("gate_proj", "up_proj")


def _fuse(switch_glu, *, orders=None, switch_cls=FusedSwitchGLU, proj_cls=FusedGateUp,
          activation=None, drop=(), free=True):
    """Our installer with one thing changed: ``orders`` maps an array name to
    the projection order of its concatenation (default [up, gate])."""
    check_fusable(switch_glu)
    orders = orders or {}
    arrays = {}
    for key, axis in ROW_ARRAYS.items():
        if key in switch_glu.up_proj and key not in drop:
            first, second = orders.get(key, UP_FIRST)
            arrays[key] = mx.concatenate([switch_glu[first][key], switch_glu[second][key]],
                                         axis=axis)
    if "global_scale" in switch_glu.up_proj and "global_scale" not in drop:
        arrays["global_scale"] = mx.array(switch_glu.up_proj["global_scale"])
    mx.eval(list(arrays.values()))
    fused = switch_cls(proj_cls(arrays, _format(switch_glu.up_proj)), switch_glu.down_proj,
                       switch_glu.activation if activation is None else activation)
    if free:
        for name in UP_FIRST:
            empty(switch_glu[name])
            del switch_glu[name]
    return fused


def gate_up_order(switch_glu):
    """[gate, up] order: gate's rows first, but the first half is used as up."""
    return _fuse(switch_glu, orders=dict.fromkeys(ROW_ARRAYS, GATE_FIRST))


def mixed_order(switch_glu):
    """Mixed order: weight [up, gate] but scales and affine biases [gate, up].

    Every up row is dequantized with gate's scales.  Dense layers have no
    scales, so only quantized ones break."""
    return _fuse(switch_glu, orders={"scales": GATE_FIRST, "biases": GATE_FIRST})


class InterleavedSplit(FusedSwitchGLU):
    """Reads the fused output as alternating up/gate columns (an interleaved
    gate_up layout, as some checkpoints store it) though it was built as two
    halves: the wrong split point for every column but the first."""

    @staticmethod
    def split(y):
        return y[..., 0::2], y[..., 1::2]


def wrong_split(switch_glu):
    """Wrong split point: the fused output split by alternating columns.

    Not at I_local: an interleaved layout read from a concatenated one."""
    return _fuse(switch_glu, switch_cls=InterleavedSplit)


class UnclippedSwiGLU(nn.Module):
    """silu(gate) * up in float32 with no clip: what a fused path that
    hard-codes SwiGLU instead of calling the module's activation computes."""

    def __call__(self, up, gate):
        dtype = up.dtype
        return (nn.silu(gate.astype(mx.float32)) * up.astype(mx.float32)).astype(dtype)


def no_clip(switch_glu):
    """Fused path without the clip: a plain SwiGLU replaces the activation.

    Right only while gate and up stay within the clip limit."""
    return _fuse(switch_glu, activation=UnclippedSwiGLU())


class SortAtEight(FusedSwitchGLU):
    """Sorts once indices.size >= 8 (not SwitchGLU's 64) and unsorts to
    indices.shape[:-1], dropping the k axis."""

    sort_threshold = 8

    @staticmethod
    def unsorted_shape(indices):
        return indices.shape[:-1]


def sort_threshold_8(switch_glu):
    """Sort threshold 8 with an unsort to indices.shape[:-1].

    Wrong (or a crash) as soon as any token is sorted."""
    return _fuse(switch_glu, switch_cls=SortAtEight)


def keeps_unfused_alive(switch_glu):
    """Old weights kept alive: the original SwitchGLU stashed in `_unfused`.

    An underscore attribute is invisible to parameters() but a live
    reference, so gate and up stay in memory beside their fused copy."""
    fused = _fuse(switch_glu, free=False)
    fused._unfused = switch_glu
    return fused


def drops_global_scale(switch_glu):
    """nvfp4 global scale dropped: the fused projection is built without it.

    gather_qmm then dequantizes with the e4m3 group scales alone."""
    return _fuse(switch_glu, drop=("global_scale",))


class GlobalScaleUnused(FusedGateUp):
    """Holds the global scale as a parameter but never hands it to gather_qmm."""

    def __call__(self, x, indices, sorted_indices=False):
        if not self.quantized:
            return super().__call__(x, indices, sorted_indices)
        y = mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"),
                          rhs_indices=indices, transpose=True, group_size=self.group_size,
                          bits=self.bits, mode=self.mode, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


def ignores_global_scale(switch_glu):
    """nvfp4 global scale unused: kept as a parameter, never passed to gather_qmm.

    It looks right structurally; only running the kernel shows it."""
    return _fuse(switch_glu, proj_cls=GlobalScaleUnused)


def drops_linear_bias(switch_glu):
    """Linear bias dropped: gate's and up's bias are not carried into the fusion."""
    return _fuse(switch_glu, drop=("bias",))


def fuse_then_shard(block, rank: int, size: int, fuse_impl):
    """Fuse then shard: the fused rows are split across ranks like any others.

    Rank 0 of 2 gets all of up, rank 1 all of gate: silently wrong.  A
    ``pipeline`` for ``sharded_fusion_matches``, not an installer."""

    def fuse_first(local, group):
        rows = 2 * local.switch_mlp.up_proj.weight.shape[1]
        fuse_block(local, fuse_impl)
        for name, leaf in local.switch_mlp.named_modules():
            if name.split(".")[-1] == "down_proj":
                shard_columns(leaf, group.rank(), group.size())
            elif "weight" in leaf and leaf["weight"].ndim == 3 and leaf["weight"].shape[1] == rows:
                shard_rows(leaf, group.rank(), group.size())
        shard_experts(local.shared_experts, group.rank(), group.size())
        mx.eval(local.parameters())
        return local

    return shard_block(block, rank, size, shard_fn=fuse_first)


def entries():
    """Each twin and the property that must catch it (test_known_bad)."""
    from dsv4shard.testing import strategies as s
    from dsv4shard.testing.mutants import Mutant
    from dsv4shard.testing.properties import fused as f

    def cases():
        return s.fusion_cases()

    def quantized():
        return s.fusion_cases(quantized=True)

    def with_bias():
        return s.fusion_cases().filter(lambda c: c.moe.linear_bias)

    def global_scale():
        return s.fusion_cases(global_scale=True)

    def sharded():
        return s.sharded_fusion_cases()

    def twin(name, prop, strategy, bad, key="fuse_impl"):
        return Mutant(f"fused_{name}", prop, strategy, {key: bad})

    return [
        twin("gate_up_order", f.fused_concat_order_structural, cases, gate_up_order),
        twin("gate_up_order_behaviour", f.fused_concat_order_behaviour, cases, gate_up_order),
        twin("gate_up_order_vs_unfused", f.fused_matches_unfused, cases, gate_up_order),
        twin("mixed_order", f.fused_concat_order_structural, quantized, mixed_order),
        twin("mixed_order_behaviour", f.fused_concat_order_behaviour, quantized, mixed_order),
        twin("wrong_split", f.fused_concat_order_behaviour, cases, wrong_split),
        twin("wrong_split_vs_unfused", f.fused_matches_unfused, cases, wrong_split),
        twin("no_clip", f.fused_matches_unfused, cases, no_clip),
        twin("no_clip_behaviour", f.fused_concat_order_behaviour, cases, no_clip),
        twin("sort_threshold_8", f.fused_matches_unfused, cases, sort_threshold_8),
        twin("keeps_unfused_alive", f.fusion_frees_unfused, cases, keeps_unfused_alive),
        # Linear biases and global scales lie beyond DeepSeek-V4's own
        # configurations: the properties that draw them are the extended ones.
        twin("drops_linear_bias", f.fused_matches_unfused_extended, with_bias,
             drops_linear_bias),
        twin("drops_global_scale", f.fused_concat_order_structural_extended, global_scale,
             drops_global_scale),
        # The two below run gather_qmm with a global scale: they skip, with
        # the reason, on a backend without it (MLX's CPU build), never passing
        # for a catch.
        twin("drops_global_scale_behaviour", f.fused_matches_unfused_extended, global_scale,
             drops_global_scale),
        twin("ignores_global_scale", f.fused_matches_unfused_extended, global_scale,
             ignores_global_scale),
        twin("fuse_then_shard", f.sharded_fusion_matches, sharded, fuse_then_shard,
             key="pipeline"),
        # The dense and extended properties each with a twin of their own.
        twin("gate_up_order_dense", f.fused_matches_unfused_dense,
             lambda: s.v4_fusion_cases(dense=True), gate_up_order),
        twin("drops_linear_bias_bytes", f.fusion_keeps_bytes_and_round_trips_extended,
             lambda: s.extended_fusion_cases(global_scale=True).filter(
                 lambda c: c.moe.linear_bias), drops_linear_bias),
    ]
