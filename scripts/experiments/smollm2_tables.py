"""EXPERIMENTS.md's tables from a finished `jobs.matrix` folder: Table 1 (accuracy, mean ± std over seeds, with
each cell's matrix job, config overrides and wall time) and Table 2 (forward passes, tokens, latency).

Usage:
    python scripts/experiments/smollm2_tables.py experiments/smollm2
"""
from __future__ import annotations

import gzip
import json
import re
import statistics
import sys
from pathlib import Path

METHOD = [("teacher", "Full CoT (teacher)"), ("nocot", "No-CoT"), ("codi", "CODI-style (alpha_kv=0)"),
          ("pccot", "PCCoT-style (alpha_codi=0)"), ("kava_crop", "KaVa, crop eviction"),
          ("kava", "KaVa (offline cache)"), ("online", "KaVa online (joint step)")]
TASKS = [("mult", "4x4 multiplication", ["mult4x4"]), ("gsm_eq", "GSM8k, equation CoT", ["gsm8k", "gsm_hard", "svamp"]),
         ("gsm_nl", "GSM8k, NL CoT", ["gsm8k", "gsm_hard", "svamp"])]


def summary(run: Path, ds: str) -> dict | None:
    for p in (run / "eval" / f"{ds}.json", run / "eval" / f"{ds}.json.gz"):
        if p.exists():
            opener = gzip.open if p.suffix == ".gz" else open
            with opener(p, "rt") as f:
                return json.load(f)["summary"]
    return None


def cell(xs: list[float], digits: int = 1) -> str:
    if not xs:
        return "–"
    m = f"{statistics.mean(xs):.{digits}f}"
    return m + (f" ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else "")


def main(root: str) -> None:
    root = Path(root)
    jobs = {j["name"]: j for j in json.loads((root / "matrix.json").read_text())["jobs"]}
    for prefix, title, sets in TASKS:
        print(f"\n#### {title}\n")
        print("| Method | seeds | " + " | ".join(sets) + " | matrix job(s) and overrides | train + eval wall (s) |")
        print("|---|---:|" + "---:|" * len(sets) + "---|---:|")
        for key, label in METHOD:
            runs = sorted(n for n in jobs if re.fullmatch(rf"{prefix}_{key}(_s\d+)?", n))
            if not runs:
                continue
            accs = {ds: [100 * s["accuracy"] for r in runs if (s := summary(root / r, ds))] for ds in sets}
            argv = jobs[runs[0]]["argv"]
            cfg = argv[argv.index("--config") + 1].split("/")[-1]
            sets_ = [a for a in argv[argv.index("--config") + 2:]
                     if not a.startswith(("train.out_dir", "model.", "store.", "train.seed"))]
            if len(runs) > 1:
                sets_.append("train.seed=" + ",".join(r.rsplit("_s", 1)[1] for r in runs))
            walls = [jobs[r]["wall_s"] + jobs[f"{r}.eval"]["wall_s"] for r in runs]
            print(f"| {label} | {len(runs)} | " + " | ".join(cell(accs[ds]) for ds in sets) +
                  f" | `{', '.join(runs)}`: {cfg} {' '.join(sets_)} | {cell(walls, 0)} |")
    print("\n#### Table 2: cost per question (batch 256, H100, bf16)\n")
    print("| Task | Method | test set | forward passes / q | tokens generated / q | latency ms / q |")
    print("|---|---|---|---:|---:|---:|")
    for prefix, title, sets in TASKS:
        for key, label in METHOD:
            runs = sorted(n for n in jobs if re.fullmatch(rf"{prefix}_{key}(_s\d+)?", n))
            ss = [s for r in runs if (s := summary(root / r, sets[0]))]
            if ss:
                print(f"| {title} | {label} | {sets[0]} | {cell([s['forward_passes'] for s in ss], 2)} | "
                      f"{cell([s['generated_tokens'] for s in ss], 2)} | {cell([1e3 * s['latency_s'] for s in ss])} |")


if __name__ == "__main__":
    main(sys.argv[1])
