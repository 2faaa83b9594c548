"""Training entry point for every stage, under the DeepSpeed launcher or as one plain process.

Usage:
    deepspeed --num_gpus 8 jobs/train.py --config configs/paper/llama1b_aug.yaml train.stage=teacher
    deepspeed --hostfile hosts jobs/train.py --config configs/paper/llama1b_aug.yaml train.stage=student \
        model.teacher_adapter=runs/llama1b_aug_teacher/adapter
    python -m jobs.train --config configs/tiny_cpu.yaml train.stage=online       # CPU (gloo) or one GPU
    python -m jobs.train --help-config                                           # every field, default, docstring

Overrides are dotted `section.key=value`; `--resume` continues from the run's latest checkpoint (same config;
RESUMABLE in kava_dist/engine.py lists the fields that may change; another number of processes resumes through
a DeepSpeed universal checkpoint, converted once, docs/CLUSTER.md "Elastic resume"). Global batch =
train.micro_batch x accumulation x processes: accumulation is derived from train.global_batch, so the same
config runs on 1, 2 or 8 GPUs with the same optimisation. ZeRO stage: train.zero_stage; DeepSpeed extras:
train.deepspeed_config=configs/deepspeed/zero3_offload.json. Baselines through the same entry: CODI-style
loss.alpha_kv=0, PCCoT-style loss.alpha_codi=0. See docs/TRAINING.md.
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
    return ap.parse_intermixed_args(argv)


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv=None) -> int:
    args = parse(argv)
    from kava_dist.config import ConfigError, describe, load_config

    if args.help_config:
        print(describe())
        return 0
    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    from jobs._cli import REFUSED, build_command, refuse, remove_if_new

    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        return refuse(e)
    import torch.distributed as tdist

    from cache_store.backend import DiskFull
    from cache_store.errors import CorruptShard, StoreNotFound
    from kava_dist.guard import Refusal
    from kava_dist.engine import init_distributed
    from kava_dist.trainer import Trainer

    out_dir = Path(cfg.train.out_dir)
    existed = out_dir.exists()
    dist = init_distributed()
    setup_logging(dist.rank)
    try:
        trainer = Trainer(cfg, dist)
    except REFUSED as e:   # errors that name their fix: one line, rc 2, no run folder left behind
        if dist.is_main:
            remove_if_new(out_dir, existed)
        return refuse(e)
    try:
        trainer.run()
    except CorruptShard as e:   # met mid-training: name the shard and the repair
        return refuse(e, f"Repair command: {build_command(args.config, overrides)}")
    except (Refusal, DiskFull, StoreNotFound) as e:
        return refuse(e)
    finally:
        trainer.close()
    if tdist.is_initialized():
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
