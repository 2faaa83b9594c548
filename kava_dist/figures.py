"""[7] Report figures (matplotlib Agg, PNG): training curves, student-vs-teacher KV similarity, decoded latents,
and the latent-budget heatmap.

Usage:
    from kava_dist.figures import (plot_training_curves, kv_similarity, plot_kv_similarity, latent_topk,
                                   write_latent_decoding, plot_budget_heatmap, model_figures)
    plot_training_curves("runs/x/metrics.jsonl", "runs/x/report/training_curves.png")
    plot_budget_heatmap("runs/x/eval/budget.json", "runs/x/report/budget_heatmap.png")
    paths = model_figures(cfg, model, tok, special, "data/gsm8k_aug.valid.jsonl.gz", "runs/x/report", n_examples=16)

KV similarity (the paper's Figs 7-8): cosine between the student's latent K/V (last Jacobi pass, what the answer
attends to) and the teacher's compressed K/V targets (`step.compute_targets`), per layer as a mean over the valid
(example, KV head, slot) entries, plus a slot x slot map (student latent i vs teacher slot j, mean over examples
and heads, teacher-invalid slots left out) for one layer. The teacher is `backbone.load_teacher(cfg.model)` for
student runs and the run's own model for online runs (the joint step uses one set of weights).
Latent decoding: each latent input z_m (`latents_BMd`, the inputs of the last Jacobi pass) goes through the LM
head *directly* (no final norm: the latents are inputs, not last-layer outputs) to its top-3 tokens.
"""
from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kava_dist.backbone import parts  # noqa: E402
from kava_dist.config import KavaConfig  # noqa: E402
from kava_dist.prompts import COT_JOINERS, collate, encode_examples, load_examples_for  # noqa: E402

log = logging.getLogger(__name__)

LOSS_TERMS = ("loss", "ce_student", "kv", "codi", "ce_teacher", "ce_answer")
EXTRA_TERMS = ("lr", "grad_norm")


def _save(fig, out_png: str | Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------- training curves


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (blank or broken lines skipped with a warning)."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON; skipped", path, i + 1)
    return rows


def plot_training_curves(metrics_path: str | Path, out_png: str | Path, smooth: int = 0) -> Path | None:
    """One panel per loss term present in metrics.jsonl (+ lr and grad_norm) against the step."""
    rows = [r for r in read_metrics(metrics_path) if "step" in r]
    terms = [t for t in LOSS_TERMS + EXTRA_TERMS if any(isinstance(r.get(t), (int, float)) for r in rows)]
    if not terms:
        log.warning("%s has no loss terms; no training-curve figure", metrics_path)
        return None
    cols = min(3, len(terms))
    nrows = math.ceil(len(terms) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, term in zip(axes.flat, terms):
        pts = [(r["step"], r[term]) for r in rows if isinstance(r.get(term), (int, float))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, lw=0.8, alpha=0.4 if smooth > 1 else 1.0)
        if smooth > 1 and len(ys) >= smooth:
            sm = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, lw=1.4)
        ax.set_title(term)
        ax.set_xlabel("step")
        if term != "lr" and ys and min(ys) > 0 and max(ys) / max(min(ys), 1e-12) > 50:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    fig.suptitle(f"Training curves ({Path(metrics_path).parent.name})")
    fig.tight_layout()
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- model-based figures


def figure_batch(cfg: KavaConfig, tokenizer, special, data_path: str | Path, n_examples: int):
    """A batch of the first `n_examples` rows with a non-empty teacher CoT, and their CoT texts."""
    examples, _ = load_examples_for(data_path, cfg.data, max(4 * n_examples, 64))
    enc, _ = encode_examples(examples, tokenizer, answer_prompt=cfg.data.answer_prompt,
                             drop_last_step=cfg.data.drop_last_step, max_tokens=cfg.data.max_tokens)
    keep = [e for e in enc if e.cot_ids][:n_examples]
    if not keep:
        after = " after dropping the last step" if cfg.data.drop_last_step else ""
        raise ValueError(f"{data_path} has no rows with a CoT{after}; pass --figure-data "
                         "with a training-style file (question, cot, answer).")
    by_id = {ex.id: ex for ex in examples}
    texts = []
    for e in keep:
        ex = by_id[e.id]
        steps = ex.steps[:-1] if cfg.data.drop_last_step else ex.steps
        texts.append({"question": ex.question, "cot": COT_JOINERS.get(ex.cot_style, " ").join(steps),
                      "answer": ex.answer})
    return collate(keep, special.pad), texts


