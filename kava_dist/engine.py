"""[7] DeepSpeed wiring, all in one module: distributed init, config, engine, checkpoints, adapter export.

Usage:
    from kava_dist import engine as E
    dist = E.init_distributed()                                # env from the deepspeed launcher, or one process
    ds_engine = E.build_engine(model, cfg.train, total_steps, dist)
    loss = ...; ds_engine.backward(loss); ds_engine.step()     # DeepSpeed handles accumulation boundaries
    E.save_checkpoint(ds_engine, run_dir, step, cfg, extra)    # global_step{N} + client_state + config
    step, extra = E.load_checkpoint(ds_engine, run_dir, cfg)   # validates the run's config before resuming
    E.export_trainable(ds_engine, tokenizer, run_dir / "adapter", meta)   # gathered under ZeRO-3

Global batch = micro x accumulation x world size: accumulation is derived from `train.global_batch` and checked.
The optimizer is a torch AdamW handed to DeepSpeed (no fused_adam JIT build on CPU). Schedule: linear warmup
over `warmup_ratio` of the steps, then cosine to 0.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kava_dist.config import KavaConfig, TrainConfig, load_config, save_config, to_dict

log = logging.getLogger(__name__)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Dist:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPU, gloo on CPU; a lone process works too."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m jobs.train`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:  # skip DeepSpeed's ~90 s JIT build of its CPU shared-memory all-reduce (gloo is used instead)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local, device)


def use_bf16(tc: TrainConfig, device: torch.device) -> bool:
    return tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")


def deepspeed_config(tc: TrainConfig, world_size: int, device: torch.device) -> dict:
    if tc.global_batch % (tc.micro_batch * world_size):
        raise ValueError(f"train.global_batch={tc.global_batch} is not divisible by train.micro_batch={tc.micro_batch} "
                         f"x {world_size} ranks. Set train.micro_batch to a divisor of {tc.global_batch // world_size}.")
    accum = tc.global_batch // (tc.micro_batch * world_size)
    zero: dict = {"stage": tc.zero_stage}
    if tc.zero_stage >= 2:
        zero.update(overlap_comm=device.type == "cuda", contiguous_gradients=True, reduce_bucket_size=5e7)
    if tc.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e4)
    cfg = {
        "train_batch_size": tc.global_batch,
        "train_micro_batch_size_per_gpu": tc.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": use_bf16(tc, device)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tc.deepspeed_config:
        extra = json.loads(Path(tc.deepspeed_config).read_text())
        for k, v in extra.items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float):
    warm = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_engine(model, tc: TrainConfig, total_steps: int, dist: Dist):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = cosine_with_warmup(opt, total_steps, tc.warmup_ratio)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(tc, dist.world_size, dist.device),
                                           dist_init_required=False)
    return engine


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


# config fields a resumed run may change without invalidating the checkpoint
RESUMABLE = {"train.resume", "train.max_steps", "train.save_every", "train.log_every", "train.eval_every",
             "eval", "store.verify", "build"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = prefix + k
        if isinstance(v, dict) and key not in RESUMABLE:
            out.update(_flat(v, key + "."))
        elif key not in RESUMABLE:
            out[key] = v
    return out


def save_checkpoint(engine, run_dir: Path, step: int, cfg: KavaConfig, extra: dict) -> Path:
    """Every rank calls this (DeepSpeed writes its partitions); rank 0 adds the resolved config."""
    from kava_dist.run import versions

    ckpt = Path(run_dir) / "checkpoints"
    tag = f"global_step{step}"
    client = {"step": step, "rng": rng_state(), "config": to_dict(cfg), "versions": versions(), **extra}
    engine.save_checkpoint(str(ckpt), tag=tag, client_state=client)
    if engine.global_rank == 0:
        save_config(cfg, ckpt / tag / "config.yaml")
    return ckpt / tag


def load_checkpoint(engine, run_dir: Path, cfg: KavaConfig) -> tuple[int, dict]:
    ckpt = Path(run_dir) / "checkpoints"
    if not (ckpt / "latest").exists():
        raise FileNotFoundError(f"train.resume=true but {ckpt} holds no checkpoint (no 'latest'). "
                                "Drop train.resume or point train.out_dir at the run to continue.")
    tag = (ckpt / "latest").read_text().strip()
    saved = load_config(ckpt / tag / "config.yaml")
    diff = sorted(k for k, v in _flat(to_dict(cfg)).items() if _flat(to_dict(saved)).get(k) != v)
    if diff:
        raise ValueError(f"cannot resume {ckpt / tag}: the config differs in {', '.join(diff)}. Resume with the run's "
                         f"own config.yaml, or start a new train.out_dir.")
    _, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt / tag}.")
    set_rng_state(client["rng"])
    return int(client["step"]), client


def export_trainable(engine, tokenizer, out_dir: Path, meta: dict, zero_stage: int) -> None:
    """Export the peft adapter (LoRA + projection + token deltas) loadable by PeftModel.from_pretrained."""
    import deepspeed
    import torch.distributed as tdist

    from kava_dist.run import export_adapter

    model = engine.module
    if zero_stage == 3:
        params = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if engine.global_rank == 0:
                _export_gathered(model, tokenizer, out_dir, meta)
    elif engine.global_rank == 0:
        export_adapter(model, tokenizer, out_dir, meta)
    if tdist.is_initialized():
        tdist.barrier()


def _export_gathered(model, tokenizer, out_dir: Path, meta: dict) -> None:
    """Under ZeRO-3 the module's own state_dict would hold empty partitions; copy the gathered tensors."""
    from kava_dist.run import export_adapter

    # Full-model keys (peft filters the adapter ones); frozen base weights stay empty partitions, costing nothing.
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    export_adapter(model, tokenizer, out_dir, meta, state_dict=state)
