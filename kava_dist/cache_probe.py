"""The teacher answering from its own compressed cache: how much of the answer M kept CoT entries can carry.

Usage:
    from kava_dist.cache_probe import probe_dataset
    res = probe_dataset(model, tokenizer, special, cfg, "data/mult4x4.test.jsonl.gz", budgets=[24, 48])
    res["summary"]["teacher"]["24"]["accuracy"]       # layout -> budget ("all" = every CoT entry) -> summary
    python -m jobs.evaluate --run runs/mult4x4/teacher --datasets mult4x4 --cache-probe 24,48 --device cuda

A trained Full-CoT teacher reads question + CoT (the row's own, teacher-forced) + prompt + answer once, exactly as
the cache build does; its CoT keys/values are evicted to M entries per layer and KV head under `cfg.eviction`
(method, lam, share, ...). Then it answers again, greedily, from a cache that holds only the question and those M
entries. Three layouts of that cache:

  teacher       post-RoPE keys at their CoT positions, the answer at its own positions: R-KV's compressed decode.
  student_post  the same entries, the prompt and answer where the student puts them (after <bot>, M latents and
                <eot>): what a student whose latent K/V equalled the paper's post-RoPE targets would see.
  student_pre   pre-RoPE keys rotated at the latent slots' positions, prompt and answer where the student puts
                them: what a student whose latent K/V equalled pre-RoPE targets (eviction.rope=pre) would see.

The student's <bot> and <eot> columns are left out (the teacher never learnt them), and a student also carries
its CODI and answer-CE training; so the probe measures the KV targets alone: if they lose the answer at a budget,
matching them cannot teach it, and if they keep it, the student's task is to produce them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from kava_dist.backbone import parts
from kava_dist.config import KavaConfig
from kava_dist.evaluate import _device_of, eval_mode, resolve_dataset, score, wilson_interval
from kava_dist.models import family_of
from kava_dist.passes import cache_kv, make_cache
from kava_dist.prompts import Batch, SpecialIds, collate, encode_examples, load_examples_for
from kava_dist.student import forced_then_greedy
from kava_dist.targets import compute_targets
from kava_dist.teacher import positions_from_mask, teacher_forward

log = logging.getLogger(__name__)

LAYOUTS = ("teacher", "student_post", "student_pre")
ALL = "all"
SHOWN = 8


def _check(budgets: Sequence[int], layouts: Sequence[str]) -> None:
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        raise ValueError(f"unknown cache-probe layout(s) {bad}; choose from {', '.join(LAYOUTS)}.")
    if not budgets or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in budgets):
        raise ValueError(f"cache-probe budgets must be positive ints (M, e.g. 24,48); got {list(budgets)!r}.")


def rotate_keys(model, k_pre_LBHMD: torch.Tensor, pos_BM: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys rotated as the model's attention rotates a key at position pos_BM[b, m]."""
    lm, decoder, _ = parts(model)
    cos, sin = decoder.rotary_emb(k_pre_LBHMD[0], pos_BM)
    return torch.stack([family_of(lm).apply_rope(k, cos, sin) for k in k_pre_LBHMD])