@torch.no_grad()
def kv_similarity(model, teacher, batch, special, cfg: KavaConfig, layer: int | None = None) -> dict[str, Any]:
    """Per-layer cosine(student latent K/V, teacher compressed K/V) and a slot x slot map for `layer`."""
    from kava_dist.step import compute_targets
    from kava_dist.student import student_forward
    from kava_dist.teacher import teacher_forward

    dev = next(parts(model)[0].parameters()).device
    batch = batch.to(dev)
    tout = teacher_forward(teacher, batch, rope=cfg.eviction.rope)
    tgt = compute_targets(tout, cfg.eviction, cfg.latent.num_latents)
    out = student_forward(model, batch, special, cfg.latent, rope=cfg.eviction.rope, with_hidden=False)
    valid_BLHM = tgt.valid_BLHM.to(dev)
    L = valid_BLHM.shape[1]
    layer = L // 2 if layer is None else layer
    res: dict[str, Any] = {"layer": layer, "num_layers": L, "examples": int(valid_BLHM.shape[0])}
    for kind, s_BLHMD, t_BLHMD in (("k", out.k_BLHMD, tgt.k_BLHMD), ("v", out.v_BLHMD, tgt.v_BLHMD)):
        s, t = s_BLHMD.float(), t_BLHMD.to(dev).float()
        cos_BLHM = F.cosine_similarity(s, t, dim=-1)
        w = valid_BLHM.float()
        res[f"{kind}_per_layer"] = ((cos_BLHM * w).sum((0, 2, 3)) / w.sum((0, 2, 3)).clamp_min(1)).tolist()
        sn_BHMD = F.normalize(s[:, layer], dim=-1)
        tn_BHMD = F.normalize(t[:, layer], dim=-1)
        sim_BHMM = torch.einsum("bhid,bhjd->bhij", sn_BHMD, tn_BHMD)
        wj_BH1M = valid_BLHM[:, layer].float().unsqueeze(2)
        res[f"{kind}_slots"] = ((sim_BHMM * wj_BH1M).sum((0, 1)) / wj_BH1M.sum((0, 1)).clamp_min(1)).tolist()
    res["valid_fraction"] = float(valid_BLHM.float().mean())
    return res


