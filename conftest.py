"""Suite-wide pytest settings: hypothesis profiles and markers."""

import os

from hypothesis import HealthCheck, settings

# Deadlines are off everywhere: under xdist two workers share two cores and an
# MLX kernel's first call compiles, so wall time per example is not a signal.
EVERYWHERE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Reproducible runs: the same examples every time, nothing remembered, and a
# blob to replay any failure.
REPRODUCIBLE = dict(derandomize=True, database=None, print_blob=True)

settings.register_profile("default", max_examples=20, **EVERYWHERE)
settings.register_profile("ci", max_examples=20, **EVERYWHERE, **REPRODUCIBLE)
settings.register_profile("thorough", max_examples=400, **EVERYWHERE)
# For backends where every new shape compiles a kernel (a GPU), a few
# examples per property: a smoke run of the same properties.
settings.register_profile("smoke", max_examples=6, **EVERYWHERE, **REPRODUCIBLE)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
)


# The tests that took longest on a GPU (seconds on one H200, 16 workers,
# MLX's kernel cache warm: benchmarks/results/gpu-h200.md run 13 B),
# longest first: each opens one worker's share of the collection, so that
# none starts late and ends the run alone (dsv4shard.testing.schedule).
# On the CPU they are long too.
STARTED_FIRST = (
    "tests/test_sharded.py::test_sharded_property[sharded_matches_unsharded]",  # 94
    "tests/test_unfused.py::test_moe_matches_reference",  # 92
    "tests/test_backend_defects.py::test_cuda_affine_group_128",  # 85
    "tests/test_unfused.py::test_sorted_matches_unsorted",  # 72
    "tests/test_known_bad.py::test_mutant_is_caught[router_epsilon]",  # 70
    "tests/test_variants.py::test_conforming_variant_passes_every_check",  # 61
    "tests/test_variants.py::test_deepseek_v41_is_reported_as_it_is",  # 58
    "tests/test_variants.py::test_adapter_drives_each_layout_and_names_its_departure"
    "[ffn_switch_mlp.py]",  # 58
    "tests/test_doctor.py::test_children_run_cases_and_known_defects_are_named",  # 48
    "tests/test_known_bad.py::test_mutant_is_caught[no_unsort]",  # 42
    "tests/test_fused.py::test_fused_property[fusion_keeps_bytes_and_round_trips_extended]",
    "tests/test_unfused.py::test_moe_matches_reference_at_extremes",  # 31
    "tests/test_sharded.py::test_real_ranks_match_unsharded",  # 32 (27 of it setup)
    "tests/test_variants.py::test_the_projects_own_block_sharding_and_fusion_conform",  # 26
    "tests/test_known_bad.py::test_mutant_is_caught[no_unsort_vs_reference]",  # 25
    "tests/test_sharded_model.py::test_released_deepseek_v41_gives_the_unsharded_logits"
    "[2-overrides0]",  # 25
    "tests/test_end_to_end.py::test_sharded_model_matches_unsharded",  # 25 (setup)
    "tests/test_known_bad.py::test_mutant_is_caught[shard_rank_dependent_routing]",  # 24
    "tests/test_third_party.py::test_exo_style_installer_fails_first_on_its_sorted_path_and"
    "_hidden_weights",  # 21
    "tests/test_third_party.py::test_three_real_ranks_run_and_a_rank_killed_mid_run_fails_fast",
    "tests/test_sharded_model.py::test_rank0_sinks_everywhere_is_a_wrong_answer_in_attention",
)


def pytest_addoption(parser, pluginmanager):
    # The suite's own plugin (its options, the rank pools, the kernel
    # warm-up) is declared by the installed project's entry point; a source
    # tree on PYTHONPATH, or PYTEST_DISABLE_PLUGIN_AUTOLOAD, loads no entry
    # point, and every test needing the plugin would then error.  Register it
    # here in that case: its options and configure hooks are replayed for it.
    # (`-p no:dsv4shard` blocks the name, and register() then declines.)
    if not pluginmanager.has_plugin("dsv4shard"):
        from dsv4shard import pytest_plugin

        pluginmanager.register(pytest_plugin, "dsv4shard")


def _chosen_dist(args) -> bool:
    return any(str(a).startswith("--dist") for a in args)


def pytest_collection_modifyitems(config, items):
    # Only for work stealing's contiguous shares, the mode pytest_configure
    # below picks unless --dist was given (workers see the controller's argv).
    worker = getattr(config, "workerinput", {})
    workers = worker.get("workercount")
    if workers and not _chosen_dist(worker.get("mainargv", ["--dist"])):
        from dsv4shard.testing.schedule import front_loaded

        rank = {nodeid: i for i, nodeid in enumerate(STARTED_FIRST)}
        items[:] = front_loaded(items, int(workers), lambda item: rank.get(item.nodeid))


def pytest_configure(config):
    # pytest-xdist hands tests out in collection order ("load"); this suite's
    # long tests (whole variant reports, real ranks) would then end the run
    # on one worker while the other idles: let idle workers steal queued
    # tests instead, unless --dist was chosen on the command line.
    if (getattr(config.option, "dist", "no") == "load"
            and not _chosen_dist(config.invocation_params.args)):
        config.option.dist = "worksteal"
    # Workers (and the rank processes they start) share the cores' BLAS
    # threads; the controller sets it before it starts them.
    workers = getattr(config.option, "numprocesses", None)
    if workers and not hasattr(config, "workerinput"):
        from dsv4shard.cpu_share import share_cores

        share_cores(os.cpu_count() if workers in ("auto", "logical") else int(workers))
    config.addinivalue_line(
        "markers", "distributed: runs real mx.distributed ranks in separate processes"
    )
    config.addinivalue_line(
        "markers", "hardware: needs a real multi-host pair or multi-GPU host (a hostfile)"
    )
    config.addinivalue_line(
        "markers", "slow: starts and times out processes on purpose; run with -m slow (CI does)"
    )
