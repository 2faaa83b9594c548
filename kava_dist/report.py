"""Reports over trained runs (the body of jobs/report.py, whose docstring has the command line): Table 1 (accuracy,
mean ± std over seeds), Table 2 (forward passes, latency), and per run RUN/report/report.md with config, cache
fingerprint, library versions, hardware and figures.

Usage:
    from kava_dist.report import load_runs, group_runs, report_runs, table1, table2
    result = report_runs(["runs/a_s0", "runs/a_s1"], out="reports/", no_model_figures=True)
    result["tables"]                      # Table 1 + Table 2 as markdown; result["groups"], result["reports"]
    print(table1(group_runs(load_runs(["runs/a_s0"]))))

Runs are grouped by their resolved config minus train.seed and train.out_dir; each group is one row (method =
stage label, plus the run-dir name without its seed suffix as the variant). std is the sample std (ddof=1) over
the seeds in the group. With `out`: OUT/tables.md and OUT/tables.json.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import yaml

from cache_store._util import flatten
from kava_dist.config import KavaConfig, load_config, to_dict
from kava_dist.evaluate import DATASET_LABELS, DATASET_ORDER, eval_mode, fmt_bytes, load_summaries, summary_markdown
from kava_dist.guard import redact

log = logging.getLogger(__name__)

METHODS = {"teacher": "Full CoT", "nocot": "No-CoT", "student": "KaVa", "online": "KaVa (online)"}
TRAIN_SETS = {"gsm8k_aug": "GSM8k-AUG", "gsm8k_aug_nl": "GSM8k-AUG-NL", "mult4x4": "4x4 Mult", "mult5x5": "5x5 Mult"}
_SEED = re.compile(r"[-_.]?(seed|s)\d+$")


@dataclass
class Run:
    root: Path
    cfg: KavaConfig
    summaries: dict[str, dict]
    key: str = ""
    label: str = ""

    @property
    def variant(self) -> str:
        return _SEED.sub("", self.root.resolve().name)


@dataclass
class Group:
    key: str
    label: str
    model: str
    train_set: str
    runs: list[Run] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [r.cfg.train.seed for r in self.runs]


def load_runs(dirs: list[str]) -> list[Run]:
    runs = []
    for d in dirs:
        root = Path(d)
        if not (root / "config.yaml").exists():
            raise FileNotFoundError(f"{root}/config.yaml not found: pass run directories (written by jobs.train).")
        cfg = load_config(root / "config.yaml")
        runs.append(Run(root, cfg, load_summaries(root / "eval")))
        if not runs[-1].summaries:
            log.warning("%s has no eval/*.json yet: run `python -m jobs.evaluate --run %s` first", root, root)
    return runs


def group_key(cfg: KavaConfig) -> str:
    d = to_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("seed", "out_dir")}
    return json.dumps(d, sort_keys=True, default=str)


def train_set_label(cfg: KavaConfig) -> str:
    name = Path(cfg.data.train_path).name.split(".")[0] if cfg.data.train_path else "(no train set)"
    return TRAIN_SETS.get(name, name)


def method_label(cfg: KavaConfig) -> str:
    """The stage's name; a student/online run without L_KV is the CODI-style baseline, without L_CODI PCCoT-style."""
    if cfg.train.stage in ("student", "online") and cfg.loss.alpha_kv == 0:
        return "CODI-style"
    if cfg.train.stage in ("student", "online") and cfg.loss.alpha_codi == 0:
        return "PCCoT-style"
    return METHODS[cfg.train.stage]


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for r in runs:
        r.key = group_key(r.cfg)
        if r.key not in groups:
            label = method_label(r.cfg) + (f" · {r.variant}" if r.variant else "")
            groups[r.key] = Group(r.key, label, Path(r.cfg.model.name_or_path).name, train_set_label(r.cfg))
        groups[r.key].runs.append(r)
    by_label: dict[str, list[Group]] = {}
    for g in groups.values():
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():         # same label, different configs: name the differing fields
        if len(same) > 1:
            flats = [flatten(json.loads(g.key)) for g in same]
            diff = sorted(k for k in flats[0] if len({json.dumps(f.get(k), default=str) for f in flats}) > 1)
            for g, f in zip(same, flats):
                g.label += " (" + ", ".join(f"{k}={f.get(k)}" for k in diff[:3]) + ")"
    for g in groups.values():
        for r in g.runs:
            r.label = g.label
    return list(groups.values())


