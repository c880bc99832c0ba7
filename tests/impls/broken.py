"""Implementations that break their contract, or never return."""

from __future__ import annotations

import time

from dsv4shard.fuse import install_fused
from dsv4shard.shard import shard


def installer_returning_an_int(switch_glu):
    install_fused(switch_glu)
    return 3


def sharder_returning_none(block, group):
    shard(block, group)


def sharder_sleeping_forever(block, group):
    while True:
        time.sleep(3600)


def installer_declining_everything(switch_glu):
    raise NotImplementedError("this installer fuses nothing yet")


def matrix_worker_dying_on(mutant_name: str, prop_name: str, examples: int):
    """A kill-matrix worker process that dies (no exception, no verdict) on
    every cell of the mutant named by DSV4SHARD_TEST_DIE_ON, and runs the
    others."""
    import os

    from dsv4shard.testing import matrix

    if mutant_name == os.environ.get("DSV4SHARD_TEST_DIE_ON"):
        os._exit(70)
    return matrix._run_named(mutant_name, prop_name, examples)
