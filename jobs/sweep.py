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
checked once up front (kava_dist.trainer.open_store_checked), and every combination's fingerprint must equal it,
else the sweep stops naming the field. Each run trains in OUT/<name>/ (train.out_dir), its log in
OUT/<name>/train.log; a rerun skips finished runs and resumes interrupted ones (--resume).

Sequential by default (subprocesses of jobs.train, each one process on this machine); `--parallel N` runs up
to N at once as Ray tasks (num_gpus=1 each when the cluster has GPUs, so Ray pins one GPU per run; on CPU
each gets CPUs/N cores). Ray joins $RAY_ADDRESS / build.ray_address or starts locally (loopback only).

Writes OUT/summary.json and OUT/summary.md: grid values, status, wall time, final step's loss terms (from
each run's metrics.jsonl) and, when `eval.datasets` is set and kava_dist.evaluate is available, accuracy per
dataset (`python -m jobs.evaluate` on the run's adapter; --eval-data-dir says where dataset names resolve).
Exits 1 if a run failed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs._cli import refuse  # noqa: E402
from kava_dist.guard import Refusal, redact, redact_argv  # noqa: E402

log = logging.getLogger("jobs.sweep")
ROOT = Path(__file__).resolve().parents[1]


def split_values(text: str) -> list[str]:
    """'0.5,1,[a,b]' -> ['0.5', '1', '[a,b]']: commas at bracket depth 0 separate values."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_grid(axes: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for ax in axes:
        if "=" not in ax:
            raise Refusal(f"--grid {ax!r}: write axes as section.key=v1,v2 (e.g. loss.alpha_kv=0.5,1,2).")
        key, vals = ax.split("=", 1)
        values = split_values(vals)
        if not values:
            raise Refusal(f"--grid {ax!r} lists no values.")
        if key in (k for k, _ in grid):
            raise Refusal(f"--grid names {key} twice; list all its values in one axis.")
        grid.append((key.strip(), values))
    return grid


def run_name(i: int, combo: list[tuple[str, str]]) -> str:
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in combo]
    name = f"{i:03d}_" + "_".join(parts) if parts else f"{i:03d}"
    return re.sub(r"[^A-Za-z0-9._=+-]+", "", name.replace(",", "+"))[:120]


def run_state(run_dir: Path) -> str:
    """done (adapter exported) | partial (has a checkpoint: resume) | new."""
    if (run_dir / "adapter" / "adapter_config.json").exists():
        return "done"
    if (run_dir / "checkpoints" / "latest").exists():
        return "partial"
    return "new"


def last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def child_env(extra: dict | None = None) -> dict:
    """Environment of a jobs.train child: no inherited torch.distributed rank/port (each child is a world of one)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


def execute(spec: dict) -> dict:
    """Train one combination (and evaluate it if asked). Runs in this process or inside a Ray task."""
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    state = run_state(run_dir)
    res = {"name": spec["name"], "run_dir": str(run_dir), "state_before": state}
    t0 = time.time()
    if state != "done":
        cmd = [sys.executable, "-m", "jobs.train", "--config", spec["config"], *spec["overrides"]]
        if state == "partial":
            cmd.append("--resume")
        with open(run_dir / "train.log", "a") as f:
            f.write(f"$ {' '.join(redact_argv(cmd))}\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=str(ROOT), env=child_env(spec.get("env")), stdout=f,
                                stderr=subprocess.STDOUT).returncode
    else:
        rc = 0
    res.update(rc=rc, status="ok" if rc == 0 else "failed", train_s=time.time() - t0)
    if rc == 0 and spec.get("eval"):
        ev = spec["eval"]
        device = ev["device"]
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        cmd = [sys.executable, "-m", "jobs.evaluate", "--run", str(run_dir), "--data-dir", ev["data_dir"],
               "--device", device, "--no-progress"]
        with open(run_dir / "eval.log", "a") as f:
            erc = subprocess.run(cmd, cwd=str(ROOT), env=child_env(spec.get("env")), stdout=f,
                                 stderr=subprocess.STDOUT).returncode
        res["eval_rc"] = erc
    return res


def evaluation_available() -> bool:
    try:
        from kava_dist import evaluate as ev
    except Exception:  # noqa: BLE001 - any import failure means: no accuracy column
        return False
    return hasattr(ev, "evaluate_run") and hasattr(ev, "load_summaries")


def accuracies(run_dir: Path) -> dict:
    try:
        from kava_dist.evaluate import load_summaries

        return {name: s.get("accuracy") for name, s in load_summaries(run_dir / "eval").items()}
    except Exception:  # noqa: BLE001
        return {}


def check_store(cfg_path: str, overrides: list[str], combos: list[list[tuple[str, str]]]) -> dict:
    """Open the store once (fingerprint vs the base config), then require every combination to fingerprint
    the same; return {"path", "fingerprint", "rows"}. Stage other than student: no store, nothing to check."""
    from kava_dist.config import load_config
    from kava_dist.fingerprint import cache_fingerprint, diff_fields
    from kava_dist.trainer import FingerprintError, open_store_checked

    base = load_config(cfg_path, overrides)
    if base.train.stage != "student":
        return {}
    reader = open_store_checked(base)
    for combo in combos:
        cfg = load_config(cfg_path, overrides + [f"{k}={v}" for k, v in combo])
        digest, fields = cache_fingerprint(cfg)
        if digest != reader.fingerprint:
            diff = diff_fields(reader.fingerprint_fields or {}, fields)
            raise FingerprintError(f"grid point {dict(combo)} changes the teacher targets ({'; '.join(diff)}): one "
                                   f"store serves only fields outside the cache fingerprint. Drop that axis, or build "
                                   "a store per value and sweep each separately.")
    return {"path": base.store.path, "fingerprint": reader.fingerprint, "rows": len(reader)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_summary(out: Path, meta: dict, rows: list[dict]) -> None:
    meta = {**meta, "overrides": redact_argv(list(meta.get("overrides", [])))}     # credentials never on disk
    (out / "summary.json").write_text(json.dumps(redact({**meta, "runs": rows}), indent=2, default=str))
    keys = [k for k, _ in meta["grid"]]
    terms = sorted({t for r in rows for t in r.get("final", {})
                    if t not in ("step", "epoch", "time", "lr", "samples_per_s", "tokens_per_s", "steps_per_s")})
    sets = sorted({d for r in rows for d in r.get("accuracy", {})})
    head = ["run", *keys, "status", "step", *terms, *[f"acc {d}" for d in sets], "train min"]
    lines = [f"# Sweep {out}", "", f"Config `{meta['config']}`, overrides `{' '.join(meta['overrides']) or '-'}`",
             f"Store: {meta['store'].get('path', '-')} (fingerprint {meta['store'].get('fingerprint', '-')})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        f = r.get("final", {})
        cells = [r["name"], *[r["grid"][k] for k in keys], r["status"], _fmt(f.get("step")),
                 *[_fmt(f.get(t)) for t in terms], *[_fmt(r.get("accuracy", {}).get(d)) for d in sets],
                 f"{r.get('train_s', 0) / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\nLoss terms are the last logged step's (mean over its micro-batches and ranks); accuracy from "
                 "jobs.evaluate when eval.datasets is set.")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def run_ray(specs: list[dict], parallel: int, cfg) -> list[dict]:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    address = cfg.build.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, object_store_memory=(cfg.build.object_store_mb or 256) << 20,
                 log_to_driver=False)
    try:
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        cpus = max(1.0, float(res.get("CPU", 1)) / parallel) if not gpus else 1.0
        log.info("Ray: %s; %d run(s) at a time, %s each", {k: v for k, v in res.items() if k in ("CPU", "GPU")},
                 parallel, "1 GPU" if gpus else f"{cpus:g} CPU")
        task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=cpus, max_retries=0)(execute)
        for s in specs:
            if not gpus:
                s.setdefault("env", {})["OMP_NUM_THREADS"] = str(int(cpus))
        pending, results, queue_ = {}, [], list(specs)
        while queue_ or pending:
            while queue_ and len(pending) < parallel:
                s = queue_.pop(0)
                pending[task.remote(s)] = s
            done, _ = ray.wait(list(pending), num_returns=1)
            s = pending.pop(done[0])
            try:
                results.append(ray.get(done[0]))
            except Exception as e:  # noqa: BLE001 - a crashed task is one failed run
                results.append({"name": s["name"], "run_dir": s["run_dir"], "rc": -1, "status": "failed",
                                "error": repr(e)})
            log.info("%s: %s", s["name"], results[-1]["status"])
        return results
    finally:
        if not address:
            ray.shutdown()


def main(argv=None) -> int:
    try:
        return _main(argv)
    except Refusal as e:
        return refuse(e)


def _main(argv=None) -> int:
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
    from kava_dist.config import ConfigError, load_config
    from kava_dist.trainer import FingerprintError

    grid = parse_grid(args.grid)
    combos = [list(zip([k for k, _ in grid], vals)) for vals in itertools.product(*[v for _, v in grid])]
    out = Path(args.out or f"runs/sweep_{Path(args.config).stem}").resolve()
    if any(o.startswith("train.out_dir=") for o in args.overrides):
        raise Refusal("train.out_dir is set per run by the sweep; pass --out DIR instead.")
    try:
        base = load_config(args.config, args.overrides)
        for combo in combos:    # every combination must be a valid config before anything runs
            load_config(args.config, args.overrides + [f"{k}={v}" for k, v in combo])
    except ConfigError as e:
        return refuse(e)
    if args.parallel < 1:
        raise Refusal("--parallel must be >= 1.")
    specs = []
    for i, combo in enumerate(combos):
        name = run_name(i, combo)
        ovs = args.overrides + [f"{k}={v}" for k, v in combo] + [f"train.out_dir={out / name}"]
        specs.append({"name": name, "run_dir": str(out / name), "config": str(Path(args.config).resolve()),
                      "overrides": ovs, "grid": dict(combo)})
    log.info("sweep of %d run(s) into %s", len(specs), out)
    for s in specs:
        log.info("  %s: %s [%s]", s["name"], " ".join(f"{k}={v}" for k, v in s["grid"].items()), run_state(Path(s["run_dir"])))
    if args.dry_run:
        return 0
    try:
        store = check_store(args.config, args.overrides, combos)     # once, before any run starts
    except (FingerprintError, FileNotFoundError, ValueError, Refusal) as e:
        return refuse(e)
    if store:
        log.info("store %s: fingerprint %s matches every grid point (%d rows)", store["path"], store["fingerprint"],
                 store["rows"])
    want_eval = bool(base.eval.datasets) and evaluation_available()
    if base.eval.datasets and not want_eval:
        log.warning("eval.datasets is set but kava_dist.evaluate is unavailable: the summary has no accuracy.")
    if want_eval:
        dev = args.eval_device or "auto"
        for s in specs:
            s["eval"] = {"data_dir": str(Path(args.eval_data_dir).resolve()), "device": dev}
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": args.config, "overrides": args.overrides, "grid": grid, "store": store, "out": str(out)}
    if args.parallel == 1:
        results = []
        for s in specs:
            log.info("run %s ...", s["name"])
            results.append(execute(s))
            log.info("%s: %s (%.0f s)", s["name"], results[-1]["status"], results[-1].get("train_s", 0))
    else:
        results = run_ray(specs, args.parallel, base)
    by_name = {r["name"]: r for r in results}
    rows = []
    for s in specs:
        r = by_name.get(s["name"], {"status": "missing", "rc": None})
        row = {"name": s["name"], "grid": s["grid"], "run_dir": s["run_dir"], **{k: v for k, v in r.items()
               if k in ("status", "rc", "train_s", "eval_rc", "error", "state_before")}}
        row["final"] = last_metrics(Path(s["run_dir"]))
        if want_eval:
            row["accuracy"] = accuracies(Path(s["run_dir"]))
        rows.append(row)
    write_summary(out, meta, rows)
    failed = [r["name"] for r in rows if r["status"] != "ok"]
    log.info("summary: %s%s", out / "summary.md", f"; failed: {', '.join(failed)} (see their train.log)" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
