"""Validating DeepSeek-V4 variants: the adapter on synthetic layouts, every
variant property against a variant with its departure, the released
mlx_lm.models.deepseek_v41 reported truthfully, isolation, the CLI and the
plugin."""

import json
from pathlib import Path

import mlx.core as mx
import pytest

from dsv4shard.cli import main
from dsv4shard.engine import outcome as o
from dsv4shard.engine.records import by_name as record
from dsv4shard.engine.records import variant_properties
from dsv4shard.engine.run import run
from dsv4shard.variants import (
    OWN,
    Variant,
    VariantLoadError,
    check_isolated,
    check_variant,
    installed_variants,
    markdown,
)
from dsv4shard.variants.adapter import split_route, takes_ids

pytest_plugins = ["pytester"]

HERE = Path(__file__).parent / "variants"
KNOBS = str(HERE / "knobs.py")
BROKEN = str(HERE / "broken_import.py")
NAMES = [r.name for r in variant_properties()]
REQUIRED = [r.name for r in variant_properties() if r.required]


def statuses(report):
    return report.by_check()


def failed_required(report):
    return sorted(v.prop for v in report.failed)


def run_check(variant, name, examples=4):
    return run(record(name, "variant"), {"variant": variant}, examples=examples)


# --- the released model, truthfully ------------------------------------------------


@pytest.mark.distributed
def test_deepseek_v41_is_reported_as_it_is():
    report = check_variant("mlx_lm.models.deepseek_v41")
    r = statuses(report)
    assert report.ok, markdown(report)
    assert not any(x.detail.startswith("raised") for x in report.verdicts
                   if x.prop != "limit_none"), markdown(report)
    assert r["hash_routing"].status == o.SKIP and "no hash routing" in r["hash_routing"].detail
    assert report.properties["hash_routing"] is False
    assert r["spec_revision"].status == o.PASS and "shared-clipped" in r["spec_revision"].detail
    assert report.properties["revision"] == "shared-clipped"
    soft, k1 = r["softmax_not_renormalised"], r["k1_renormalised"]
    assert (soft.status, soft.required) == (o.DEPARTS, False) and "renormalised to sum" in soft.detail
    assert (k1.status, k1.required) == (o.DEPARTS, False) and "not renormalised" in k1.detail
    assert report.properties["softmax_renormalised"] is True
    assert report.properties["k1_renormalised"] is False
    assert 0 < report.properties["epsilon"] < 1e-18
    assert "mlp.experts.switch_mlp" in r["structure"].detail and "(x)" in r["structure"].detail
    for name in REQUIRED:
        assert r[name].status in o.PASSING + (o.SKIP,) if name == "hash_routing" else \
            r[name].status in o.PASSING, (name, r[name].detail)
    whole = r["sharded_model"].detail
    assert "every rank of 2" in whole and "every rank of 4" in whole, whole
    assert report.identity["sha256"] and report.identity["file"].endswith("deepseek_v41.py")
    assert "metal" in " ".join(report.identity["device_gates"])


def test_installed_variants_include_deepseek_v41():
    assert "mlx_lm.models.deepseek_v41" in installed_variants()


# --- synthetic layouts, each with a departure the report must name -------------------

LAYOUTS = {
    "ffn_switch_mlp.py": dict(
        routed="ffn.switch_mlp", order="(indices, weights)", call="(x, input_ids)",
        departure=None, diagnosis="rounded to bfloat16 before the shared expert",
        departs="combine_precision", revision="first-release", hash_routing=True),
    "experts_attr.py": dict(
        routed="moe.experts", order="(weights, indices)", call="(x)",
        departure=["softplus_overflow"], diagnosis="non-finite weights",
        revision="shared-clipped", hash_routing=False),
    "mlp_experts_switch_mlp.py": dict(
        routed="mlp.experts.switch_mlp", order="(indices, weights)", call="(x, input_ids=…)",
        departure=["sharded_model", "sharded_moe_2_ranks"], diagnosis="no all_sum",
        revision="shared-clipped",
        hash_routing=True),
}


