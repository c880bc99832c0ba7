"""The attribution of failures to MLX's kernels, tested on MLX's CPU build
with a deliberately wrong stand-in for one MLX operation
(``attribution.simulated_defect``): a property failing only because of it
reads BACKEND, naming the operation with a reproducer; a known-bad
implementation stays the implementation's failure with the defect present.
"""

import contextlib

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import strategies as st

import reference.quantization as q
from dsv4shard import attribution as a
from dsv4shard.engine import outcome as o
from dsv4shard.engine.records import Property, by_name
from dsv4shard.engine.run import run
from dsv4shard.testing.mutants import fusion as fusion_mutants
from dsv4shard.testing.mutants import quantization as quant_mutants
from dsv4shard.testing.mutants.router import build_no_renormalisation
from dsv4shard.testing.properties import fused as fused_props
from dsv4shard.testing.properties import quantization as qprops
from dsv4shard.testing.properties import unfused
from dsv4shard.testing.strategies import FusionCase, MoECase, QuantCase
from reference.moe_block import MoEConfig

# The simulated defects stand in for a GPU on MLX's CPU build; on a GPU the
# real attribution runs in every property (tests/test_unfused.py reports a
# real kernel defect as BACKEND there), and a real defect would mix with the
# simulated one.
pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.cpu,
    reason="simulated backend defects are for the CPU build; on a GPU the real ones show")

AFFINE8 = q.QuantFormat("affine", 64, 8)
# One expert, 3 tokens, affine 8-bit group 64, float32: the shared expert's
# QuantizedLinear runs quantized_matmul on x of 3 rows and a 64x64 weight,
# the shape of MLX's CUDA defect (issue 12).  A hash layer: no near-tie
# router scores to discard.
CASE = MoECase(MoEConfig(64, 64, 1, 1, hash_routing=True, vocab_size=97), AFFINE8, "float32",
               3, "hash", 1.0, seed=5)


def wrong_rows(out, params):
    """The CUDA defect's look: the first row right, the others not."""
    return mx.concatenate([out[..., :1, :], -3.0 * out[..., 1:, :]], axis=-2)


def three_rows(params):
    return params["x"].shape[-2] == 3


def test_on_the_cpu_nothing_is_rerun():
    calls = []

    def prop(case):
        calls.append(case)

    error = AssertionError("prop: wrong")
    assert a.device_under_test() is None
    assert a.attribute(prop, CASE, {}, error) is error
    assert calls == []


def test_a_failure_only_the_defect_causes_is_the_backends():
    unfused.moe_matches_reference(CASE)  # sound on the CPU
    with a.simulated_defect("quantized_matmul", wrong_rows, when=three_rows):
        with pytest.raises(o.BackendDefect) as caught:
            unfused.moe_matches_reference(CASE)
    message = str(caught.value)
    first = message.splitlines()[0]
    assert first.startswith("moe_matches_reference: backend defect, not the implementation's")
    for words in ("quantized_matmul", "affine 8-bit group 64", "float32", "x (3, 64)",
                  "simulated device", "passes on mx.cpu"):
        assert words in first, words
    assert "failure on simulated device: moe_matches_reference: " in message
    (line,) = [x for x in message.splitlines() if "op alone:" in x]
    assert "python -m dsv4shard.attribution replay \"OpCase(op='quantized_matmul'" in line
    assert "  reproduce: python -m dsv4shard.testing.repro" in message
    (finding,) = caught.value.findings
    assert finding.op == "quantized_matmul" and finding.measure.device_cpu > 0.5
    assert finding.case.x_shape == (3, 64) and finding.case.w_shape == (64, 64)


def test_the_reproducers_show_the_op_alone():
    with a.simulated_defect("quantized_matmul", wrong_rows, when=three_rows):
        with pytest.raises(o.BackendDefect) as caught:
            unfused.moe_matches_reference(CASE)
        finding = caught.value.findings[0]
        assert a.main(["replay", repr(finding.case)]) == 1
        assert a.main(["replay", finding.arrays]) == 1
    assert a.main(["replay", repr(finding.case)]) == 0  # the real CPU kernel agrees


