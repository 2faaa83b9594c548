"""One command-line shape: every config-driven job takes `--config FILE` plus positional `section.key=value`
overrides (README, "The real workflow on a cluster"), through `python -m jobs.X` and `kava X` alike; the older
flags (`evaluate --run/--set`, `matrix PLAN --set`) keep working."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG_JOBS = ("train", "build-cache", "sweep", "evaluate", "matrix")


def kava(argv: list[str]) -> tuple[int, str]:
    from jobs.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue()


@pytest.mark.parametrize("job", CONFIG_JOBS)
def test_every_config_job_takes_config_and_positional_overrides(job):
    rc, usage = kava([job, "--help"])
    assert rc == 0, usage
    head = usage.split("\n\n")[0]                       # argparse's usage paragraph
    assert "--config" in head, f"kava {job}: no --config in\n{head}"
    assert "..." in head and ("KEY=VALUE" in head or "overrides" in head), f"kava {job}: no positional overrides"


def test_evaluate_config_means_the_run_of_that_config(tmp_path):
    from jobs.evaluate import parse

    cfg = str(REPO / "configs/tiny_cpu.yaml")
    a = parse(["--config", cfg, f"train.out_dir={tmp_path}/run", "eval.limit=3", "--datasets", "toy"])
    assert a.run == f"{tmp_path}/run" and a.overrides == [f"train.out_dir={tmp_path}/run", "eval.limit=3"]
    old = parse(["--run", "runs/x", "--set", "model.dtype=float32", "eval.limit=2"])       # the older flags
    assert old.run == "runs/x" and sorted(old.overrides) == ["eval.limit=2", "model.dtype=float32"]
    for bad in ([], ["--run", "r", "--config", cfg]):
        rc, msg = kava(["evaluate", *bad])
        assert rc == 2 and "--config FILE" in msg and "--run" in msg


def test_matrix_config_plan_and_positional_overrides(tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "slots": 1, "vars": {"device": "cuda"},
                                    "jobs": [{"name": "t", "config": "C.yaml", "eval": ["toy"]}]}))
    rc, new = kava(["matrix", "--config", str(plan), "train.max_steps=2", "--var", "device=cpu", "eval.limit=3",
                    "--dry-run"])
    rc_old, old = kava(["matrix", str(plan), "--var", "device=cpu", "--dry-run", "--set", "train.max_steps=2",
                        "eval.limit=3"])
    assert rc == rc_old == 0
    assert "-m jobs.train --config C.yaml" in new and "train.max_steps=2 eval.limit=3" in new
    assert "--device cpu" in new and new == old
    rc, msg = kava(["matrix", "train.max_steps=2"])
    assert rc == 2 and "one plan" in msg
