"""Report runs: Table 1 (accuracy, mean ± std over seeds) and Table 2 (forward passes, latency), per-run
report.md with config, cache fingerprint, library versions, hardware and figures.

Usage:
    python -m jobs.report runs/llama1b_aug_s0 runs/llama1b_aug_s1 runs/llama1b_aug_s2 runs/nocot_s0 --out reports/
    python -m jobs.report runs/x --device cuda --figure-data data/gsm8k_aug.valid.jsonl.gz --figure-examples 32
    python -m jobs.report runs/* --no-model-figures          # tables + training curves only (no model loading)

Runs are grouped by their resolved config minus train.seed and train.out_dir; each group is one row (method =
stage label, plus the run-dir name without its seed suffix as the variant). Table 1 has one table per
(backbone, training set) with the evaluated sets as columns (GSM8k, GSM-Hard, SVAMP, ...); std is the sample
std (ddof=1) over the seeds in the group. Each run gets RUN/report/report.md and figures (training curves from
metrics.jsonl; KV similarity and decoded latents for student/online runs, which loads the model; the budget
heatmap if `jobs.evaluate --budgets` wrote eval/budget.json). With --out DIR: DIR/tables.md and DIR/tables.json.
The body is kava_dist/report.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kava_dist.report import group_runs, load_runs, method_label, report_runs, table1, table2  # noqa: E402,F401

log = logging.getLogger("jobs.report")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (evaluated with jobs.evaluate)")
    ap.add_argument("--out", default="", help="also write DIR/tables.md and DIR/tables.json over all runs")
    ap.add_argument("--device", default="cpu", help="device for the model-based figures (cpu | cuda)")
    ap.add_argument("--figure-data", default="",
                    help="file with (question, cot, answer) rows for the KV/latent figures "
                         "(default: the run's data.valid_path, else data.train_path)")
    ap.add_argument("--figure-examples", type=int, default=16, help="examples for the KV/latent figures")
    ap.add_argument("--kv-layer", type=int, default=None, help="layer of the slot x slot map (default: L // 2)")
    ap.add_argument("--smooth", type=int, default=0, help="moving-average window for the training curves")
    ap.add_argument("--no-model-figures", action="store_true", help="skip figures that load the model")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from jobs._cli import REFUSED, refuse

    try:
        load_runs(args.runs)
    except REFUSED as e:   # one line naming the fix, exit code 2
        raise SystemExit(refuse(e)) from None
    result = report_runs(args.runs, args.out, args.device, args.figure_data, args.figure_examples, args.kv_layer,
                         args.smooth, args.no_model_figures)
    print(result["tables"])
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
