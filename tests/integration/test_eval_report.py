"""End to end: train a tiny model a few online steps, save run dirs by hand, then `jobs.evaluate` (with a latent
budget sweep) and `jobs.report`; every JSON, table and figure must exist and be non-empty.

Usage:
    .venv/bin/python -m pytest tests/integration/test_eval_report.py -q
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _root_conftest():
    """tests/conftest.py's helpers, loaded by path (tests/integration/conftest.py shadows the name `conftest`)."""
    spec = importlib.util.spec_from_file_location("kava_tests_root_conftest", ROOT / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ct = _root_conftest()
QUESTIONS, build, make_batch = _ct.QUESTIONS, _ct.build, _ct.make_batch


def _save_run(root: Path, cfg, model, tok, stage: str, seed: int, adapter_from: Path | None = None) -> Path:
    from kava_dist.config import save_config
    from kava_dist.run import export_adapter

    cfg.train.stage, cfg.train.seed, cfg.train.out_dir = stage, seed, str(root)
    save_config(cfg, root / "config.yaml")
    if adapter_from is None:
        export_adapter(model, tok, root / "adapter", {"stage": stage, "step": 20})
    else:                     # same trained weights under another seed/stage: exercises grouping, not training
        shutil.copytree(adapter_from, root / "adapter")
    with open(root / "metrics.jsonl", "w") as f:
        for step in range(1, 21):
            row = {"step": step, "epoch": step / 10, "lr": 1e-3 * min(1.0, step / 5), "grad_norm": 2.0 / step,
                   "loss": 6.0 / step + seed * 0.01, "samples_per_s": 12.0, "tokens_per_s": 900.0, "time": step * 0.5}
            row.update({"ce_student": 3.0 / step, "kv": 0.3 / step, "codi": 0.05 / step, "ce_teacher": 2.5 / step}
                       if stage != "teacher" else {"ce_teacher": 2.5 / step})
            f.write(json.dumps(row) + "\n")
        f.write("\n")
    return root


@pytest.mark.integration
def test_evaluate_and_report_end_to_end(tiny_paths, tmp_path, capsys):
    from kava_dist.step import online_step

    data = tmp_path / "data"
    data.mkdir()
    with gzip.open(data / "toy.test.jsonl.gz", "wt") as f:
        for q, c, a in QUESTIONS:
            f.write(json.dumps({"question": q, "cot": c, "answer": a}) + "\n")
    train_file = data / "toy.train.jsonl.gz"
    shutil.copy(data / "toy.test.jsonl.gz", train_file)

    cfg, model, tok, special = build(tiny_paths, "llama", **{"data.train_path": str(train_file),
                                                               "eval.max_new_tokens": 6,
                                                               "eval.cot_max_new_tokens": 12})
    batch, _ = make_batch(tok, special, rows=QUESTIONS[:4])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(20):
        terms = online_step(model, batch, special, cfg)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < losses[0]
    model.eval()

    runs = tmp_path / "runs"
    r0 = _save_run(runs / "kava_s0", cfg, model, tok, "online", 0)
    r1 = _save_run(runs / "kava_s1", cfg, model, tok, "online", 1, adapter_from=r0 / "adapter")
    rt = _save_run(runs / "cot_s0", cfg, model, tok, "teacher", 0, adapter_from=r0 / "adapter")

    from jobs import evaluate as ev_job
    from jobs import report as rep_job

    for run in (r0, r1, rt):
        extra = ["--budgets", "2,4"] if run == r0 else ["--cache-probe", "2,3"] if run == rt else []
        ev_job.main(["--run", str(run), "--datasets", "toy", "--data-dir", str(data), "--batch-size", "4",
                     "--no-progress"] + extra)
    for run in (r0, r1, rt):
        res = json.loads((run / "eval" / "toy.json").read_text())
        assert res["summary"]["n"] == len(QUESTIONS) and len(res["records"]) == len(QUESTIONS)
        assert res["summary"]["mode"] == ("cot" if run == rt else "latent")
        assert res["summary"]["forward_passes"] >= (1 if run == rt else 1 + cfg.latent.num_iterations + 1)
        assert "| GSM8k" not in (run / "eval" / "summary.md").read_text()
        assert "| toy | " in (run / "eval" / "summary.md").read_text()
    budget = json.loads((r0 / "eval" / "budget.json").read_text())
    assert budget["budgets"] == [2, 4] and {c["M"] for c in budget["cells"]} == {2, 4}
    assert (r0 / "eval" / "budget" / "M2" / "toy.json").stat().st_size > 0
    probe = json.loads((rt / "eval" / "cache_probe" / "toy.rkv-lam0.1-share_none.json").read_text())
    assert probe["budgets"] == ["all", "2", "3"] and probe["n"] == len(QUESTIONS)
    assert set(probe["summary"]) == {"teacher", "student_post", "student_pre"}
    assert "| teacher | " in (rt / "eval" / "cache_probe" / "toy.rkv-lam0.1-share_none.md").read_text()
    before = (rt / "eval" / "toy.json").stat().st_mtime_ns
    ev_job.main(["--run", str(rt), "--datasets", "toy", "--data-dir", str(data), "--no-progress",
                 "--cache-probe", "2", "--cache-probe-only", "--set", "eviction.method=attention"])
    assert (rt / "eval" / "toy.json").stat().st_mtime_ns == before           # the decoding eval did not rerun
    other = json.loads((rt / "eval" / "cache_probe" / "toy.attention-lam0.1-share_none.json").read_text())
    assert other["eviction"]["method"] == "attention" and other["budgets"] == ["all", "2"]
    # another Jacobi depth at evaluation: its own folder, the run's own results untouched
    own = (r0 / "eval" / "toy.json").read_bytes()
    ev_job.main(["--run", str(r0), "--datasets", "toy", "--data-dir", str(data), "--no-progress",
                 "--set", "latent.num_iterations=1", "--out-dir", str(r0 / "eval_t1")])
    assert (r0 / "eval" / "toy.json").read_bytes() == own
    t1 = json.loads((r0 / "eval_t1" / "toy.json").read_text())["summary"]
    assert t1["overrides"] == ["latent.num_iterations=1"]
    assert t1["forward_passes"] == json.loads(own)["summary"]["forward_passes"] - (cfg.latent.num_iterations - 1)
    with pytest.raises(SystemExit):
        ev_job.main(["--run", str(r1), "--datasets", "toy", "--data-dir", str(data), "--no-progress",
                     "--cache-probe", "2"])
    assert "Give it the teacher's run" in capsys.readouterr().err

    out = tmp_path / "tables"
    result = rep_job.main([str(r0), str(r1), str(rt), "--out", str(out), "--figure-data", str(train_file),
                           "--figure-examples", "4"])
    assert len(result["groups"]) == 2                              # kava seeds grouped; the teacher apart
    tables = (out / "tables.md").read_text()
    assert "Table 1" in tables and "Table 2" in tables and "±" in tables
    assert "KaVa (online) · kava" in tables and "Full CoT · cot" in tables and "| 0, 1 |" in tables
    assert json.loads((out / "tables.json").read_text())
    for name in ("report.md", "training_curves.png", "kv_similarity_layers.png", "kv_similarity_slots.png",
                 "kv_similarity.json", "latent_decoding.md", "latent_decoding.png", "budget_heatmap.png"):
        assert (r0 / "report" / name).stat().st_size > 0, name
    for name in ("report.md", "training_curves.png"):
        assert (rt / "report" / name).stat().st_size > 0, name
    report = (r0 / "report" / "report.md").read_text()
    for needle in ("## Config", "## Library versions", "## Hardware", "transformers", "![training_curves]",
                   "![budget_heatmap]", "latent_decoding.md", "Table 1"):
        assert needle in report, needle
    sim = json.loads((r0 / "report" / "kv_similarity.json").read_text())
    assert len(sim["k_per_layer"]) == 2 and all(-1.0 <= c <= 1.0 for c in sim["k_per_layer"] + sim["v_per_layer"])


@pytest.mark.integration
def test_cli_help():
    for job in ("jobs.evaluate", "jobs.report"):
        res = subprocess.run([sys.executable, "-m", job, "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0 and "usage" in res.stdout.lower(), res.stderr
