"""Run an experiment matrix (teachers -> caches -> students -> evaluations -> report) on one machine, as a DAG of
this project's own jobs, several at a time, within a wall-clock deadline.

Usage:
    python -m jobs.matrix configs/experiments/smollm2/matrix.yaml --var device=cuda --deadline-min 14
    python -m jobs.matrix PLAN --dry-run                          # the commands, in start order, and nothing else
    python -m jobs.matrix PLAN --var device=cpu --set train.max_steps=2 data.limit=64 eval.limit=8   # smoke run
    python -m jobs.matrix --config PLAN train.max_steps=2 data.limit=64 --var device=cpu   # the same, every job's shape

A plan (YAML) names an output folder, the slots (jobs at once), variables, and jobs:

    out: runs/smollm2                   # {out} in any string below
    slots: 6                            # sum of the running jobs' `slots`
    vars: {device: cuda, data: data}    # {name} substitution ({python}: this interpreter); --var k=v overrides
    jobs:
      - {name: mult_teacher, kind: train, config: C.yaml, set: [train.stage=teacher], eval: [mult4x4]}
      - {name: mult_cache, kind: cache, after: [mult_teacher], config: C.yaml,
         set: ["model.teacher_adapter={out}/mult_teacher/adapter"]}
      - {name: report, kind: cmd, after: ["*"], run: [python, -m, jobs.report, "{out}/mult_teacher"]}

kinds: `train` = `python -m jobs.train --config C set... train.out_dir={out}/{name}` (and, with `eval:`, a job
`{name}.eval` = `python -m jobs.evaluate --run {out}/{name} --datasets ... --device {device}` right after it);
`cache` = `python -m jobs.build_cache --config C set...`; `cmd` = any argv. `--set` overrides go to every
train/cache job (last, so they win) and their `eval.*` part to every evaluation. `after: ["*"]` = after every
job listed before it; `always: true` starts a job once its `after` jobs ended, whatever their status
(reports, cleanup). Jobs start in plan order as soon as their `after` jobs succeeded and slots are free; a job
whose dependency failed is skipped. With --deadline-min, no train/cache job starts after deadline - reserve, and at
the deadline running jobs are stopped (recorded as `killed`); `always` jobs still run after it.

Writes {out}/_logs/{job}.log and {out}/matrix.json (per job: command, status, rc, start, wall seconds; written
after every change, so it is current if the machine goes away). A rerun skips the jobs that succeeded before.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger("jobs.matrix")
KINDS = ("train", "cache", "cmd")


@dataclass
class Job:
    name: str
    kind: str
    argv: list[str]
    after: list[str] = field(default_factory=list)
    slots: int = 1
    env: dict[str, str] = field(default_factory=dict)
    always: bool = False        # start once its `after` jobs ended, whatever their status (reports, cleanup)
    status: str = "pending"     # pending | running | ok | failed | skipped | killed
    rc: int | None = None
    started: float | None = None
    wall_s: float | None = None
    reason: str = ""


class PlanError(ValueError):
    pass


def _fmt(obj, vars_: dict[str, str]):
    if isinstance(obj, str):
        try:
            return obj.format(**vars_)
        except KeyError as e:
            raise PlanError(f"unknown variable {{{e.args[0]}}} in {obj!r}: define it under `vars:` or pass "
                            f"--var {e.args[0]}=VALUE") from None
    if isinstance(obj, list):
        return [_fmt(x, vars_) for x in obj]
    if isinstance(obj, dict):
        return {k: _fmt(v, vars_) for k, v in obj.items()}
    return obj


def load_plan(path: str | Path, var_overrides: list[str] = (), sets: list[str] = ()) -> tuple[Path, int, list[Job]]:
    """Read a plan into (out dir, slots, jobs in start order); errors name the job and the fix."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    vars_ = {k: str(v) for k, v in (raw.get("vars") or {}).items()}
    for kv in var_overrides:
        if "=" not in kv:
            raise PlanError(f"--var {kv!r}: expected NAME=VALUE")
        k, v = kv.split("=", 1)
        vars_[k] = v
    vars_.setdefault("python", sys.executable)
    vars_["out"] = _fmt(str(vars_.get("out") or raw.get("out") or ""), vars_)   # --var out=DIR wins
    if not vars_["out"]:
        raise PlanError(f"{path}: set `out:` (the folder every run of the matrix goes under)")
    for k in [k for k in vars_ if k not in ("out", "python")]:   # a var may use others, e.g. "{out}/teacher"
        vars_[k] = _fmt(vars_[k], vars_)
    py = sys.executable
    jobs: list[Job] = []
    for i, spec in enumerate(raw.get("jobs") or []):
        name = spec.get("name") or ""
        kind = spec.get("kind", "train")
        if not name or kind not in KINDS:
            raise PlanError(f"{path}: job #{i} needs a `name` and a `kind` in {KINDS} (got {name!r}, {kind!r})")
        v = dict(vars_, name=name)
        overrides = _fmt(list(spec.get("set") or []), v)
        after = list(spec.get("after") or [])
        env = {k: str(x) for k, x in _fmt(dict(spec.get("env") or {}), v).items()}
        if kind in ("train", "cache"):
            config = _fmt(spec.get("config") or "", v)
            if not config:
                raise PlanError(f"{path}: job {name} ({kind}) needs `config:`")
            module = "jobs.train" if kind == "train" else "jobs.build_cache"
            tail = [f"train.out_dir={vars_['out']}/{name}"] if kind == "train" else []
            argv = [py, "-m", module, "--config", config, *overrides, *tail, *sets]
        else:
            argv = _fmt([str(a) for a in spec.get("run") or []], v)
            if not argv:
                raise PlanError(f"{path}: job {name} (cmd) needs `run:` (an argv list)")
            argv = [py if a == "python" else a for a in argv]
        jobs.append(Job(name, kind, argv, after, int(spec.get("slots", 1)), env, bool(spec.get("always", False))))
        if kind == "train" and spec.get("eval"):
            datasets = ",".join(_fmt(list(spec["eval"]), v))
            eval_sets = [x for s in sets if s.startswith("eval.") for x in ("--set", s)]
            argv = [py, "-m", "jobs.evaluate", "--run", f"{vars_['out']}/{name}", "--datasets", datasets,
                    "--data-dir", v.get("data", "data"), "--device", v.get("device", "cpu"), "--no-progress",
                    *_fmt([str(a) for a in spec.get("eval_args") or []], v), *eval_sets]
            jobs.append(Job(f"{name}.eval", "cmd", argv, [name], 1, env))
    names = [j.name for j in jobs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise PlanError(f"{path}: job names must be unique; repeated: {sorted(dup)}")
    for i, j in enumerate(jobs):
        if j.after == ["*"]:
            j.after = names[:i]
        missing = [a for a in j.after if a not in names]
        if missing:
            raise PlanError(f"{path}: job {j.name} runs after unknown job(s) {missing}; known: {names}")
    return Path(vars_["out"]), int(raw.get("slots", 1)), jobs


class Matrix:
    """Start ready jobs in plan order while slots allow; record every state change in matrix.json."""

    def __init__(self, out: Path, slots: int, jobs: list[Job], deadline_s: float | None, reserve_s: float):
        self.out, self.slots, self.jobs = out, slots, jobs
        self.by_name = {j.name: j for j in jobs}
        self.t0 = time.time()
        self.deadline = self.t0 + deadline_s if deadline_s else None
        self.reserve_s = reserve_s
        self.procs: dict[str, tuple[subprocess.Popen, object]] = {}
        (out / "_logs").mkdir(parents=True, exist_ok=True)
        done = self._previous()
        for j in jobs:
            if done.get(j.name) == "ok":
                j.status, j.reason = "ok", "succeeded in an earlier run"

    def _previous(self) -> dict[str, str]:
        p = self.out / "matrix.json"
        if not p.exists():
            return {}
        return {j["name"]: j["status"] for j in json.loads(p.read_text()).get("jobs", [])}

    def save(self) -> None:
        doc = {"out": str(self.out), "slots": self.slots, "started": self.t0, "elapsed_s": time.time() - self.t0,
               "jobs": [asdict(j) for j in self.jobs]}
        tmp = self.out / "matrix.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.out / "matrix.json")

    def _used(self) -> int:
        return sum(self.by_name[n].slots for n in self.procs)

    def _start(self, j: Job) -> None:
        logf = open(self.out / "_logs" / f"{j.name}.log", "ab")
        logf.write(f"$ {' '.join(j.argv)}\n".encode())
        logf.flush()
        env = os.environ | j.env
        proc = subprocess.Popen(j.argv, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[j.name] = (proc, logf)
        j.status, j.started = "running", time.time()
        log.info("start %-28s (%d/%d slots) %s", j.name, self._used(), self.slots, " ".join(j.argv[1:]))

    def _finish(self, name: str, rc: int, status: str | None = None) -> None:
        proc, logf = self.procs.pop(name)
        logf.close()
        j = self.by_name[name]
        j.rc, j.wall_s = rc, time.time() - j.started
        j.status = status or ("ok" if rc == 0 else "failed")
        log.info("%-6s %-28s rc=%s in %.0f s%s", j.status, name, rc, j.wall_s,
                 "" if rc == 0 else f"  (log: {self.out}/_logs/{name}.log)")

    def _kill(self, name: str) -> None:
        proc, _ = self.procs[name]
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self._finish(name, proc.returncode, "killed")
        self.by_name[name].reason = "stopped at the deadline"

    def step(self) -> bool:
        """One scheduling round; False when nothing is left to run or wait for."""
        for name, (proc, _) in list(self.procs.items()):
            if proc.poll() is not None:
                self._finish(name, proc.returncode)
        now = time.time()
        if self.deadline and now >= self.deadline:
            for name in [n for n in self.procs if not self.by_name[n].always]:
                self._kill(name)
        for j in self.jobs:
            if j.status != "pending":
                continue
            states = [self.by_name[a].status for a in j.after]
            if j.always:    # waits for its `after` jobs to end, then runs whatever they did, deadline or not
                if not any(s in ("pending", "running") for s in states) and self._used() + j.slots <= self.slots:
                    self._start(j)
                continue
            if any(s in ("failed", "skipped", "killed") for s in states):
                j.status, j.reason = "skipped", "a job it runs after did not succeed"
            elif self.deadline and now >= self.deadline:
                j.status, j.reason = "skipped", "deadline reached"
            elif self.deadline and j.kind != "cmd" and now >= self.deadline - self.reserve_s:
                j.status, j.reason = "skipped", "too close to the deadline to start"
            elif all(s == "ok" for s in states) and self._used() + j.slots <= self.slots:
                self._start(j)
        self.save()
        return bool(self.procs) or any(j.status == "pending" for j in self.jobs)

    def run(self, poll_s: float = 2.0) -> int:
        try:
            while self.step():
                time.sleep(poll_s)
        finally:
            for name in list(self.procs):
                self._kill(name)
            self.save()
        bad = [j for j in self.jobs if j.status != "ok"]
        for j in bad:
            log.warning("%-28s %s %s", j.name, j.status, j.reason)
        log.info("matrix done in %.0f s: %d ok, %d not ok; %s", time.time() - self.t0, len(self.jobs) - len(bad),
                 len(bad), self.out / "matrix.json")
        return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.matrix", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("args", nargs="*", metavar="PLAN | KEY=VALUE",
                    help="the plan YAML (or --config PLAN), then config overrides for every train/cache job (= --set)")
    ap.add_argument("--config", default="", metavar="PLAN", help="the plan YAML (configs/experiments/...)")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a plan variable")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every train/cache job (their eval.* part for evaluations too)")
    ap.add_argument("--slots", type=int, default=0, help="jobs at once (default: the plan's `slots`)")
    ap.add_argument("--deadline-min", type=float, default=0, help="stop everything this many minutes from now")
    ap.add_argument("--reserve-min", type=float, default=2.0,
                    help="start no train/cache job later than this before the deadline")
    ap.add_argument("--dry-run", action="store_true", help="print the jobs' commands and exit")
    args = ap.parse_intermixed_args(argv)
    plans = [a for a in args.args if "=" not in a] + ([args.config] if args.config else [])
    if len(plans) != 1:
        ap.error(f"give one plan (positional or --config PLAN), got {plans or 'none'}")
    args.plan, args.set = plans[0], [a for a in args.args if "=" in a] + list(args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        out, slots, jobs = load_plan(args.plan, args.var, args.set)
    except (PlanError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for j in jobs:
            print(f"{j.name}  [after {','.join(j.after) or '-'}]\n  {' '.join(j.argv)}")
        return 0
    m = Matrix(out, args.slots or slots, jobs, args.deadline_min * 60 or None, args.reserve_min * 60)
    return m.run()


if __name__ == "__main__":
    sys.exit(main())
