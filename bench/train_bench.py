"""Training throughput: the `student` stage (targets from a store / memory) vs the `online` (paper) stage at equal
global batch, interleaved in one run, through the production path: kava_dist.engine.StageModule (student_forward /
online_step) inside a DeepSpeed ZeRO-2 engine built by kava_dist.engine.build_engine, fed by kava_dist.loader.

Usage:
    python bench/train_bench.py                               # Llama-3.2-1B then 3B shapes, one GPU, bf16
    python bench/train_bench.py --shape 1b --global-batch 64 --out bench/results/train_1gpu.json
    deepspeed --num_gpus 2 bench/train_bench.py --world 2 --shape 1b --compare bench/results/train_1gpu.json
    python bench/train_bench.py --shape tiny --global-batch 8 --rounds 2          # CPU smoke (fp32)
    python bench/train_bench.py --targets store               # student reads targets from a local cache_store
    python bench/train_bench.py --shape 1b --variants student --targets memory,store,cold,int8,s3,s3-cache
                                       # the targets paths side by side (bench/store_targets.py), ratios vs memory
    python bench/train_bench.py --shape 1b,3b --global-batch 256 --micro-batch 1b=256,3b=128 --variants student
    python bench/train_bench.py --shape 1b --variants student,student:train.group_by_length=8 --pool 8 --steps 8
                                       # a variant is STAGE[@FUSED_MODE][:KEY=VALUE...] (its own config overrides)
    python bench/train_bench.py --shape 1b --variants student:train.group_by_length=8:train.loader_read_processes=0,student:train.group_by_length=8 --targets memory,store,cold,int8
                                       # store reads on threads of the training process vs in worker processes
                                       # (train.loader_read_processes: 4 per rank on a CUDA node by default)

Model: Llama-3.2 shapes with random weights (1b: 16 layers, d 2048, 32 q / 8 kv heads, MLP 8192, vocab 128256,
tied embeddings; 3b: 28 layers, d 3072, 24 / 8 heads), paper settings: LoRA r=128, alpha 32, dropout 0.1 on
q/k/v/o, projection MLP, M=24 latents, T=3 Jacobi iterations. Synthetic GSM8k-AUG-like lengths (defaults):
question 100 tokens (BOS included), CoT 150 tokens (the last step already dropped), answer segment 10 tokens
("The answer is:" 5 + answer 4 + EOS), each of question and CoT drawn uniformly in [0.75, 1.25] x its mean.
Targets for `student` are produced once by the teacher pass + R-KV eviction of the same model and held as
CPU bf16 tensors (the form a store read returns), or written to stores and read back through the production
loader (`--targets`, a comma list: memory, store, cold, int8, s3, s3-cache; bench/store_targets.py). Every
targets kind of one variant trains the same engine (one model), each through its own loader; blocks interleave.

Measurement: each variant has its own engine (a model copy with the same init) so it can use its own
micro-batch at the same global batch (student 64 / online 32 on 1b, 32 / 16 on 3b, to fit 80 GB; per shape with
`--micro-batch 1b=256,3b=128`). A shape that runs out of device memory is run again at half the micro-batch of
the stage that ran out (`--on-oom halve`, one process; the micro-batch used is printed and recorded), and a shape
not measured is listed at the end (`NOT MEASURED`, exit status 1), never left out silently. `--rounds`
rounds after `--warmup` rounds; each round runs `--steps` optimizer steps of each variant (the order alternates
between rounds); time between CUDA syncs; reported: mean step time and FLOPs over the measured rounds (each
round's MFU is listed too). Variants with `:train.group_by_length=N` see length-grouped batches: give them whole
epochs per round (`--steps` = `--pool`), so that every variant's rounds hold the same examples. `--compile`
torch.compiles each decoder layer (kava_dist.engine.compile_decoder_layers).

FLOPs (model FLOPs, real tokens only; padding is not counted): for a pass over t tokens with h of them
through the LM head and P (query, key) attention pairs (causal, real keys), with N = decoder matmul params per
token, N_l = LoRA params, d = hidden, V = vocab, L = layers, A = q heads x head dim:
    forward   = 2 t (N + N_l) + 2 h d V + 4 L A P
    backward  = t (2 N + 4 N_l) + 2 h d V + 8 L A P      (frozen base and head: input gradients only, = 1x fwd;
                                                           LoRA: input + weight gradients, = 2x fwd)
so a trained pass costs 3x forward for LoRA/attention and 2x forward for the frozen base. The projection MLP
(2 d^2 params, trained) adds 6 * 2 d^2 per latent per projection. Passes per example (Q, C, A = real lengths):
    student: [question + <bot> + M latents] (t = Q+1+M) + T x [M latents] + [<eot> + answer] (t = A+1, h = A+1)
    online:  teacher [question + CoT + answer] (t = Q+C+A, h = C+A) + the student passes
MFU = model FLOPs per step / step time / (peak x world). --peak-tflops: H100 SXM dense bf16 = 989.
Targets: student >= 1.5x online samples/s, student MFU >= 35%; 2 GPUs >= 1.8x one (--compare).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kava_dist import engine as E  # noqa: E402
from kava_dist.backbone import LatentProjection, add_lora  # noqa: E402
from kava_dist.config import load_config  # noqa: E402
from kava_dist.fused import apply_fused  # noqa: E402
from kava_dist.loader import TokenLoader, plan_for, read_processes  # noqa: E402
from kava_dist.prompts import Encoded, add_special_tokens, collate  # noqa: E402
from kava_dist.step import Targets, compute_targets  # noqa: E402
from kava_dist.teacher import teacher_forward  # noqa: E402
from kava_dist.tiny import char_tokenizer  # noqa: E402

from bench.shapes import LLAMA_1B, LLAMA_3B  # noqa: E402
from bench.store_targets import TargetSources  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
    "1b": LLAMA_1B,
    "3b": LLAMA_3B,
}
MICRO = {"tiny": (4, 4), "1b": (64, 32), "3b": (32, 16)}   # (student, online) micro-batches that fit 80 GB
PROMPT = [40, 41, 42, 43, 26]     # 5 fixed token ids standing in for "The answer is:"


def random_backbone(shape: str, cfg, device: torch.device, dtype: torch.dtype):
    """A random-init Llama of `shape` + KaVa tokens + projection, wrapped in the paper's LoRA (as the trainer does)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kava_dist.backbone import set_sdpa_backends

    set_sdpa_backends(cfg.model.sdpa_backends)            # the attention kernels the trainer would use
    tok = char_tokenizer()
    special = add_special_tokens(tok)
    s = dict(SHAPES[shape])
    s["vocab_size"] = max(s["vocab_size"], len(tok))
    mc = LlamaConfig(**s, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                     pad_token_id=special.pad, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(mc, dtype=dtype, attn_implementation="sdpa")
    model.kava_prj = LatentProjection(mc.hidden_size, cfg.latent.projection_dropout).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return add_lora(model, special, cfg.lora, cfg.latent), special, mc


def synth_examples(n: int, q: int, c: int, a: int, seed: int = 0) -> list[Encoded]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ql = max(2, int(rng.integers(int(0.75 * q), int(1.25 * q) + 1)))
        cl = max(1, int(rng.integers(int(0.75 * c), int(1.25 * c) + 1)))
        ans = rng.integers(3, 95, size=max(1, a - len(PROMPT) - 1)).tolist() + [2]
        out.append(Encoded(id=i, question_ids=[1] + rng.integers(3, 95, size=ql - 1).tolist(),
                           cot_ids=rng.integers(3, 95, size=cl).tolist(), prompt_ids=list(PROMPT), answer_ids=ans))
    return out


@torch.no_grad()
def make_targets(model, items, cfg, special, device, bs: int) -> dict[int, dict]:
    """Teacher pass + eviction over every example once; per-example CPU tensors (K/V bf16, as the store holds)."""
    model.eval()
    out = {}
    for i in range(0, len(items), bs):
        chunk = items[i:i + bs]
        b = collate(chunk, special.pad).to(device)
        t = compute_targets(teacher_forward(model, b, rope=cfg.eviction.rope, with_hidden=True), cfg.eviction,
                            cfg.latent.num_latents)
        for j, e in enumerate(chunk):
            out[e.id] = {"k": t.k_BLHMD[j].to("cpu", torch.bfloat16), "v": t.v_BLHMD[j].to("cpu", torch.bfloat16),
                         "valid": t.valid_BLHM[j].cpu(), "codi_h": t.codi_BLd[j].to("cpu", torch.bfloat16),
                         "index": t.index_BLHM[j].to(torch.int16).cpu(), "cot_len": len(e.cot_ids)}
    model.train()
    return out


# ----------------------------------------------------------------------------- FLOPs


class Flops:
    """Model FLOPs of the passes a step runs (module docstring has the formulas)."""

    def __init__(self, model, mc, cfg):
        d, L = mc.hidden_size, mc.num_hidden_layers
        hd = getattr(mc, "head_dim", None) or d // mc.num_attention_heads
        self.d, self.V, self.L, self.A = d, mc.vocab_size, L, mc.num_attention_heads * hd
        mm = 0
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name and "lora_" not in name:
                mm += mod.in_features * mod.out_features
        self.N = mm                                          # decoder matmul params (frozen), all layers
        self.Nl = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        self.M, self.T = cfg.latent.num_latents, cfg.latent.num_iterations
        self.prj = 2 * d * d if cfg.latent.use_projection else 0

    def pass_(self, t: float, h: float, pairs: float) -> float:
        fwd = 2 * t * (self.N + self.Nl) + 2 * h * self.d * self.V + 4 * self.L * self.A * pairs
        bwd = t * (2 * self.N + 4 * self.Nl) + 2 * h * self.d * self.V + 8 * self.L * self.A * pairs
        return fwd + bwd

    def student(self, e: Encoded) -> float:
        Q, A, M, T = len(e.question_ids), len(e.prompt_ids) + len(e.answer_ids), self.M, self.T
        n0 = Q + 1 + M
        f = self.pass_(n0, 0, n0 * (n0 + 1) / 2)
        f += T * self.pass_(M, 0, M * (Q + 1) + M * (M + 1) / 2)
        f += self.pass_(A + 1, A + 1, (A + 1) * (Q + 1 + M) + (A + 1) * (A + 2) / 2)
        return f + 6 * self.prj * M * T

    def teacher(self, e: Encoded) -> float:
        Q, C, A = len(e.question_ids), len(e.cot_ids), len(e.prompt_ids) + len(e.answer_ids)
        n = Q + C + A
        return self.pass_(n, C + A, n * (n + 1) / 2)

    def step(self, variant: str, items: list[Encoded]) -> float:
        return sum(self.student(e) + (self.teacher(e) if variant == "online" else 0.0) for e in items)


# ----------------------------------------------------------------------------- measurement


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_block(engine, loader, start: int, steps: int, accum: int, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    for _, micro, batch, targets in loader.iterate(start, start + steps):
        batch = batch.to(dev, non_blocking=True)                  # pinned by the loader (as in the trainer)
        terms = engine(batch, None if targets is None else targets.to(dev, non_blocking=True))
        engine.backward(terms["loss"])
        engine.step()
    sync(dev)
    return (time.perf_counter() - t0) / steps


def find_syncs(engines, loaders, plans, step: int, dev) -> None:
    """One step of each variant under torch.cuda.set_sync_debug_mode("warn"): print where the host waits for the
    device (each distinct call site once, with its Python stack)."""
    import traceback
    import warnings

    seen: dict[str, int] = {}

    def show(message, category, filename, lineno, file=None, line=None):
        stack = "".join(traceback.format_stack(limit=9)[:-2])
        seen[stack] = seen.get(stack, 0) + 1

    for v, engine in engines.items():
        seen.clear()
        with warnings.catch_warnings():          # restores showwarning and the filters on exit
            warnings.simplefilter("always")
            warnings.showwarning = show
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_block(engine, loaders[v], step, 1, plans[v].accum, dev)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        print(f"[train_bench] syncs {v}: {sum(seen.values())} synchronizing calls at {len(seen)} sites", flush=True)
        for stack, n in seen.items():
            print(f"--- {n}x\n{stack}", flush=True)


def profile_step(engines, loaders, plans, step: int, dev) -> None:
    """One optimizer step of each variant under torch.profiler: device busy time vs wall time, the device time
    by kernel family, and the top kernels (what bounds the step)."""
    from torch.profiler import ProfilerActivity, profile

    for v, engine in engines.items():
        sync(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            run_block(engine, loaders[v], step, 1, plans[v].accum, dev)
            wall = time.perf_counter() - t0
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6
        fam: dict[str, float] = {}
        for e in kernels:
            n = e.key.lower()
            f = ("gemm" if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")) and "fmha" not in n
                 else "attention" if any(k in n for k in ("fmha", "flash", "attention")) else
                 "copy/cast" if any(k in n for k in ("memcpy", "copy", "cast")) else
                 "reduce/norm" if any(k in n for k in ("reduce", "norm", "softmax")) else "elementwise/other")
            fam[f] = fam.get(f, 0.0) + e.self_device_time_total / 1e6
        print(f"[train_bench] profile {v}: wall {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%}); "
              + ", ".join(f"{k} {t:.3f} s" for k, t in sorted(fam.items(), key=lambda kv: -kv[1])), flush=True)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70),
              flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70),
              flush=True)                                     # what the host spends the step on


