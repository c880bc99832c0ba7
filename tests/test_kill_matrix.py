"""``dsv4shard mutants``: the kill matrix, its verdicts and its exit status."""

import json

import pytest

import reference as ref
from dsv4shard import backend
from dsv4shard.cli import main
from dsv4shard.testing import matrix
from dsv4shard.testing import strategies as s
from dsv4shard.testing.mutants import Mutant, catalogue
from dsv4shard.testing.properties import reference_edges as edges


def test_every_listed_property_is_in_the_matrix():
    props = matrix.properties()
    for m in catalogue():
        assert m.prop in props, m.name
        assert matrix.kin(m)[0] is m.prop


def test_kind_is_keyword_and_case_type():
    by_name = {m.name: m for m in catalogue()}
    kin = [matrix.qualified(p) for p in matrix.kin(by_name["np_epsilon"], matrix.properties())]
    assert kin == ["reference_edges.all_zero_scores_give_nan"]
    kin = {matrix.qualified(p) for p in matrix.kin(by_name["no_up_clip"], matrix.properties())}
    assert kin == {"unfused.moe_matches_reference", "unfused.switch_glu_matches_reference",
                   "unfused.sorted_matches_unsorted",
                   "unfused.moe_matches_reference_at_extremes",
                   "unfused.router_matches_reference_on_exact_inputs"}


