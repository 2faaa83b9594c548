"""[8] Results of an experiment matrix, per method: test accuracy over seeds, forward passes, examples seen,
wall time and rate per stage, the command behind each run, and the validation accuracy curves.

Usage:
    python -m jobs.summarize runs/mult4x4 --out experiments/mult4x4
    python -m jobs.summarize runs/plan_a runs/plan_b --out experiments/mult4x4   # several matrices, one table
    from kava_dist.matrix_summary import collect, collect_all, write_summary
    runs = collect("runs/mult4x4", dataset="mult4x4")     # one dict per finished run folder
    write_summary(runs, "experiments/mult4x4")            # summary.json, details.json, summary.md, curves.png

Several matrices (plans run one after another, e.g. one per seed) summarise into one table with `collect_all`:
a method's seeds come from every matrix; a run folder name found in more than one matrix (each plan's
`teacher`) is taken from the first matrix given, and the others are logged as left out.

A run's method is its folder name without a `_s<seed>` suffix (`kava_s1` -> `kava`). `summary.json` holds, per
method, exactly {"accuracy": [per-seed fractions], "passes_per_question": mean, "examples_seen": mean};
`details.json` adds per-run intervals, walls, rates and commands, and for digit-string answers the digits right
at each position (`digits`, also a table in summary.md). Reads each run's eval/{dataset}.json,
metrics.jsonl, adapter/kava.json and the matrix's matrix.json (job commands and wall times). An evaluation under
other settings (`jobs.evaluate --set latent.num_iterations=3 --out-dir RUN/eval_t3`) is a row of its own,
method `{method}@t3`, beside the run's.
"""
from __future__ import annotations

import json
import logging
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kava_dist.figures import read_metrics  # noqa: E402

log = logging.getLogger(__name__)

METHOD_ORDER = ("teacher", "kava", "codi", "pccot", "nocot", "kava_crop", "kava_online", "kava_int8")
_SEED = re.compile(r"_s(\d+)$")


def method_of(name: str) -> tuple[str, int | None]:
    m = _SEED.search(name)
    return (name[: m.start()], int(m.group(1))) if m else (name, None)


def digit_positions(records: list[dict]) -> dict[str, Any] | None:
    """For answers that are digit strings of one length (spaces ignored): the fraction of questions whose digit at
    each position is right (in the answer's written order), and how many digits each wrong answer gets wrong.
    None for other answers."""
    golds = ["".join(str(r.get("gold", "")).split()) for r in records]
    if not golds or not all(g.isdigit() for g in golds) or len({len(g) for g in golds}) != 1:
        return None
    preds = ["".join(str(r.get("pred") or "").split()) for r in records]
    width = len(golds[0])
    right = [sum(p[i:i + 1] == g[i] for p, g in zip(preds, golds)) / len(golds) for i in range(width)]
    wrong = Counter(sum(p[i:i + 1] != g[i] for i in range(width)) for p, g in zip(preds, golds) if p != g)
    return {"by_position": right, "digits_wrong_per_wrong_answer": {str(k): wrong[k] for k in sorted(wrong)}}


