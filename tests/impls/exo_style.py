"""A fused installer in the style of exo pull request #1999's
``_install_fused_switch_glu``, with the faults the suite found in it:

- the SwitchGLU's class is rebound in place (``__class__``) and the
  installer returns None;
- its module sorts tokens by expert once ``indices.size >= 8`` and scatters
  them back to ``indices.shape[:-1]``, dropping the k axis: a wrong shape
  (k = 1) or an ``[Unflatten]`` error (k > 1) whenever it sorts;
- the fused arrays are kept as underscore attributes, hidden from
  ``parameters()`` (so ``nbytes``, ``save_weights`` and ``load_weights``
  miss them), gate_proj and up_proj replaced by empty modules;
- dense experts and linear biases are refused by assertions, not declined.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU


class _FusedSwitchGLU(SwitchGLU):
    sort_threshold = 8

    def __call__(self, x, indices):
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= self.sort_threshold
        idx, inv = indices, None
        if do_sort:
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            x = x.flatten(0, -3)[order // indices.shape[-1]]
            idx = flat[order]
        bits, group, mode = self._fused_format
        y = mx.gather_qmm(x, self._gate_up_weight, self._gate_up_scales,
                          self._gate_up_biases, rhs_indices=idx, transpose=True,
                          group_size=group, bits=bits, mode=mode, sorted_indices=do_sort)
        n = y.shape[-1] // 2
        y = self.down_proj(self.activation(y[..., :n], y[..., n:]), idx,
                           sorted_indices=do_sort)
        if do_sort:
            y = mx.unflatten(y[inv], 0, indices.shape[:-1])
        return y.squeeze(-2)


def install_fused_switch_glu(switch_glu):
    gate, up = switch_glu.gate_proj, switch_glu.up_proj
    gate_bits, up_bits = getattr(gate, "bits", None), getattr(up, "bits", None)
    assert gate_bits is not None and gate_bits == up_bits, (
        f"gate/up bits mismatch: {gate_bits} vs {up_bits}")
    assert "bias" not in gate and "bias" not in up, "gate/up linear bias mismatch"
    weight = mx.concatenate([up.weight, gate.weight], axis=1)
    scales = mx.concatenate([up.scales, gate.scales], axis=1)
    biases = (mx.concatenate([up.biases, gate.biases], axis=1)
              if up.get("biases") is not None else None)
    mx.eval(weight, scales, *([biases] if biases is not None else []))
    switch_glu._gate_up_weight = weight
    switch_glu._gate_up_scales = scales
    switch_glu._gate_up_biases = biases
    switch_glu._fused_format = (up.bits, up.group_size, up.mode)
    switch_glu.gate_proj = nn.Module()
    switch_glu.up_proj = nn.Module()
    switch_glu.__class__ = _FusedSwitchGLU
