"""[7] DeepSpeed wiring, all in one module: distributed init, config, engine, checkpoints, adapter export.

Usage:
    from kava_dist import engine as E
    dist = E.init_distributed()                                # env from the deepspeed launcher, or one process
    module = E.StageModule(peft_model, "student", special, cfg)   # model + the stage's loss in one forward
    ds_engine = E.build_engine(module, cfg.train, total_steps, dist)
    terms = ds_engine(batch, targets); ds_engine.backward(terms["loss"])
    gn = E.grad_norm(ds_engine, cfg.train.zero_stage)          # at the accumulation boundary, before step()
    ds_engine.step()                                           # DeepSpeed handles accumulation boundaries
    E.save_checkpoint(ds_engine, run_dir, step, cfg, extra)    # global_step{N} + client_state + config + RNG
    resume = E.plan_resume(run_dir, cfg)                       # before build_engine: checks, universal conversion
    ds_engine = E.build_engine(module, cfg.train, total_steps, dist, load_universal=resume.universal)
    step, extra = E.load_checkpoint(ds_engine, run_dir, cfg, resume)
    E.export_trainable(ds_engine, tokenizer, run_dir / "adapter", meta, zero_stage)   # gathered under ZeRO-3

The loss is computed inside `StageModule.forward`, so every micro-step goes through `engine(...)`: DeepSpeed's
forward bookkeeping (ZeRO-3 gradient accumulation counts micro-steps there, the backward prologue is hooked
on the outputs) must run; calling the wrapped model's submodules directly silently breaks ZeRO-3 accumulation.

Global batch = micro x accumulation x world size: accumulation is derived from `train.global_batch`, checked
here and against the engine. The optimizer is a torch AdamW handed to DeepSpeed (no fused_adam / cpu_adam JIT
build). Schedule: linear warmup over `warmup_steps` (or `warmup_ratio` of the steps), then cosine to 0. `train.deepspeed_config`
names a JSON overlay (configs/deepspeed/*.json) deep-merged over the generated config; it may not set what the
kava config owns (batch sizes, optimizer, scheduler, precision, ZeRO stage): the error names the field to use.

Resume at another world size (elastic): ZeRO partitions the optimizer state by rank, so a checkpoint written by
N processes loads as is only into N. `plan_resume` notices the difference from DeepSpeed's own partition files,
has rank 0 convert the checkpoint once into a DeepSpeed universal checkpoint (`ds_to_universal`, into
checkpoints/global_stepN_universal, kept beside it), and the engine is built with `checkpoint.load_universal`
so `load_checkpoint` reshards it to this world size. The step, the scheduler and the loader position come back
with it; the examples of every later step do not depend on the world size (kava_dist/loader.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache_store._util import flatten
from kava_dist import ds_patches
from kava_dist.config import KavaConfig, TrainConfig, deep_merge, load_config, save_config, to_dict
from kava_dist.guard import Refusal, confine, disk_full, redact

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
    local = int(os.environ.get("LOCAL_RANK", 0))
    if not cuda:
        ds_patches.skip_shm_build()      # gloo is used instead of DeepSpeed's JIT-built CPU all-reduce
        local_procs = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)
        if local_procs > 1 and "OMP_NUM_THREADS" not in os.environ:  # don't oversubscribe the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    else:
        torch.cuda.set_device(local)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local, device)


def use_bf16(tc: TrainConfig, device: torch.device) -> bool:
    """bf16 when asked, or on GPU under precision=auto; fp32 otherwise (fp16 is not offered)."""
    return tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")


def accumulation(tc: TrainConfig, world_size: int) -> int:
    """Micro-batches per rank per optimizer step, so that micro x accum x world = global batch."""
    if tc.global_batch % (tc.micro_batch * world_size):
        raise ValueError(f"train.global_batch={tc.global_batch} is not divisible by train.micro_batch={tc.micro_batch} "
                         f"x {world_size} ranks. Set train.micro_batch to a divisor of {tc.global_batch} / {world_size} "
                         f"or train.global_batch to a multiple of {tc.micro_batch * world_size}.")
    return tc.global_batch // (tc.micro_batch * world_size)


# keys of a DeepSpeed overlay that the kava config owns, and the field to set instead
OWNED = {"train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
         "gradient_accumulation_steps": "train.global_batch (accumulation is derived from it)",
         "gradient_clipping": "train.grad_clip", "optimizer": "train.lr / train.weight_decay (a torch AdamW is used)",
         "scheduler": "train.warmup_steps / train.warmup_ratio (cosine with warmup is built here)", "bf16": "train.precision",
         "fp16": "train.precision (fp16 is not supported; use bf16)"}


def deepspeed_config(tc: TrainConfig, world_size: int, device: torch.device, load_universal: bool = False) -> dict:
    """The DeepSpeed config of this run: generated from `train.*`, then the `train.deepspeed_config` overlay.
    `load_universal`: the checkpoint to resume is a universal one (`plan_resume`)."""
    accum = accumulation(tc, world_size)
    zero: dict = {"stage": tc.zero_stage}
    if tc.zero_stage >= 2:
        # overlap_comm off: with it DeepSpeed synchronizes the whole device at the end of every backward and per
        # reduced bucket; only the LoRA/projection/token gradients (tens of MB) are reduced, so there is little
        # communication to overlap and the syncs cost more (docs/PERFORMANCE.md, "Fused student passes"). An
        # overlay may turn it on.
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7)
    if tc.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=1e4)
    cfg = {
        "train_batch_size": tc.global_batch,
        "train_micro_batch_size_per_gpu": tc.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": ({"enabled": True, "check_grad_overflow": tc.skip_nonfinite_steps} if use_bf16(tc, device)
                 else {"enabled": False}),
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    if not tc.deepspeed_config:
        return cfg
    path = Path(tc.deepspeed_config)
    if not path.exists():
        raise FileNotFoundError(f"train.deepspeed_config={path} does not exist. Point it at a JSON overlay such as "
                                "configs/deepspeed/zero3_offload.json, or leave it empty.")
    try:
        extra = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"train.deepspeed_config={path} is not valid JSON ({e}).") from None
    for key, field in OWNED.items():
        if key in extra:
            raise ValueError(f"{path} sets {key!r}, which the kava config owns: remove it and set {field} instead.")
    stage = extra.get("zero_optimization", {}).get("stage", tc.zero_stage)
    if stage != tc.zero_stage:
        raise ValueError(f"{path} sets zero_optimization.stage={stage} but train.zero_stage={tc.zero_stage}: "
                         f"pass train.zero_stage={stage} (and drop the stage from the overlay).")
    cfg = deep_merge(cfg, extra)
    zo = cfg["zero_optimization"]
    if zo.get("offload_param") and tc.zero_stage != 3:
        raise ValueError(f"{path} offloads parameters, which needs ZeRO-3: set train.zero_stage=3.")
    if zo.get("offload_optimizer") and tc.zero_stage == 0:
        raise ValueError(f"{path} offloads the optimizer, which needs ZeRO >= 1: set train.zero_stage to 1, 2 or 3.")
    if zo.get("offload_optimizer") or zo.get("offload_param"):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)   # keep the torch AdamW (no cpu_adam JIT build)
    return cfg


def warmup_steps(total_steps: int, warmup_ratio: float, steps: int = 0) -> int:
    """The warm-up's optimizer steps: `steps` (train.warmup_steps) when > 0, else round(warmup_ratio * total)."""
    return steps if steps > 0 else int(round(warmup_ratio * total_steps))