def _mean_std(xs: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not xs:
        return "–"
    m = statistics.fmean(xs) * scale
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(xs) * scale:.{digits}f}"


def _datasets(groups: list[Group]) -> list[str]:
    names = {n for g in groups for r in g.runs for n in r.summaries}
    return [n for n in DATASET_ORDER if n in names] + sorted(names - set(DATASET_ORDER))


def _values(g: Group, ds: str, key: str) -> list[float]:
    return [r.summaries[ds][key] for r in g.runs if ds in r.summaries]


def table1(groups: list[Group]) -> str:
    """Accuracy (%) mean ± std over seeds; one table per (backbone, training set)."""
    out = []
    blocks: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        blocks.setdefault((g.model, g.train_set), []).append(g)
    for (model, train_set), gs in blocks.items():
        ds = _datasets(gs)
        out += [f"### Table 1 — accuracy (%), {model}, trained on {train_set}", "",
                "| Method | Seeds | " + " | ".join(DATASET_LABELS.get(d, d) for d in ds) + " |",
                "|---|---|" + "---:|" * len(ds)]
        for g in gs:
            cells = []
            for d in ds:
                vals = _values(g, d, "accuracy")
                cells.append(_mean_std(vals, 100) + (f" (n={len(vals)})" if 0 < len(vals) != len(g.runs) else ""))
            out.append(f"| {g.label} | {', '.join(map(str, g.seeds))} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def table2(groups: list[Group]) -> str:
    """Efficiency: forward passes per question (prefill separately), tokens, latency, peak memory."""
    out = ["### Table 2 — efficiency (mean ± std over seeds)", "",
           "| Method | Trained on | Dataset | Fwd passes / q | Prefill | Passes after prefill | Tokens generated | "
           "Latency (ms/q) | Peak memory |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for g in groups:
        for d in _datasets([g]):
            mem = _values(g, d, "peak_memory_bytes")
            out.append(f"| {g.label} | {g.train_set} | {DATASET_LABELS.get(d, d)} | "
                       f"{_mean_std(_values(g, d, 'forward_passes'), digits=2)} | "
                       f"{_mean_std(_values(g, d, 'prefill_passes'), digits=0)} | "
                       f"{_mean_std(_values(g, d, 'passes_after_prefill'), digits=2)} | "
                       f"{_mean_std(_values(g, d, 'generated_tokens'), digits=2)} | "
                       f"{_mean_std(_values(g, d, 'latency_s'), 1000, 1)} | {fmt_bytes(max(mem)) if mem else '–'} |")
    out += ["", "Forward passes count every model call: latent = prefill + T Jacobi passes + forced "
            "prompt + one per further token; Full CoT / No-CoT = prefill + one per further token. Latency = batch "
            "wall time / batch size on the device in each run's eval summary.", ""]
    return "\n".join(out)


def hardware() -> dict[str, object]:
    import torch

    info: dict[str, object] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                               "cpu_count": os.cpu_count()}
    try:
        import psutil

        info["memory"] = fmt_bytes(psutil.virtual_memory().total)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def fingerprint_section(cfg: KavaConfig) -> list[str]:
    if not cfg.store.path:
        return ["No teacher-target store in this config (store.path is empty)."]
    try:
        from kava_dist.fingerprint import cache_fingerprint

        digest, fields = cache_fingerprint(cfg)
    except Exception as e:  # files moved or absent: say so rather than fail the report
        return [f"store.path={cfg.store.path}; fingerprint not computable here: {e}"]
    return [f"store.path={cfg.store.path}, fingerprint `{digest}`", "", "```json", json.dumps(fields, indent=1,
            default=str), "```"]


def run_figures(run: Run, args) -> tuple[list[Path], list[str]]:
    """Figures in RUN/report/; returns (paths, notes on figures that were skipped)."""
    from kava_dist.figures import model_figures, plot_budget_heatmap, plot_training_curves

    out_dir, paths, notes = run.root / "report", [], []
    metrics = run.root / "metrics.jsonl"
    p = plot_training_curves(metrics, out_dir / "training_curves.png", smooth=args.smooth) if metrics.exists() else None
    paths += [p] if p else []
    notes += [] if p else [f"no training curves: {metrics} is missing or has no loss terms"]
    budget = run.root / "eval" / "budget.json"
    if budget.exists():
        paths.append(plot_budget_heatmap(budget, out_dir / "budget_heatmap.png"))
    elif eval_mode(run.cfg) == "latent":
        notes.append(f"no budget heatmap: run `python -m jobs.evaluate --run {run.root} --budgets 8,16,24,32`")
    if eval_mode(run.cfg) != "latent":
        return paths, notes
    if args.no_model_figures:
        return paths, notes + ["KV-similarity and latent-decoding figures skipped (--no-model-figures)"]
    data = args.figure_data or next((p for p in (run.cfg.data.valid_path, run.cfg.data.train_path)
                                     if p and Path(p).exists()), "")
    if not data:
        return paths, notes + ["no KV-similarity / latent figures: pass --figure-data FILE (question, cot, answer)"]
    from kava_dist.run import load_run

    cfg, model, tok, special = load_run(run.root, device=args.device)
    res = model_figures(cfg, model, tok, special, data, out_dir, n_examples=args.figure_examples, layer=args.kv_layer)
    return paths + res["paths"], notes


def write_run_report(run: Run, group: Group, figures: list[Path], notes: list[str]) -> Path:
    from kava_dist.run import versions

    out = run.root / "report" / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# Report: {run.root.name}", "",
             f"- method: **{run.label}** (train.stage={run.cfg.train.stage}, eval mode {eval_mode(run.cfg)}, "
             f"seed {run.cfg.train.seed})",
             f"- backbone {run.cfg.model.name_or_path}, trained on {group.train_set}",
             f"- seed group: {len(group.runs)} run(s): " + ", ".join(str(r.root) for r in group.runs), "",
             "## Evaluation of this run", ""]
    lines += [summary_markdown(run.summaries) if run.summaries
              else "No eval/*.json: run `python -m jobs.evaluate`.", ""]
    lines += ["## Its seed group", "", table1([group]), table2([group])]
    lines += ["## Figures", ""]
    for p in figures:
        rel = p.relative_to(out.parent)
        lines += [f"- [{rel}]({rel})" if p.suffix == ".md" else f"![{p.stem}]({rel})", ""]
    lines += [f"- {n}" for n in notes] + [""]
    if any(p.name == "latent_decoding.md" for p in figures):
        lines += ["Decoded latents: each latent input through the LM head directly (no final norm).", ""]
    lines += ["## Config", "", "```yaml", yaml.safe_dump(redact(to_dict(run.cfg)), sort_keys=False).rstrip(), "```", "",
              "## Teacher-target cache", ""] + fingerprint_section(run.cfg) + ["", "## Library versions", ""]
    lines += [f"- {k}: {v}" for k, v in versions().items()] + ["", "## Hardware (report host)", ""]
    lines += [f"- {k}: {v}" for k, v in hardware().items()]
    devices = {s["device"] for s in run.summaries.values()}
    lines += [f"- evaluation device(s): {', '.join(sorted(devices)) or 'n/a'}", ""]
    out.write_text("\n".join(lines))
    return out


