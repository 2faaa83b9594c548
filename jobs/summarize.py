"""Summarise an experiment matrix per method: summary.json (per-seed exact accuracy, forward passes per
question, examples seen), details.json, summary.md and curves.png (validation accuracy against examples seen).

Usage:
    python -m jobs.summarize runs/mult4x4 --out experiments/mult4x4 [--dataset mult4x4]
    python -m jobs.summarize runs/plan_a runs/plan_b --out OUT      # several matrices, one table (the first
                                                                    # given wins a run name found twice)
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kava_dist.matrix_summary import collect_all, write_summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roots", nargs="+", metavar="root",
                    help="a matrix's out folder (one run folder per job, matrix.json); several are summarised together")
    ap.add_argument("--out", required=True, help="folder for summary.json, details.json, summary.md, curves.png")
    ap.add_argument("--dataset", default="mult4x4", help="evaluated set whose eval/NAME.json is summarised")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    roots = [Path(r) for r in args.roots]
    for root in roots:
        if not root.is_dir():
            print(f"error: {root} is not a folder. Pass the matrix's out folder (e.g. runs/mult4x4).", file=sys.stderr)
            return 2
    runs = collect_all(roots, args.dataset)
    if not any("accuracy" in r for r in runs):
        print(f"error: no run under {', '.join(map(str, roots))} has eval/{args.dataset}.json yet. Evaluate the runs "
              "first (python -m jobs.evaluate).", file=sys.stderr)
        return 2
    for name, path in write_summary(runs, args.out, args.dataset, roots).items():
        logging.getLogger("jobs.summarize").info("%s: %s", name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
