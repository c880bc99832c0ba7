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


def pytest_configure(config):
    # pytest-xdist hands tests out in collection order ("load"); this suite's
    # long tests (whole variant reports, real ranks) would then end the run
    # on one worker while the other idles: let idle workers steal queued
    # tests instead, unless --dist was chosen on the command line.
    if (getattr(config.option, "dist", "no") == "load"
            and not any(str(a).startswith("--dist") for a in config.invocation_params.args)):
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