def decay_steps(total_steps: int, warmup: int, steps: int = 0) -> int:
    """The final decay's optimizer steps for `wsd`: `steps` (train.lr_decay_steps) when > 0, else a fifth of the
    steps after the warm-up."""
    return steps if steps > 0 else max(1, int(round(0.2 * (total_steps - warmup))))


def cosine_with_warmup(optimizer, total_steps: int, warmup_ratio: float, schedule: str = "cosine",
                       warmup: int = 0, decay: int = 0):
    """LR factor for optimizer step k (0-based): (k+1)/W for k < W (`warmup_steps`), then
    0.5 * (1 + cos(pi * (k - W) / (total - W))): peak at k = W, 0 after the last step. `schedule="constant"`
    holds the peak after the warmup (runs cut by train.time_limit_min, or compared at any point of the curve).
    `schedule="wsd"` (warm-up, stable, decay) holds the peak, then falls linearly over the last D steps
    (`decay_steps`): (total - k) / D for k >= total - D, so the last step runs at peak / D."""
    warm = warmup_steps(total_steps, warmup_ratio, warmup)
    tail = decay_steps(total_steps, warm, decay) if schedule == "wsd" else 0
    if tail > total_steps - warm:
        raise ValueError(f"train.lr_decay_steps={tail} is more than the {total_steps - warm} steps after the warmup "
                         f"({total_steps} in all): lower it, or raise train.max_steps.")

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        if schedule == "wsd":
            return min(1.0, max(0.0, (total_steps - step) / tail))
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StageModule(torch.nn.Module):
    """The trained (peft) model and its stage's loss: forward(batch, targets) -> {"loss", term: tensor, ...}.

    stage: teacher | student | online | nocot (kava_dist.step's teacher_step, offline_step, online_step,
    nocot_step). `targets` is only read by `student` (None there = the student CE alone, for validation)."""

    def __init__(self, model, stage: str, special, cfg: KavaConfig):
        super().__init__()
        if stage not in ("teacher", "student", "online", "nocot"):
            raise ValueError(f"train.stage={stage!r} is not one of teacher, student, online, nocot.")
        self.model, self.stage, self.special, self.cfg = model, stage, special, cfg
        self.cot_removed: int | None = None     # the CoT curriculum's step, set by the trainer (None = off)

    def forward(self, batch, targets=None) -> dict:
        from kava_dist.step import nocot_step, offline_step, online_step, teacher_step

        if self.stage == "teacher":
            return teacher_step(self.model, batch)
        if self.stage == "nocot":
            return nocot_step(self.model, batch)
        if self.stage == "online":
            return online_step(self.model, batch, self.special, self.cfg, self.cot_removed)
        return offline_step(self.model, batch, self.special, targets, self.cfg, self.cot_removed)


