"""`kava demo --quick`: every stage runs (teacher, Ray cache build, DeepSpeed student, No-CoT, eval, report)
and the report exists with every figure; the same seed gives the same table. Runs the demo in a subprocess, as a
user would."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ["training_curves.png", "kv_similarity_layers.png", "kv_similarity_slots.png", "latent_decoding.png",
           "budget_heatmap.png"]
ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
           RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")


def run_quick_demo(out: Path, seed: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", "--quick", "--seed", str(seed), "--out", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def measured(out: Path) -> dict:
    """What the same seed must reproduce: each method's accuracy, interval, forward passes and generated tokens
    as the table prints them (not the latency column), and every logged loss of the three training runs."""
    rows = {}
    for line in (out / "demo_table.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and re.match(r"[\d.]+% \(", cells[1]):
            rows[cells[0]] = cells[1:4]
    losses = {run: [{k: v for k, v in json.loads(line).items() if k in ("step", "loss", "ce_teacher", "ce_student",
                                                                         "kv", "codi", "ce_answer")}
                    for line in (out / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("teacher", "student", "nocot")}
    return {"table": rows, "losses": losses}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "a"
    run_quick_demo(out)
    return out


@pytest.mark.integration
def test_quick_demo_runs_every_stage(quick_demo):
    out = quick_demo
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
    # report/ gathers the tables and every figure in one place
    assert (out / "report" / "tables.md").exists() and (out / "report" / "demo_table.md").read_text() == table
    for fig in FIGURES:
        assert (out / "report" / f"student_{fig}").stat().st_size > 1000, fig
    assert (out / "report" / "teacher_training_curves.png").exists()
    # the store the student trained from is complete and verifies
    verify = subprocess.run([sys.executable, "-m", "cache_store", "verify", str(out / "store")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.integration
def test_quick_demo_same_seed_same_table(quick_demo, tmp_path):
    """README and docs/PERFORMANCE.md promise that a seed gives the same table on the same machine."""
    first = measured(quick_demo)
    assert set(first["table"]) == {"Full-CoT teacher", "KaVa student", "No-CoT"}
    assert all(len(v) >= 2 for v in first["losses"].values())
    run_quick_demo(tmp_path / "b")
    second = measured(tmp_path / "b")
    assert second["table"] == first["table"]
    assert second["losses"] == first["losses"]


def test_pointer_task_follows_its_map():
    """The demo's task: each question lists a permutation of the nodes as pairs and a start node; the CoT is the
    start and the nodes the walk visits (all distinct), the answer its last node; questions are distinct, and a
    training set made with `exclude` holds no map-and-start of the test set, in any order of its pairs."""
    from kava_dist.synthetic import make_pointer_task, pointer_key

    test = make_pointer_task(300, hops=3, nodes=6, seed=1000)
    rows = make_pointer_task(3000, hops=3, nodes=6, seed=0, exclude={r["question"] for r in test})
    assert rows == make_pointer_task(3000, hops=3, nodes=6, seed=0, exclude={r["question"] for r in test})
    assert len({r["question"] for r in rows}) == 3000
    for r in rows + test:
        pairs, start = r["question"].split("|")
        succ = {int(p[0]): int(p[1]) for p in pairs.split(" ")}
        assert sorted(succ) == sorted(succ.values()) == list(range(6))
        walk = [int(c) for c in r["cot"]]
        assert walk[0] == int(start) and len(walk) == 4 == len(set(walk))
        assert all(succ[a] == b for a, b in zip(walk, walk[1:]))
        assert r["answer"] == r["cot"][-1]
    assert {r["answer"] for r in rows} == {str(d) for d in range(6)}
    assert not {pointer_key(r["question"]) for r in test} & {pointer_key(r["question"]) for r in rows}


def test_demo_defaults_give_each_cot_token_a_latent_and_each_link_an_iteration():
    """The demo's student works because M = the CoT's tokens (one latent per node of the walk, R-KV keeps them
    all) and T >= M (each Jacobi iteration carries the walk one link further)."""
    from kava_dist.demo import FULL
    from kava_dist.synthetic import make_pointer_task

    assert FULL["task"] == "pointer"
    (row,) = make_pointer_task(1, FULL["hops"], FULL["nodes"])
    assert FULL["latents"] == len(row["cot"]) <= FULL["iterations"]
