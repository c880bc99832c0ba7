"""Someone else's installer or sharder: judged on what DeepSeek-V4 needs,
allowed to decline the rest, told which bug it has, bounded in time, and
refused at start-up when an option is wrong.  The implementations are in
``tests/impls/``."""

import os
import signal
import sys
import threading
import time

import pytest
from hypothesis import strategies as st

from dsv4shard.engine import outcome as o
from dsv4shard.engine.records import by_name
from dsv4shard.engine.run import run
from dsv4shard.pytest_plugin import judge_property, rank_import_problems, session_args
from dsv4shard.rank_memory import RankMemoryError, available_bytes, check, rank_bytes
from dsv4shard.ranks import hostfile as hf
from dsv4shard.ranks.pool import RankPool
from dsv4shard.testing import strategies as s
from dsv4shard.testing.guard import EXAMPLE_TIMEOUT
from dsv4shard.testing.properties import fused, sharded
from dsv4shard.third_party import impl_verdicts
from reference import MoEConfig
from reference.quantization import QuantFormat
from tests.impls import broken, exo_style, v4_installer, v4_sharder

pytest_plugins = ["pytester"]

EXO = "tests.impls.exo_style:install_fused_switch_glu"
MXFP4 = QuantFormat("mxfp4", 32, 4)


def fusion_case(quant=MXFP4, top_k=2, n_tokens=4, scale=1.0, linear_bias=False):
    return s.FusionCase(s.MoECase(
        config=MoEConfig(64, 64, 4, top_k), quant=quant, dtype="float32", n_tokens=n_tokens,
        pattern="router", activation_scale=scale, seed=0, linear_bias=linear_bias))


def verdict(name, keyword, examples=4, cases=None, **impl):
    return run(by_name(name, keyword), impl, examples=examples, cases=cases)


# --- scope and declining ----------------------------------------------------------------


def test_a_v4_installer_that_declines_biases_and_global_scales_passes():
    impl = {"fuse_impl": v4_installer.install}
    for name in ("fused_matches_unfused", "fused_matches_unfused_dense"):
        v = verdict(name, "fuse_impl", examples=2, **impl)
        assert v.status in o.PASSING and not v.declined, (name, v.detail)
    v = verdict("fused_concat_order_structural_extended", "fuse_impl", **impl)
    assert v.status in o.PASSING + (o.DECLINED,), v.detail
    assert any("linear bias" in d for d in v.declined), v.declined
    assert any("global scale" in d for d in v.declined), v.declined


def small_shard_cases(linear_bias: bool, uneven: bool = False):
    """Dense float32 shard cases over 2 to 4 ranks: quick to run."""
    cases = s.shard_cases(quantized=False, linear_bias=False, uneven=uneven).filter(
        lambda c: 1 < c.ranks <= 4)
    if linear_bias:
        cases = cases.map(lambda c: s._replace(c, moe=s._replace(c.moe, linear_bias=True)))
    return cases


def test_a_v4_sharder_declines_biases_and_a_bias_over_n_sharder_passes():
    biased = s.ShardCase(fusion_case(quant=None, linear_bias=True).moe, 2, "float32")
    with pytest.raises(NotImplementedError, match="experts with a linear bias are not sharded"):
        sharded.shard_holds_its_share_extended(biased, shard=v4_sharder.shard)
    # Every rank holds bias / N of down's linear bias: not dsv4shard's layout, yet right.
    over_n = {"shard_impl": v4_sharder.shard_bias_over_n}
    for name in ("sharded_matches_unsharded_extended", "shard_holds_its_share_extended"):
        v = verdict(name, "shard", examples=3, cases=small_shard_cases(True), **over_n)
        assert v.status in o.PASSING, (name, v.detail)
    # Even splits only (no weights= argument): uneven ones are declined for it.
    v = verdict("sharded_matches_unsharded", "shard", examples=3,
                cases=small_shard_cases(False, uneven=True), **over_n)
    assert v.status in o.PASSING, v.detail
    assert any("takes no weights= argument" in d for d in v.declined), v.declined


def test_declining_a_deepseek_v4_configuration_fails_saying_so():
    with pytest.raises(AssertionError, match=r"the installer declined a DeepSeek-V4 "
                                             r"configuration \(routed experts mxfp4 group 32"):
        fused.fused_matches_unfused(fusion_case(), broken.installer_declining_everything)
    with pytest.raises(NotImplementedError, match="fuses nothing yet"):
        fused.fused_matches_unfused(fusion_case(linear_bias=True),
                                    broken.installer_declining_everything)


