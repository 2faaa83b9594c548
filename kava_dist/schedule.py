"""Running this project's jobs as child processes: their command lines, whether a run is finished, and a scheduler
that runs several at once (slots, dependencies, a deadline) and records them. jobs.matrix and jobs.sweep use it;
any driver that runs train/build/evaluate jobs can.

Usage:
    from kava_dist.schedule import Job, Scheduler, evaluate_argv, load_plan, preflight, run_state, train_argv
    argv = train_argv("C.yaml", ["train.out_dir=runs/a"], resume=run_state(Path("runs/a")) == "partial")
    jobs = [Job("a", "train", argv), Job("a.eval", "cmd", evaluate_argv("runs/a", "data", "cpu"), after=["a"])]
    rc = Scheduler(Path("runs"), slots=2, jobs=jobs, deadline_s=600, reserve_s=60).run()   # 0: every job ok
    out, slots, jobs = load_plan("configs/experiments/mult4x4/matrix.yaml", ["device=cuda"], [])   # a matrix plan
    problems = preflight(jobs)     # [] or what would fail at once (a package that does not import, a program)

`run_state(run_dir)`: done (adapter exported, skip it) | partial (has a checkpoint: resume) | new. A Scheduler
job starts once its `after` jobs succeeded and slots are free; a job whose dependency failed is skipped;
`always` jobs start once their `after` jobs ended, whatever their status (and after the deadline). At the
deadline running jobs are stopped (`killed`); no train/cache job starts later than deadline - reserve. Each job
logs to OUT/_logs/<name>.log, headed by its command; OUT/matrix.json is rewritten after every change.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from kava_dist.guard import redact_argv

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]      # where `python -m jobs.*` resolves
KINDS = ("train", "cache", "cmd")


def train_argv(config: str, overrides: list[str], resume: bool = False, python: str = sys.executable) -> list[str]:
    """`python -m jobs.train --config C overrides... [--resume]`."""
    return [python, "-m", "jobs.train", "--config", str(config), *overrides, *(["--resume"] if resume else [])]


def build_argv(config: str, overrides: list[str], python: str = sys.executable) -> list[str]:
    """`python -m jobs.build_cache --config C overrides...`."""
    return [python, "-m", "jobs.build_cache", "--config", str(config), *overrides]


def evaluate_argv(run_dir: str | Path, data_dir: str, device: str, datasets: str = "", extra: list[str] = (),
                  python: str = sys.executable) -> list[str]:
    """`python -m jobs.evaluate --run RUN [--datasets A,B] --data-dir D --device DEV --no-progress extra...`."""
    return [python, "-m", "jobs.evaluate", "--run", str(run_dir), *(["--datasets", datasets] if datasets else []),
            "--data-dir", str(data_dir), "--device", device, "--no-progress", *extra]


def run_state(run_dir: Path) -> str:
    """done (adapter exported) | partial (has a checkpoint: resume) | new."""
    if (run_dir / "adapter" / "adapter_config.json").exists():
        return "done"
    if (run_dir / "checkpoints" / "latest").exists():
        return "partial"
    return "new"


def child_env(extra: dict | None = None) -> dict:
    """Environment of a job child: no inherited torch.distributed rank/port (each child is a world of one), this
    checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def run_logged(argv: list[str], log_path: Path, env: dict | None = None, header: bool = True) -> int:
    """Run one job to its end (in this checkout, `child_env`), its output appended to `log_path`, under a line
    with its (redacted) command when `header`."""
    with open(log_path, "a") as f:
        if header:
            f.write(f"$ {' '.join(redact_argv(argv))}\n")
            f.flush()
        return subprocess.run(argv, cwd=str(ROOT), env=child_env(env), stdout=f, stderr=subprocess.STDOUT).returncode


KIND_MODULES = {"train": ("torch", "transformers", "peft", "deepspeed", "zarr"),
                "cache": ("torch", "transformers", "ray", "zarr", "numcodecs")}
"""What each job kind imports; `preflight` checks them before a plan starts anything."""

_IMPORT_CHECK = """
import importlib, json, sys
bad = {}
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except BaseException as e:
        bad[m] = f"{type(e).__name__}: {e}"
print(json.dumps(bad))
"""