@torch.no_grad()
def probe_batch(model, batch: Batch, special: SpecialIds, cfg: KavaConfig, budgets: Sequence[int | str],
                layouts: Sequence[str], max_new_tokens: int) -> dict[tuple[str, str], list[list[int]]]:
    """Answer tokens per row for every (layout, budget) on one collated batch (already on the model's device).
    A budget of "all" keeps every CoT entry: the probe's reference, the teacher after its whole CoT."""
    lm = parts(model)[0]
    tout = teacher_forward(model, batch, rope="pre")            # k: pre-RoPE, k_post: post-RoPE, q: answer rows
    q_pos_BQ = positions_from_mask(batch.q_mask)
    q_kv = cache_kv(lm(input_ids=batch.q_ids, attention_mask=batch.q_mask, position_ids=q_pos_BQ,
                       use_cache=True, logits_to_keep=1).past_key_values)
    k_pre_LBHND = torch.stack(tout.k_LBHND)
    qlen_B, ncot_B = batch.q_mask.sum(1), batch.cot_mask.sum(1)
    prompt_BP = batch.ans_ids[:, :batch.prompt_len]
    ecfg = replace(cfg.eviction, rope="post")
    out: dict[tuple[str, str], list[list[int]]] = {}
    for budget in budgets:
        M = max(1, batch.cot_ids.shape[1]) if budget == ALL else int(budget)
        t = compute_targets(tout, ecfg, M)                      # k_BLHMD post-RoPE, index_BLHM (-1 = empty slot)
        index_BLHM = t.index_BLHM
        slot_mask_BM = index_BLHM[:, 0, 0] >= 0                 # the first min(M, N_C) slots, same in every head
        if not bool(((index_BLHM >= 0) == slot_mask_BM[:, None, None]).all()):
            raise RuntimeError("eviction filled different slots in different heads; the probe needs one slot mask.")
        mask_BK = torch.cat([batch.q_mask, slot_mask_BM], dim=1)
        slot_pos_BM = qlen_B[:, None] + 1 + torch.arange(M, device=qlen_B.device)[None]
        for layout in layouts:
            if layout == "student_pre":
                idx = index_BLHM.clamp_min(0).transpose(0, 1).unsqueeze(-1).expand(-1, -1, -1, -1,
                                                                                     k_pre_LBHND.shape[-1])
                k_sel_LBHMD = rotate_keys(model, k_pre_LBHND.gather(3, idx), slot_pos_BM)
            else:
                k_sel_LBHMD = t.k_BLHMD.transpose(0, 1)
            v_sel_LBHMD = t.v_BLHMD.transpose(0, 1)
            kv = [(torch.cat([qk, k_sel_LBHMD[i].to(qk.dtype)], 2), torch.cat([qv, v_sel_LBHMD[i].to(qv.dtype)], 2))
                  for i, (qk, qv) in enumerate(q_kv)]
            pos0_B = qlen_B + ncot_B if layout == "teacher" else qlen_B + M + 2   # student: <bot> M latents <eot>
            tokens, _ = forced_then_greedy(lm, make_cache(kv), mask_BK, prompt_BP, pos0_B, special.eos,
                                           max_new_tokens)
            out[(layout, str(budget))] = tokens
    return out