def bench_cfg(shape: str, args, micro: int, bf16: bool, fused: str = "auto", extra: list[str] = ()):
    over = [f"model.fused_kernels={fused}", "lora.r=128", "lora.alpha=32", "lora.dropout=0.1",
            "latent.num_latents=24", "latent.num_iterations=3",
            f"train.global_batch={args.global_batch}", f"train.micro_batch={micro}", "train.zero_stage=2",
            f"train.precision={'bf16' if bf16 else 'fp32'}", "train.warmup_ratio=0", "train.max_steps=100000",
            "store.dtype=bf16"]
    if shape == "tiny":
        over += ["lora.r=8", "lora.alpha=16", "latent.num_latents=6", "latent.num_iterations=2"]
    return load_config(None, over + args.overrides + list(extra))


def parse_variant(v: str) -> tuple[str, str | None, list[str]]:
    """STAGE[@FUSED_MODE][:KEY=VALUE...] -> (stage, mode or None, overrides)."""
    head, *over = v.split(":")
    stage, _, mode = head.partition("@")
    if stage not in ("student", "online"):
        raise SystemExit(f"--variants {v}: the stage must be student or online.")
    return stage, mode or None, over


def micro_for(spec: str, shape: str, default: int) -> int:
    """--micro-batch / --online-micro-batch for `shape`: '0' or '' -> `default`; 'N' -> N for every shape;
    '1b=256,3b=128' -> the value given for the shape (`default` for a shape not named)."""
    spec = spec.strip()
    if "=" not in spec:
        return int(spec or 0) or default
    per = {}
    for part in spec.split(","):
        name, _, val = part.partition("=")
        if name.strip() not in SHAPES or not val.strip().isdigit():
            raise SystemExit(f"micro-batch {part!r}: write SHAPE=N (shapes: {', '.join(SHAPES)}), e.g. 1b=256,3b=128.")
        per[name.strip()] = int(val)
    return per.get(shape, 0) or default


