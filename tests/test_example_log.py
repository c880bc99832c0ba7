"""The example log (``DSV4SHARD_EXAMPLE_LOG``): each example's seconds and
its MLX operations' first evaluation and repeat, from a pytest session and
from the engine's runner, and the summary that reads it."""

import json

import mlx.core as mx
import numpy as np
from hypothesis import strategies as st

from dsv4shard.engine.records import Property
from dsv4shard.engine.run import run
from dsv4shard.pytest_plugin import session_args
from dsv4shard.testing import example_log

pytest_plugins = ["pytester"]


def quantizes(n: int) -> None:
    w = mx.array(np.random.default_rng(n).standard_normal((8, 64)), dtype=mx.float32)
    wq, scales, biases = mx.quantize(w, group_size=32, bits=4)
    mx.eval(mx.dequantize(wq, scales, biases, group_size=32, bits=4))


def test_a_pytest_session_logs_every_example_with_its_operations(pytester, tmp_path,
                                                                  monkeypatch):
    log = tmp_path / "examples.jsonl"
    monkeypatch.setenv(example_log.ENV, str(log))
    pytester.makepyfile(test_timed='''
        import mlx.core as mx
        from hypothesis import given, settings, strategies as st

        @settings(max_examples=3, database=None, derandomize=True)
        @given(n=st.integers(1, 4))
        def test_quantizes(n):
            w = mx.ones((n, 64))
            mx.eval(mx.quantize(w, group_size=32, bits=4))

        def test_plain():
            pass
    ''')
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist",
                                          *session_args())
    assert result.ret == 0, result.stdout.str()
    entries = example_log.read([log])
    assert len(entries) == 3 and {e["test"] for e in entries} == {
        "test_timed.py::test_quantizes"}, entries
    for e in entries:
        assert e["outcome"] == "ok" and e["seconds"] > 0 and e["case"].isdigit(), e
        [op] = e["ops"]
        assert op["op"] == "quantize" and f"w {e['case']}x64 float32" in op["call"], op
        assert op["first"] >= 0 and op["repeat"] >= 0, op
    # The test function is itself again once the session is over.
    assert not example_log._STACK and not example_log._RESTORE


def test_the_engine_logs_each_example_and_its_outcome(tmp_path, monkeypatch):
    log = tmp_path / "examples.jsonl"
    monkeypatch.setenv(example_log.ENV, str(log))
    calls = []
    real = mx.quantize
    def counted(*args, **kwargs):
        # On a GPU build the engine reruns a failing example, on the device
        # and on mx.cpu, to tell whose the failure is (12 and then 10 calls
        # for 3 examples on the H200): those calls are not the examples'.
        if example_log.active():
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mx, "quantize", counted)

    def fails_from_3(n):
        quantizes(n)
        assert n < 3, "n is 3 or more"

    prop = Property("fails_from_3", fails_from_3, lambda: st.integers(0, 5), "", "", "")
    verdict = run(prop, examples=10, shrink=False)
    assert verdict.status == "FAIL", verdict
    entries = example_log.read([log])
    outcomes = [e["outcome"] for e in entries]
    assert outcomes[-1] == "AssertionError" and "ok" in outcomes, outcomes
    assert all(e["test"] == "fails_from_3" for e in entries)
    assert all([o["op"] for o in e["ops"]] == ["quantize", "dequantize"] for e in entries)
    # Each timed call ran twice: its first evaluation and its repeat.
    assert len(calls) == 2 * len(entries), (len(calls), len(entries))
    assert mx.quantize is counted and not example_log._RESTORE


def test_off_by_default_and_the_summary_names_the_slowest(tmp_path, monkeypatch):
    monkeypatch.delenv(example_log.ENV, raising=False)
    with example_log.example("t", 1):
        quantizes(1)
    assert not example_log._RESTORE  # nothing was wrapped
    slow = {"test": "t::slow", "case": "7", "seconds": 9.0, "outcome": "ok", "untimed_ops": 0,
            "ops": [{"op": "gather_mm", "call": "[device] gather_mm(a 6x1x64 float32)",
                     "inputs": 0.0, "first": 8.5, "repeat": 0.01}]}
    quick = {**slow, "test": "t::quick", "seconds": 0.1, "ops": []}
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in (quick, slow)))
    text = example_log.summary(example_log.read([path]))
    rows = text.splitlines()
    first_row = rows[rows.index("slowest examples:") + 4]
    assert first_row.startswith("| 9.00 | 8.50 | `t::slow`"), text
    assert "| 1 | 8.50 | 0.01 | 8.50 | `[device] gather_mm(a 6x1x64 float32)` |" in text, text
    assert example_log.main([str(tmp_path / "missing.jsonl")]) == 2
