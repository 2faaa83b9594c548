"""Training entry point for every stage, under the DeepSpeed launcher or as one plain process.

Usage:
    deepspeed --num_gpus 8 jobs/train.py --config configs/paper/llama1b_aug.yaml train.stage=teacher
    deepspeed --hostfile hosts jobs/train.py --config configs/paper/llama1b_aug.yaml train.stage=student \
        model.teacher_adapter=runs/llama1b_aug_teacher/adapter
    python -m jobs.train --config configs/tiny_cpu.yaml train.stage=online       # CPU (gloo) or one GPU
    python -m jobs.train --help-config                                           # every field, default, docstring

Overrides are dotted `section.key=value`; `--resume` continues from the run's latest checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed jobs/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config (configs/...)")
    ap.add_argument("--resume", action="store_true", help="continue from train.out_dir/checkpoints/latest")
    ap.add_argument("--help-config", action="store_true", help="print every config field and exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    return ap.parse_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv=None) -> int:
    args = parse(argv)
    from kava_dist.config import describe, load_config

    if args.help_config:
        print(describe())
        return 0
    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    from kava_dist.engine import init_distributed
    from kava_dist.trainer import Trainer

    dist = init_distributed()
    setup_logging(dist.rank)
    trainer = Trainer(cfg, dist)
    try:
        trainer.run()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