def test_the_engine_reports_backend():
    record = by_name("moe_matches_reference", "build")
    with a.simulated_defect("quantized_matmul", wrong_rows, when=three_rows):
        verdict = run(record, examples=1, shrink=False, cases=st.just(CASE))
    assert verdict.status == o.BACKEND, verdict
    assert "quantized_matmul" in verdict.detail and not verdict.fatal


def test_fused_code_is_judged_on_the_same_backend_and_against_the_reference():
    """A wrong gather_qmm: the right installer's output departs from the
    reference, yet is the backend's; the [gate, up] installer is still
    caught as itself; fused against unfused (the same kernels) agrees."""
    case = FusionCase(MoECase(MoEConfig(64, 64, 4, 2), q.QuantFormat("affine", 64, 4),
                              "float32", 5, "router", 30.0, seed=1))
    behaviour = by_name("fused_concat_order_behaviour")
    with a.simulated_defect("gather_qmm", lambda out, p: -out):
        right = run(behaviour, examples=1, shrink=False, cases=st.just(case))
        swapped = run(behaviour, {"fuse_impl": fusion_mutants.gate_up_order}, examples=1,
                      shrink=False, cases=st.just(case))
        same_backend = run(by_name("fused_matches_unfused"), examples=1, shrink=False,
                           cases=st.just(case))
    assert right.status == o.BACKEND and "MLX's gather_qmm" in right.detail, right
    assert swapped.status == o.FAIL and "[gate, up]" in swapped.detail, swapped
    assert same_backend.status == o.PASS, same_backend


def test_a_departure_raised_outside_report_is_attributed_by_the_engine():
    """A variant-style property raising Departure itself (not through
    report.fail) is attributed by the runner."""
    def dequantized_matmul(case):
        x = mx.array(np.random.default_rng(case).standard_normal((3, 64)), mx.float32)
        w, s, b = mx.quantize(mx.array(np.eye(64, dtype=np.float32)), 64, 8)
        y = np.array(mx.quantized_matmul(x, w, s, b, True, 64, 8))
        if not np.allclose(y, np.array(x), atol=1e-2):
            raise o.Departure("dequantized_matmul: the identity changed x")

    record = Property("dequantized_matmul", dequantized_matmul, lambda: st.just(1), "", "int",
                      "a test's property")
    assert run(record, examples=1).status == o.PASS
    with a.simulated_defect("quantized_matmul", wrong_rows, when=three_rows):
        verdict = run(record, examples=1, shrink=False)
    assert verdict.status == o.BACKEND and "quantized_matmul" in verdict.detail, verdict


def test_a_known_bad_implementation_stays_the_implementations():
    with a.simulated_defect("quantized_matmul", wrong_rows, when=three_rows):
        with pytest.raises(AssertionError) as caught:
            unfused.moe_matches_reference(CASE, build=build_no_renormalisation)
        assert not isinstance(caught.value, o.BackendDefect)
        notes = " ".join(getattr(caught.value, "__notes__", []))
        assert "fails on mx.cpu as well" in notes and "quantized_matmul" in notes, notes
        verdict = run(by_name("moe_matches_reference", "build"),
                      {"build": build_no_renormalisation}, examples=1, shrink=False,
                      cases=st.just(CASE))
    assert verdict.status == o.FAIL, verdict


def test_a_device_only_path_stays_the_implementations():
    """Passing on mx.cpu clears nothing when the code calls other MLX
    operations on the device."""
    def gated(case):
        if a.device_under_test() is not None:
            mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2)))
            raise AssertionError("gated: wrong on the device's own path")

    with a.simulated_defect("gather_mm", lambda out, p: out):
        result = a.attribute(gated, 0, {}, AssertionError("gated: wrong"))
    assert not isinstance(result, o.BackendDefect)
    assert "device-dependent path" in " ".join(result.__notes__)


