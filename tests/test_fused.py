"""Fused gate+up (SPEC §3): the installer under test (``--fuse-impl``, default
ours) against the unfused block, the reference, the sharded block, on
DeepSeek-V4's configurations and (``*_extended``, which an installer may
decline) beyond them; and our installer's refusals."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from hypothesis import given, settings
from mlx_lm.models.switch_layers import SwitchMLP

from dsv4shard import backend
from dsv4shard.engine.records import project_properties
from dsv4shard.fuse import (
    FusedGateUp,
    FusedSwitchGLU,
    FusionError,
    fuse_block,
    install_fused,
)
from dsv4shard.testing import strategies as s
from dsv4shard.testing.data import make_weights
from dsv4shard.testing.properties import fused
from dsv4shard.weights import build_block
from reference.quantization import QuantFormat

AFFINE4 = QuantFormat("affine", 32, 4)
GLOBAL_SCALE = QuantFormat("nvfp4", 16, 4, global_scale=True)
NO_GLOBAL_SCALE = backend.unsupported(GLOBAL_SCALE, "bfloat16")

# Every fused property of the property table, each on its own strategy.
# The examples of the slowest (two blocks, or several ranks, per example)
# and of the dense and extended regions (every code path but the format is
# shared) are cut to keep the default run short; the thorough profile
# multiplies all of them alike.
FUSED = [r for r in project_properties() if r.keyword == "fuse_impl"]
CUT = ("sharded_fusion_matches", "fusion_keeps_bytes_and_round_trips")


def share(record) -> float | None:
    return 0.2 if record.name.endswith(("_extended", "_dense")) or record.name in CUT else None


# --- properties, against --fuse-impl -------------------------------------------


@pytest.mark.parametrize("record", FUSED, ids=[r.name for r in FUSED])
def test_fused_property(record, judge, fuse_impl):
    judge(record.fn, record.cases(), share=share(record), fuse_impl=fuse_impl)


# --- the installer contract: an in-place installer (exo's style) -------------


def install_in_place(switch_glu):
    """Fuses by rebinding the SwitchGLU's class, as exo's installer does, and
    returns None."""
    replacement = install_fused(switch_glu)
    dict.clear(switch_glu)
    dict.update(switch_glu, replacement)
    switch_glu.__class__ = FusedSwitchGLU


@settings(max_examples=5)
@given(case=s.fusion_cases())
def test_in_place_installer_contract(case):
    fused.fused_matches_unfused(case, install_in_place)
    fused.fusion_frees_unfused(case, install_in_place)


# --- our installer's refusals --------------------------------------------------


def small_case(quant=AFFINE4, dtype="float32", seed=0):
    return s.FusionCase(s.MoECase(
        config=s.MoEConfig(64, 64, 4, 2), quant=quant, dtype=dtype, n_tokens=4,
        pattern="router", activation_scale=1.0, seed=seed))


def small_block(quant=AFFINE4, dtype="float32", seed=0):
    return fused.build(small_case(quant, dtype, seed))


def snapshot(module):
    from mlx.utils import tree_flatten

    return {k: mx.array(v) for k, v in tree_flatten(module.parameters())}


def assert_untouched(module, before):
    from mlx.utils import tree_flatten

    after = dict(tree_flatten(module.parameters()))
    assert set(after) == set(before)
    for key, value in before.items():
        assert mx.array_equal(after[key], value).item(), key


def requantize(layer, weight, quant):
    """Replace ``layer``'s arrays by ``weight`` [E, O, I] quantized in ``quant``
    (None: dense)."""
    for key in [k for k, v in layer.items() if isinstance(v, mx.array)]:
        del layer[key]
    if quant is None:
        layer.weight = weight
        return
    q = mx.quantize(weight, quant.group_size, quant.bits, mode=quant.mode)
    layer.weight, layer.scales = q[0], q[1]
    if len(q) > 2:
        layer.biases = q[2]
    layer.mode, layer.bits, layer.group_size = quant.mode, quant.bits, quant.group_size


MISMATCHES = {
    "bits": (QuantFormat("affine", 32, 8), "differ in bits: 8 vs 4"),
    "group": (QuantFormat("affine", 64, 4), "differ in group size: 64 vs 32"),
    "mode": (QuantFormat("mxfp4", 32, 4), "differ in mode: 'mxfp4' vs 'affine'"),
    "dense": (None, "gate_proj is dense but up_proj is affine 4-bit group 32"),
}


@pytest.mark.parametrize("what", sorted(MISMATCHES))
def test_refuses_gate_and_up_of_different_formats(what):
    quant, message = MISMATCHES[what]
    block = small_block()
    gate = mx.random.normal((4, 64, 64), key=mx.random.key(1))
    requantize(block.switch_mlp.gate_proj, gate, quant)
    before = snapshot(block.switch_mlp)
    with pytest.raises(FusionError, match=message.replace("(", r"\(")):
        install_fused(block.switch_mlp)
    assert_untouched(block.switch_mlp, before)


def test_refuses_gate_and_up_of_different_shapes():
    block = small_block()
    requantize(block.switch_mlp.gate_proj, mx.random.normal((4, 32, 64), key=mx.random.key(2)),
               QuantFormat("affine", 32, 4))
    before = snapshot(block.switch_mlp)
    with pytest.raises(FusionError, match=r"gate_proj.weight has shape \(4, 32, 8\) but "
                                          r"up_proj.weight has shape \(4, 64, 8\)"):
        install_fused(block.switch_mlp)
    assert_untouched(block.switch_mlp, before)


def test_refuses_gate_and_up_of_different_dtypes():
    block = small_block()
    gate = block.switch_mlp.gate_proj
    gate.scales = gate.scales.astype(mx.bfloat16)
    with pytest.raises(FusionError, match="gate_proj.scales is mlx.core.bfloat16 but "
                                          "up_proj.scales is mlx.core.float32"):
        install_fused(block.switch_mlp)


def test_refuses_different_global_scales():
    # mlx-lm's own quantization gives gate and up each their own max |w|.
    case = small_case(GLOBAL_SCALE).moe
    block = build_block(case.config, make_weights(case), GLOBAL_SCALE, "float32")
    before = snapshot(block.switch_mlp)
    with pytest.raises(FusionError, match="different nvfp4 global scales for 4 of 4 experts"):
        install_fused(block.switch_mlp)
    assert_untouched(block.switch_mlp, before)


def test_fuses_equal_global_scales_and_keeps_one():
    block = small_block(GLOBAL_SCALE, seed=3)
    scale = mx.array(block.switch_mlp.up_proj.global_scale)
    fuse_block(block)
    kept = block.switch_mlp.gate_up_proj.global_scale
    assert kept.dtype == mx.float32 and mx.array_equal(kept, scale).item()


def test_refuses_already_fused():
    block = small_block()
    old = block.switch_mlp
    fuse_block(block)
    with pytest.raises(FusionError, match="already fused: this is a FusedSwitchGLU"):
        install_fused(block.switch_mlp)
    with pytest.raises(FusionError, match="already fused"):
        fuse_block(block)
    # The emptied original cannot be fused a second time either.
    with pytest.raises(FusionError, match="already fused .* has no gate_proj, up_proj"):
        install_fused(old)


@pytest.mark.parametrize("module", [
    nn.Linear(8, 8), SwitchMLP(32, 32, 2), None,
    FusedGateUp({"weight": mx.zeros((1, 2, 4))}, None),
], ids=["Linear", "SwitchMLP", "None", "FusedGateUp"])
def test_refuses_what_is_not_a_switch_glu(module):
    with pytest.raises(FusionError, match="not a SwitchGLU: got"):
        install_fused(module)


def test_refuses_a_whole_block():
    block = small_block()
    with pytest.raises(FusionError, match=r"not a SwitchGLU: got dsv4shard\.block\.MoEBlock"):
        install_fused(block)
