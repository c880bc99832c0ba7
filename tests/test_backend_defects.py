"""What the running backend cannot compute, or computes wrong, shown rather
than assumed.

Every record of ``dsv4shard.backend.DEFECTS`` is probed here as a strict
xfail: its probe cases (``dsv4shard.attribution.OpCase``) must depart (raise,
or answer wrong against mx.cpu / the NumPy reference).  The day MLX fixes
one, its test reports XPASS as a failure and the record goes.  Records of
MLX's CPU kernels are probed on every build (``mx.cpu`` is in each); those
of a GPU build on that GPU only, each probe in a child process with a
timeout (a hang counts as the defect showing).  ``dsv4shard doctor`` says
which records to add.
"""

import pytest
from hypothesis import Phase, given, settings

from dsv4shard import attribution, backend, doctor
from dsv4shard.engine.outcome import BackendDefect
from dsv4shard.testing import strategies as s
from dsv4shard.testing.properties import unfused
from reference.quantization import QuantFormat

PROBE_TIMEOUT = 45.0  # as tests/test_doctor.py's: one case, compilation included


def departing(row: backend.Defect) -> list[str]:
    """The probe cases of ``row`` that show it."""
    cases = [attribution.OpCase(**fields) for fields in row.probe]
    if row.backend == "cpu":
        return [f"{c.label} ({c.shapes()})" for c in cases
                if attribution.run_case(c).cpu_departs]
    # One probe that shows it is enough for the xfail, and a probe that hangs
    # costs the whole timeout: stop at the first (all run once MLX is fixed).
    for case in cases:
        r = doctor.run_batch([case], PROBE_TIMEOUT, row.backend)[0]
        if r.status != doctor.OK and r.backend == row.backend:
            return [f"{r.case.label} ({r.case.shapes()}): {r.status} {r.detail}"]
    return []


@pytest.mark.parametrize("row", [
    pytest.param(d, id=d.key, marks=pytest.mark.xfail(strict=True, reason=d.because("float16")))
    for d in backend.DEFECTS])
def test_defect_still_shows(row):
    if row.backend != "cpu" and backend.name() != row.backend:
        pytest.skip(f"a defect of MLX's {row.backend} build")
    shown = departing(row)
    assert not shown, f"{row.key}: {row.because('float16')}; its probes depart: {shown}"


def test_every_record_is_complete_and_explains_its_own_probes():
    keys = [d.key for d in backend.DEFECTS]
    assert len(set(keys)) == len(keys)
    for d in backend.DEFECTS:
        assert d.backend in ("cpu", "cuda") and d.ops and d.reason and d.probe, d.key
        for fields in d.probe:
            case = attribution.OpCase(**fields)
            assert case.op in d.ops, (d.key, case)
            assert backend.known(case, d.backend) is d, (d.key, case)


@pytest.mark.skipif(backend.name() != "cpu", reason="the CPU build's exclusions")
def test_exclusions_come_from_the_table():
    assert backend.unsupported(None, "float16") == \
        "MLX's CPU gather_mm runs only in float32, not float16"
    assert backend.unsupported(None, "float32") is None
    assert backend.unsupported(MXFP8, "float16") == backend.by_key("cpu-mxfp8-float16-inf").reason
    assert backend.unsupported(s.NVFP4_GLOBAL_SCALE, "bfloat16") == \
        backend.by_key("cpu-gather-qmm-global-scale").reason
    assert backend.unsupported(MXFP4, "float16") is None  # guarded, not left out
    assert backend.float16_code_overflow(MXFP4, "float16") == \
        backend.by_key("cpu-float16-code-overflow").reason
    assert backend.float16_code_overflow(MXFP4, "bfloat16") is None


# The same CPU defects, shown through the properties they would break (a
# failure is all a strict xfail needs: no shrinking).

SHOW = dict(max_examples=50, phases=[Phase.explicit, Phase.generate])

MXFP8 = QuantFormat("mxfp8", 32, 8)
AFFINE_4_G64 = QuantFormat("affine", 64, 4)


@pytest.mark.skipif(backend.name() != "cpu", reason="a defect of MLX's CPU build")
@pytest.mark.xfail(strict=True, reason=backend.by_key("cpu-mxfp8-float16-inf").reason)
@settings(**SHOW)
@given(case=s.moe_cases(formats=[MXFP8]).map(
    lambda c: c.__class__(**{**c.__dict__, "dtype": "float16", "activation_scale": 30.0})))
def test_cpu_mxfp8_float16_overflows(case):
    unfused.switch_glu_matches_reference(case)


MXFP4 = QuantFormat("mxfp4", 32, 4)


@pytest.mark.skipif(backend.name() != "cpu", reason="a defect of MLX's CPU build")
@pytest.mark.xfail(strict=True, reason=backend.by_key("cpu-float16-code-overflow").reason)
@settings(**SHOW)
@given(case=s.moe_cases(formats=[MXFP4]).map(lambda c: c.__class__(**{
    **c.__dict__, "dtype": "float16", "activation_scale": 30.0,
    "config": c.config.__class__(**{**c.config.__dict__, "swiglu_limit": 0.0})})))
def test_cpu_float_formats_float16_overflow_unclipped(case):
    unfused.switch_glu_matches_reference(case)