def test_the_recorder_sees_calls_and_operators_and_restores_them():
    before = (mx.quantized_matmul, mx.array.__matmul__)
    w, s, b = mx.quantize(mx.ones((64, 64)), 64, 4)
    with a.Recorder() as recorder:
        mx.quantized_matmul(mx.ones((2, 64)), w, s, b, True, 64, 4)
        mx.ones((2, 3)) @ mx.ones((3, 4))
        mx.matmul(mx.ones((2, 3)), mx.ones((3, 4)), stream=mx.cpu)  # explicit mx.cpu: not noted
    assert [c.op for c in recorder.calls] == ["quantized_matmul", "matmul"]
    assert (mx.quantized_matmul, mx.array.__matmul__) == before
    assert a.check_call(recorder.calls[0]) is None  # no device: nothing departs


@pytest.mark.parametrize("case", [
    a.OpCase("quantized_matmul", "bfloat16", (5, 64), (32, 64), "affine", 4, 32),
    a.OpCase("gather_qmm", "float32", (3, 1, 1, 64), (4, 32, 64), "mxfp4", 4, 32,
             indices_shape=(3, 2)),
    a.OpCase("gather_qmm", "float16", (6, 1, 64), (4, 32, 64), "nvfp4", 4, 16,
             indices_shape=(6,), sorted_indices=True),
    a.OpCase("gather_mm", "float32", (6, 1, 64), (4, 64, 32), indices_shape=(6,),
             sorted_indices=True),
    a.OpCase("dequantize", "bfloat16", (), (8, 64), "affine", 3, 64),
    a.OpCase("dequantize", "float16", (), (8, 64), "nvfp4", 4, 16, global_scale=True),
    a.OpCase("quantize", "float32", (), (8, 64), "mxfp8", 8, 32),
    a.OpCase("quantize", "bfloat16", (), (8, 64), "affine", 8, 64),
    a.OpCase("from_fp8", "float16"), a.OpCase("to_fp8", "float32"),
], ids=lambda c: c.label.replace(" ", "-"))
def test_mx_cpu_agrees_with_the_numpy_reference_of_each_op(case):
    m = a.run_case(case)
    assert not m.cpu_departs, m
    assert a.parse_case(repr(case)) == case


def test_a_wrong_quantize_or_dequantize_is_named():
    case = a.OpCase("quantize", "float32", (), (8, 64), "affine", 4, 32)
    with a.simulated_defect("quantize", lambda out, p: (out[0], out[1] * 2, out[2])):
        m = a.run_case(case)
    assert m.device_departs and not m.cpu_departs, m


def test_row_error_and_ulps():
    assert a.row_error(np.array([[1.0, np.nan]]), np.array([[1.0, np.nan]]), 1.0)[0] == 0
    assert a.row_error(np.array([[1.0, np.inf]]), np.array([[1.0, 2.0]]), 1.0)[0] == np.inf
    err, row, rows = a.row_error(np.array([[1.0, 2.0], [3.0, 5.0]]),
                                 np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[2.0], [4.0]]))
    assert (err, row, rows) == (0.25, 1, 2)
    one = np.float32(1.0)
    assert a.ulps(np.nextafter(one, np.float32(2)), one, "float32") == 1
    assert a.ulps(np.float64(-0.0), np.float64(0.0), "float32") == 0
    assert a.ulps(np.float64(1 + 2**-7), np.float64(1.0), "bfloat16") == 1
    assert a.ulps(np.float64(1 + 2**-10), np.float64(1.0), "float16") == 1


def test_the_fused_multiply_add_mode_rounds_once():
    """The reference's FMA mode: exact a*b + c rounded once, ties included;
    it departs from MLX's CPU arithmetic exactly where the mutant does."""
    one, tiny = np.float32(1.0), np.float32(2.0**-24)
    assert q.fused_multiply_add(one, tiny, one) == one  # a tie: to even
    a_, b_ = np.float32(3.0), np.nextafter(np.float32(2.0**-24 / 3), np.float32(1))
    assert q.fused_multiply_add(a_, b_, one) == np.nextafter(one, np.float32(2))
    # 131 * b + 1024 is just above the tie 1024 + 2**-14, and its float64 sum
    # one ulp above that: it rounds up, to 1024 + 2**-13.
    b_ = np.array([888808237], np.uint32).view(np.float32)[0]
    assert q.fused_multiply_add(np.float32(131), b_, np.float32(1024)) == 1024 + 2.0**-13
    case = QuantCase(AFFINE8, (4, 64), 37.0, "float32", seed=3)
    quantized = qprops.mlx_quantize(AFFINE8, qprops.make_matrix(case))
    fused = q.dequantize(*quantized[:3], AFFINE8, fma=True)
    mutant = quant_mutants.dequantize_fused_multiply_add(*quantized[:3], AFFINE8)
    assert np.array_equal(fused, mutant)
    assert not np.array_equal(fused, q.dequantize(*quantized[:3], AFFINE8))


