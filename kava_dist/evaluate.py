"""[7] Evaluation: batched greedy decoding in three modes, CODI answer extraction, accuracy and efficiency.

Usage:
    from kava_dist.evaluate import evaluate_run, evaluate_dataset, extract_answer, wilson_interval
    summaries = evaluate_run("runs/llama1b_aug", ["gsm8k", "gsm_hard", "svamp"], data_dir="data", device="cuda")
    # -> runs/llama1b_aug/eval/{gsm8k,gsm_hard,svamp}.json + eval/summary.md
    result = evaluate_dataset(model, tok, special, cfg, "data/svamp.test.jsonl.gz", limit=100)
    result["summary"]["accuracy"], result["records"][0]["forward_passes"]
    extract_answer("so 1,234 dollars. The answer is: 1,234")   # 1234.0
    wilson_interval(50, 100)                                   # (0.4038, 0.5962)

Modes (from `cfg.train.stage`; prompt and extraction: docs/DEVIATIONS.md D13):
    latent  (student, online)  BOS+question | <bot> latents | <eot> "The answer is:" (forced) | answer
    cot     (teacher)          BOS+question | CoT + "The answer is:" + answer, all generated (Full CoT)
    nocot   (nocot)            BOS+question "The answer is:" (forced, one prefill pass) | answer

Forward passes count every model call a question needed: latent = prefill + T Jacobi passes +
one forced-prompt pass + one pass per further token; cot/nocot = prefill + one pass per further token. The
prefill is reported separately (`prefill_passes`). A batch runs as long as its slowest row; each row counts
only the passes it needed (rows that are done stop counting). `generated_tokens` excludes EOS.
Answer extraction (`data.answer_match`) is CODI's by default (remove commas, the LAST number matching
`-?\\d+\\.?\\d*`, compared as float), or exact string equality (`exact`, for digit-string answers), applied to
the text after the last "The answer is:" when the output contains one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import resource
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from cache_store._util import format_bytes
from kava_dist.backbone import parts
from kava_dist.config import KavaConfig, LatentConfig
from kava_dist.guard import confine, redact_argv
from kava_dist.prompts import Encoded, SpecialIds, encode_examples, load_examples_for
from kava_dist.student import generate_answers
from kava_dist.teacher import positions_from_mask

log = logging.getLogger(__name__)

MODES = {"teacher": "cot", "student": "latent", "online": "latent", "nocot": "nocot"}
DATASET_LABELS = {"gsm8k": "GSM8k", "gsm_hard": "GSM-Hard", "svamp": "SVAMP", "multiarith": "MultiArith",
                  "mult4x4": "4x4 Mult", "mult5x5": "5x5 Mult", "gsm8k_aug": "GSM8k-AUG test",
                  "gsm8k_aug_nl": "GSM8k-AUG-NL test"}
DATASET_ORDER = ("gsm8k", "gsm_hard", "svamp", "multiarith", "mult4x4", "mult5x5")
_NUMBER = re.compile(r"-?\d+\.?\d*")
_EXTS = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".txt")
Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- scoring


def extract_answer(text: str, prompt: str | None = "The answer is:") -> float | None:
    """CODI's extraction: drop commas, take the last `-?\\d+\\.?\\d*` as a float; None if there is none.
    If `prompt` occurs in the text, only the part after its last occurrence is searched."""
    if prompt and prompt in text:
        text = text.rsplit(prompt, 1)[1]
    found = _NUMBER.findall(text.replace(",", ""))
    if not found:
        return None
    try:
        return float(found[-1])
    except ValueError:
        return None


def is_correct(pred: float | None, gold: str | float) -> bool:
    """Float comparison as in CODI (`pred == float(gold)`), tolerant only of float rounding (rel 1e-9)."""
    if pred is None:
        return False
    try:
        gold_f = float(str(gold).replace(",", ""))
    except ValueError:
        return False
    return math.isclose(pred, gold_f, rel_tol=1e-9, abs_tol=1e-12)


def exact_answer(text: str, prompt: str | None = "The answer is:") -> str | None:
    """The text after the last answer prompt (all of it when there is none), whitespace runs collapsed;
    None when nothing is left. For `data.answer_match=exact` (digit strings such as `8 5 6 8 7 2 1 2`)."""
    if prompt and prompt in text:
        text = text.rsplit(prompt, 1)[1]
    out = " ".join(text.replace(",", "").split())
    return out or None


def score(text: str, gold: str, prompt: str | None, match: str = "numeric") -> tuple[Any, bool]:
    """(prediction, correct) of a generated text under `data.answer_match`: numeric (CODI's last number, as a
    float) or exact (string equality after `exact_answer`)."""
    if match == "exact":
        pred = exact_answer(text, prompt)
        return pred, pred is not None and pred == " ".join(str(gold).replace(",", "").split())
    if match != "numeric":
        raise ValueError(f"unknown answer match {match!r}; use numeric or exact (data.answer_match).")
    pred = extract_answer(text, prompt)
    return pred, is_correct(pred, gold)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n ((0, 1) when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return lo, hi


# ----------------------------------------------------------------------------- datasets


def dataset_name(path: str | Path) -> str:
    """`data/gsm8k.test.jsonl.gz` -> `gsm8k`; other files -> their name without the extension."""
    name = Path(path).name
    for ext in _EXTS:
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return name[: -len(".test")] if name.endswith(".test") else name


def resolve_dataset(spec: str, data_dir: str | Path = "data") -> tuple[str, Path]:
    """A dataset name (`gsm8k` -> `{data_dir}/gsm8k.test.jsonl.gz`) or a file path -> (name, path)."""
    p = Path(spec)
    if p.exists():
        return dataset_name(p), p
    cand = Path(data_dir) / f"{spec}.test.jsonl.gz"
    if cand.exists():
        return dataset_name(cand), cand     # the file's own name: a spec such as ../x never becomes a path part
    raise FileNotFoundError(
        f"dataset {spec!r}: neither a file nor {cand}. Pass --data-dir DIR holding {{name}}.test.jsonl.gz "
        f"(e.g. the shared data dir), or the file's path.")


def eval_mode(cfg: KavaConfig) -> str:
    return MODES[cfg.train.stage]


def _device_of(model) -> torch.device:
    return next(parts(model)[0].parameters()).device


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [B, S] and bool mask [B, S]."""
    width = max(len(s) for s in seqs)
    ids_BS = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        if s:
            ids_BS[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask_BS[i, width - len(s):] = True
    return ids_BS, mask_BS


# ----------------------------------------------------------------------------- decode loops


@torch.no_grad()
def greedy_decode(model, ids_BS: torch.Tensor, mask_BS: torch.Tensor, eos_id: int,
                  max_new_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Greedy decoding with a KV cache from left-padded prompts. Returns (tokens per row without EOS,
    forward passes per row: the prefill + one per further token the row needed)."""
    lm = parts(model)[0]
    B = ids_BS.shape[0]
    dev = ids_BS.device
    out = lm(input_ids=ids_BS, attention_mask=mask_BS, position_ids=positions_from_mask(mask_BS),
             use_cache=True, logits_to_keep=1)
    count_B = torch.ones(B, dtype=torch.long, device=dev)
    done_B = torch.zeros(B, dtype=torch.bool, device=dev)
    mask = mask_BS
    next_pos_B = mask_BS.long().sum(1)
    steps = []
    for step in range(max_new_tokens):
        nxt_B = out.logits[:, -1].argmax(-1)
        nxt_B = torch.where(done_B, torch.full_like(nxt_B, eos_id), nxt_B)
        steps.append(nxt_B)
        done_B = done_B | (nxt_B == eos_id)
        if bool(done_B.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], dim=1)
        out = lm(input_ids=nxt_B[:, None], attention_mask=mask, position_ids=next_pos_B[:, None],
                 past_key_values=out.past_key_values, use_cache=True)
        next_pos_B = next_pos_B + 1
        count_B += (~done_B).long()
    tokens = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]
    rows = [r[: r.index(eos_id)] if eos_id in r else r for r in tokens]
    return rows, count_B.tolist()


def decode_batch(model, enc: Sequence[Encoded], special: SpecialIds, mode: str, latent: LatentConfig,
                 max_new_tokens: int) -> tuple[list[list[int]], list[dict[str, int]]]:
    """Decode one batch of encoded questions. Returns (tokens per row, pass breakdown per row)."""
    dev = _device_of(model)
    prompt = list(enc[0].prompt_ids)
    if mode == "latent":
        q_ids, q_mask = left_pad([e.question_ids for e in enc], special.pad)
        gen = generate_answers(model, q_ids.to(dev), q_mask.to(dev), prompt, special, latent, max_new_tokens)
        T = latent.num_iterations
        passes = [{"prefill": 1, "latent": T, "prompt": 1, "decode": n - 2 - T, "total": n}
                  for n in gen.forward_passes]
        return gen.tokens, passes
    if mode == "cot":
        seqs = [e.question_ids for e in enc]
    elif mode == "nocot":
        seqs = [e.question_ids + prompt for e in enc]      # prompt forced inside the prefill pass
    else:
        raise ValueError(f"unknown eval mode {mode!r}; use latent, cot or nocot.")
    ids, mask = left_pad(seqs, special.pad)
    tokens, counts = greedy_decode(model, ids.to(dev), mask.to(dev), special.eos, max_new_tokens)
    passes = [{"prefill": 1, "latent": 0, "prompt": 0, "decode": n - 1, "total": n} for n in counts]
    return tokens, passes


@torch.no_grad()
def correct_flags(model, tokenizer, special: SpecialIds, cfg: KavaConfig, examples: Sequence, enc: Sequence[Encoded],
                  mode: str, batch_size: int, max_new_tokens: int | None = None) -> list[bool]:
    """Greedy-decode `enc` (questions of `examples`, same order) in `mode` and score each answer under
    `data.answer_match`: the accuracy curve the trainer logs every `train.eval_every` steps."""
    if max_new_tokens is None:
        max_new_tokens = cfg.eval.cot_max_new_tokens if mode == "cot" else cfg.eval.max_new_tokens
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i].question_ids))
    flags = [False] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        tokens, _ = decode_batch(model, [enc[i] for i in idx], special, mode, cfg.latent, max_new_tokens)
        for i, toks in zip(idx, tokens):
            text = tokenizer.decode(toks, skip_special_tokens=True)
            flags[i] = score(text, examples[i].answer, cfg.data.answer_prompt, cfg.data.answer_match)[1]
    return flags


# ----------------------------------------------------------------------------- one dataset


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_memory(dev: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated since the last reset, or the process's peak RSS on CPU."""
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def cot_groups(records: list[dict], name: str) -> list[str]:
    """Set `group` on each record: its gold-CoT-length tercile within the dataset (short/mid/long, "no CoT")
    when the set has gold CoTs, else the dataset name. Returns the group labels in display order."""
    lens = sorted(r["cot_tokens"] for r in records if r["cot_tokens"] > 0)
    if len(lens) < 3:
        for r in records:
            r["group"] = name
        return [name]
    lo, hi = lens[len(lens) // 3], lens[(2 * len(lens)) // 3]
    labels = [f"{name} CoT short (<{lo} tok)", f"{name} CoT mid ({lo}-{hi - 1} tok)",
              f"{name} CoT long (>={hi} tok)", f"{name} no CoT"]
    for r in records:
        n = r["cot_tokens"]
        r["group"] = labels[3] if n == 0 else labels[0] if n < lo else labels[1] if n < hi else labels[2]
    present = {r["group"] for r in records}
    return [g for g in labels if g in present]


def summarize(records: list[dict], **extra: Any) -> dict[str, Any]:
    n = len(records)
    k = sum(r["correct"] for r in records)
    lo, hi = wilson_interval(k, n)
    mean = (lambda key: sum(r[key] for r in records) / n if n else float("nan"))
    return {"n": n, "correct": k, "accuracy": k / n if n else float("nan"), "ci95": [lo, hi],
            "forward_passes": mean("forward_passes"), "prefill_passes": mean("prefill_passes"),
            "passes_after_prefill": mean("forward_passes") - mean("prefill_passes"),
            "generated_tokens": mean("generated_tokens"), "latency_s": mean("latency_s"), **extra}


def evaluate_dataset(model, tokenizer, special: SpecialIds, cfg: KavaConfig, path: str | Path,
                     name: str | None = None, mode: str | None = None, batch_size: int | None = None,
                     max_new_tokens: int | None = None, limit: int | None = None,
                     latent: LatentConfig | None = None, progress: bool = True,
                     warmup: bool = True) -> dict[str, Any]:
    """Evaluate one dataset file. Returns {"summary": {...}, "records": [per question]}. `warmup` decodes the
    first batch once (two tokens, untimed) before timing."""
    name = name or dataset_name(path)
    mode = mode or eval_mode(cfg)
    latent = latent or cfg.latent
    batch_size = batch_size or cfg.eval.batch_size
    limit = cfg.eval.limit if limit is None else limit
    if max_new_tokens is None:
        max_new_tokens = cfg.eval.cot_max_new_tokens if mode == "cot" else cfg.eval.max_new_tokens
    d = cfg.data
    numeric = d.answer_match == "numeric"
    examples, report = load_examples_for(path, d, limit, numeric=numeric)
    if not examples:
        raise ValueError(f"{path}: no usable rows ({report.summary()}). Evaluation needs a "
                         f"{'numeric ' if numeric else ''}`{d.answer_field}` (data.answer_field) in every row.")
    enc, _ = encode_examples(examples, tokenizer, answer_prompt=cfg.data.answer_prompt,
                             drop_last_step=cfg.data.drop_last_step, max_tokens=0)
    dev = _device_of(model)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i].question_ids))   # less padding per batch
    records: list[dict | None] = [None] * len(enc)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if warmup:   # untimed: first-call costs (kernel selection, allocator growth) stay out of the latency
        decode_batch(model, [enc[i] for i in batches[0]], special, mode, latent, min(2, max_new_tokens))
    for idx in tqdm(batches, desc=f"eval {name} ({mode})", disable=not progress, unit="batch"):
        rows = [enc[i] for i in idx]
        _sync(dev)
        t0 = time.perf_counter()
        tokens, passes = decode_batch(model, rows, special, mode, latent, max_new_tokens)
        _sync(dev)
        latency = (time.perf_counter() - t0) / len(rows)
        for i, toks, p in zip(idx, tokens, passes):
            ex = examples[i]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            pred, correct = score(text, ex.answer, d.answer_prompt, d.answer_match)
            records[i] = {"id": ex.id, "question": ex.question, "gold": ex.answer, "output": text,
                          "pred": pred, "correct": correct, "forward_passes": p["total"],
                          "prefill_passes": p["prefill"], "latent_passes": p["latent"],
                          "prompt_passes": p["prompt"], "decode_passes": p["decode"],
                          "generated_tokens": len(toks), "latency_s": latency,
                          "question_tokens": len(enc[i].question_ids), "cot_tokens": len(enc[i].cot_ids)}
    done = [r for r in records if r is not None]
    cot_groups(done, name)
    mem, mem_kind = peak_memory(dev)
    summary = summarize(done, dataset=name, path=str(path), mode=mode, stage=cfg.train.stage,
                        num_latents=latent.num_latents if mode == "latent" else 0,
                        num_iterations=latent.num_iterations if mode == "latent" else 0,
                        max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
                        device=str(dev), dtype=cfg.model.dtype, peak_memory_bytes=mem, memory_kind=mem_kind,
                        data_report=report.to_dict())
    log.info("%s: accuracy %.2f%% (%d/%d), %.2f passes/question", name, 100 * summary["accuracy"],
             summary["correct"], summary["n"], summary["forward_passes"])
    return {"summary": summary, "records": done}


