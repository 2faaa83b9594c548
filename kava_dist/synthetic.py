"""A synthetic multi-step arithmetic task where chain-of-thought matters (the demo's data, made in-process).

Usage:
    from kava_dist.synthetic import make_chain_task, write_jsonl
    rows = make_chain_task(n=20000, n_ops=4, seed=0, ops="+-")   # [{"question": "7+7-9+7+6", "cot": "4 5 2 8", "answer": "8"}]
    write_jsonl(rows, "runs/demo/data/train.jsonl")

Digits 0-9 combined left to right modulo 10 with the operations in `ops`: "7+7-9+7+6" -> 7+7=4, 4-9=5, 5+7=2,
2+6=8 -> "8". Each step depends on the previous result, so answering in one pass means composing n_ops steps
inside the network. With `ops="+-"` (the demo's) the answer is uniform given anything short of all the digits and
signs (no shortcut: with `*` a last "*0" gives 0 and "*5" gives 0 or 5, which lifted a No-CoT model to ~21%), so a
small model without CoT stays at chance, 10%.

CoT formats (`cot=`):
* "results" (default, the demo's): the running results, one digit per step, separated by spaces ("4 5 2 8").
  Train with `data.cot_style=equation` (its fallback splits on whitespace). Every CoT step takes two tokens, as
  every question step does, so step i's operator and operand sit at a fixed distance from CoT position i, and
  each CoT token is one intermediate result, the slots KaVa's M latents are matched to.
* "equation": GSM8k-AUG equations ("<<7+7=4>> <<4-9=5>> <<5+7=2>> <<2+6=8>>", `data.cot_style=auto`).
The rows follow the shared data schema (question, cot, answer).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}
COT_STYLE = {"results": "equation", "equation": "auto"}
"""The `data.cot_style` each CoT format is trained with."""


def chain_example(rng: random.Random, n_ops: int, cot: str = "results", ops_set: str = "+-*") -> dict:
    nums = [rng.randrange(10) for _ in range(n_ops + 1)]
    ops = [rng.choice(ops_set) for _ in range(n_ops)]
    acc, steps, results, q = nums[0], [], [], str(nums[0])
    for op, b in zip(ops, nums[1:]):
        new = OPS[op](acc, b)
        steps.append(f"<<{acc}{op}{b}={new}>>")
        results.append(str(new))
        q += f"{op}{b}"
        acc = new
    if cot not in COT_STYLE:
        raise ValueError(f"unknown cot format {cot!r}; use {' or '.join(COT_STYLE)}")
    return {"question": q, "cot": " ".join(results if cot == "results" else steps), "answer": str(acc)}


def make_chain_task(n: int, n_ops: int = 4, seed: int = 0, exclude: set[str] | None = None,
                    cot: str = "results", ops: str = "+-*") -> list[dict]:
    """`n` distinct questions (none in `exclude`)."""
    rng = random.Random(f"kava-chain-{n_ops}-{seed}" + ("" if ops == "+-*" else f"-{ops}"))
    rows, seen = [], set(exclude or ())
    while len(rows) < n:
        ex = chain_example(rng, n_ops, cot, ops)
        if ex["question"] in seen:
            continue
        seen.add(ex["question"])
        rows.append(ex)
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)
    return path