def test_command_prints_the_matrix_and_writes_json(tmp_path, capsys):
    out = tmp_path / "matrix.json"
    rc = main(["mutants", "--only", "np_epsilon", "--only", "np_two_sided_gate_clip",
               "--jobs", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "## Kill matrix" in printed and "- killed: 2 / 2 mutants" in printed
    result = json.loads(out.read_text())
    assert result["summary"]["killed"] == 2 and result["summary"]["survived"] == []
    assert {c["result"] for c in result["cells"]} == {"caught"}
    assert all(c["examples"] >= 1 and c["seconds"] >= 0 for c in result["cells"])


def test_parts_run_apart_merge_into_one_matrix(tmp_path, capsys):
    """A GPU machine lends 10 minutes a command: the matrix runs in parts of
    whole mutants and is merged afterwards."""
    two = ["--only", "np_epsilon", "--only", "np_two_sided_gate_clip", "--jobs", "1"]
    ran = []
    for k in (1, 2):
        rc = main(["mutants", *two, "--part", f"{k}/2", "--json", str(tmp_path / f"{k}.json")])
        assert rc == 0
        ran.append({c["mutant"] for c in json.loads((tmp_path / f"{k}.json").read_text())["cells"]})
    assert ran[0] and ran[1] and not ran[0] & ran[1]
    capsys.readouterr()
    assert main(["mutants", "--merge", str(tmp_path / "1.json"), str(tmp_path / "2.json")]) == 0
    assert "- killed: 2 / 2 mutants" in capsys.readouterr().out
    assert main(["mutants", "--part", "3/2"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "bad.json").write_text("{")
    assert main(["mutants", "--merge", str(tmp_path / "bad.json")]) == 2
    assert "not a matrix written by --json" in capsys.readouterr().err


def test_a_run_cut_short_keeps_its_cells_and_resume_goes_on(tmp_path, capsys, monkeypatch):
    """The JSON is written after every cell, so a command stopped by a time
    limit keeps what it ran; ``--resume`` runs only the cells it lacks, and a
    merge of a cut file says which mutants have no verdict yet."""
    out = tmp_path / "m.json"
    only = ["--only", "np_bias_in_weights", "--jobs", "1", "--json", str(out)]
    assert main(["mutants", *only]) == 0
    whole = json.loads(out.read_text())
    assert len(whole["cells"]) == 5, whole["cells"]
    # As a run stopped after two cells leaves it (the listed cell is the first).
    cut = {**whole, "cells": [{**c, "detail": f"kept {i}"} for i, c in
                              enumerate(whole["cells"][:2])]}
    out.write_text(json.dumps(cut))
    capsys.readouterr()
    assert main(["mutants", "--merge", str(out)]) == 0
    assert "- killed: 1 / 1 mutants" in capsys.readouterr().out  # its listed cell caught it
    missed_only = {**cut, "cells": [c for c in whole["cells"] if c["result"] == "missed"]}
    assert missed_only["cells"]
    (tmp_path / "missed.json").write_text(json.dumps(missed_only))
    main(["mutants", "--merge", str(tmp_path / "missed.json")])
    assert "not all cells run: np_bias_in_weights" in capsys.readouterr().out
    assert main(["mutants", *only, "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("] np_bias_in_weights x ") == 3 and "[3/5]" in err, err
    resumed = json.loads(out.read_text())
    assert len(resumed["cells"]) == 5
    assert [c["detail"] for c in resumed["cells"][:2]] == ["kept 0", "kept 1"]
    # A run killed at its third cell (as a time limit kills it) left two.
    out.unlink()
    ran = []
    real_cell = matrix.run_cell

    def stopped_at_third(*args):
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append(1)
        return real_cell(*args)

    monkeypatch.setattr(matrix, "run_cell", stopped_at_third)
    with pytest.raises(KeyboardInterrupt):
        main(["mutants", *only])
    assert len(json.loads(out.read_text())["cells"]) == 2
    monkeypatch.undo()
    assert main(["mutants", "--only", "np_epsilon", "--json", str(out), "--resume"]) == 2
    assert "holds mutants this selection does not run" in capsys.readouterr().err
    assert main(["mutants", "--only", "np_epsilon", "--resume"]) == 2
    assert "needs --json FILE" in capsys.readouterr().err


def test_listed_first_runs_the_rest_of_a_kind_only_where_the_listed_cell_missed(
        monkeypatch, capsys):
    """``--listed-first``: the kill verdicts in a sixth of the cells.  A
    mutant its listed cell catches runs nothing more; one it does not runs
    the rest of its kind, where another property may kill it."""
    from dsv4shard.testing import mutants
    from dsv4shard.testing.mutants import router

    by_name = {m.name: m for m in catalogue()}
    # Listed with a property that cannot see it: hash_ignores_bias draws hash
    # layers, where the weights are not renormalised by score at all.
    elsewhere = Mutant("renormalisation_listed_elsewhere", edges.hash_ignores_bias,
                       lambda: s.moe_cases(quantized=False),
                       {"route": router.route_no_renormalisation})
    monkeypatch.setattr(mutants, "catalogue", lambda: [elsewhere, by_name["np_epsilon"]])
    assert main(["mutants", "--listed-first", "--jobs", "1"]) == 0
    out, err = capsys.readouterr()
    ran = [line.split("] ", 1)[1].split(":")[0] for line in err.splitlines() if "] " in line]
    # Every listed cell before any other.
    assert ran[:2] == ["renormalisation_listed_elsewhere x reference_edges.hash_ignores_bias",
                       "np_epsilon x reference_edges.all_zero_scores_give_nan"], ran
    rest = {matrix.qualified(p) for p in matrix.kin(elsewhere)[1:]}
    assert {r.split(" x ")[1] for r in ran[2:]} == rest and len(ran) == 2 + len(rest), ran
    assert "- killed: 2 / 2 mutants" in out, out
    assert "killed by reference_edges.renormalisation_rule" in out, out


def test_a_survivor_is_reported_as_such():
    correct = Mutant("the_reference_itself", edges.clip_probes, s.clip_cases,
                     {"clipped_swiglu": ref.clipped_swiglu})
    cells = matrix.run_matrix([correct], examples=5)
    assert [(c.result, c.examples) for c in cells] == [("missed", 5)]
    assert matrix.summary([correct], cells, 0.0)["survived"] == ["the_reference_itself"]


@pytest.mark.slow
def test_a_worker_that_dies_costs_its_own_cells_only(monkeypatch):
    """A worker process killed mid-cell (a crash in a kernel, the memory
    killer) broke the whole pool on the H200: a traceback and no matrix.
    Now its cells are errors saying so, and the other mutant's are run."""
    from impls.broken import matrix_worker_dying_on

    two = [m for m in catalogue() if m.name in ("np_naive_softplus", "np_two_sided_gate_clip")]
    monkeypatch.setenv("DSV4SHARD_TEST_DIE_ON", "np_naive_softplus")
    cells = matrix.run_matrix(two, examples=3, jobs=2, worker=matrix_worker_dying_on)
    assert len(cells) == sum(len(matrix.kin(m)) for m in two)
    dead = {c.result for c in cells if c.mutant == "np_naive_softplus"}
    assert dead == {"error"} and all("worker process died" in c.detail for c in cells
                                     if c.mutant == "np_naive_softplus")
    assert "error" not in {c.result for c in cells if c.mutant == "np_two_sided_gate_clip"}


def test_a_mutant_only_a_kernel_can_catch_skips_where_the_backend_has_none():
    (m,) = [m for m in catalogue() if m.name == "fused_ignores_global_scale"]
    cells = matrix.run_matrix([m], examples=3)
    verdict = matrix.verdicts([m], cells)[m.name]
    if backend.unsupported(s.NVFP4_GLOBAL_SCALE, "float32"):
        assert verdict["status"] == "skipped" and "GPU only" in verdict["skip_reason"]
        assert matrix.summary([m], cells, 0.0)["survived"] == []
    else:
        assert verdict["status"] == "killed"
