"""Loss-weight sweeps against one teacher-target store: every grid combination is its own `jobs.train` run
(the body of jobs/sweep.py; its docstring has the command line).

Usage:
    from kava_dist.sweep import run_sweep
    rc = run_sweep("configs/paper/llama1b_aug.yaml", ["store.path=s3://b/kava/l1b"],
                   ["loss.alpha_kv=0.5,1,2", "loss.kv_loss=mse,smooth_l1"], out_dir="runs/sweep_kv")
    grid = parse_grid(["loss.alpha_kv=0.5,1"]); name = run_name(0, [("loss.alpha_kv", "0.5")])

A grid may only vary fields outside the cache fingerprint: the store is opened once (kava_dist.targets.
open_targets) and every combination's fingerprint must equal it, else FingerprintMismatch names the field.
Runs are scheduled with kava_dist.schedule (argv, skip finished runs, resume partial ones); sequential, or
`parallel` > 1 as Ray tasks (one GPU each when the cluster has GPUs, else CPUs/N cores each). Writes
OUT/summary.json and OUT/summary.md; returns 1 if a run failed. Errors that the user fixes raise (Refusal,
ConfigError, FingerprintMismatch, ...), for the job to print as one line.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import time
from pathlib import Path

from kava_dist.guard import Refusal, redact, redact_argv
from kava_dist.schedule import evaluate_argv, run_logged, run_state, train_argv

log = logging.getLogger(__name__)


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


def last_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else {}


def execute(spec: dict) -> dict:
    """Train one combination (and evaluate it if asked). Runs in this process or inside a Ray task."""
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    state = run_state(run_dir)
    res = {"name": spec["name"], "run_dir": str(run_dir), "state_before": state}
    t0 = time.time()
    rc = 0
    if state != "done":
        argv = train_argv(spec["config"], spec["overrides"], resume=state == "partial")
        rc = run_logged(argv, run_dir / "train.log", spec.get("env"))
    res.update(rc=rc, status="ok" if rc == 0 else "failed", train_s=time.time() - t0)
    if rc == 0 and spec.get("eval"):
        ev = spec["eval"]
        device = ev["device"]
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        argv = evaluate_argv(run_dir, ev["data_dir"], device)
        res["eval_rc"] = run_logged(argv, run_dir / "eval.log", spec.get("env"), header=False)
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
    from cache_store.errors import FingerprintMismatch
    from kava_dist.config import load_config
    from kava_dist.fingerprint import cache_fingerprint, diff_fields
    from kava_dist.targets import open_targets

    base = load_config(cfg_path, overrides)
    if base.train.stage != "student":
        return {}
    reader = open_targets(base)
    for combo in combos:
        cfg = load_config(cfg_path, overrides + [f"{k}={v}" for k, v in combo])
        digest, fields = cache_fingerprint(cfg)
        if digest != reader.fingerprint:
            diff = diff_fields(reader.fingerprint_fields or {}, fields)
            raise FingerprintMismatch(f"grid point {dict(combo)} changes the teacher targets ({'; '.join(diff)}): one "
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


def run_sweep(config: str, overrides: list[str], axes: list[str], out_dir: str = "", parallel: int = 1,
              eval_data_dir: str = "data", eval_device: str = "", dry_run: bool = False) -> int:
    """Run (or finish) the sweep of `axes` over `config` + `overrides` into `out_dir` (default
    runs/sweep_<config name>); 0 when every run succeeded (or dry_run), 1 if one failed."""
    from kava_dist.config import load_config

    grid = parse_grid(axes)
    combos = [list(zip([k for k, _ in grid], vals)) for vals in itertools.product(*[v for _, v in grid])]
    out = Path(out_dir or f"runs/sweep_{Path(config).stem}").resolve()
    if any(o.startswith("train.out_dir=") for o in overrides):
        raise Refusal("train.out_dir is set per run by the sweep; pass --out DIR instead.")
    base = load_config(config, overrides)
    for combo in combos:    # every combination must be a valid config before anything runs
        load_config(config, overrides + [f"{k}={v}" for k, v in combo])
    if parallel < 1:
        raise Refusal("--parallel must be >= 1.")
    specs = []
    for i, combo in enumerate(combos):
        name = run_name(i, combo)
        ovs = overrides + [f"{k}={v}" for k, v in combo] + [f"train.out_dir={out / name}"]
        specs.append({"name": name, "run_dir": str(out / name), "config": str(Path(config).resolve()),
                      "overrides": ovs, "grid": dict(combo)})
    log.info("sweep of %d run(s) into %s", len(specs), out)
    for s in specs:
        log.info("  %s: %s [%s]", s["name"], " ".join(f"{k}={v}" for k, v in s["grid"].items()), run_state(Path(s["run_dir"])))
    if dry_run:
        return 0
    store = check_store(config, overrides, combos)     # once, before any run starts
    if store:
        log.info("store %s: fingerprint %s matches every grid point (%d rows)", store["path"], store["fingerprint"],
                 store["rows"])
    want_eval = bool(base.eval.datasets) and evaluation_available()
    if base.eval.datasets and not want_eval:
        log.warning("eval.datasets is set but kava_dist.evaluate is unavailable: the summary has no accuracy.")
    if want_eval:
        dev = eval_device or "auto"
        for s in specs:
            s["eval"] = {"data_dir": str(Path(eval_data_dir).resolve()), "device": dev}
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": config, "overrides": overrides, "grid": grid, "store": store, "out": str(out)}
    if parallel == 1:
        results = []
        for s in specs:
            log.info("run %s ...", s["name"])
            results.append(execute(s))
            log.info("%s: %s (%.0f s)", s["name"], results[-1]["status"], results[-1].get("train_s", 0))
    else:
        results = run_ray(specs, parallel, base)
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