def preflight(jobs: list["Job"]) -> list[str]:
    """What would make a plan's jobs fail at once, found before any starts (an empty list: nothing): each package
    the train/cache jobs import, imported in the job's own interpreter and environment (a package that imports
    but whose own dependency is missing fails here too: `import ray` without msgpack), and each `cmd` job's
    program on PATH. One child process, a few seconds; each problem names its fix."""
    problems: list[str] = []
    by_python: dict[str, set[str]] = {}
    for j in jobs:
        if j.kind in KIND_MODULES:
            by_python.setdefault(j.argv[0], set()).update(KIND_MODULES[j.kind])
        elif j.kind == "cmd" and not (os.path.sep in j.argv[0] and os.access(j.argv[0], os.X_OK)) \
                and shutil.which(j.argv[0], path=child_env(j.env).get("PATH")) is None:
            here = Path(sys.executable).parent / j.argv[0]
            fix = (f"it is in {here.parent}: activate that environment or put {here.parent} on PATH" if here.exists()
                   else "install it (pip install -e . brings ray) or give its full path in the plan")
            problems.append(f"job {j.name}: program {j.argv[0]!r} is not on PATH; {fix}")
    for python, modules in by_python.items():
        try:
            r = subprocess.run([python, "-c", _IMPORT_CHECK, *sorted(modules)], cwd=str(ROOT), env=child_env(),
                               capture_output=True, text=True)
        except OSError as e:
            problems.append(f"interpreter {python} of the train/cache jobs cannot run ({e}); set {{python}} in the "
                            "plan's vars or run jobs.matrix with the project's Python")
            continue
        try:
            bad = json.loads(r.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            bad = {"(interpreter)": (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]}
        problems += [f"`import {m}` fails in {python}: {err}; install the missing package into that environment "
                     f"(pip install -e . from the repo root installs every dependency)" for m, err in bad.items()]
    return problems


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
            if kind == "train":
                argv = train_argv(config, [*overrides, f"train.out_dir={vars_['out']}/{name}", *sets], python=py)
            else:
                argv = build_argv(config, [*overrides, *sets], python=py)
        else:
            argv = _fmt([str(a) for a in spec.get("run") or []], v)
            if not argv:
                raise PlanError(f"{path}: job {name} (cmd) needs `run:` (an argv list)")
            argv = [py if a == "python" else a for a in argv]
        jobs.append(Job(name, kind, argv, after, int(spec.get("slots", 1)), env, bool(spec.get("always", False))))
        if kind == "train" and spec.get("eval"):
            datasets = ",".join(_fmt(list(spec["eval"]), v))
            eval_sets = [x for s in sets if s.startswith("eval.") for x in ("--set", s)]
            argv = evaluate_argv(f"{vars_['out']}/{name}", v.get("data", "data"), v.get("device", "cpu"), datasets,
                                 [*_fmt([str(a) for a in spec.get("eval_args") or []], v), *eval_sets], python=py)
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


def select_jobs(jobs: list[Job], patterns: list[str]) -> list[Job]:
    """The jobs whose names match `patterns` (shell globs), with every job they run after (transitively), the
    evaluation job of each matched train job, and the `always` jobs (summaries, cleanup) that follow a kept job; the
    kept jobs' `after` lists are trimmed to the kept ones. For running a plan in parts (one part per machine
    session, say): the parts write under the same `out`, so one `jobs.summarize` reads them all."""
    import fnmatch

    names = [j.name for j in jobs]
    by_name = {j.name: j for j in jobs}
    keep: set[str] = set()
    for pat in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            raise PlanError(f"--only {pat!r} matches no job; the plan's jobs are {names}")
        keep.update(hit)
    keep.update(f"{n}.eval" for n in list(keep) if f"{n}.eval" in by_name)
    todo = list(keep)
    while todo:                                   # what the kept jobs run after
        for dep in by_name[todo.pop()].after:
            if dep not in keep:
                keep.add(dep)
                todo.append(dep)
    for j in jobs:                                # in plan order, so an always job after another one is seen
        if j.always and j.name not in keep and any(a in keep for a in j.after):
            keep.add(j.name)
    out = []
    for j in jobs:
        if j.name in keep:
            j.after = [a for a in j.after if a in keep]
            out.append(j)
    return out


class Scheduler:
    """Start ready jobs in order while slots allow, within an optional deadline; record every state change in
    OUT/matrix.json (a rerun skips the jobs recorded there as ok)."""

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
