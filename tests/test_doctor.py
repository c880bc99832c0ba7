"""dsv4shard doctor: the map's cases, children with a timeout (a hang and a
crash are findings), matching against the table of known defects, reports."""

import argparse
import json
import sys
import textwrap

import pytest

from dsv4shard import attribution, backend, doctor

# The shape of MLX's CUDA quantized_matmul defect.
SMALL_T = attribution.OpCase("quantized_matmul", "float32", (3, 64), (64, 64), "affine", 8, 64)
# A child's limit: one case answers in seconds, kernel compilation included,
# with a GPU shared by a whole test run; SMALL_T may spend all of it on CUDA.
TIMEOUT = 45.0


def test_the_map_holds_the_cuda_small_t_defect_and_every_format():
    full = doctor.cases()
    assert SMALL_T in full and SMALL_T in doctor.cases(quick=True)
    ops = {(c.op, c.sorted_indices) for c in full}
    assert ops == {("quantize", False), ("dequantize", False), ("quantized_matmul", False),
                   ("gather_qmm", False), ("gather_qmm", True), ("gather_mm", False),
                   ("gather_mm", True), ("from_fp8", False), ("to_fp8", False)}
    formats = {c.fmt for c in full if c.fmt}
    assert len(formats) == 22 and {c.dtype for c in full} == set(doctor.DTYPES)
    assert {c.tokens for c in full if c.op == "quantized_matmul"} == set(doctor.TOKENS)
    assert len(full) == len(set(full))
    assert all(c.w_shape[-1] % c.group_size == 0 for c in full if c.fmt)
    # gather_mm both ways, x contiguous and x's size-1 axes a view; the CUDA
    # record explains the sorted view cases only.
    for cases in (full, doctor.cases(quick=True)):
        made = {(c.sorted_indices, c.x_axis_view) for c in cases if c.op == "gather_mm"}
        assert made == {(False, False), (True, False), (False, True), (True, True)}
        made = {(c.sorted_indices, c.x_axis_view) for c in cases if c.op == "gather_qmm"}
        assert made == {(False, False), (True, False), (True, True)}
    for c in doctor.cases(quick=True):
        record = backend.known(c, "cuda") if c.op == "gather_mm" else None
        assert (record is not None) == (c.op == "gather_mm" and c.sorted_indices and c.x_axis_view)


def test_children_run_cases_and_known_defects_are_named(tmp_path):
    """Real children on this backend: a float32 case is ok (on CUDA it is
    the known small-T defect), a float16 gather_mm is the CPU build's known
    limitation."""
    listed = [SMALL_T, doctor.gather_case("gather_mm", "float16", 2, 64, 64, False),
              attribution.OpCase("to_fp8", "bfloat16")]
    results = doctor.run_map(listed, jobs=2, timeout=TIMEOUT, device=backend.name())
    by_op = {r.case.op: r for r in results}
    small_t = by_op["quantized_matmul"]
    if backend.name() == "cuda":  # the defect itself, named by its record
        # wrong rows in some runs of an H200, no answer at all in others
        assert small_t.status in (doctor.DEPARTS, doctor.HANG), small_t
        assert small_t.known == "cuda-quantized-matmul-affine-group-64", small_t
    else:
        assert small_t.status == doctor.OK, small_t
    fp8 = by_op["to_fp8"]
    if backend.name() == "cpu":
        assert fp8.status == doctor.OK, fp8
        mm = by_op["gather_mm"]
        assert (mm.status, mm.backend, mm.known) == (doctor.RAISES, "cpu",
                                                     "cpu-gather-mm-float32-only"), mm
    else:  # a NaN input's code on CUDA (the probes hold one)
        assert (fp8.status, fp8.known) == (doctor.DEPARTS, "cuda-to-fp8-nan"), fp8
    report = doctor.report_json(results, doctor.identity(), 1.0,
                                {"jobs": 2, "timeout": TIMEOUT, "quick": True})
    json.dumps(report)
    new = [row["op"] for row in report["new_rows"]]
    assert new == [] and report["identity"]["mlx"]
    text = doctor.markdown(report)
    assert "## The map" in text
    assert ("None: every departure is a known record." in text) == (not new)