def test_declined_cases_are_skips_listed_in_the_session_summary(pytester):
    pytester.makepyfile(test_declines='''
        from hypothesis import strategies as st

        def prop(case, impl):
            impl(case)

        def declines_odd(case):
            if case % 2:
                raise NotImplementedError("odd cases are not supported")

        def declines_all(case):
            raise NotImplementedError("nothing is supported")

        def test_some(judge):
            judge(prop, st.integers(0, 50), impl=declines_odd)

        def test_all(judge):
            judge(prop, st.integers(0, 50), impl=declines_all)
    ''')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-rs",
                                          *session_args())
    out = result.stdout.str()
    assert result.ret == 0, out
    # Only the outcomes: the in-process session may add warnings of its own
    # (modules this worker imported before, which it cannot rewrite).
    outcomes = result.parseoutcomes()
    assert (outcomes.get("passed"), outcomes.get("skipped"), outcomes.get("failed")) == \
        (1, 1, None), out
    assert "declined by the implementation under test" in out, out
    assert "test_some: odd cases are not supported" in out, out
    assert "declined: nothing is supported" in out, out


# --- diagnoses that name the bug ---------------------------------------------------------


def test_exo_style_installer_fails_first_on_its_sorted_path_and_hidden_weights():
    verdicts = impl_verdicts(EXO, None, examples=3, real_ranks=False, shrink=False)
    first = verdicts[0]
    assert first.prop == "fused_matches_unfused" and first.status == o.FAIL, first.detail
    assert "wrong only when sorting is on: from indices.size >= 8" in first.detail, first.detail
    assert "unsorts to the wrong shape" in first.detail, first.detail
    assert "fused weights hidden from parameters(): switch_mlp._gate_up_weight" in first.detail
    assert "--fuse-impl=" + EXO in first.reproduce
    by = {v.prop: v for v in verdicts}
    dense = by["fused_matches_unfused_dense"]
    assert dense.status == o.FAIL and "gate/up bits mismatch: None vs None" in dense.detail
    assert "dense" in dense.detail and "a DeepSeek-V4 configuration" in dense.detail
    bias = by["fused_matches_unfused_extended"]
    assert bias.status == o.FAIL and "linear biases" in bias.detail, bias.detail
    assert "raise NotImplementedError to decline it" in bias.detail, bias.detail


def test_a_wrong_shape_is_a_failure_not_a_crash_of_the_harness():
    # k = 1 and 12 tokens: exo-style sorts (12 >= 8) and drops the k axis.
    case = fusion_case(top_k=1, n_tokens=12, scale=30.0)
    v = verdict("fused_concat_order_behaviour", "fuse_impl", cases=st.just(case),
                fuse_impl=exo_style.install_fused_switch_glu)
    assert v.status == o.FAIL, v.detail
    assert "has shape (12, 64), the unfused one's (12, 1, 64)" in v.detail, v.detail


def test_broken_contracts_are_named_with_the_contract():
    v = verdict("fused_matches_unfused", "fuse_impl", cases=st.just(fusion_case()),
                fuse_impl=broken.installer_returning_an_int)
    assert ("broken contract: the installer returned int 3; the contract: an installer is "
            "called as installer(switch_glu)") in v.detail, v.detail
    case = s.ShardCase(fusion_case().moe, 2, "float32")
    v = verdict("sharded_matches_unsharded", "shard", cases=st.just(case),
                shard_impl=broken.sharder_returning_none)
    assert ("broken contract: the sharder returned None where a block is needed; the "
            "contract: a sharder is called as shard(moe_block, group)") in v.detail, v.detail


# --- time limits, dead ranks, rank counts -------------------------------------------------


def test_a_sharder_that_never_returns_fails_naming_the_hang(request):
    assert EXAMPLE_TIMEOUT <= 100  # the default limit fails it within 120 s
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        judge_property(request.node, sharded.sharded_matches_unsharded, s.v4_shard_cases(),
                       timeout=0.5, shard=broken.sharder_sleeping_forever)
    assert time.monotonic() - start < 10
    message = str(failure.value)
    assert "did not finish within 0.5 s (hung)" in message, message
    assert "broken.py" in message and "sharder_sleeping_forever" in message, message


def test_cases_split_over_every_rank_count_the_configurations_allow():
    """--ranks N draws shard cases whose intermediate size (and groups) N
    divides, and the end-to-end model splits over every N dividing 96."""
    from hypothesis import given, settings

    from dsv4shard.shard import check_shardable
    from dsv4shard.testing import data
    from dsv4shard.tiny_model import splits_over
    from dsv4shard.weights import build_block

    for ranks in (3, 4, 5, 6):
        @settings(max_examples=5, database=None)
        @given(case=s.v4_shard_cases(ranks=ranks))
        def splits(case):
            m = case.moe
            block = build_block(m.config, data.make_weights(m), m.quant, m.dtype)
            check_shardable(block, case.ranks, case.split)

        splits()
    assert [n for n in range(2, 9) if splits_over(n)] == [2, 3, 4, 6, 8]