def compile_decoder_layers(model, dynamic: bool = True) -> int:
    """torch.compile every decoder layer in place (nn.Module.compile), to cut the kernel-launch overhead of the
    many small passes of the student step. Returns the number of layers compiled."""
    from kava_dist.backbone import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    return len(layers)


def unwrap(engine_or_module):
    """The peft model inside a DeepSpeed engine and/or StageModule."""
    m = getattr(engine_or_module, "module", engine_or_module)
    return m.model if isinstance(m, StageModule) else m


def _register_zero3_external(model) -> int:
    """peft's TrainableTokensLayer reads its base weight and token rows without calling the modules that own
    them; under ZeRO-3 those would stay empty partitions. Register them so DeepSpeed gathers them."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    n = 0
    for mod in model.modules():
        deltas = getattr(mod, "trainable_tokens_delta", None)
        base = getattr(mod, "base_layer", None)
        if deltas is None or base is None:
            continue
        for p in list(deltas.parameters()) + [base.weight]:
            register_external_parameter(mod, p)
            n += 1
    return n


def build_engine(model, tc: TrainConfig, total_steps: int, dist: Dist, load_universal: bool = False):
    """torch AdamW (no decay on 1-D params) + cosine-with-warmup, wrapped in a DeepSpeed engine.
    `load_universal`: it will resume from a universal checkpoint (`plan_resume`)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad. Enable lora.enabled, latent.use_projection "
                         "or lora.train_new_tokens.")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = cosine_with_warmup(opt, total_steps, tc.warmup_ratio, tc.lr_schedule, tc.warmup_steps,
                               tc.lr_decay_steps)
    ds_cfg = deepspeed_config(tc, dist.world_size, dist.device, load_universal)
    if tc.zero_stage == 3:
        _register_zero3_external(model)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg,
                                           dist_init_required=False)
    got = (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(), dist.world_size)
    if got[0] * got[1] * got[2] != tc.global_batch or engine.train_batch_size() != tc.global_batch:
        raise RuntimeError(f"DeepSpeed runs micro {got[0]} x accum {got[1]} x world {got[2]} != train.global_batch="
                           f"{tc.global_batch}; check the train.deepspeed_config overlay.")
    ds_patches.clip_on_device(engine.optimizer)
    ds_patches.no_scalar_uploads()
    return engine


