"""`kava demo`: the whole pipeline on CPU in minutes, with real components and nothing from outside the repo.

Usage:
    kava demo                              # = python -m jobs.demo: synthetic task, tiny Llama from scratch
    kava demo --quick                      # every stage, a few steps each (CI)
    kava demo --param student_steps=300 --param alpha_kv=2     # change a demo setting (FULL below lists them)
    kava demo --model PATH --data TRAIN.jsonl --test TEST.jsonl          # any local HF checkpoint (LoRA)
    kava demo --model DIR --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data ... --test ...

Stages (each prints the command that runs it on a cluster):
  1. data     a synthetic multi-hop task (kava_dist.synthetic; or --data/--test files)
  2. base     a small Llama built from a config (or --model / --gguf)
  3. teacher  CoT training (`train.stage=teacher`): from scratch = full fine-tuning; a pretrained model = LoRA
  4. cache    teacher forward + R-KV eviction into a Zarr store through a local Ray cluster (jobs.build_cache)
  5. student  KaVa from the cached targets with DeepSpeed (`train.stage=student`)
  6. nocot    the No-CoT baseline, same steps and batch as the student
  7. eval     Full-CoT teacher, KaVa student and No-CoT on the held-out questions (jobs.evaluate)
  8. report   report.md + figures per run (jobs.report)
Each stage logs its expected seconds before it starts (a reference run's time per step x this run's steps x how
much slower than the reference this machine has been so far); training logs carry steps/s and ETA.
Ends with one table: accuracies, forward passes per question, store size and compression, and stage times;
OUT/report/ gathers that table, jobs.report's tables and every run's report and figures (<run>_<file>).
The synthetic defaults: 3-hop pointer chasing in a random permutation of the digits 0-5 given in the question
("03 54 12 25 30 41|2" -> 2, 5, 4, 1 -> "1"), the CoT the start and the visited nodes, one token each, kept whole
(so the answer is the CoT's last digit); a 4-layer Llama (d=128) trained from scratch; M = 4 latents, one per CoT
token, and T = 4 Jacobi iterations, one per link of the chain; student and No-CoT start from the teacher's weights
with full fine-tuning (docs/DEVIATIONS.md D27). `--param task=chain --param latents=7` is the + - mod 10 task.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kava_dist.demo import FULL  # noqa: E402


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="kava demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="run directory of the whole demo")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (checks the plumbing, not accuracy)")
    ap.add_argument("--model", default="", help="local HF checkpoint dir to start from (LoRA instead of from scratch)")
    ap.add_argument("--gguf", default="", help="GGUF file inside --model (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--data", default="", help="training file (question, cot, answer); default: synthetic")
    ap.add_argument("--test", default="", help="test file; default: synthetic, disjoint from training")
    ap.add_argument("--teacher-steps", type=int, default=0)
    ap.add_argument("--student-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help=f"change a demo setting ({', '.join(FULL)})")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value for every stage")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from kava_dist.demo import run_demo

    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