def collect(root: str | Path, dataset: str = "mult4x4") -> list[dict[str, Any]]:
    """One record per run folder under `root` that has eval/{dataset}.json (others are listed as missing)."""
    root = Path(root)
    jobs = {}
    if (root / "matrix.json").exists():
        jobs = {j["name"]: j for j in json.loads((root / "matrix.json").read_text()).get("jobs", [])}
    runs = []
    for run in sorted(p for p in root.iterdir() if (p / "config.yaml").exists()):
        ev = run / "eval" / f"{dataset}.json"
        method, seed = method_of(run.name)
        metrics = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        train = [r for r in metrics if "samples_per_s" in r]
        curve = [(r["examples_seen"], r["valid/accuracy"]) for r in metrics
                 if "valid/accuracy" in r and "examples_seen" in r]
        # the answer's CE on the validation set (student/online: after the latents; nocot: after the question)
        curve_ce = [(r["examples_seen"], r.get("valid/ce_student", r.get("valid/ce_answer"))) for r in metrics
                    if "examples_seen" in r and ("valid/ce_student" in r or "valid/ce_answer" in r)]
        meta = json.loads((run / "adapter" / "kava.json").read_text()) if (run / "adapter" / "kava.json").exists() else {}
        rec: dict[str, Any] = {"run": run.name, "method": method, "seed": seed, "curve": curve, "curve_ce": curve_ce,
                               "examples_seen": meta.get("examples_seen", train[-1]["examples_seen"] if train and
                                                         "examples_seen" in train[-1] else None),
                               "steps": meta.get("step"), "planned_steps": meta.get("planned_steps"),
                               "samples_per_s": statistics.mean(r["samples_per_s"] for r in train[1:] or train)
                               if train else None,
                               "train_wall_s": jobs.get(run.name, {}).get("wall_s"),
                               "eval_wall_s": jobs.get(f"{run.name}.eval", {}).get("wall_s"),
                               "command": " ".join(jobs.get(run.name, {}).get("argv", [])[1:])}
        if ev.exists():
            rec.update(_scored(json.loads(ev.read_text())))
        else:
            log.warning("%s has no eval/%s.json: left out of the accuracy table", run, dataset)
        runs.append(rec)
        for extra in sorted(run.glob(f"eval_*/{dataset}.json")):   # jobs.evaluate --set ... --out-dir RUN/eval_X
            doc = json.loads(extra.read_text())
            tag = extra.parent.name[len("eval_"):]
            how = " ".join(f"--set {o}" for o in doc["summary"].get("overrides", []))
            runs.append({**rec, "run": f"{run.name}@{tag}", "method": f"{method}@{tag}", "curve": [], "curve_ce": [],
                         "eval_wall_s": None, "command": f"{rec['command']}, evaluated with {how or extra.parent.name}",
                         **_scored(doc)})
    return runs


def _scored(doc: dict) -> dict[str, Any]:
    """A run's fields from one evaluation file (jobs.evaluate's {"summary", "records"})."""
    s = doc["summary"]
    return {"accuracy": s["accuracy"], "correct": s["correct"], "n": s["n"], "ci95": s["ci95"],
            "passes_per_question": s["forward_passes"], "mode": s["mode"],
            "digits": digit_positions(doc.get("records", []))}


def collect_all(roots: list[str | Path], dataset: str = "mult4x4") -> list[dict[str, Any]]:
    """`collect` over several matrices' out folders; a run name seen before (an earlier root's) is left out."""
    runs, seen = [], {}
    for root in roots:
        for rec in collect(root, dataset):
            if rec["run"] in seen:
                log.warning("%s/%s left out: the run %s is taken from %s", root, rec["run"], rec["run"],
                            seen[rec["run"]])
                continue
            seen[rec["run"]] = str(root)
            runs.append({**rec, "root": str(root)})
    return runs


