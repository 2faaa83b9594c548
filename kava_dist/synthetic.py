"""A synthetic multi-step arithmetic task where chain-of-thought matters (the demo's data, made in-process).

Usage:
    from kava_dist.synthetic import make_chain_task, write_jsonl
    rows = make_chain_task(n=20000, n_ops=4, seed=0)      # [{"question": "3+4*2-7+5", "cot": "<<3+4=7>> ...", "answer": "2"}]
    write_jsonl(rows, "runs/demo/data/train.jsonl")

Digits 0-9 combined left to right with + - * modulo 10: "3+4*2-7+5" -> 3+4=7, 7*2=4, 4-7=7, 7+5=2 -> "2".
Each step depends on the previous result, so answering in one pass means composing n_ops lookups inside the
network, while the CoT (GSM8k-AUG equation format, `<<a+b=c>>`) spells every intermediate result out.
Chance accuracy is 10%. The rows follow the shared data schema (question, cot, answer).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

OPS = {"+": lambda a, b: (a + b) % 10, "-": lambda a, b: (a - b) % 10, "*": lambda a, b: (a * b) % 10}


def chain_example(rng: random.Random, n_ops: int) -> dict:
    nums = [rng.randrange(10) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-*") for _ in range(n_ops)]
    acc, steps, q = nums[0], [], str(nums[0])
    for op, b in zip(ops, nums[1:]):
        new = OPS[op](acc, b)
        steps.append(f"<<{acc}{op}{b}={new}>>")
        q += f"{op}{b}"
        acc = new
    return {"question": q, "cot": " ".join(steps), "answer": str(acc)}


def make_chain_task(n: int, n_ops: int = 4, seed: int = 0, exclude: set[str] | None = None) -> list[dict]:
    """`n` distinct questions (none in `exclude`)."""
    rng = random.Random(f"kava-chain-{n_ops}-{seed}")
    rows, seen = [], set(exclude or ())
    while len(rows) < n:
        ex = chain_example(rng, n_ops)
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
