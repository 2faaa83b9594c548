"""A real training run (`python -m jobs.train`, output to a pipe as under a scheduler): its progress lines carry
the rate and the ETA, and its exported adapter loads with README's lines (verbatim) to the student that
`load_run` (the evaluation's loader) gives."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kava_testing import QUESTIONS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (found,) = [b for b in blocks if "PeftModel.from_pretrained" in b]
    return found


@pytest.mark.timeout(600)
def test_progress_lines_and_readme_load_of_a_trained_student(tiny_paths, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from kava_dist.pretrained import answer_questions
    from kava_dist.run import load_run

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": q, "cot": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    run = tmp_path / "runs/demo/student"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "configs/tiny_cpu.yaml",
                          f"model.name_or_path={tiny_paths['llama']}", f"data.train_path={data}",
                          "train.stage=online", "train.max_steps=3", "train.log_every=1", "train.global_batch=2",
                          "train.micro_batch=2", "train.zero_stage=0", "train.lr=1e-2", f"train.out_dir={run}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in (out.stdout + out.stderr).splitlines() if re.search(r"step \d+/3 ", ln)]
    assert len(lines) == 3, out.stderr[-3000:]
    assert all(re.search(r"steps_s=[0-9.e+-]+ eta=\d+s$", ln) for ln in lines), lines
    assert lines[-1].endswith("eta=0s")

    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(readme_snippet(), ns)                       # README's lines, verbatim, on this run
    assert capsys.readouterr().out.strip().startswith("[")
    cfg, merged, tok, _ = load_run(run)
    questions = [q for q, _, _ in QUESTIONS]
    assert answer_questions(ns["student"], AutoTokenizer.from_pretrained(str(run / "adapter")), run, questions) == \
        answer_questions(merged, tok, cfg, questions)