def fused_device(out, params):
    """A device whose mx.dequantize fuses multiply and add (as CUDA does)."""
    if (params.get("mode") or "affine") != "affine":
        return out
    fmt = q.QuantFormat("affine", params["group_size"], params["bits"])
    scales_dtype = a.dtype_name(params["scales"].dtype)
    value = q.dequantize(np.array(params["w"]), a.to_numpy(params["scales"]),
                         a.to_numpy(params["biases"]), fmt,
                         dtype=a.dtype_name(out.dtype), scales_dtype=scales_dtype, fma=True)
    return mx.array(value.astype(np.float32)).astype(out.dtype)


def test_an_fma_device_is_matched_and_the_fma_mutant_still_caught():
    case = QuantCase(AFFINE8, (4, 64), 37.0, "bfloat16", seed=3)
    with a.simulated_defect("dequantize", fused_device):
        found = qprops.backend_arithmetic("fma device")
        assert found[("affine", "bfloat16")] == qprops.Arithmetic(True, 0.0)
        assert found[("mxfp4-g32-b4", "float32")] == qprops.Arithmetic(False, 0.0)
        qprops.dequantize_matches_mlx(case)
        with pytest.raises(AssertionError) as caught:
            qprops.dequantize_matches_mlx(
                case, dequantize=quant_mutants.dequantize_fused_multiply_add)
        assert not isinstance(caught.value, o.BackendDefect)


def test_a_device_dequantize_defect_is_the_backends():
    case = QuantCase(AFFINE8, (5, 64), 1.0, "float32", seed=4)  # 5 rows: no probe has them
    with a.simulated_defect("dequantize", lambda out, p: out * (1 + 2.0**-10),
                            when=lambda p: p["w"].shape[0] == 5):
        with pytest.raises(o.BackendDefect) as caught:
            qprops.dequantize_matches_mlx(case)
    first = str(caught.value).splitlines()[0]
    assert "MLX's dequantize on simulated device" in first and "ulps" in first
    assert "replay \"OpCase(op='dequantize'" in str(caught.value)


def test_a_device_quantize_defect_is_the_backends():
    case = QuantCase(q.QuantFormat("affine", 32, 4), (3, 64), 1.0, "float32", seed=6)
    with a.simulated_defect("quantize", lambda out, p: (out[0], out[1] * 2, out[2])):
        with pytest.raises(o.BackendDefect) as caught:
            qprops.quantize_matches_mlx(case)
    assert "MLX's quantize on simulated device" in str(caught.value).splitlines()[0]


def test_e4m3_nan_codes_match_any_nan():
    got = np.array([0x7F, 0xFF, 0x7E, 0x01], np.uint8)
    want = np.array([0xFF, 0x7F, 0x7E, 0x02], np.uint8)
    assert qprops.same_e4m3_codes(got, want).tolist() == [True, True, True, False]


def wrong_once():
    """A kernel that answers wrong on its first call only (a race's look):
    every rerun, on the device or on mx.cpu, passes."""
    calls = iter(range(1 << 20))
    return lambda out, params: -3.0 * out if next(calls) == 0 else out


