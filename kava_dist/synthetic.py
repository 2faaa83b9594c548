"""Synthetic multi-step tasks where chain-of-thought matters (the demo's data, made in-process).

Usage:
    from kava_dist.synthetic import make_pointer_task, make_chain_task, write_jsonl
    rows = make_pointer_task(n=12000, hops=3, nodes=6, seed=0)   # [{"question": "03 54 12 25 30 41|2", "cot": "2541", "answer": "1"}]
    rows = make_chain_task(n=20000, n_ops=4, seed=0, ops="+-")   # [{"question": "7+7-9+7+6", "cot": "4 5 2 8", "answer": "8"}]
    write_jsonl(rows, "runs/demo/data/train.jsonl")

Pointer chasing (the demo's task): the question lists a random permutation of the digits 0..nodes-1 as pairs
"kv" (k -> v) in random order, then "|" and a start node; the answer is the node `hops` links further. The CoT is
the start and every node visited, one token each ("2541": 2 -> 5 -> 4 -> 1), kept whole so the answer is its last
token. Each CoT token is one lookup of the previous token in the question (found by content, so it does not
depend on where the token sits), and the walk never revisits a node, so its end is uniform over the nodes other
than the start: chance is 1/(nodes-1). In KaVa's student the M = hops + 1 latents stand one for each CoT token and
each Jacobi iteration can extend the chain by one link, so T >= M iterations can carry the whole walk. The CoT
has no separator, so `data.cot_style=equation` reads it as one step (the last-step drop would remove all of it).

Chain arithmetic:
digits 0-9 combined left to right modulo 10 with the operations in `ops`: "7+7-9+7+6" -> 7+7=4, 4-9=5, 5+7=2,
2+6=8 -> "8". Each step depends on the previous result, so answering in one pass means composing n_ops steps
inside the network. With `ops="+-"` (`kava demo --param task=chain`) the answer is uniform given anything short of all the digits and
signs (no shortcut: with `*` a last "*0" gives 0 and "*5" gives 0 or 5, which lifted a No-CoT model to ~21%), so a
small model without CoT stays at chance, 10%.

CoT formats (`cot=`):
* "results" (default): the running results, one digit per step, separated by spaces ("4 5 2 8").
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


def pointer_example(rng: random.Random, hops: int = 3, nodes: int = 6) -> dict:
    """One pointer-chasing question: a random permutation of the digits 0..nodes-1 listed as pairs in random
    order and a start node; the CoT is the start and the `hops` nodes the walk visits (all distinct)."""
    if not 1 <= hops < nodes <= 10:
        raise ValueError(f"pointer task: need 1 <= hops < nodes <= 10, got hops={hops}, nodes={nodes}")
    path = rng.sample(range(nodes), hops + 1)
    succ = dict(zip(path, path[1:]))
    rest_keys = [x for x in range(nodes) if x not in succ]
    rest_vals = [x for x in range(nodes) if x not in path[1:]]
    rng.shuffle(rest_vals)
    succ.update(zip(rest_keys, rest_vals))
    pairs = [f"{k}{v}" for k, v in succ.items()]
    rng.shuffle(pairs)
    walk = "".join(str(x) for x in path)
    return {"question": " ".join(pairs) + f"|{path[0]}", "cot": walk, "answer": walk[-1]}


def pointer_key(question: str) -> tuple[frozenset[str], str]:
    """A pointer question's map and start, whatever the order of its pairs."""
    pairs, start = question.split("|")
    return frozenset(pairs.split(" ")), start


def make_pointer_task(n: int, hops: int = 3, nodes: int = 6, seed: int = 0,
                      exclude: set[str] | None = None) -> list[dict]:
    """`n` distinct pointer-chasing questions, none with the map and start of a question in `exclude` (in any
    order of its pairs: with 6 nodes there are only 2,160 maps-and-starts with a 3-hop walk, so a training set
    repeats each in several orders, and a test set made with `exclude` holds only walks it never saw)."""
    rng = random.Random(f"kava-pointer-{hops}-{nodes}-{seed}")
    rows, seen, banned = [], set(), {pointer_key(q) for q in exclude or ()}
    while len(rows) < n:
        ex = pointer_example(rng, hops, nodes)
        if ex["question"] in seen or pointer_key(ex["question"]) in banned:
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
