"""The suite's pytest plugin is in effect however pytest is started: from an
installed project (its entry point) or from a source tree that declares no
entry point (the root conftest registers it)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _collect(env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only",
         "tests/test_kernel_warmup.py::test_other_names_have_no_call"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_without_entry_points_the_conftest_registers_the_plugin():
    done = _collect({"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dsv4shard: MLX " in done.stdout and ", backend " in done.stdout, done.stdout


def test_blocking_the_plugin_by_name_is_honoured():
    # The header line is the plugin's: blocked, it is absent (and the twin
    # above shows the line is what a loaded plugin prints).
    done = _collect({"PYTEST_ADDOPTS": "-p no:dsv4shard"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dsv4shard: MLX " not in done.stdout, done.stdout