def grad_norm(engine, zero_stage: int) -> float:
    """Global gradient norm (before clipping) of the current step. Call at the accumulation boundary, after the
    last backward and before `engine.step()`: DeepSpeed's ZeRO optimizers record it during the step (read it
    after with `engine.get_global_grad_norm()`); its fp32 stage-0 path never does, so it is computed here."""
    if zero_stage > 0 or engine.bfloat16_enabled():
        return float("nan")   # filled in after the step from engine.get_global_grad_norm()
    grads = [p.grad.detach() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return float("nan")
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


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


# config fields a resumed run may change without invalidating the checkpoint (a dotted prefix covers its subtree)
RESUMABLE = {"train.resume", "train.out_dir", "train.save_every", "train.log_every", "train.eval_every",
             "train.stop_at_step", "train.keep_checkpoints", "train.micro_batch", "eval", "build", "store.path",
             "store.storage_options", "store.verify", "store.codec", "store.clevel", "store.cache_dir",
             "store.cache_bytes"}
# train.micro_batch: the global batch and the examples of every step stay; only the split over ranks changes.
# store.codec / store.clevel: how new stores are written; a store keeps the codec it records, training reads it.
UNIVERSAL = "_universal"    # global_stepN_universal: global_stepN converted by ds_to_universal


def _flat(d: dict) -> dict:
    """Dotted keys of a config dict, without the RESUMABLE fields (a prefix drops its subtree)."""
    return {k: v for k, v in flatten(d).items()
            if not any(k == r or k.startswith(r + ".") for r in RESUMABLE)}


def config_diff(saved: KavaConfig, current: KavaConfig) -> list[str]:
    """Fields (outside RESUMABLE) whose values differ, as 'key: saved -> current'."""
    a, b = _flat(to_dict(saved)), _flat(to_dict(current))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _ckpt_steps(ckpt: Path) -> list[int]:
    out = []
    for p in ckpt.glob("global_step*"):
        if p.is_dir() and p.name[len("global_step"):].isdigit():
            out.append(int(p.name[len("global_step"):]))
    return sorted(out)


def save_checkpoint(engine, run_dir: Path, step: int, cfg: KavaConfig, extra: dict, keep: int = 0) -> Path:
    """Every rank calls this (DeepSpeed writes its partitions; frozen base weights are left out). The resolved
    config and each rank's RNG state go into the tag dir first; DeepSpeed writes `latest` last, so a kill
    mid-save leaves the previous checkpoint as the one to resume. `keep` > 0 deletes all but the newest `keep`."""
    import torch.distributed as tdist

    from kava_dist.run import versions

    ckpt = Path(run_dir) / "checkpoints"
    tag = f"global_step{step}"
    rank = engine.global_rank
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    client = {"step": step, "world_size": world, "rng": rng_state(), "config": redact(to_dict(cfg)),
              "versions": versions(), **extra,   # what ds_to_universal requires of a checkpoint (no TP/PP merging)
              UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    try:
        (ckpt / tag).mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), ckpt / tag / f"rng_rank{rank}.pt")
        if rank == 0:
            save_config(cfg, ckpt / tag / "config.yaml")
        engine.save_checkpoint(str(ckpt), tag=tag, client_state=client, exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as e:   # torch.save on a full disk: "basic_ios::clear: iostream error"
        full = disk_full(e, ckpt / tag)
        if full is None:
            raise
        if rank == 0:
            shutil.rmtree(ckpt / tag, ignore_errors=True)   # `latest` still names the previous, whole checkpoint
        raise full from e
    if keep > 0 and rank == 0:
        for old in _ckpt_steps(ckpt)[:-keep]:
            shutil.rmtree(ckpt / f"global_step{old}", ignore_errors=True)
            shutil.rmtree(ckpt / f"global_step{old}{UNIVERSAL}", ignore_errors=True)
    return ckpt / tag


def check_shared_out_dir(root: Path) -> None:
    """Refuse a train.out_dir the ranks do not all see (node-local disks): rank 0 writes a random token into it,
    every rank reads it back, and the verdicts are gathered (torch.distributed, i.e. DeepSpeed's process group).
    Without this, DeepSpeed writes `latest` and rank 0's partitions on one node and the other ranks' partitions
    on theirs, and --resume fails later. A world of one passes at once."""
    import secrets

    import torch.distributed as tdist

    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return
    rank, world = tdist.get_rank(), tdist.get_world_size()
    token = [secrets.token_hex(8) if rank == 0 else None]
    tdist.broadcast_object_list(token, src=0)
    mark = Path(root) / f".shared-check-{token[0]}"
    if rank == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        mark.write_text(token[0])
    tdist.barrier()
    try:
        seen = mark.read_text() == token[0]
    except OSError:
        seen = False
    views: list = [None] * world
    tdist.all_gather_object(views, (seen, socket.gethostname()))
    if rank == 0:
        mark.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise Refusal(f"train.out_dir={root} is not shared between the ranks ({', '.join(blind)} cannot see the file "
                      "rank 0 wrote there), so checkpoints would be split between nodes: put train.out_dir on a "
                      "filesystem every node mounts at the same path (docs/CLUSTER.md).")


def checkpoint_world_size(tag_dir: Path) -> int | None:
    """The data-parallel world size a checkpoint was written with, from DeepSpeed's own files: one
    `*zero_pp_rank_R_mp_rank_00_optim_states.pt` per rank under ZeRO 1-3 (None when there are none, ZeRO-0)."""
    ranks = {p.name.split("zero_pp_rank_")[1].split("_")[0] for p in Path(tag_dir).glob("*zero_pp_rank_*_optim_states.pt")}
    return len(ranks) or None


@dataclass
class Resume:
    tag: str                   # the checkpoint (config, RNG, example map): checkpoints/<tag>
    load_tag: str              # what DeepSpeed loads: <tag>, or <tag>_universal at another world size
    saved_world: int | None    # processes that wrote it (None: ZeRO-0, not partitioned)

    @property
    def universal(self) -> bool:
        return self.load_tag != self.tag


def _latest_tag(ckpt: Path) -> str:
    if not (ckpt / "latest").exists():
        raise FileNotFoundError(f"train.resume=true but {ckpt} holds no checkpoint (no 'latest'). "
                                "Drop train.resume / --resume, or point train.out_dir at the run to continue.")
    return (ckpt / "latest").read_text().strip()


def convert_command(ckpt: Path, tag: str) -> str:
    return (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {ckpt / tag} --output_folder "
            f"{ckpt / (tag + UNIVERSAL)} --inject_missing_state")


def to_universal(ckpt: Path, tag: str) -> Path:
    """Convert checkpoints/<tag> into checkpoints/<tag>_universal with DeepSpeed's ds_to_universal (once: an
    existing conversion is reused; written under a temporary name and renamed when whole)."""
    out = ckpt / (tag + UNIVERSAL)
    if out.is_dir():
        return out
    tmp = ckpt / f".{tag}{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    log.info("converting %s into a universal checkpoint: %s", ckpt / tag, " ".join(cmd))
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"ds_to_universal failed on {ckpt / tag} (exit {p.returncode}): {last}")
    tmp.rename(out)
    return out