def plot_kv_similarity(sim: dict[str, Any], out_layers_png: str | Path, out_slots_png: str | Path) -> list[Path]:
    L = sim["num_layers"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(range(L), sim["k_per_layer"], "o-", label="K")
    ax.plot(range(L), sim["v_per_layer"], "s-", label="V")
    ax.axhline(0, color="gray", lw=0.6)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity")
    ax.set_title(f"Student latent K/V vs teacher compressed K/V ({sim['examples']} examples, valid slots)")
    ax.legend()
    ax.grid(alpha=0.3)
    p1 = _save(fig, out_layers_png)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, kind in zip(axes, ("k", "v")):
        im = ax.imshow(sim[f"{kind}_slots"], cmap="viridis", vmin=-1, vmax=1)
        M = len(sim[f"{kind}_slots"])
        ticks = list(range(0, M, max(1, M // 8)))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xlabel("teacher compressed slot")
        ax.set_ylabel("student latent")
        ax.set_title(f"{kind.upper()}, layer {sim['layer']}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Slot x slot cosine similarity (mean over examples and KV heads)")
    fig.tight_layout()
    return [p1, _save(fig, out_slots_png)]


@torch.no_grad()
def latent_topk(model, tokenizer, latents_BMd: torch.Tensor, k: int = 3) -> list[list[list[tuple[str, float]]]]:
    """Top-k tokens of each latent through the LM head directly (no final norm). [B][M][k] of (token, prob)."""
    lm = parts(model)[0]
    logits_BMV = lm.lm_head(latents_BMd.to(lm.lm_head.weight.dtype)).float()
    prob_BMV = logits_BMV.softmax(-1)
    top_p, top_i = prob_BMV.topk(k, dim=-1)
    out = []
    for b in range(top_i.shape[0]):
        out.append([[(tokenizer.decode([int(i)]), float(p)) for i, p in zip(top_i[b, m], top_p[b, m])]
                    for m in range(top_i.shape[1])])
    return out


def _tok_str(t: str) -> str:
    return repr(t)[1:-1].replace("|", "\\|") or "∅"


def write_latent_decoding(texts: Sequence[dict], topk: Sequence, out_md: str | Path, out_png: str | Path,
                          n_md: int = 4, last_step_dropped: bool = True) -> list[Path]:
    """Markdown tables (latent m -> top-3 tokens) next to the teacher's CoT text, and a PNG of the first one."""
    how = "last step dropped, as the teacher reads it" if last_step_dropped else "as the teacher reads it"
    lines = ["# Decoded latents", "",
             "Each latent input z_m (last Jacobi pass) projected through the LM head directly (no final norm), "
             f"top-3 tokens with probabilities, next to the teacher's CoT text ({how}).", ""]
    for i, (t, rows) in enumerate(zip(texts[:n_md], topk[:n_md])):
        lines += [f"## Example {i}", "", f"**Question:** {t['question']}", "", f"**Teacher CoT:** `{t['cot']}`", "",
                  f"**Answer:** {t['answer']}", "", "| latent | top-1 | top-2 | top-3 |", "|---:|---|---|---|"]
        for m, cands in enumerate(rows):
            lines.append(f"| {m} | " + " | ".join(f"`{_tok_str(s)}` {p:.2f}" for s, p in cands) + " |")
        lines.append("")
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines))
    rows = topk[0]
    cell = [[str(m)] + [f"{_tok_str(s)} ({p:.2f})" for s, p in cands] for m, cands in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * len(cell)))
    ax.axis("off")
    table = ax.table(cellText=cell, colLabels=["latent", "top-1", "top-2", "top-3"], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    title = ("Q: " + textwrap.shorten(texts[0]["question"], 140)
             + "\nTeacher CoT: " + textwrap.shorten(texts[0]["cot"], 140))
    ax.set_title("\n".join(textwrap.wrap(title, 110, replace_whitespace=False)), fontsize=8, loc="left")
    return [out_md, _save(fig, out_png)]


def model_figures(cfg: KavaConfig, model, tokenizer, special, data_path: str | Path, out_dir: str | Path,
                  n_examples: int = 16, layer: int | None = None, teacher=None) -> dict[str, Any]:
    """KV-similarity and latent-decoding figures of a latent (student/online) run. Returns paths and numbers."""
    from kava_dist.backbone import load_teacher
    from kava_dist.student import student_forward

    out_dir = Path(out_dir)
    batch, texts = figure_batch(cfg, tokenizer, special, data_path, n_examples)
    dev = next(parts(model)[0].parameters()).device
    if teacher is None:
        teacher = model if cfg.train.stage == "online" else load_teacher(cfg.model, device=dev)[0]
    sim = kv_similarity(model, teacher, batch, special, cfg, layer=layer)
    paths = plot_kv_similarity(sim, out_dir / "kv_similarity_layers.png", out_dir / "kv_similarity_slots.png")
    (out_dir / "kv_similarity.json").write_text(json.dumps(sim, indent=1))
    with torch.no_grad():
        lat_BMd = student_forward(model, batch.to(dev), special, cfg.latent, with_hidden=False).latents_BMd
    topk = latent_topk(model, tokenizer, lat_BMd)
    paths += write_latent_decoding(texts, topk, out_dir / "latent_decoding.md", out_dir / "latent_decoding.png",
                                   last_step_dropped=cfg.data.drop_last_step)
    return {"paths": paths, "kv_similarity": sim}


# ----------------------------------------------------------------------------- budget heatmap


def plot_budget_heatmap(budget_json: str | Path, out_png: str | Path) -> Path:
    """Accuracy and latency per (question group, M) from eval/budget.json (`jobs.evaluate --budgets`)."""
    data = json.loads(Path(budget_json).read_text())
    ms, groups = data["budgets"], data["groups"]
    cell = {(c["group"], c["M"]): c for c in data["cells"]}
    fig, axes = plt.subplots(1, 2, figsize=(5 + 1.2 * len(ms), 1.5 + 0.45 * len(groups)), squeeze=False)
    for ax, key, title, scale, fmt in ((axes[0, 0], "accuracy", "accuracy (%)", 100.0, "{:.1f}"),
                                       (axes[0, 1], "latency_s", "latency (ms / question)", 1000.0, "{:.1f}")):
        grid = [[cell[(g, m)][key] * scale if (g, m) in cell else float("nan") for m in ms] for g in groups]
        lim = dict(vmin=0.0, vmax=100.0) if key == "accuracy" else {}
        im = ax.imshow(grid, aspect="auto", cmap="viridis" if key == "accuracy" else "magma_r", **lim)
        ax.set_xticks(range(len(ms)), [f"M={m}" for m in ms])
        ax.set_yticks(range(len(groups)), [f"{g} (n={cell.get((g, ms[0]), {}).get('n', '?')})" for g in groups])
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    dark = im.cmap(im.norm(v))[:3]
                    light = 0.299 * dark[0] + 0.587 * dark[1] + 0.114 * dark[2] > 0.5
                    ax.text(j, i, fmt.format(v), ha="center", va="center", color="black" if light else "white",
                            fontsize=8)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"Latent budget at inference (trained with M={data.get('trained_num_latents', '?')})")
    fig.tight_layout()
    return _save(fig, out_png)
