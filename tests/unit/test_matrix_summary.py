"""jobs.summarize / kava_dist.matrix_summary: methods from run names, per-seed accuracies, examples seen, curves."""
from __future__ import annotations

import json

from kava_dist.matrix_summary import collect, method_of, summary_json, write_summary


def _run(root, name, correct, n=1000, passes=6.0, seen=2560, curve=((1280, 0.1), (2560, 0.4))):
    d = root / name
    (d / "eval").mkdir(parents=True)
    (d / "adapter").mkdir()
    (d / "config.yaml").write_text("train: {stage: student}\n")
    (d / "eval" / "mult4x4.json").write_text(json.dumps({"summary": {
        "accuracy": correct / n, "correct": correct, "n": n, "ci95": [0.0, 1.0], "forward_passes": passes,
        "mode": "latent"}, "records": []}))
    (d / "adapter" / "kava.json").write_text(json.dumps({"step": seen // 256, "examples_seen": seen}))
    lines = [{"step": s // 256, "examples_seen": s, "samples_per_s": 100.0, "valid/accuracy": a,
              "valid/ce_student": 1.0 - a} for s, a in curve]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_summary_groups_seeds_and_keeps_the_schema(tmp_path):
    assert method_of("kava_s2") == ("kava", 2) and method_of("kava_online") == ("kava_online", None)
    for name, c in (("kava_s0", 900), ("kava_s1", 920), ("codi_s0", 100), ("teacher", 995)):
        _run(tmp_path, name, c, passes=100.0 if name == "teacher" else 6.0)
    (tmp_path / "matrix.json").write_text(json.dumps({"jobs": [
        {"name": "kava_s0", "argv": ["py", "-m", "jobs.train", "x"], "wall_s": 60.0},
        {"name": "kava_s0.eval", "argv": [], "wall_s": 5.0}]}))
    runs = collect(tmp_path)
    s = summary_json(runs)
    assert list(s) == ["teacher", "kava", "codi"]                     # the method order of the report
    assert s["kava"] == {"accuracy": [0.9, 0.92], "passes_per_question": 6.0, "examples_seen": 2560}
    assert s["teacher"]["passes_per_question"] == 100.0
    paths = write_summary(runs, tmp_path / "out")
    assert json.loads(paths["summary"].read_text()) == s
    md = paths["markdown"].read_text()
    assert "| kava | 2 | 91.0 ± 1.4 |" in md and "`kava_s0`: `-m jobs.train x`" in md
    assert paths["curves"].stat().st_size > 1000
    assert runs[[r["run"] for r in runs].index("kava_s0")]["curve_ce"] == [(1280, 0.9), (2560, 0.6)]


def test_an_evaluation_under_other_settings_is_a_row_of_its_own(tmp_path):
    _run(tmp_path, "kava_t6_s1", 800, passes=23.0)
    (tmp_path / "kava_t6_s1" / "eval_t3").mkdir()
    (tmp_path / "kava_t6_s1" / "eval_t3" / "mult4x4.json").write_text(json.dumps({"summary": {
        "accuracy": 0.5, "correct": 500, "n": 1000, "ci95": [0.47, 0.53], "forward_passes": 20.0, "mode": "latent",
        "overrides": ["latent.num_iterations=3"]}, "records": []}))
    s = summary_json(collect(tmp_path))
    assert s["kava_t6"] == {"accuracy": [0.8], "passes_per_question": 23.0, "examples_seen": 2560}
    assert s["kava_t6@t3"] == {"accuracy": [0.5], "passes_per_question": 20.0, "examples_seen": 2560}
    md = write_summary(collect(tmp_path), tmp_path / "out")["markdown"].read_text()
    assert "evaluated with --set latent.num_iterations=3" in md


def test_several_matrices_summarise_into_one_table(tmp_path):
    """Plans run one after another (a seed each) give one method row; a run name in both (each plan's teacher) is
    taken from the first matrix given."""
    from jobs.summarize import main

    a, b = tmp_path / "a", tmp_path / "b"
    for root, kava, teacher in ((a, ("kava_s0", 700), 1000), (b, ("kava_s1", 750), 990)):
        _run(root, kava[0], kava[1], passes=16.0)
        _run(root, "teacher", teacher, passes=97.0)
        (root / "matrix.json").write_text(json.dumps({"elapsed_s": 100.0, "slots": 2, "jobs": [
            {"name": kava[0], "argv": ["py", "-m", "jobs.train", root.name], "wall_s": 60.0, "status": "ok"}]}))
    assert main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["kava"] == {"accuracy": [0.7, 0.75], "passes_per_question": 16.0, "examples_seen": 2560}
    assert s["teacher"]["accuracy"] == [1.0]                           # a's teacher; b's is left out
    md = (tmp_path / "out" / "summary.md").read_text()
    assert f"`kava_s1` (`{b}`): `-m jobs.train b`" in md and md.count("Matrix wall time") == 2
    assert main([str(a), str(tmp_path / "nope"), "--out", str(tmp_path / "out2")]) == 2


def test_digit_answers_are_scored_by_position():
    """Digit-string answers: the share right at each written position, and the wrong answers by digits wrong."""
    from kava_dist.matrix_summary import digit_positions

    recs = [{"gold": "8 0 4", "pred": "8 0 4"}, {"gold": "123", "pred": "124"}, {"gold": "555", "pred": "5"},
            {"gold": "900", "pred": None}]
    d = digit_positions(recs)
    assert d["by_position"] == [0.75, 0.5, 0.25]
    assert d["digits_wrong_per_wrong_answer"] == {"1": 1, "2": 1, "3": 1}
    assert digit_positions([{"gold": "12", "pred": "12"}, {"gold": "123", "pred": "123"}]) is None   # lengths differ
    assert digit_positions([{"gold": "3.5", "pred": "3.5"}]) is None                                 # not digits
