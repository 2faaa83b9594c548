"""Run an experiment matrix (teachers -> caches -> students -> evaluations -> report) on one machine, as a DAG of
this project's own jobs, several at a time, within a wall-clock deadline.

Usage:
    python -m jobs.matrix configs/experiments/smollm2/matrix.yaml --var device=cuda --deadline-min 14
    python -m jobs.matrix PLAN --dry-run                          # the commands, in start order, and nothing else
    python -m jobs.matrix PLAN --only 'kava_*,codi_s0'           # a part: these jobs and what they need
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

Before starting anything it checks that the train/cache jobs' packages import in their interpreter and that each
`cmd` program is on PATH (kava_dist.schedule.preflight), and exits 2 naming what is missing (--no-preflight skips it).

Writes {out}/_logs/{job}.log and {out}/matrix.json (per job: command, status, rc, start, wall seconds; written
after every change, so it is current if the machine goes away). A rerun skips the jobs that succeeded before.
Plan loading and the scheduler are kava_dist/schedule.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kava_dist.schedule import PlanError, Scheduler, load_plan, preflight, select_jobs  # noqa: E402

log = logging.getLogger("jobs.matrix")


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
    ap.add_argument("--only", default="", metavar="NAME,NAME",
                    help="run only these jobs (shell globs, e.g. 'kava_*,codi_s0') and what they need: the jobs "
                         "they run after, their evaluations, the summary and cleanup jobs")
    ap.add_argument("--dry-run", action="store_true", help="print the jobs' commands and exit")
    ap.add_argument("--no-preflight", action="store_true",
                    help="skip the check, before anything starts, that the jobs' packages import and programs exist")
    args = ap.parse_intermixed_args(argv)
    plans = [a for a in args.args if "=" not in a] + ([args.config] if args.config else [])
    if len(plans) != 1:
        ap.error(f"give one plan (positional or --config PLAN), got {plans or 'none'}")
    args.plan, args.set = plans[0], [a for a in args.args if "=" in a] + list(args.set)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        out, slots, jobs = load_plan(args.plan, args.var, args.set)
        if args.only:
            jobs = select_jobs(jobs, [p.strip() for p in args.only.split(",") if p.strip()])
    except (PlanError, OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for j in jobs:
            print(f"{j.name}  [after {','.join(j.after) or '-'}]\n  {' '.join(j.argv)}")
        return 0
    problems = [] if args.no_preflight else preflight(jobs)
    if problems:
        print("error: no job was started:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    return Scheduler(out, args.slots or slots, jobs, args.deadline_min * 60 or None, args.reserve_min * 60).run()


if __name__ == "__main__":
    sys.exit(main())