def report_runs(run_dirs: list[str], out: str = "", device: str = "cpu", figure_data: str = "",
                figure_examples: int = 16, kv_layer: int | None = None, smooth: int = 0,
                no_model_figures: bool = False) -> dict:
    """Every run's report and figures, the tables over all runs (and OUT/tables.md, OUT/tables.json with `out`).
    Returns {"groups", "reports", "tables"}. A run dir that is not an evaluated run raises (one-line fix)."""
    args = SimpleNamespace(device=device, figure_data=figure_data, figure_examples=figure_examples,
                           kv_layer=kv_layer, smooth=smooth, no_model_figures=no_model_figures)
    runs = load_runs(run_dirs)
    groups = group_runs(runs)
    by_key = {g.key: g for g in groups}
    reports = []
    for run in runs:
        figures, notes = run_figures(run, args)
        reports.append(write_run_report(run, by_key[run.key], figures, notes))
        log.info("wrote %s (%d figures)", reports[-1], len(figures))
    tables = table1(groups) + "\n" + table2(groups)
    if out:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tables.md").write_text("# KaVa results\n\n" + tables)
        data = [{"label": g.label, "model": g.model, "train_set": g.train_set, "seeds": g.seeds,
                 "runs": [str(r.root) for r in g.runs],
                 "summaries": {str(r.root): r.summaries for r in g.runs}} for g in groups]
        (out_dir / "tables.json").write_text(json.dumps(data, indent=1, default=str))
    return {"groups": groups, "reports": reports, "tables": tables}
