"""`kava demo --quick`: every stage runs (teacher, Ray cache build, DeepSpeed student, No-CoT, eval, report)
and the report exists with every figure. Runs the console entry in a subprocess, as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ["training_curves.png", "kv_similarity_layers.png", "kv_similarity_slots.png", "latent_decoding.png",
           "budget_heatmap.png"]


@pytest.mark.integration
def test_quick_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (out / "demo_table.md").read_text()
    for label in ("Full-CoT teacher", "KaVa student", "No-CoT", "store:", "| teacher |", "| cache |", "| total |"):
        assert label in table, label
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["times_s"]) == {"data", "base", "teacher", "cache", "student", "nocot", "eval", "report"}
    for run in ("teacher", "student", "nocot"):
        assert (out / run / "adapter").is_dir() and (out / run / "metrics.jsonl").stat().st_size > 0
        assert (out / run / "report" / "report.md").stat().st_size > 0
        assert list((out / run / "eval").glob("*.json"))
    for fig in FIGURES:
        assert (out / "student" / "report" / fig).stat().st_size > 1000, fig
    assert (out / "report" / "tables.md").exists()
    # the store the student trained from is complete and verifies
    verify = subprocess.run([sys.executable, "-m", "cache_store", "verify", str(out / "store")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