def plan_resume(run_dir: Path, cfg: KavaConfig, tag: str | None = None) -> Resume:
    """What `load_checkpoint` will load, decided before the engine is built (a universal checkpoint needs the
    engine built with `checkpoint.load_universal`). Checks the saved config; at another world size rank 0
    converts the checkpoint to a universal one while the other ranks wait. Every rank gets the same answer
    or the same one-line Refusal."""
    import torch.distributed as tdist

    ckpt = Path(run_dir) / "checkpoints"
    tag = tag or _latest_tag(ckpt)
    confine(ckpt, tag, "checkpoint tag")    # a tag is a name under checkpoints/, never a path out of it
    if not (ckpt / tag / "config.yaml").exists():
        have = ", ".join(f"global_step{s}" for s in _ckpt_steps(ckpt)) or "none"
        raise FileNotFoundError(f"checkpoint {ckpt / tag} is missing or incomplete (no config.yaml); "
                                f"checkpoints present: {have}. Write the tag to resume into {ckpt / 'latest'}.")
    saved = load_config(ckpt / tag / "config.yaml")
    diff = config_diff(saved, cfg)
    if diff:
        raise ValueError(f"cannot resume {ckpt / tag}: the config differs in {'; '.join(diff)}. Resume with the run's "
                         f"own config ({ckpt / tag / 'config.yaml'}) or start a new train.out_dir.")
    dist = tdist.is_initialized()
    world = tdist.get_world_size() if dist else 1
    saved_world = checkpoint_world_size(ckpt / tag)
    if saved_world is None or saved_world == world:
        return Resume(tag, tag, saved_world)
    error = [None]
    if not dist or tdist.get_rank() == 0:
        try:
            to_universal(ckpt, tag)
            log.info("%s was written by %d processes, this run has %d: resuming from its universal checkpoint %s",
                     ckpt / tag, saved_world, world, ckpt / (tag + UNIVERSAL))
        except (OSError, RuntimeError) as e:
            error[0] = str(e)
    if dist:
        tdist.broadcast_object_list(error, src=0)    # also the barrier: the conversion is whole when it returns
    if error[0]:
        raise Refusal(f"{ckpt / tag} was written by {saved_world} processes, this run has {world}, and converting it "
                      f"to a universal checkpoint failed: {error[0]}. Resume with {saved_world} processes, or "
                      f"convert it yourself ({convert_command(ckpt, tag)}) and rerun.")
    return Resume(tag, tag + UNIVERSAL, saved_world)