@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_adapter_drives_each_layout_and_names_its_departure(name):
    want = LAYOUTS[name]
    report = check_variant(str(HERE / name))
    r = statuses(report)
    text = markdown(report)
    assert r["structure"].status == o.PASS, text
    layout = r["structure"].detail
    assert f"routed experts {want['routed']} " in layout, layout
    assert f"returns {want['order']}" in layout and f"called as {want['call']}" in layout, layout
    named = (want["departure"] or [want["departs"]])[-1]
    assert want["diagnosis"] in r[named].detail, text
    assert report.properties["revision"] == want["revision"]
    assert report.properties["hash_routing"] is want["hash_routing"]
    if want["departure"]:
        assert failed_required(report) == want["departure"], text
        assert not report.ok and "FAILS" in text
    else:  # one extra bfloat16 rounding: reported with its size, never fatal
        assert r[named].status == o.DEPARTS and "bfloat16 ulps" in r[named].detail, text
        assert report.ok, text


def test_forced_quantization_is_compared_on_round_tripped_weights():
    variant = Variant(str(HERE / "experts_attr.py"))
    built = variant.build()
    assert built.forced_quant is not None and built.forced_quant.mode == "mxfp4"
    result = run_check(variant, "moe_matches_reference")
    assert result.status in o.PASSING, result.detail
    assert "mxfp4 experts, as the variant forces" in result.detail


def test_a_file_whose_import_fails_names_the_missing_module():
    with pytest.raises(VariantLoadError, match=r"mlx_lm\.models\.deepseek_v4_kernels"):
        Variant(BROKEN)
    report = check_variant(BROKEN)
    assert not report.ok and not report.verdicts
    assert "deepseek_v4_kernels" in report.error
    assert "cannot be loaded" in markdown(report)


def test_unknown_module_name_is_a_clear_error():
    with pytest.raises(VariantLoadError, match="no module named 'no_such_port'"):
        Variant("no_such_port.models.deepseek_v4")


# --- every check can fail ----------------------------------------------------------------


def knobbed(*departures):
    variant = Variant(KNOBS, fresh=True)
    variant.module.DEPARTURES.update(departures)
    return variant


def knob_names():
    variant = Variant(KNOBS, fresh=True)
    return variant.module.KNOWN


KNOWN = knob_names()


# Properties shown to fail on a synthetic port of their own, not a knob.
ELSEWHERE = {"sharded_moe_2_ranks": "mlp_experts_switch_mlp.py",
             "sharded_model": "sinks_unsliced.py and sinks_rank0.py (tests/test_sharded_model.py)"}


def test_each_check_is_shown_to_fail_somewhere():
    covered = set(KNOWN.values()) | set(ELSEWHERE)
    assert covered == set(NAMES)


@pytest.mark.parametrize("departure", sorted(KNOWN))
def test_check_fails_on_its_departure(departure):
    name = KNOWN[departure]
    result = run_check(knobbed(departure), name)
    want = o.FAIL if record(name, "variant").required else o.DEPARTS
    assert result.status == want, (departure, result)
    assert result.detail and result.reproduce


@pytest.mark.distributed
def test_conforming_variant_passes_every_check():
    report = check_variant(KNOBS)
    assert all(v.status in o.PASSING for v in report.verdicts), markdown(report)
    assert report.ok


def test_route_scale_applied_by_the_block_is_followed():
    variant = knobbed("scale_applied_by_block")
    results = {n: run_check(variant, n, examples=2) for n in NAMES
               if not record(n, "variant").ranks}
    assert not variant.gate_applies_scale
    assert all(v.status in o.PASSING for v in results.values()), results


@pytest.mark.distributed
def test_the_projects_own_block_sharding_and_fusion_conform():
    report = check_variant(OWN)
    assert all(v.status in o.PASSING + (o.SKIP,) for v in report.verdicts), markdown(report)
    assert report.ok, markdown(report)