@pytest.mark.distributed
def test_three_real_ranks_run_and_a_rank_killed_mid_run_fails_fast(request):
    """Three real ranks run shard cases drawn for 3 (``pytest --ranks 3``
    runs every distributed test so, the end-to-end model's too); then one
    rank is killed mid-run: the run fails within 10 s with that rank's
    stderr, never as a flaky result."""
    ranks = 3
    pool = RankPool(hf.local(ranks), timeout=30).start()
    try:
        judge_property(request.node, sharded.real_ranks_match_unsharded,
                       s.v4_shard_cases(ranks=ranks), examples=1, pool=pool)
        killed = {}

        def kill_soon():
            time.sleep(0.3)
            killed["at"] = time.monotonic()
            os.kill(pool.procs[1].pid, signal.SIGKILL)

        threading.Thread(target=kill_soon, daemon=True).start()
        with pytest.raises(pytest.fail.Exception) as failure:
            judge_property(request.node, sharded.real_ranks_match_unsharded,
                           s.v4_shard_cases(ranks=ranks), examples=10_000, pool=pool)
        assert time.monotonic() - killed["at"] < 10
        message = str(failure.value)
        # Killed during a job, between jobs, or as a job was being sent:
        assert ("rank 1 died" in message or "rank 1 stopped reading jobs" in message), message
        assert "--- rank 1 stderr ---" in message, message
        assert "rank 1 of 3: job moe" in message, message  # what it was doing
        assert "Flaky" not in message, message
    finally:
        pool.close()


def test_ranks_beyond_this_machines_memory_are_refused_naming_the_need():
    available = available_bytes()
    if available is None:
        pytest.skip("this platform does not say how much memory is available")
    too_many = int(available // rank_bytes()) + 8
    with pytest.raises(RankMemoryError, match=rf"--ranks {too_many}: {too_many} rank "
                                              r"processes need about [\d.]+ GB"):
        check(too_many)
    if 64 * rank_bytes() > 0.9 * available:  # this 24 GB machine: --ranks 64 must refuse
        with pytest.raises(RankMemoryError, match="--ranks 64"):
            check(64)
    check(2)


@pytest.mark.distributed
def test_the_rank_memory_estimate_covers_a_measured_rank(rank_pool):
    """A rank's peak memory after the largest block the suite draws (32
    experts, I = 256, D = 128, mxfp4, 70 tokens: past the sort threshold)
    stays below the per-rank figure the cap uses."""
    from dsv4shard.testing.properties.sharded import run_on_ranks

    n = rank_pool.size
    inter = 32 * n * max(1, 8 // n)  # 256 at 2, 4 and 8 ranks: whole groups on every rank
    large = s.MoECase(MoEConfig(128, inter, 32, 6), MXFP4, "float32", 70, "router", 30.0, 1)
    run_on_ranks(s.ShardCase(large, rank_pool.size, "float32"), pool=rank_pool)
    peaks = [a["peak_rss"] for a in rank_pool.run({"task": "memory"})]
    assert max(peaks) <= rank_bytes(), [round(p / 2**20) for p in peaks]


# --- start-up checks ------------------------------------------------------------------------


def test_bad_option_values_are_one_usage_error_at_start_up(pytester):
    pytester.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-p", "no:xdist", *session_args(),
        "--fuse-impl", "no_such_module:install",
        "--shard-impl", "dsv4shard.shard:shard_block", "--ranks", "1",
        "--hostfile", "/nonexistent/hosts.json", "--variant", "no/such/port.py",
        "--example-timeout", "0")
    err = result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, err
    assert err.count("ERROR") == 1 and "Traceback" not in err, err
    for problem in ("--fuse-impl: no_such_module:install: cannot import no_such_module",
                    "the contract is function(moe_block, group)",
                    "--ranks must be at least 2", "--hostfile: cannot read hostfile",
                    "--variant no/such/port.py: no such file",
                    "--example-timeout: expected a positive number"):
        assert problem in err, (problem, err)


def test_a_module_only_the_test_process_can_import_is_refused(tmp_path, monkeypatch):
    (tmp_path / "only_here_impl.py").write_text("def install(switch_glu):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dsv4shard import impl

    assert impl.load("only_here_impl:install")  # importable here
    problems = rank_import_problems(["only_here_impl:install", "dsv4shard.impl:load"])
    assert len(problems) == 1 and "cannot import only_here_impl" in problems[0], problems
    sys.modules.pop("only_here_impl", None)