def load_checkpoint(engine, run_dir: Path, cfg: KavaConfig, resume: Resume | None = None) -> tuple[int, dict]:
    """Restore module, optimizer, scheduler, RNG and step from `resume` (plan_resume: checkpoints/latest by
    default, after checking the saved config; a universal checkpoint at another world size)."""
    ckpt = Path(run_dir) / "checkpoints"
    resume = resume or plan_resume(run_dir, cfg)
    if resume.universal and not engine.load_universal_checkpoint():
        raise RuntimeError(f"{ckpt / resume.load_tag} is a universal checkpoint: build the engine with "
                           "build_engine(..., load_universal=True).")
    _, client = engine.load_checkpoint(str(ckpt), tag=resume.load_tag, load_module_strict=False)
    if client is None:
        raise RuntimeError(f"DeepSpeed could not load {ckpt / resume.load_tag}.")
    import torch.distributed as tdist

    world = tdist.get_world_size() if tdist.is_initialized() else 1
    if not resume.universal and int(client.get("world_size", world)) != world:
        raise ValueError(f"{ckpt / resume.tag} was written by {client['world_size']} processes, this run has {world}: "
                         f"resume with {client['world_size']} processes, or from its universal checkpoint "
                         f"({convert_command(ckpt, resume.tag)}).")
    mine = ckpt / resume.tag / f"rng_rank{engine.global_rank}.pt"
    set_rng_state(torch.load(mine, weights_only=False) if mine.exists() else client["rng"])
    return int(client["step"]), client


def export_trainable(engine, tokenizer, out_dir: Path, meta: dict, zero_stage: int) -> None:
    """Export the peft adapter (LoRA + projection + token rows) loadable by PeftModel.from_pretrained.
    Every rank must call this (ZeRO-3 gathers the partitioned trainable parameters collectively)."""
    import deepspeed
    import torch.distributed as tdist

    from kava_dist.run import export_adapter

    model = unwrap(engine)
    if zero_stage == 3:
        params = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if engine.global_rank == 0:
                # Only the adapter keys matter (peft filters them); frozen base weights stay empty partitions.
                state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
                export_adapter(model, tokenizer, out_dir, meta, state_dict=state)
    elif engine.global_rank == 0:
        export_adapter(model, tokenizer, out_dir, meta)
    if tdist.is_initialized():
        tdist.barrier()