@pytest.mark.parametrize("departure, diagnosis", [
    ("two_sided_gate_clip", "gate clipped on both sides"),
    ("clips_at_zero_limit", "clips even with swiglu_limit <= 0"),
    ("shared_two_sided_gate_clip", "matches neither revision"),
    ("bias_in_weights", "the bias entered the weights"),
    ("no_renormalisation", "not renormalised"),
    ("epsilon", "adds eps ~ 1e-20"),
    ("bfloat16_router", "not computed in float32"),
    ("bfloat16_combine", "bfloat16"),
    ("limit_none_typeerror", "raises TypeError"),
    ("float32_output", "returned mlx.core.float32 for bfloat16"),
    ("argpartition_kth_k", "raised ValueError"),
    ("hash_ignores_table", "its table row is"),
    ("bf16_skips_routed_clip", "routed experts' clip removed"),
    ("bf16_skips_shared_clip", "shared expert's clip removed"),
    ("bf16_output_scaled", "0.8 x the expected one"),
])
def test_diagnoses_name_the_departure(departure, diagnosis):
    result = run_check(knobbed(departure), KNOWN[departure])
    assert diagnosis in result.detail, result.detail


# --- adapter pieces -----------------------------------------------------------------------


def test_router_output_is_read_in_either_order():
    idx, w = mx.array([[1, 2]], dtype=mx.uint32), mx.array([[0.5, 0.5]])
    assert split_route((idx, w), "r")[2] == "(indices, weights)"
    assert split_route((w, idx), "r")[2] == "(weights, indices)"
    with pytest.raises(Exception, match="not a pair"):
        split_route(w, "r")


def test_the_call_signature_decides_whether_ids_are_passed():
    def plain(x):
        pass

    def optional(x, input_ids=None):
        pass

    def required(x, tokens):
        pass

    def other(x, mask=None):
        pass

    assert [takes_ids(f) for f in (plain, optional, required, other)] == [False, True, True,
                                                                           False]


def test_no_hash_routing_fails_where_model_type_claims_deepseek_v4():
    variant = Variant(str(HERE / "experts_attr.py"), fresh=True)
    assert run_check(variant, "hash_routing").status == o.SKIP
    variant.module.ModelArgs.__dataclass_fields__["model_type"].default = "deepseek_v4"
    result = run_check(variant, "hash_routing")
    assert result.status == o.FAIL and "model_type 'deepseek_v4'" in result.detail


def test_a_variant_without_shard_is_skipped_with_the_reason():
    result = run_check(Variant(str(HERE / "experts_attr.py")), "sharded_moe_2_ranks")
    assert result.status == o.SKIP and "no shard()" in result.detail


# --- the command and the plugin ---------------------------------------------------------------


@pytest.mark.slow
def test_cli_exit_status_follows_required_checks_only(tmp_path, capsys):
    out = tmp_path / "report.json"
    informational = ["--only", "softmax_not_renormalised", "--only", "k1_renormalised"]
    assert main(["check", "--variant", "mlx_lm.models.deepseek_v41", "--json", str(out),
                 *informational]) == 0
    data = json.loads(out.read_text())
    checks = {c["prop"]: c for c in data["variants"][0]["checks"]}
    assert checks["k1_renormalised"]["status"] == o.DEPARTS
    assert not checks["k1_renormalised"]["required"]
    assert main(["check", "--variant", str(HERE / "experts_attr.py"), "--json", str(out),
                 "--only", "structure", "--only", "softplus_overflow"]) == 1
    data = json.loads(out.read_text())["variants"][0]
    assert not data["ok"] and data["checks"][1]["status"] == "FAIL"
    printed = capsys.readouterr().out
    assert "| softplus_overflow | required | FAIL (required) |" in printed


@pytest.mark.slow
def test_cli_reports_a_load_failure(tmp_path, capsys):
    assert main(["check", "--variant", BROKEN, "--json", str(tmp_path / "r.json")]) == 1
    assert "deepseek_v4_kernels" in capsys.readouterr().out
    data = json.loads((tmp_path / "r.json").read_text())["variants"][0]
    assert data["error"] and "cannot be loaded" in data["error"] and not data["checks"]