def bench_shape(shape: str, args, dist, micro_of: dict[str, int], held: dict | None = None) -> list[dict]:
    """One engine (own model copy, same init) per variant, so each can run its own micro-batch at the same
    global batch; the variants' blocks are interleaved. micro_of: the micro-batch of each stage (student,
    online). held["stage"] names the stage being built or run (what an out-of-memory error came from); the
    store sources and the temp dir are released however this ends."""
    held = {} if held is None else held
    try:
        return _bench_shape(shape, args, dist, micro_of, held)
    finally:
        if held.get("sources") is not None:
            held["sources"].close()
        if held.get("tmp") is not None:
            held["tmp"].cleanup()
        held.pop("sources", None), held.pop("tmp", None)


def _bench_shape(shape: str, args, dist, micro_of: dict[str, int], held: dict) -> list[dict]:
    dev = dist.device
    bf16 = args.precision == "bf16" or (args.precision == "auto" and dev.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parsed = {v: parse_variant(v) for v in variants}
    stage = {v: parsed[v][0] for v in variants}
    fused = {v: parsed[v][1] or args.fused for v in variants}
    micro = {v: micro_of[stage[v]] for v in variants}
    cfgs = {v: bench_cfg(shape, args, micro[v], bf16, fused[v], [f"train.stage={stage[v]}"] + parsed[v][2])
            for v in variants}
    cfg0 = next(iter(cfgs.values()))
    items = synth_examples(args.pool * args.global_batch, args.q_len, args.cot_len, args.ans_len, seed=0)
    plans = {v: plan_for(cfgs[v].train, items, dist.world_size) for v in variants}
    kinds = [k.strip() for k in args.targets.split(",") if k.strip()]
    engines, loaders, t_gen, targets, patched, sources = {}, {}, 0.0, None, {}, None   # patched: resolved fused mode
    runs: list[tuple[str, str]] = []     # (variant, targets kind): what is timed; engines are per variant
    tmp = held["tmp"] = tempfile.TemporaryDirectory(prefix="kava_bench_store_", dir=args.store_dir or None)
    for v in variants:
        held["stage"] = stage[v]
        model, special, mc = random_backbone(shape, cfgs[v], dev, dtype)
        flops = Flops(model, mc, cfg0)
        if stage[v] == "student" and targets is None:     # the same init for every variant: one set of targets
            t_gen = time.perf_counter()
            targets = make_targets(model, items, cfg0, special, dev, micro[v])
            t_gen = time.perf_counter() - t_gen
            sources = TargetSources(kinds, targets, cfg0, mc, Path(tmp.name) / f"rank{dist.rank}",
                                    cfg_int8=bench_cfg(shape, args, micro[v], bf16, fused[v], ["store.dtype=int8"]))
            held["sources"] = sources
        patched[v] = apply_fused(model, fused[v], dev, cfgs[v].train.zero_stage)
        for kind in (kinds if stage[v] == "student" else ["-"]):
            loaders[(v, kind)] = (sources.loader(kind, items, plans[v], dist.rank, special.pad,
                                                 switch_interval_ms=cfgs[v].train.loader_switch_interval_ms,
                                                 read_processes=read_processes(cfgs[v].train.loader_read_processes, dev))
                                  if kind != "-" else
                                  TokenLoader(items, plans[v], dist.rank, special.pad, prefetch=4))
            runs.append((v, kind))
        if args.compile:
            E.compile_decoder_layers(model)
        engines[v] = E.build_engine(E.StageModule(model, stage[v], special, cfgs[v]), cfgs[v].train, 100000, dist)
        engines[v].train()
    times: dict[tuple, list[float]] = {r: [] for r in runs}
    round_flops: dict[tuple, list[float]] = {r: [] for r in runs}     # mean model FLOPs of the steps each round ran
    round_tokens: dict[tuple, list[float]] = {r: [] for r in runs}
    mem: dict[tuple, float] = {r: 0.0 for r in runs}
    per_rank = args.steps * args.global_batch // dist.world_size
    step = 0
    for r in range(args.warmup + args.rounds):
        for run in runs if r % 2 == 0 else runs[::-1]:
            v, kind = run
            held["stage"] = stage[v]
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sources is not None and kind != "-" and sources.before_block(kind)
            dt = run_block(engines[v], loaders[run], step, args.steps, plans[v].accum, dev)
            sources is not None and kind != "-" and sources.after_block(kind, per_rank, r >= args.warmup)
            if dev.type == "cuda":
                mem[run] = max(mem[run], torch.cuda.max_memory_allocated(dev) / 2**30)
            if r >= args.warmup:
                times[run].append(dt)
                ran = [[items[i] for i in plans[v].global_indices(s)] for s in range(step, step + args.steps)]
                round_flops[run].append(statistics.mean(flops.step(stage[v], b) for b in ran))
                round_tokens[run].append(statistics.mean(sum(e.teacher_len for e in b) for b in ran))
        step += args.steps
    first = {v: loaders[next(run for run in runs if run[0] == v)] for v in variants}
    if args.profile and dev.type == "cuda":
        profile_step(engines, first, plans, step, dev)
    if args.find_syncs and dev.type == "cuda":
        find_syncs(engines, first, plans, step + 1, dev)
    # FLOPs: of the global steps each measured round ran (all ranks' examples); reported over all measured rounds
    # (mean step time, mean FLOPs per step). With grouped lengths, steps differ in size: run whole epochs per round
    # (--steps = --pool) so that every variant's rounds hold the same examples.
    out = []
    for run in runs:
        v, kind = run
        t, step_flops = statistics.mean(times[run]), statistics.mean(round_flops[run])
        tokens = statistics.mean(round_tokens[run])
        tflops = step_flops / t / 1e12
        out.append({"shape": shape, "variant": v if kind in ("-", kinds[0]) and len(kinds) == 1 else f"{v} [{kind}]",
                    "base_variant": v, "stage": stage[v], "world": dist.world_size,
                    "global_batch": args.global_batch, "group_by_length": cfgs[v].train.group_by_length,
                    "micro_batch": micro[v], "accum": plans[v].accum, "precision": "bf16" if bf16 else "fp32",
                    "targets": kind, "step_s": t, "step_s_all": times[run],
                    "mfu_all": [f / x / (args.peak_tflops * 1e12 * dist.world_size)
                                for f, x in zip(round_flops[run], times[run])],
                    "samples_per_s": args.global_batch / t, "tokens_per_s": tokens / t,
                    "model_tflops_per_step": step_flops / 1e12, "achieved_tflops": tflops,
                    "mfu": tflops / (args.peak_tflops * dist.world_size), "peak_mem_gib": mem[run],
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "lengths": {"question": args.q_len, "cot": args.cot_len, "answer": args.ans_len},
                    "M": cfg0.latent.num_latents, "T": cfg0.latent.num_iterations, "lora_r": cfg0.lora.r,
                    "compile": args.compile, "fused_kernels": patched[v],
                    "target_gen_s": t_gen, **(sources.summary(kind) if sources is not None and kind != "-" else {})})
    del engines, loaders
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def report(rows: list[dict], args, is_main: bool) -> None:
    if not is_main:
        return
    for r in rows:
        print(f"[train_bench] shape={r['shape']} world={r['world']} variant={r['variant']:11s} "
              f"global_batch={r['global_batch']} (micro {r['micro_batch']} x accum {r['accum']} x world {r['world']}) "
              f"{r['precision']} targets={r['targets']}: step {r['step_s']:.3f} s, {r['samples_per_s']:.1f} samples/s, "
              f"{r['tokens_per_s']:.0f} tok/s, {r['achieved_tflops']:.3g} TFLOP/s, MFU {100 * r['mfu']:.3g}% "
              f"(peak {args.peak_tflops:g}), peak mem {r['peak_mem_gib']:.1f} GiB"
              + (" (both variants' models resident)" if "," in args.variants else ""),
              flush=True)
    for shape in dict.fromkeys(r["shape"] for r in rows):
        kinds = list(dict.fromkeys(r["targets"] for r in rows if r["shape"] == shape and r["targets"] != "-"))
        for base in dict.fromkeys(r["base_variant"] for r in rows if r["shape"] == shape and r["targets"] != "-"):
            same = {r["targets"]: r for r in rows if r["shape"] == shape and r["base_variant"] == base}
            ref = same.get("memory")
            for kind, r in same.items():
                extra = "".join(f", {k} {r[k]:.3g}" for k in ("requests_per_example", "bytes_per_example",
                                                               "store_write_s") if r.get(k) is not None)
                ratio = f" = {r['samples_per_s'] / ref['samples_per_s']:.3f}x memory" if ref and kind != "memory" else ""
                print(f"[train_bench] shape={shape} {base} targets={kind}: {r['samples_per_s']:.1f} samples/s"
                      f"{ratio} (MFU {100 * r['mfu']:.1f}%; rounds {', '.join(f'{x:.3f}' for x in r['step_s_all'])} s"
                      f"{extra})", flush=True)
        by = {r["variant"]: r for r in rows if r["shape"] == shape and r["targets"] in ("-", kinds[0] if kinds else "-")}
        suffix = lambda name: name.partition(":")[2]  # noqa: E731  (the variant's own overrides)
        for sn, s in by.items():
            if s["stage"] != "student":
                continue
            for on, o in by.items():   # student vs online with the same overrides (and any kernels)
                if o["stage"] == "online" and suffix(on) == suffix(sn):
                    sp = s["samples_per_s"] / o["samples_per_s"]
                    print(f"[train_bench] shape={shape} world={s['world']}: {sn} / {on} = {sp:.2f}x samples/s "
                          f"(target >= 1.5x: {'PASS' if sp >= 1.5 else 'FAIL'})", flush=True)
            print(f"[train_bench] shape={shape} world={s['world']}: {sn} MFU {100 * s['mfu']:.1f}% (target >= 35%: "
                  f"{'PASS' if s['mfu'] >= 0.35 else 'FAIL'}; rounds: "
                  f"{', '.join(f'{100 * m:.1f}%' for m in s['mfu_all'])})", flush=True)
        for stage in ("student", "online"):      # the same stage, other kernels or settings: ratio to the first listed
            same = [(name, r) for name, r in by.items() if r["stage"] == stage]
            for name, r in same[1:]:
                print(f"[train_bench] shape={shape} {stage}: {same[0][0]} vs {name} = "
                      f"{same[0][1]['samples_per_s'] / r['samples_per_s']:.2f}x samples/s "
                      f"(MFU {100 * same[0][1]['mfu']:.1f}% vs {100 * r['mfu']:.1f}%)", flush=True)
    if args.compare:
        base = {(r["shape"], r["variant"]): r for r in json.loads(Path(args.compare).read_text())["results"]}
        for r in rows:
            b = base.get((r["shape"], r["variant"]))
            if b and b["world"] != r["world"] and b["global_batch"] == r["global_batch"]:
                sc = r["samples_per_s"] / b["samples_per_s"]
                want = 0.9 * r["world"] / b["world"]
                print(f"[train_bench] shape={r['shape']} variant={r['variant']}: world {r['world']} vs {b['world']} = "
                      f"{sc:.2f}x samples/s (target >= {want:.1f}x: {'PASS' if sc >= want else 'FAIL'})", flush=True)


def measure_shape(shape: str, args, dist) -> tuple[list[dict] | None, str]:
    """bench_shape at the micro-batches asked for; out of device memory, with --on-oom halve, the stage that ran
    out is run again at half its micro-batch (while it still divides the global batch over the ranks). Returns
    (rows, "") or (None, why the shape was not measured). The micro-batches used are printed."""
    micro = {"student": micro_for(args.micro_batch, shape, MICRO[shape][0]),
             "online": micro_for(args.online_micro_batch, shape, MICRO[shape][1])}
    asked = dict(micro)
    while True:
        held: dict = {}
        oom = ""
        try:
            res = bench_shape(shape, args, dist, micro, held)
        except torch.OutOfMemoryError as e:
            oom = str(e).splitlines()[0]
        if not oom:
            break
        gc.collect()                        # after the except block: the traceback no longer holds the engines
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        stages = [held["stage"]] if held.get("stage") else list(micro)
        smaller = {k: (m // 2 if k in stages else m) for k, m in micro.items()}
        fits = all(m >= 1 and args.global_batch % (m * dist.world_size) == 0 for m in smaller.values())
        what = ", ".join(f"{k} micro {micro[k]}" for k in stages)
        if args.on_oom != "halve" or not fits or dist.world_size > 1:
            why = (f"out of memory at {what} ({oom}); "
                   + ("--on-oom skip" if args.on_oom != "halve" else
                      "halving runs on one process only: give --micro-batch SHAPE=N" if dist.world_size > 1 else
                      f"half of it does not divide --global-batch {args.global_batch}") + ". Lower --micro-batch.")
            return None, why
        if dist.is_main:
            print(f"[train_bench] shape={shape}: out of memory at {what} ({oom}); running it again at "
                  + ", ".join(f"{k} micro {smaller[k]}" for k in stages), flush=True)
        micro = smaller
    if dist.is_main:
        note = "" if micro == asked else f" (asked for {asked['student']} / {asked['online']}: halved after out of memory)"
        print(f"[train_bench] shape={shape}: micro-batch student {micro['student']}, online {micro['online']}{note}",
              flush=True)
    return res, ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b,3b", help="comma list of tiny | 1b | 3b")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--micro-batch", default="0",
                    help="micro-batch of the student variant: N, or per shape SHAPE=N,... (e.g. 1b=256,3b=128); "
                    "0 or a shape not named = per shape: tiny 4, 1b 64, 3b 32")
    ap.add_argument("--online-micro-batch", default="0", help="micro-batch of the online variant, whose teacher "
                    "pass needs more activation memory: N or SHAPE=N,... (0 = per shape: tiny 4, 1b 32, 3b 16)")
    ap.add_argument("--on-oom", choices=("halve", "skip"), default="halve",
                    help="a shape that runs out of device memory: halve the micro-batch of the stage that ran out "
                    "and run it again (the micro-batch used is printed and recorded), or leave the shape out. "
                    "Either way a shape not measured is listed at the end and the exit status is 1")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (mean reported)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    ap.add_argument("--pool", type=int, default=2, help="distinct examples = pool x global batch")
    ap.add_argument("--q-len", type=int, default=100)
    ap.add_argument("--cot-len", type=int, default=150)
    ap.add_argument("--ans-len", type=int, default=10)
    ap.add_argument("--targets", default="memory", help="comma list of the student's targets paths, timed side by "
                    "side: memory | store | cold | int8 | s3 | s3-cache (bench/store_targets.py)")
    ap.add_argument("--store-dir", default="", help="where --targets store writes (default: the temp dir)")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto = bf16 on GPU, fp32 on CPU")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s of one device (H100 SXM bf16: 989)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (dynamic shapes)")
    ap.add_argument("--variants", default="student,online", help="which variants to measure: student | online, "
                    "each optionally @MODE to override --fused for it (e.g. student,student@hf: fused vs HF kernels) "
                    "and :KEY=VALUE config overrides of its own (e.g. student:train.group_by_length=8)")
    ap.add_argument("--fused", default="auto", help="model.fused_kernels of every variant without @MODE "
                    "(auto = compile on CUDA, hf on CPU)")
    ap.add_argument("--profile", action="store_true", help="after timing, profile one step of each variant")
    ap.add_argument("--find-syncs", action="store_true", help="after timing, list where one step syncs the host")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="set torch._inductor.config.KEY (int/bool/str) before compiling, e.g. cpp_wrapper=1")
    ap.add_argument("--world", type=int, default=1, help="expected number of processes (run under `deepspeed --num_gpus N`)")
    ap.add_argument("--compare", default="", help="a JSON written by --out with another world size: print the scaling")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="kava config overrides, e.g. latent.num_iterations=2")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for kv in args.inductor:
        import torch._inductor.config as ind

        key, _, val = kv.partition("=")
        cur = getattr(ind, key)          # AttributeError names a wrong key
        setattr(ind, key, type(cur)(int(val)) if isinstance(cur, (bool, int)) else val)
    dist = E.init_distributed()
    if dist.world_size != args.world:
        raise SystemExit(f"--world {args.world} but {dist.world_size} processes: launch with "
                         f"`deepspeed --num_gpus {args.world} bench/train_bench.py --world {args.world}`.")
    rows, missing = [], {}
    for shape in [s.strip() for s in args.shape.split(",") if s.strip()]:
        if shape not in SHAPES:
            raise SystemExit(f"--shape {shape}: use one of {', '.join(SHAPES)}.")
        res, why = measure_shape(shape, args, dist)
        if res is None:
            missing[shape] = why
            continue
        report(res, args, dist.is_main)
        rows += res
    if args.out and dist.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows, "not_measured": missing},
                                             indent=1))
    for shape, why in missing.items():
        if dist.is_main:
            print(f"[train_bench] NOT MEASURED shape={shape}: {why}", flush=True)
    import torch.distributed as tdist

    if tdist.is_initialized():         # all ranks leave together (else rank 1 logs a TCPStore error at exit)
        tdist.barrier()
        tdist.destroy_process_group()
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