# ----------------------------------------------------------------------------- run level


def write_result(result: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = confine(out_dir, f"{result['summary']['dataset']}.json", "dataset name")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path


def load_summaries(eval_dir: str | Path) -> dict[str, dict]:
    """Summaries of every `{dataset}.json` in an eval dir (budget sweeps in subdirs are not included)."""
    out = {}
    for p in sorted(Path(eval_dir).glob("*.json")):
        if p.name == "budget.json":
            continue
        data = json.loads(p.read_text())
        if isinstance(data, dict) and "summary" in data:
            out[data["summary"]["dataset"]] = data["summary"]
    rank = {n: i for i, n in enumerate(DATASET_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def fmt_bytes(n: float) -> str:
    """Peak memory as the tables show it: '1.23 GiB', '512 MiB'."""
    return format_bytes(n, digits=2 if n >= 2**30 else 0)


def summary_markdown(summaries: dict[str, dict], title: str = "") -> str:
    head = ("| Dataset | Mode | N | Accuracy (%) | 95% CI (Wilson) | Fwd passes / q | of which prefill | "
            "Tokens generated | Latency (ms/q) | Peak memory |\n|---|---|---:|---:|---|---:|---:|---:|---:|---|")
    lines = ([f"# {title}", ""] if title else []) + [head]
    for name, s in summaries.items():
        lo, hi = s["ci95"]
        label = DATASET_LABELS.get(name, name)
        lines.append(f"| {label} | {s['mode']} | {s['n']} | {100 * s['accuracy']:.2f} | "
                     f"[{100 * lo:.1f}, {100 * hi:.1f}] | {s['forward_passes']:.2f} | {s['prefill_passes']:.2f} | "
                     f"{s['generated_tokens']:.2f} | {1000 * s['latency_s']:.1f} | "
                     f"{fmt_bytes(s['peak_memory_bytes'])} ({s['memory_kind']}) |")
    if summaries:
        s0 = next(iter(summaries.values()))
        lines.append(f"\nDevice {s0['device']}, dtype {s0['dtype']}, batch {s0['batch_size']}, "
                     f"max_new_tokens {s0['max_new_tokens']}"
                     + (f", M={s0['num_latents']}, T={s0['num_iterations']}" if s0["mode"] == "latent" else "")
                     + ". Forward passes count every model call; latency = batch wall time / batch size.")
    return "\n".join(lines) + "\n"


def budget_sweep(model, tokenizer, special: SpecialIds, cfg: KavaConfig, datasets: list[tuple[str, Path]],
                 budgets: Sequence[int], out_dir: str | Path, batch_size: int | None = None,
                 limit: int | None = None, max_new_tokens: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Accuracy/latency for each M in `budgets` (latent.num_latents overridden at inference), per question
    group (dataset and gold-CoT-length tercile). Writes out_dir/M{m}/{dataset}.json and out_dir/../budget.json."""
    if eval_mode(cfg) != "latent":
        raise ValueError(f"a latent-budget sweep needs a student/online run; this run is train.stage="
                         f"{cfg.train.stage}. Drop --budgets for it.")
    out_dir = Path(out_dir)
    cells: dict[tuple[str, int], list[dict]] = {}
    groups: dict[str, None] = {}
    for m in budgets:
        latent = dataclasses.replace(cfg.latent, num_latents=int(m))
        for name, path in datasets:
            res = evaluate_dataset(model, tokenizer, special, cfg, path, name=name, batch_size=batch_size,
                                   limit=limit, max_new_tokens=max_new_tokens, latent=latent, progress=progress)
            write_result(res, out_dir / f"M{m}")
            groups.update(dict.fromkeys([name] + [g for g in cot_groups(res["records"], name) if g != name]))
            for r in res["records"]:
                for g in dict.fromkeys([name, r["group"]]):
                    cells.setdefault((g, int(m)), []).append(r)
    table = [{"group": g, "M": m, **{k: v for k, v in summarize(recs).items()
                                     if k in ("n", "accuracy", "ci95", "forward_passes", "latency_s")}}
             for (g, m), recs in cells.items()]
    result = {"budgets": [int(m) for m in budgets], "groups": list(groups),
              "trained_num_latents": cfg.latent.num_latents,
              "cells": table}
    (out_dir.parent / "budget.json").write_text(json.dumps(result, indent=1))
    return result


def evaluate_run(run_dir: str | Path, datasets: Sequence[str] | None = None, data_dir: str | Path = "data",
                 device: str = "cpu", batch_size: int | None = None, limit: int | None = None,
                 max_new_tokens: int | None = None, budgets: Sequence[int] = (),
                 overrides: Sequence[str] = (), progress: bool = True,
                 out_dir: str | Path | None = None) -> dict[str, dict]:
    """Load a run, evaluate it on `datasets` (names or paths; default cfg.eval.datasets), write eval/*.json and
    eval/summary.md (over every dataset evaluated so far), and optionally the budget sweep. Returns summaries.
    `out_dir` (default RUN/eval) keeps an evaluation under other settings (say `latent.num_iterations=3` for a
    student trained at T = 6) apart from the run's own."""
    from kava_dist.run import RunDir, load_run

    rd = RunDir(run_dir)
    eval_dir = Path(out_dir) if out_dir else rd.eval
    cfg, model, tokenizer, special = load_run(run_dir, device=device, overrides=list(overrides))
    specs = list(datasets or cfg.eval.datasets)
    if not specs:
        raise ValueError("no datasets: pass --datasets gsm8k,gsm_hard,svamp (or set eval.datasets in the config).")
    resolved = [resolve_dataset(s, data_dir) for s in specs]
    if budgets and eval_mode(cfg) != "latent":
        raise ValueError(f"--budgets sweeps the latent count M of a student/online run; {run_dir} has train.stage="
                         f"{cfg.train.stage}. Drop --budgets for it.")
    out = {}
    for name, path in resolved:
        res = evaluate_dataset(model, tokenizer, special, cfg, path, name=name, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, limit=limit, progress=progress)
        res["summary"]["run"] = str(rd.root)
        if overrides:
            res["summary"]["overrides"] = redact_argv(list(overrides))
        write_result(res, eval_dir)
        out[name] = res["summary"]
    (eval_dir / "summary.md").write_text(summary_markdown(load_summaries(eval_dir), title=f"Evaluation of {rd.root}"))
    if budgets:
        budget_sweep(model, tokenizer, special, cfg, resolved, budgets, eval_dir / "budget",
                     batch_size=batch_size, limit=limit, max_new_tokens=max_new_tokens, progress=progress)
    return out
