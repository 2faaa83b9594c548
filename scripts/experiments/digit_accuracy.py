"""Partial credit for multiplication runs: how many digits of the product each method gets right.

Usage:
    python scripts/experiments/digit_accuracy.py experiments/smollm2 --dataset mult4x4

Reads RUN/eval/{dataset}.json(.gz) of every run folder under ROOT (records written by jobs.evaluate) and prints a
markdown table: exact match, per-digit accuracy (prediction and gold aligned at the least-significant digit; a
missing digit counts as wrong) and the share of answers with the right number of digits; runs named *_sN are
grouped as seeds (mean ± sample std).
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from pathlib import Path


def digit_scores(records: list[dict]) -> dict[str, float]:
    exact = digits = length = 0.0
    for r in records:
        gold = str(r["gold"])
        p = None if r["pred"] is None else float(r["pred"])
        pred = str(int(p)) if p is not None and p.is_integer() else ""
        exact += pred == gold
        length += len(pred) == len(gold)
        g, p = gold[::-1], pred[::-1]
        digits += sum(i < len(p) and p[i] == c for i, c in enumerate(g)) / len(g)
    n = max(1, len(records))
    return {"exact": 100 * exact / n, "digits": 100 * digits / n, "length": 100 * length / n, "n": len(records)}


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["records"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="folder holding run folders")
    ap.add_argument("--dataset", default="mult4x4")
    args = ap.parse_args(argv)
    groups: dict[str, list[dict]] = {}
    for f in sorted(Path(args.root).glob(f"*/eval/{args.dataset}.json*")):
        run = f.parent.parent.name
        groups.setdefault(re.sub(r"_s\d+$", "", run), []).append(digit_scores(load(f)))
    print("| run | seeds | exact (%) | digits right (%) | right length (%) | N |\n|---|---:|---:|---:|---:|---:|")
    for name, rows in groups.items():
        def cell(k):
            xs = [r[k] for r in rows]
            return f"{statistics.mean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")
        print(f"| {name} | {len(rows)} | {cell('exact')} | {cell('digits')} | {cell('length')} | {rows[0]['n']} |")


if __name__ == "__main__":
    main()