AFFINE_G128 = QuantFormat("affine", 128, 4)


@pytest.mark.skipif(backend.name() != "cuda", reason="a defect of MLX's CUDA build")
@pytest.mark.xfail(raises=BackendDefect, reason=backend.by_key("cuda-affine-group-128").reason)
# No shrinking (every shape compiles); one failure, not a group of them, so
# that raises= sees the BackendDefect itself.
@settings(max_examples=4, phases=SHOW["phases"], report_multiple_bugs=False)
@given(case=s.moe_cases(formats=[AFFINE_G128]))
def test_cuda_affine_group_128(case):
    """Through the block, the defect is MLX's, never the block's: any other
    failure fails the test (not strict: the op-level probe above is)."""
    unfused.moe_matches_reference(case)


def test_a_contraction_defect_leaves_that_size_out_and_keeps_the_format(monkeypatch):
    """The CUDA build's affine group-64 record cuts K = 64 only: drawn cases
    in that format keep it at 128 (shown here with the backend named CUDA)."""
    from hypothesis import HealthCheck

    monkeypatch.setattr(backend, "name", lambda: "cuda")
    g64 = QuantFormat("affine", 64, 4)
    assert backend.cuts_contraction(g64, 64) and not backend.cuts_contraction(g64, 128)
    assert backend.unsupported(g64, "bfloat16") is None
    sizes = set()

    @settings(max_examples=40, database=None, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=s.moe_cases(formats=[g64]))
    def draws(case):
        sizes.update({case.config.hidden_size, case.config.intermediate_size})

    draws()
    assert sizes == {128}


def test_a_sorting_defect_keeps_those_experts_on_the_unsorted_path(monkeypatch):
    """The CUDA build's sorted gather_mm record: dense cases stay below the
    sort threshold there, quantized ones still cross it; on any other
    backend dense cases cross it too (shown with the backend named each)."""
    from hypothesis import HealthCheck

    def sorted_paths(quantized):
        seen = set()

        @settings(max_examples=60, database=None, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=s.moe_cases(quantized=quantized))
        def draws(case):
            seen.add(case.n_tokens * case.config.top_k >= s.SORT_THRESHOLD)

        draws()
        return seen

    for name in ("cuda", "cpu"):
        monkeypatch.setattr(backend, "name", lambda name=name: name)
        assert bool(backend.cuts_sorting(None)) == (name == "cuda"), name
        assert not backend.cuts_sorting(QuantFormat("mxfp4", 32, 4)), name
        assert sorted_paths(False) == ({False} if name == "cuda" else {False, True}), name
        assert True in sorted_paths(True), name


@pytest.mark.filterwarnings("ignore:Using `assume` outside a property-based test")
def test_a_propertys_own_probe_tokens_stay_unsorted_where_sorting_is_cut(monkeypatch):
    """moe_matches_reference_at_extremes puts two probe tokens before the
    drawn ones: on the H200 this case (1 token, k = 22: 66 rows) went through
    the sorted gather_mm its record says is wrong, and failed as a backend
    defect.  Where the record holds, every gather_mm call stays unsorted."""
    import mlx.core as mx

    from reference import MoEConfig, Revision

    config = MoEConfig(32, 32, 22, 22, 10.0, 1.0, "sqrtsoftplus",
                       revision=Revision.FIRST_RELEASE)
    case = s.MoECase(config, None, "float32", 1, "router", 1.0, 0, linear_bias=True)
    real, seen = mx.gather_mm, []

    def spy(*args, sorted_indices=False, **kwargs):
        seen.append(sorted_indices)
        return real(*args, sorted_indices=sorted_indices, **kwargs)

    monkeypatch.setattr(mx, "gather_mm", spy)
    for name in ("cuda", "cpu"):
        monkeypatch.setattr(backend, "name", lambda name=name: name)
        seen.clear()
        with attribution.on_cpu():  # the paths taken, not a GPU's values, are the point
            unfused.moe_matches_reference_at_extremes(case)
        assert seen and any(seen) == (name == "cpu"), (name, seen)


@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_no_rank_multiplies_over_a_contraction_the_backend_gets_wrong(monkeypatch, uneven):
    """A rank's share of the intermediate size is the contraction of its
    shared expert's down projection: on the H200 a share of 64 (affine,
    group 64) hung MLX's quantized_matmul inside sharded_matches_unsharded.
    Where the record holds no share is 64; elsewhere such shares are drawn."""
    from hypothesis import HealthCheck

    def shares_drawn():
        seen = set()

        @settings(max_examples=80, database=None, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=s.shard_cases(formats=[AFFINE_4_G64], uneven=uneven))
        def draws(case):
            inter = case.moe.config.intermediate_size
            seen.update(round(inter * share) for share in case.shares)

        draws()
        return seen

    for name in ("cuda", "cpu"):
        monkeypatch.setattr(backend, "name", lambda name=name: name)
        assert (64 in shares_drawn()) == (name == "cpu"), name


def test_whole_model_comparisons_leave_a_tf32_device_for_the_cpu(monkeypatch):
    for name, device in (("cuda", "cpu"), ("metal", "default"), ("cpu", "default")):
        monkeypatch.setattr(backend, "name", lambda name=name: name)
        assert backend.model_device() == device, name
