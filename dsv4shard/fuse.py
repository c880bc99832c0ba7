"""Fused gate+up for mlx-lm's SwitchGLU: one gather_(q)mm instead of two (SPEC §3).

``install_fused(switch_glu)`` returns a :class:`FusedSwitchGLU` to use in place
of a SwitchGLU.  Up and gate are concatenated along their output axis (axis 1
of ``[E, O, ...]``), in the order ``[up, gate]``, for the weight, the scales,
the affine biases and a linear bias alike; one ``gather_qmm`` (``gather_mm``
when dense) gives ``[..., 2 * I_local]``, split at ``I_local`` into
``x_up, x_gate``, and the module's own ``activation(x_up, x_gate)`` and
``down_proj`` run unchanged.  Tokens are sorted by expert by SwitchGLU's own
rule (``indices.size >= 64``) and unsorted back to ``indices.shape``, so the
fused module is bit-identical to the unfused one.

Fuse AFTER sharding: the concatenation must be of the local rows.  A fused
module handed to a row sharder gives rank 0 all of up and rank 1 all of gate.

After installing, the old gate/up arrays are gone: the SwitchGLU given is
emptied of ``gate_proj`` and ``up_proj``, and those projections of their
arrays, so that nothing (even a caller still holding the old modules) keeps
them alive.  The fused arrays are ordinary parameters of ``gate_up_proj``,
so ``nbytes``, ``save_weights`` and ``load_weights`` keep working.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

# mlx-lm's SwitchGLU sorts the tokens by expert once indices.size reaches this.
SORT_THRESHOLD = 64

# Every array a (Quantized)SwitchLinear may hold, and the axis that is its
# output axis (the one gate and up are concatenated along).
ROW_ARRAYS = {"weight": 1, "scales": 1, "biases": 1, "bias": 1}


class FusionError(ValueError):
    """gate_proj and up_proj cannot be fused; the module is left untouched."""


def _format(layer) -> tuple:
    """(mode, bits, group_size) of a quantized projection, None when dense."""
    if "scales" not in layer:
        return None
    return (layer.mode, layer.bits, layer.group_size)


def _describe(fmt) -> str:
    if fmt is None:
        return "dense"
    mode, bits, group = fmt
    return f"{mode} {bits}-bit group {group}"


def _arrays(layer) -> dict[str, mx.array]:
    return {k: v for k, v in layer.items() if isinstance(v, mx.array)}


def check_fusable(switch_glu) -> None:
    """Raise :class:`FusionError` naming every reason ``switch_glu``'s gate_proj
    and up_proj cannot become one gather; touch nothing."""
    if isinstance(switch_glu, FusedSwitchGLU):
        raise FusionError("already fused: this is a FusedSwitchGLU (gate and up are one "
                          "gate_up_proj already)")
    if not isinstance(switch_glu, SwitchGLU):
        raise FusionError(f"not a SwitchGLU: got {type(switch_glu).__module__}."
                          f"{type(switch_glu).__qualname__}; only mlx-lm's SwitchGLU "
                          f"(gate_proj, up_proj, down_proj) can be fused")
    missing = [n for n in ("gate_proj", "up_proj", "down_proj") if n not in switch_glu]
    if missing:
        raise FusionError(f"already fused (or emptied by an earlier install): this "
                          f"SwitchGLU has no {', '.join(missing)}")
    gate, up = switch_glu.gate_proj, switch_glu.up_proj
    problems = []
    if _format(gate) != _format(up):
        g, u = _format(gate), _format(up)
        if g is None or u is None:
            problems.append(f"gate_proj is {_describe(g)} but up_proj is {_describe(u)}")
        else:
            for i, what in enumerate(("mode", "bits", "group size")):
                if g[i] != u[i]:
                    problems.append(f"gate_proj and up_proj differ in {what}: "
                                    f"{g[i]!r} vs {u[i]!r}")
    ga, ua = _arrays(gate), _arrays(up)
    if set(ga) != set(ua):
        problems.append(f"gate_proj holds {sorted(ga)} but up_proj holds {sorted(ua)}")
    for key in sorted(set(ga) & set(ua)):
        if ga[key].shape != ua[key].shape:
            problems.append(f"gate_proj.{key} has shape {tuple(ga[key].shape)} but "
                            f"up_proj.{key} has shape {tuple(ua[key].shape)}")
        elif ga[key].dtype != ua[key].dtype:
            problems.append(f"gate_proj.{key} is {ga[key].dtype} but up_proj.{key} is "
                            f"{ua[key].dtype}: concatenating would promote one")
    if "weight" in ga and ga["weight"].ndim != 3:
        problems.append(f"gate_proj.weight is {ga['weight'].ndim}-D; a SwitchLinear's is "
                        f"[experts, out, in]")
    if not problems and "global_scale" in ga:
        # gather_qmm takes ONE float32 nvfp4 global scale per expert (shape [E]):
        # a fused [up; gate] matrix cannot carry up's and gate's separately, and
        # folding one into the other's e4m3 group scales would round them, so the
        # fused result would no longer be bit-identical.  We refuse instead, unless
        # the two are equal for every expert (then that one scale serves both).
        same = mx.equal(ga["global_scale"], ua["global_scale"])
        if not mx.all(same).item():
            differ = int((~same).sum().item())
            problems.append(
                f"gate_proj and up_proj have different nvfp4 global scales for {differ} "
                f"of {same.size} experts; gather_qmm takes one global scale per expert, "
                f"so a fused [up, gate] matrix cannot keep both (quantize gate and up "
                f"with a shared per-expert global scale to fuse them)")
    if problems:
        raise FusionError("cannot fuse gate_proj and up_proj: " + "; ".join(problems))


class FusedGateUp(nn.Module):
    """``[up; gate]`` as one (quantized) switch projection.

    Its arrays are ordinary parameters: ``weight`` (and ``scales``, ``biases``,
    ``bias``) with ``2 * I_local`` output rows, and for nvfp4 the one
    per-expert ``global_scale`` that up and gate share."""

    def __init__(self, arrays: dict[str, mx.array], fmt):
        super().__init__()
        for key, value in arrays.items():
            self[key] = value
        self.quantized = fmt is not None
        if fmt is not None:
            self.mode, self.bits, self.group_size = fmt
        self.freeze()  # as mlx-lm's QuantizedSwitchLinear: inference weights

    @property
    def output_dims(self) -> int:
        return self["weight"].shape[1]

    def __call__(self, x, indices, sorted_indices=False):
        if self.quantized:
            y = mx.gather_qmm(
                x, self["weight"], self["scales"], self.get("biases"),
                rhs_indices=indices, transpose=True, group_size=self.group_size,
                bits=self.bits, mode=self.mode, global_scale=self.get("global_scale"),
                sorted_indices=sorted_indices,
            )
        else:
            y = mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=indices,
                             sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


class FusedSwitchGLU(nn.Module):
    """A SwitchGLU whose gate and up run as one gather: ``gate_up_proj`` holds
    ``[up; gate]``; ``down_proj`` and ``activation`` are the original ones."""

    def __init__(self, gate_up_proj: FusedGateUp, down_proj, activation):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.activation = activation

    @staticmethod
    def split(y: mx.array) -> tuple[mx.array, mx.array]:
        """(x_up, x_gate): the fused output split at I_local, which is read
        from the fused rows (half of them), never stored."""
        half = y.shape[-1] // 2
        return y[..., :half], y[..., half:]

    sort_threshold = SORT_THRESHOLD  # SwitchGLU's own rule

    @staticmethod
    def unsorted_shape(indices: mx.array) -> tuple[int, ...]:
        """The shape sorted results are scattered back to: indices' own."""
        return indices.shape

    def __call__(self, x, indices) -> mx.array:
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= self.sort_threshold
        idx, inverse = indices, None
        if do_sort:
            flat = indices.flatten()
            order = mx.argsort(flat)
            inverse = mx.argsort(order)
            x = x.flatten(0, -3)[order // indices.shape[-1]]
            idx = flat[order]
        x_up, x_gate = self.split(self.gate_up_proj(x, idx, sorted_indices=do_sort))
        y = self.down_proj(self.activation(x_up, x_gate), idx, sorted_indices=do_sort)
        if do_sort:
            y = mx.unflatten(y[inverse], 0, self.unsorted_shape(indices))
        return y.squeeze(-2)


def fused_arrays(up, gate) -> dict[str, mx.array]:
    """``[up; gate]`` for every row array, evaluated, and the shared global scale."""
    arrays = {}
    for key, axis in ROW_ARRAYS.items():
        if key in up:
            arrays[key] = mx.concatenate([up[key], gate[key]], axis=axis)
    if "global_scale" in up:
        arrays["global_scale"] = mx.array(up["global_scale"])  # equal to gate's
    # Evaluate now: a lazy concatenation would keep the old arrays alive as
    # its inputs until its first use.
    mx.eval(list(arrays.values()))
    return arrays


def empty(layer) -> None:
    """Drop every array of ``layer``: whoever still holds the module holds no
    weights through it."""
    for key in [k for k, v in layer.items() if isinstance(v, mx.array)]:
        del layer[key]


def install_fused(switch_glu) -> FusedSwitchGLU:
    """The fused module to use in place of ``switch_glu`` (a mlx-lm SwitchGLU,
    quantized in any mode or dense, already sharded if it is to be).

    Raises :class:`FusionError`, leaving ``switch_glu`` untouched, when gate
    and up differ in mode, bits, group size, shape or dtype, when their nvfp4
    global scales differ, when the module is already fused, or when it is not
    a SwitchGLU.  On success ``switch_glu`` is emptied of gate_proj and
    up_proj (and those of their arrays), so the unfused arrays are freed.
    """
    check_fusable(switch_glu)
    up, gate = switch_glu.up_proj, switch_glu.gate_proj
    fused = FusedSwitchGLU(FusedGateUp(fused_arrays(up, gate), _format(up)),
                           switch_glu.down_proj, switch_glu.activation)
    for layer in (up, gate):
        empty(layer)
    del switch_glu["up_proj"], switch_glu["gate_proj"]
    return fused


class ContractError(TypeError):
    """An implementation under test returned what its contract rules out."""


INSTALLER_CONTRACT = ("an installer is called as installer(switch_glu) and returns the module to "
                      "use in place of the SwitchGLU (an nn.Module called as module(x, indices)),"
                      " or None when it changed switch_glu in place")


def apply_installer(installer, switch_glu):
    """The module to use after ``installer(switch_glu)``, by the installer
    contract: it returns the replacement, or None when it changed
    ``switch_glu`` in place (as exo's ``_install_fused_switch_glu`` does).
    Raises :class:`ContractError` for anything else it returns."""
    result = installer(switch_glu)
    if result is None:
        return switch_glu
    if not isinstance(result, nn.Module) or not callable(result):
        raise ContractError(f"the installer returned {type(result).__qualname__} "
                            f"{_short(result)}; the contract: {INSTALLER_CONTRACT}")
    return result


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fuse_block(block, installer=install_fused):
    """Fuse ``block.switch_mlp`` in place (after any sharding) and return the
    block.  ``installer`` follows the contract of :func:`apply_installer`."""
    block.switch_mlp = apply_installer(installer, block.switch_mlp)
    return block