def probe_dataset(model, tokenizer, special: SpecialIds, cfg: KavaConfig, path: str | Path,
                  budgets: Sequence[int], layouts: Sequence[str] = LAYOUTS, limit: int | None = None,
                  batch_size: int | None = None, max_new_tokens: int | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Probe every question of one dataset file (rows need a CoT and an answer). Returns {"summary": {layout:
    {budget: {accuracy, correct, n, ci95}}}, "budgets", "layouts", "eviction", "n"}; budget "all" is included."""
    _check(budgets, layouts)
    d = cfg.data
    limit = cfg.eval.limit if limit is None else limit
    batch_size = batch_size or cfg.eval.batch_size
    max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
    examples, report = load_examples_for(path, d, limit, numeric=d.answer_match == "numeric")
    if not examples:
        raise ValueError(f"{path}: no usable rows ({report.summary()}); the cache probe needs rows with a CoT "
                         f"and a `{d.answer_field}` (data.answer_field).")
    enc, _ = encode_examples(examples, tokenizer, answer_prompt=d.answer_prompt, drop_last_step=d.drop_last_step,
                             max_tokens=0)
    dev = _device_of(model)
    all_budgets: list[int | str] = [ALL, *budgets]
    flags: dict[tuple[str, str], list[bool]] = {(lay, str(m)): [] for lay in layouts for m in all_budgets}
    shown: dict[int, dict[str, Any]] = {}          # the first SHOWN questions of the file: gold and every answer
    order = sorted(range(len(enc)), key=lambda i: (len(enc[i].question_ids), len(enc[i].cot_ids)))
    for start in tqdm(range(0, len(order), batch_size), desc="cache probe", disable=not progress, unit="batch"):
        idx = order[start:start + batch_size]
        batch = collate([enc[i] for i in idx], pad_id=special.pad).to(dev)
        answers = probe_batch(model, batch, special, cfg, all_budgets, layouts, max_new_tokens)
        for key, rows in answers.items():
            for i, toks in zip(idx, rows):
                text = tokenizer.decode(toks, skip_special_tokens=True)
                flags[key].append(score(text, examples[i].answer, d.answer_prompt, d.answer_match)[1])
                if i < SHOWN:
                    shown.setdefault(i, {"id": examples[i].id, "gold": examples[i].answer})[f"{key[0]} M={key[1]}"] = text
    summary: dict[str, dict[str, dict]] = {}
    for (layout, budget), fl in flags.items():
        k, n = sum(fl), len(fl)
        summary.setdefault(layout, {})[budget] = {"accuracy": k / n, "correct": k, "n": n,
                                                  "ci95": list(wilson_interval(k, n))}
        log.info("cache probe %s M=%s: %.1f%% (%d/%d)", layout, budget, 100 * k / n, k, n)
    return {"summary": summary, "budgets": [str(m) for m in all_budgets], "layouts": list(layouts),
            "eviction": vars(cfg.eviction).copy(), "n": len(enc), "path": str(path),
            "examples": [shown[i] for i in sorted(shown)]}


def probe_tag(cfg: KavaConfig) -> str:
    """The eviction settings a probe ran under, for its file name: e.g. `rkv-lam0.1-share_none`."""
    e = cfg.eviction
    return f"{e.method}-lam{e.lam:g}-share_{e.share}"


def probe_run(run_dir: str | Path, datasets: Sequence[str], budgets: Sequence[int], data_dir: str | Path = "data",
              device: str = "cpu", batch_size: int | None = None, limit: int | None = None,
              overrides: Sequence[str] = (), progress: bool = True) -> dict[str, dict]:
    """Load a teacher run and probe it on `datasets` (names or paths; default cfg.eval.datasets). Writes
    RUN/eval/cache_probe/{dataset}.{eviction tag}.json and .md (`probe_tag`: probes under other eviction settings,
    e.g. `--set eviction.method=attention`, sit side by side); returns {dataset: summary}."""
    from kava_dist.run import RunDir, load_run

    rd = RunDir(run_dir)
    cfg, model, tokenizer, special = load_run(run_dir, device=device, overrides=list(overrides))
    if eval_mode(cfg) != "cot":
        raise ValueError(f"--cache-probe evicts a Full-CoT teacher's cache; {run_dir} has train.stage="
                         f"{cfg.train.stage}. Give it the teacher's run (train.stage=teacher).")
    out_dir = rd.eval / "cache_probe"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, path in (resolve_dataset(s, data_dir) for s in (list(datasets) or cfg.eval.datasets)):
        res = probe_dataset(model, tokenizer, special, cfg, path, budgets, limit=limit, batch_size=batch_size,
                            progress=progress)
        res["run"] = str(rd.root)
        stem = f"{name}.{probe_tag(cfg)}"
        tmp = out_dir / f"{stem}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(out_dir / f"{stem}.json")
        (out_dir / f"{stem}.md").write_text(probe_markdown(res, f"Cache probe of {rd.root} on {name}, eviction "
                                                                f"{probe_tag(cfg)}"))
        out[name] = res["summary"]
    return out


def probe_markdown(result: dict[str, Any], title: str = "") -> str:
    """One table: a row per layout, a column per budget, exact accuracy with its 95% interval."""
    budgets = result["budgets"]
    lines = [f"# {title}", ""] if title else []
    lines += ["| layout | " + " | ".join(f"M = {m}" for m in budgets) + " |",
              "|---|" + "---:|" * len(budgets)]
    for layout in result["layouts"]:
        cells = []
        for m in budgets:
            s = result["summary"][layout][m]
            cells.append(f"{100 * s['accuracy']:.1f} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]")
        lines.append(f"| {layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