@pytest.mark.slow
def test_pytest_variant_runs_the_checks_as_items(pytester):
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "-rxsf",
        "--variant", str(HERE / "experts_attr.py"), "--variant", BROKEN, "-m", "variant")
    out = result.stdout.str()
    assert result.ret == 1, out
    assert "experts_attr.py]::softplus_overflow" in out and "non-finite weights" in out, out
    assert "broken_import.py]::load" in out and "deepseek_v4_kernels" in out, out
    assert "XFAIL" in out and "epsilon_underflow" in out, out  # informational: never a failure
    outcomes = result.parseoutcomes()
    assert outcomes["failed"] == 2 and outcomes["passed"] >= 10 and outcomes["skipped"] >= 2, out


# --- fresh blocks, isolation, identity -----------------------------------------------------


def test_a_router_caching_its_transposed_weight_conforms():
    """Weights go into a fresh block before its first call (as mlx-lm loads
    them): a port that caches a derived weight on first call is right."""
    variant = Variant(str(HERE / "cached_router.py"))
    for name in ("bias_chooses_only", "epsilon_underflow", "renormalisation",
                 "softplus_overflow", "moe_matches_reference"):
        v = run_check(variant, name)
        assert v.status in o.PASSING, (name, v.detail)


def test_loading_weights_into_a_block_that_ran_is_refused():
    variant = Variant(KNOBS)
    built = variant.build()
    built.route(mx.zeros((2, 64)))
    with pytest.raises(RuntimeError, match="already run"):
        built.load(None)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_port_patching_all_sum_cannot_change_another_verdict():
    """patches_all_sum.py rounds every all_sum to bfloat16 at import, which
    fails its own sharded check; checked in a process of its own, it leaves
    this process's all_sum alone, and deepseek_v41 checked after it gets the
    verdict it gets alone."""
    before = mx.distributed.all_sum
    only = ["sharded_moe_2_ranks"]
    patched = check_isolated(str(HERE / "patches_all_sum.py"), only, progress=None)
    after = check_isolated("mlx_lm.models.deepseek_v41", only, progress=None)
    assert patched.by_check()["sharded_moe_2_ranks"].status == o.FAIL, markdown(patched)
    assert after.by_check()["sharded_moe_2_ranks"].status in o.PASSING, markdown(after)
    assert mx.distributed.all_sum is before


def test_a_module_without_a_moe_block_is_one_line():
    report = check_variant("mlx_lm.models.llama")
    assert report.error and report.error.startswith("no MoE block found"), report.error
    assert not report.verdicts
    assert markdown(report).count("\n") < 8


def test_report_names_the_file_its_hash_versions_and_device(tmp_path):
    report = check_variant(str(HERE / "experts_attr.py"), ["structure"])
    ident = report.identity
    assert ident["file"] == str(HERE / "experts_attr.py")
    assert len(ident["sha256"]) == 64 and ident["mlx"] and ident["mlx_lm"]
    assert ident["backend"] in ("cpu", "cuda", "metal") and ident["device"]
    text = markdown(report)
    assert "experts_attr.py" in text and "sha256" in text and "mlx-lm" in text


def test_readme_check_table_is_the_property_table():
    from dsv4shard.docs import check_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert check_table() in readme, "README's check table is stale: run python -m dsv4shard.docs"


@pytest.mark.slow
def test_a_hung_property_is_reported_and_the_rest_still_run():
    lines = []
    report = check_isolated(str(HERE / "hangs.py"),
                            ["structure", "moe_matches_reference", "renormalisation"],
                            property_timeout=4, progress=lines.append)
    r = report.by_check()
    assert r["structure"].status == o.PASS and r["renormalisation"].status == o.PASS, \
        markdown(report)
    hung = r["moe_matches_reference"]
    assert hung.status == o.ERROR and "hung: no verdict within 4 s" in hung.detail, hung
    assert not report.ok and "moe_matches_reference" in markdown(report)
    assert any("[2/3] moe_matches_reference ..." in line for line in lines), lines
