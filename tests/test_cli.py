"""The ``dsv4shard`` command as a user meets it: version, help, ``python -m``,
arguments refused before any work, the summary line."""

import subprocess
import sys

from dsv4shard.cli import main, summary_line
from dsv4shard.engine import outcome as o
from dsv4shard.engine.run import Verdict
from dsv4shard.variants.checking import Report, eta


def test_version_and_help_through_python_m():
    out = subprocess.run([sys.executable, "-m", "dsv4shard", "--version"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("dsv4shard ") and "mlx" in out.stdout
    out = subprocess.run([sys.executable, "-m", "dsv4shard", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    for command in ("check", "mutants", "bench", "doctor"):
        assert command in out.stdout


def test_bad_arguments_are_one_line_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "missing" / "out.json")
    for argv in (["check", "--json", missing], ["check", "--examples", "0"],
                 ["mutants", "--examples", "0"], ["mutants", "--jobs", "-1"],
                 ["mutants", "--json", missing], ["check", "--only", "no_such_check"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("dsv4shard ") and "\n" not in err, (argv, err)


def test_the_summary_line_counts_every_word():
    def v(status):
        return Verdict("p", "x", True, status, "")

    reports = [Report("a", [v(o.PASS), v(o.DEPARTS)]), Report("b", [v(o.FAIL), v(o.DECLINED)])]
    line = summary_line([v(o.PASS)], reports, 3.21)
    assert line == ("summary: checked 1 properties of the project's implementations and 2 "
                    "variants (1 conform, 1 do not); 2 PASS, 1 FAIL, 1 DEPARTS, 1 DECLINED; 3.2 s")


def test_progress_lines_estimate_the_time_left():
    done = [Verdict("p", "x", True, o.PASS, "", seconds=2.0)] * 2
    assert eta(done, 5) == ", about 6 s left"
    assert eta(done, 2) == ""


def test_a_weak_pass_is_never_a_plain_pass_in_the_report():
    from dsv4shard.variants.report import markdown, status_word, verdict

    weak = Verdict("quantized_moe_matches_reference", "x", True, o.WEAK,
                   "weak in 4 of 4 passing examples, e.g. bound/signal 0.46")
    report = Report("x", [weak, Verdict("structure", "x", True, o.PASS, "found")])
    assert status_word(weak) == "WEAK (passed, bound too loose to rely on)"
    assert "| WEAK (passed, bound too loose to rely on) |" in markdown(report)
    assert "passed only weakly on this backend, no evidence here: " \
           "quantized_moe_matches_reference" in verdict(report)
    # A detail built from a weak comparison's note stays weak.
    note = o.Weak("weak: bound/signal 0.46")
    assert isinstance(o.carried(f"within the stage bound; {note}", note), o.Weak)
    assert not isinstance(o.carried("within the stage bound; bound/signal 0.01", "x"), o.Weak)