def by_method(runs: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if "accuracy" in r:
            groups.setdefault(r["method"], []).append(r)
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def summary_json(runs: list[dict]) -> dict[str, dict]:
    out = {}
    for method, rs in by_method(runs).items():
        rs = sorted(rs, key=lambda r: r["seed"] or 0)
        seen = [r["examples_seen"] for r in rs if r["examples_seen"] is not None]
        out[method] = {"accuracy": [r["accuracy"] for r in rs],
                       "passes_per_question": statistics.mean(r["passes_per_question"] for r in rs),
                       "examples_seen": round(statistics.mean(seen)) if seen else 0}
    return out


def _fmt_s(x: float | None) -> str:
    return "" if x is None else f"{x:.0f}"


def summary_markdown(runs: list[dict], dataset: str) -> str:
    lines = [f"| Method | seeds | exact accuracy on {dataset} (%), mean ± std | per seed (95% Wilson interval) | "
             "forward passes / question | examples seen | train wall (s) | eval wall (s) | samples/s (train) |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for method, rs in by_method(runs).items():
        rs = sorted(rs, key=lambda r: r["seed"] or 0)
        accs = [100 * r["accuracy"] for r in rs]
        std = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
        per = ", ".join(f"{100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]" for r in rs)
        mean = lambda key: statistics.mean(r[key] for r in rs) if all(r[key] is not None for r in rs) else None  # noqa: E731
        seen = sorted({r["examples_seen"] for r in rs if r["examples_seen"] is not None})
        lines.append(f"| {method} | {len(rs)} | {statistics.mean(accs):.1f}{std} | {per} | "
                     f"{mean('passes_per_question'):.1f} | {', '.join(f'{s:,}' for s in seen)} | "
                     f"{_fmt_s(mean('train_wall_s'))} | {_fmt_s(mean('eval_wall_s'))} | "
                     f"{_fmt_s(mean('samples_per_s'))} |")
    digits = [r for r in runs if r.get("digits")]
    if digits:
        width = len(digits[0]["digits"]["by_position"])
        lines += ["", "Digits right by position, in the answer's written order (% of questions), and the wrong "
                  "answers by how many digits they get wrong:", "",
                  "| run | " + " | ".join(str(i + 1) for i in range(width)) + " | wrong answers: digits wrong (count) |",
                  "|---|" + "---:|" * width + "---|"]
        for r in digits:
            d = r["digits"]
            wrong = ", ".join(f"{k}: {v}" for k, v in d["digits_wrong_per_wrong_answer"].items())
            lines.append(f"| {r['run']} | " + " | ".join(f"{100 * x:.1f}" for x in d["by_position"]) +
                         f" | {wrong} |")
    lines += ["", "Commands (one per run):", ""]
    roots = len({r.get("root") for r in runs}) > 1
    lines += [f"- `{r['run']}`" + (f" (`{r['root']}`)" if roots else "") + f": `{r['command']}`"
              for r in runs if r.get("command")]
    return "\n".join(lines) + "\n"


def plot_curves(runs: list[dict], out_png: str | Path, dataset: str = "valid") -> Path:
    """Left: exact accuracy on the validation questions; right: the answer's validation CE (student-side runs),
    both against examples seen; one colour per method, seeds in lighter lines."""
    fig, (ax, ax_ce) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in sorted(
        runs, key=lambda r: METHOD_ORDER.index(r["method"]) if r["method"] in METHOD_ORDER else 99)))
    for i, method in enumerate(methods):
        for axis, key, scale in ((ax, "curve", 100.0), (ax_ce, "curve_ce", 1.0)):
            for j, r in enumerate(r for r in runs if r["method"] == method and r.get(key)):
                xs, ys = zip(*r[key])
                axis.plot(xs, [scale * y for y in ys], color=colors[i % len(colors)], alpha=1.0 if j == 0 else 0.5,
                          marker="o", markersize=2, label=method if j == 0 else None)
    ax.set_ylabel(f"exact accuracy on {dataset} (%)")
    ax.set_ylim(-2, 102)
    ax_ce.set_ylabel(f"answer cross-entropy on {dataset} (nats/token)")
    for axis in (ax, ax_ce):
        axis.set_xlabel("examples seen")
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


def stage_table(root: str | Path) -> str:
    """Every job of the matrix (training, evaluation, cache builds, commands): status and wall time."""
    p = Path(root) / "matrix.json"
    if not p.exists():
        return ""
    doc = json.loads(p.read_text())
    lines = [f"Matrix wall time {doc.get('elapsed_s', 0):.0f} s, up to {doc.get('slots')} jobs at once.", "",
             "| job | status | wall (s) |", "|---|---|---:|"]
    lines += [f"| {j['name']} | {j['status']} | {_fmt_s(j.get('wall_s'))} |" for j in doc.get("jobs", [])]
    return "\n".join(lines) + "\n"


def write_summary(runs: list[dict], out_dir: str | Path, dataset: str = "mult4x4",
                  root: str | Path | list[str | Path] | None = None) -> dict[str, Path]:
    """Write summary.json, details.json, summary.md (with each matrix's job table: `root`, one folder or a list)
    and curves.png under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out_dir / "summary.json", "details": out_dir / "details.json",
             "markdown": out_dir / "summary.md", "curves": out_dir / "curves.png"}
    paths["summary"].write_text(json.dumps(summary_json(runs), indent=1) + "\n")
    paths["details"].write_text(json.dumps(runs, indent=1) + "\n")
    roots = [] if root is None else [root] if isinstance(root, (str, Path)) else list(root)
    tables = [stage_table(r) for r in roots]
    if len(roots) > 1:
        tables = [f"`{r}`: {t}" for r, t in zip(roots, tables) if t]
    paths["markdown"].write_text(summary_markdown(runs, dataset) + "".join("\n" + t for t in tables if t))
    plot_curves(runs, paths["curves"], dataset=f"{dataset} valid")
    return paths