FAKE_CHILD = textwrap.dedent("""
    import json, os, re, sys, time
    listing, start = sys.argv[sys.argv.index("--child") + 1], int(sys.argv[-1])
    cases = json.load(open(listing))
    for i in range(start, len(cases)):
        print(json.dumps({"i": i, "start": True}), flush=True)
        if re.search(r"seed=1[,)]", cases[i]):
            time.sleep(60)
        if re.search(r"seed=2[,)]", cases[i]):
            os._exit(3)
        print(json.dumps({"i": i, "measure": {"device_departs": False, "cpu_departs": False}}),
              flush=True)
""")


def test_a_hang_and_a_crash_are_findings_and_the_rest_goes_on():
    batch = [attribution.OpCase("to_fp8", seed=i) for i in range(4)]
    results = doctor.run_batch(batch, timeout=1.0, device="cuda",
                               command=[sys.executable, "-c", FAKE_CHILD])
    assert [r.status for r in results] == [doctor.OK, doctor.HANG, doctor.CRASH, doctor.OK]
    assert "no answer within 1 s" in results[1].detail
    assert "exit status 3" in results[2].detail


def test_a_new_departure_is_a_row_to_add():
    new = doctor.Result(SMALL_T, doctor.DEPARTS, "cuda",
                        {"device_cpu": 1.0, "device_departs": True}, detail="relative error 1")
    other = doctor.Result(attribution.OpCase("quantized_matmul", "float32", (3, 64), (64, 64),
                                             "affine", 4, 32), doctor.DEPARTS, "cuda",
                          detail="relative error 0.5")
    doctor._match_known([new, other])
    assert new.known == "cuda-quantized-matmul-affine-group-64"  # already a record
    assert other.known is None
    (row,) = doctor.suggested_rows([new, other])
    assert (row["backend"], row["op"], row["format"], row["tokens"]) == (
        "cuda", "quantized_matmul", "affine 4-bit group 32", [3])
    assert "replay" in row["reproduce"]
    report = doctor.report_json([new, other], {"mlx": "0", "mlx_lm": "0", "backend": "cuda",
                                               "device": "gpu", "python": "3", "platform": "x",
                                               "cpus": 1}, 1.0, {"jobs": 1, "timeout": 1.0})
    text = doctor.markdown(report)
    assert "affine 4-bit group 32" in text and "Every case no record explains" in text


def test_the_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    out_json, out_md = tmp_path / "d.json", tmp_path / "d.md"
    args = parser.parse_args(["--quick", "--only", "from_fp8", "--jobs", "2", "--json",
                              str(out_json), "--markdown", str(out_md)])
    assert doctor.main(args) == 0
    report = json.loads(out_json.read_text())
    assert report["cases"] == 3 and report["summary"] == {"ok": 3}
    assert "dsv4shard doctor: MLX" in out_md.read_text()
    bad = parser.parse_args(["--json", str(tmp_path / "missing" / "x.json")])
    assert doctor.main(bad) == 2


@pytest.mark.parametrize("op", ["quantize", "dequantize", "gather_qmm"])
def test_a_departing_kernel_is_classified(op):
    case = next(c for c in doctor.cases(quick=True) if c.op == op and c.dtype == "float32")
    m = attribution.run_case(case).to_dict()
    assert doctor.classify(case, m, backend.name())[0] == doctor.OK, m
    m.update(device_departs=True, device_cpu=0.9)
    status, who, detail = doctor.classify(case, m, "cuda")
    assert (status, who) == (doctor.DEPARTS, "cuda") and "0.9" in detail
