"""Loss-weight sweeps against one teacher-target store: every grid combination is its own `jobs.train` run.

Usage:
    python -m jobs.sweep --config configs/paper/llama1b_aug.yaml store.path=s3://bucket/kava/llama1b_aug \
        --grid loss.alpha_kv=0.5,1,2 loss.kv_loss=mse,smooth_l1 --out runs/sweep_kv            # 6 runs, one by one
    python -m jobs.sweep --config CFG --grid loss.alpha_codi=0,10 --parallel 4 --out runs/sw   # Ray tasks, 1 GPU each
    python -m jobs.sweep --config CFG --grid lora.target_modules=[q_proj,v_proj],[q_proj,k_proj,v_proj,o_proj] ...
    python -m jobs.sweep ... --dry-run                                                         # list the runs only

Arguments after `--grid` are axes `section.key=v1,v2,...` (commas inside [...] stay in one value); other
overrides (`section.key=value`) go before `--grid` or after another option, and apply to every run. A grid may
only vary fields outside the cache fingerprint (loss weights, LoRA, lr, T, seeds...): the store's fingerprint is
checked once up front (kava_dist.targets.open_targets), and every combination's fingerprint must equal it,
else the sweep stops naming the field. Each run trains in OUT/<name>/ (train.out_dir), its log in
OUT/<name>/train.log; a rerun skips finished runs and resumes interrupted ones (--resume).

Sequential by default (subprocesses of jobs.train, each one process on this machine); `--parallel N` runs up
to N at once as Ray tasks (num_gpus=1 each when the cluster has GPUs, so Ray pins one GPU per run; on CPU
each gets CPUs/N cores). Ray joins $RAY_ADDRESS / build.ray_address or starts locally (loopback only).

Writes OUT/summary.json and OUT/summary.md: grid values, status, wall time, final step's loss terms (from
each run's metrics.jsonl) and, when `eval.datasets` is set and kava_dist.evaluate is available, accuracy per
dataset (`python -m jobs.evaluate` on the run's adapter; --eval-data-dir says where dataset names resolve).
Exits 1 if a run failed, 2 when refused before any run (a bad grid or config, a store of other targets). The
body is kava_dist/sweep.py (run_sweep), the run scheduling kava_dist/schedule.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._cli import REFUSED, refuse  # noqa: E402

log = logging.getLogger("jobs.sweep")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="base YAML config")
    ap.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2", help="sweep axes")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once (> 1: Ray tasks, one GPU each)")
    ap.add_argument("--out", default="", help="sweep directory (default runs/sweep_<config name>)")
    ap.add_argument("--eval-data-dir", default="data", help="where eval.datasets names resolve (jobs.evaluate)")
    ap.add_argument("--eval-device", default="", help="device for the accuracy evaluation (default: cuda where the run has one)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    ap.add_argument("overrides", nargs="*", help="section.key=value applied to every run")
    args = ap.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from kava_dist.sweep import run_sweep

    try:
        return run_sweep(args.config, args.overrides, args.grid, args.out, args.parallel, args.eval_data_dir,
                         args.eval_device, args.dry_run)
    except REFUSED as e:
        return refuse(e)


if __name__ == "__main__":
    sys.exit(main())
