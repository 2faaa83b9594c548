"""jobs.matrix: plan loading, dependency order, failure propagation, `always` jobs, the deadline, resume."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from kava_dist.schedule import PlanError, load_plan
from kava_dist.schedule import Scheduler as Matrix


def write_plan(tmp_path: Path, jobs: list[dict], **top) -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "slots": 2, **top, "jobs": jobs}))
    return p


def py(code: str) -> list[str]:
    return ["python", "-c", code]


def touch(name: str) -> list[str]:
    """A job that appends its name to {out}/order.txt (the order jobs ran in)."""
    return py(f"open(r'{{out}}/order.txt', 'a').write('{name}\\n')")


def run(plan: Path, **kw) -> tuple[int, dict]:
    out, slots, jobs = load_plan(plan, kw.pop("var", []), kw.pop("sets", []))
    rc = Matrix(out, slots, jobs, kw.get("deadline_s"), kw.get("reserve_s", 0.0)).run(poll_s=0.05)
    doc = json.loads((out / "matrix.json").read_text())
    return rc, {j["name"]: j for j in doc["jobs"]}


def test_order_failure_skip_and_always(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, [
        {"name": "a", "kind": "cmd", "run": touch("a")},
        {"name": "b", "kind": "cmd", "after": ["a"], "run": touch("b")},
        {"name": "bad", "kind": "cmd", "after": ["a"], "run": py("import sys; sys.exit(3)")},
        {"name": "c", "kind": "cmd", "after": ["bad"], "run": touch("c")},
        {"name": "report", "kind": "cmd", "after": ["*"], "always": True, "run": touch("report")},
    ])
    rc, jobs = run(plan)
    assert rc == 1
    assert (jobs["a"]["status"], jobs["b"]["status"], jobs["bad"]["status"]) == ("ok", "ok", "failed")
    assert jobs["bad"]["rc"] == 3 and jobs["c"]["status"] == "skipped" and jobs["report"]["status"] == "ok"
    order = (tmp_path / "out" / "order.txt").read_text().split()
    assert order[0] == "a" and order[-1] == "report" and "c" not in order
    assert "$ " in (tmp_path / "out" / "_logs" / "bad.log").read_text()     # the command heads its log


def test_train_jobs_get_config_sets_and_an_eval_job(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, [{"name": "t", "config": "C.yaml", "set": ["train.stage=teacher", "x={name}"],
                                  "eval": ["gsm8k", "svamp"]}], vars={"device": "cuda"})
    out, _, jobs = load_plan(plan, ["device=cpu"], ["train.max_steps=2", "eval.limit=4"])
    train, ev = jobs
    assert train.argv[1:] == ["-m", "jobs.train", "--config", "C.yaml", "train.stage=teacher", "x=t",
                              f"train.out_dir={out}/t", "train.max_steps=2", "eval.limit=4"]
    assert ev.name == "t.eval" and ev.after == ["t"]
    assert ev.argv[ev.argv.index("--device") + 1] == "cpu" and ev.argv[-2:] == ["--set", "eval.limit=4"]
    assert "--datasets" in ev.argv and "gsm8k,svamp" in ev.argv


@pytest.mark.parametrize("jobs, match", [
    ([{"name": "x", "kind": "nope"}], "kind"),
    ([{"name": "x"}], "needs `config:`"),
    ([{"name": "x", "kind": "cmd", "run": ["echo"], "after": ["y"]}], "unknown job"),
    ([{"name": "x", "kind": "cmd", "run": ["echo", "{nope}"]}], "--var nope=VALUE"),
    ([{"name": "x", "kind": "cmd", "run": ["echo"]}, {"name": "x", "kind": "cmd", "run": ["echo"]}], "unique"),
])
def test_plan_errors_name_the_fix(tmp_path: Path, jobs, match) -> None:
    with pytest.raises(PlanError, match=match):
        load_plan(write_plan(tmp_path, jobs))


def test_deadline_kills_and_skips_but_always_runs(tmp_path: Path) -> None:
    plan = write_plan(tmp_path, [
        {"name": "slow", "kind": "cmd", "run": py("import time; time.sleep(60)")},
        {"name": "later", "config": "C.yaml", "after": ["slow"]},
        {"name": "report", "kind": "cmd", "after": ["*"], "always": True, "run": touch("report")},
    ])
    t0 = time.time()
    rc, jobs = run(plan, deadline_s=1.5)
    assert time.time() - t0 < 30 and rc == 1
    assert jobs["slow"]["status"] == "killed" and jobs["later"]["status"] == "skipped"
    assert jobs["report"]["status"] == "ok"


def test_rerun_skips_jobs_that_succeeded(tmp_path: Path) -> None:
    flag = tmp_path / "fail_once"
    flag.write_text("")
    code = (f"import os, sys; f=r'{flag}'; open(r'{{out}}/order.txt','a').write('b\\n'); "
            "sys.exit(1 if os.path.exists(f) and not os.remove(f) else 0)")
    plan = write_plan(tmp_path, [{"name": "a", "kind": "cmd", "run": touch("a")},
                                 {"name": "b", "kind": "cmd", "after": ["a"], "run": py(code)}])
    assert run(plan)[0] == 1
    rc, jobs = run(plan)
    assert rc == 0 and jobs["a"]["reason"] == "succeeded in an earlier run"
    assert (tmp_path / "out" / "order.txt").read_text().split() == ["a", "b", "b"]


def test_slots_bound_concurrency(tmp_path: Path) -> None:
    stamp = "import time, os; open(r'{out}/t_{name}', 'w').write(str(time.time())); time.sleep(0.6)"
    plan = write_plan(tmp_path, [{"name": f"j{i}", "kind": "cmd", "run": py(stamp)} for i in range(3)], slots=1)
    assert run(plan)[0] == 0
    starts = sorted(float((tmp_path / "out" / f"t_j{i}").read_text()) for i in range(3))
    assert starts[1] - starts[0] >= 0.5 and starts[2] - starts[1] >= 0.5        # one at a time


def test_preflight_stops_a_plan_whose_packages_do_not_import(tmp_path: Path, monkeypatch, capsys) -> None:
    """A cache job's package that imports only as far as a missing dependency of its own (as `import ray` does
    without msgpack), and a cmd job's missing program, stop the matrix before any job starts, each named with
    its fix."""
    from jobs import matrix as matrix_job
    from kava_dist import schedule

    pkg = tmp_path / "site" / "half_installed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import kava_test_missing_dependency\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    monkeypatch.setitem(schedule.KIND_MODULES, "cache", ("json", "half_installed"))
    plan = write_plan(tmp_path, [
        {"name": "first", "kind": "cmd", "run": touch("first")},
        {"name": "build", "kind": "cache", "config": "C.yaml"},
        {"name": "head", "kind": "cmd", "run": ["kava-test-no-such-program", "start"]},
    ])
    rc = matrix_job.main([str(plan)])
    err = capsys.readouterr().err
    assert rc == 2
    assert not (tmp_path / "out" / "order.txt").exists()          # nothing ran, not even the job that could
    assert "`import half_installed` fails" in err and "kava_test_missing_dependency" in err
    assert "pip install -e ." in err
    assert "'kava-test-no-such-program' is not on PATH" in err
    assert "json" not in err.split("no job was started")[1]      # what imports is not reported


def test_preflight_passes_a_plan_that_can_run(tmp_path: Path, monkeypatch) -> None:
    from kava_dist import schedule

    monkeypatch.setitem(schedule.KIND_MODULES, "train", ("json",))
    plan = write_plan(tmp_path, [
        {"name": "a", "kind": "cmd", "run": touch("a")},
        {"name": "t", "kind": "train", "config": "C.yaml"},
    ])
    _, _, jobs = load_plan(plan)
    assert schedule.preflight(jobs) == []


def test_only_keeps_the_named_jobs_and_what_they_need(tmp_path: Path) -> None:
    from kava_dist.schedule import select_jobs

    cmd = {"kind": "cmd", "run": ["echo"]}
    plan = write_plan(tmp_path, [
        {"name": "teacher", "config": "C.yaml", "eval": ["mult4x4"]},
        {"name": "cache", **cmd, "after": ["teacher"]},
        {"name": "kava_s0", "config": "C.yaml", "after": ["cache"], "eval": ["mult4x4"]},
        {"name": "kava_s1", "config": "C.yaml", "after": ["cache"], "eval": ["mult4x4"]},
        {"name": "codi_s0", "config": "C.yaml", "after": ["cache"], "eval": ["mult4x4"]},
        {"name": "nocot", "config": "C.yaml", "after": ["teacher"], "eval": ["mult4x4"]},
        {"name": "report", **cmd, "after": ["kava_s0.eval"]},
        {"name": "summary", **cmd, "after": ["*"], "always": True},
        {"name": "stop", **cmd, "after": ["summary"], "always": True},
    ])
    _, _, jobs = load_plan(plan)
    kept = select_jobs(jobs, ["kava_*"])
    assert [j.name for j in kept] == ["teacher", "cache", "kava_s0", "kava_s0.eval", "kava_s1", "kava_s1.eval",
                                      "summary", "stop"]
    by = {j.name: j for j in kept}
    assert by["summary"].after == ["teacher", "cache", "kava_s0", "kava_s0.eval", "kava_s1", "kava_s1.eval"]
    assert by["stop"].after == ["summary"]
    _, _, jobs = load_plan(plan)
    assert [j.name for j in select_jobs(jobs, ["nocot", "report"])] == [
        "teacher", "cache", "kava_s0", "kava_s0.eval", "nocot", "nocot.eval", "report", "summary", "stop"]
    _, _, jobs = load_plan(plan)
    with pytest.raises(PlanError, match="matches no job"):
        select_jobs(jobs, ["pccot"])