def test_a_kernel_wrong_once_is_named_from_the_failing_run_itself():
    """The failing run's own MLX calls are kept (unevaluated, as it made
    them): the departure is MLX's although no rerun shows it.  Without that
    record the same failure would be 'not reproducible', never BACKEND."""
    with a.simulated_defect("quantized_matmul", wrong_once(), when=three_rows):
        with a.flight_recording():
            with pytest.raises(o.BackendDefect) as caught:
                unfused.moe_matches_reference(CASE)
    text = str(caught.value)
    assert "MLX's quantized_matmul" in text and "in the failing run (rerun on " in text, text
    assert "the property passes on mx.cpu on the same case" in text, text
    with a.simulated_defect("quantized_matmul", wrong_once(), when=three_rows):
        with pytest.raises(AssertionError) as unrecorded:
            unfused.moe_matches_reference(CASE)
    assert not isinstance(unrecorded.value, o.BackendDefect), unrecorded.value
    assert "not reproducible" in "\n".join(getattr(unrecorded.value, "__notes__", []))


def test_an_implementation_wrong_once_stays_the_implementations():
    """The twin: a block built wrong the first time only, every MLX call
    right: the failing run's record names nothing, so it is not MLX's."""
    builds = iter(range(1 << 20))

    def wrong_first_build(*args, **kwargs):
        block = unfused.build_block(*args, **kwargs)
        if next(builds) == 0:  # the routed experts' weights scaled twice over
            block.gate.route_scale = 2.0 * block.gate.route_scale
        return block

    with a.simulated_defect("quantized_matmul", lambda out, p: out):
        with a.flight_recording():
            with pytest.raises(AssertionError) as caught:
                unfused.moe_matches_reference(CASE, build=wrong_first_build)
    assert not isinstance(caught.value, o.BackendDefect), caught.value
    assert "not reproducible" in "\n".join(getattr(caught.value, "__notes__", []))


def test_the_record_keeps_no_array_the_freed_weights_property_counts():
    """On a device the record runs in every test; were it to keep the arrays
    a build or install makes, the unfused gate/up would look kept alive by
    the implementation (here, with the record kept inside too: a false
    alarm, and one read as the backend's)."""
    case = FusionCase(MoECase(MoEConfig(64, 64, 4, 2), q.QuantFormat("affine", 64, 4),
                              "float32", 5, "router", 1.0, seed=1))
    with a.simulated_defect("quantize", lambda out, p: out):
        with a.flight_recording():
            fused_props.fusion_frees_unfused(case)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(fused_props, "unrecorded", contextlib.nullcontext)
                with pytest.raises(AssertionError, match="fusion_frees_unfused"):
                    fused_props.fusion_frees_unfused(case)


@pytest.mark.slow
def test_the_record_changes_no_verdict_of_the_projects_own_code():
    """Every property on one process's records (real ranks aside), run as on
    a device, its calls kept by the record: the same verdicts as without."""
    from dsv4shard.engine.records import table

    for record in [r for r in table() if not r.ranks]:
        plain = run(record, examples=2)
        with a.simulated_defect("quantized_matmul", lambda out, p: out):
            with a.flight_recording():
                kept = run(record, examples=2)
        assert kept.status == plain.status, (record.name, plain.detail, kept.detail)


def test_a_calls_layout_is_kept_in_its_case_and_named_in_its_finding():
    """MLX's CUDA sorted gather_mm reads x by the stride of its size-1 axis
    (x[:, None, :], expand_dims): a recorded call's OpCase keeps that, and
    its description names strides that are not row-major."""
    rows = mx.array(np.arange(16 * 64, dtype=np.float32).reshape(16, 64))
    w = mx.swapaxes(mx.ones((4, 72, 64)), -1, -2)  # as SwitchLinear passes it
    idx = mx.zeros((16,), mx.uint32)
    for x, view in ((mx.expand_dims(rows, 1), True), (rows.reshape(16, 1, 64), False),
                    (mx.array(np.ones((16, 64), np.float32)[:, None, :]), True)):
        params = {"a": x, "b": w, "rhs_indices": idx, "sorted_indices": True}
        case = a.case_of("gather_mm", params)
        assert case.x_axis_view is view, (case, a.strides(x))
        assert ("strides" in a.layout_note(x)) is view
        assert a.make_params(case)["a"].shape == x.shape
        assert a.axis_view(a.make_params(case)["a"]) is view
    assert a.layout_note(w) == " strides (4608, 1, 64)"
    assert a.layout_note(mx.ones((3, 4))) == ""
