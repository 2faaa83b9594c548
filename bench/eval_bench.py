"""Evaluation throughput: questions/s of batched greedy decoding per mode (docs/PERFORMANCE.md, "Evaluation
throughput").

Usage (GPU):  python bench/eval_bench.py --shape 1b --batch 64 --iters 5
      (CPU smoke): python bench/eval_bench.py --shape tiny --batch 8 --iters 1

Random-init Llama-3.2 shapes in bf16 with the KaVa tokens added. Questions are ~100 tokens (70-100% of
`--qlen`, left-padded). A random model never emits EOS, so every row decodes the full `--new-tokens`
(16): this is the upper bound of a real evaluation's cost per question. Modes, run on the same questions:
latent (prefill + T=3 Jacobi passes over M=24 latents + forced "<eot> The answer is:" + decode),
nocot (prefill with the forced prompt + decode), cot (prefill + `--cot-tokens` decode steps, Full-CoT).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.teacher_bench import SHAPES  # noqa: E402
from kava_dist.backbone import LatentProjection  # noqa: E402
from kava_dist.config import LatentConfig  # noqa: E402
from kava_dist.evaluate import decode_batch  # noqa: E402
from kava_dist.prompts import Encoded, SpecialIds  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--qlen", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--cot-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shape = dict(SHAPES[args.shape])
    V = shape["vocab_size"]
    shape["vocab_size"] = V + 4                       # <bot> <eot> <latent> [PAD]
    cfg = LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
        model.kava_prj = LatentProjection(cfg.hidden_size).to(dtype)
    special = SpecialIds(bot=V, eot=V + 1, latent=V + 2, pad=V + 3, eos=2, bos=1)
    g = torch.Generator().manual_seed(0)
    enc = []
    for i in range(args.batch):
        n = int(args.qlen * (0.7 + 0.3 * torch.rand(1, generator=g).item()))
        q = [1] + torch.randint(10, V, (n,), generator=g).tolist()
        enc.append(Encoded(id=i, question_ids=q, cot_ids=[], prompt_ids=[50, 51, 52, 53], answer_ids=[60, 2]))
    latent = LatentConfig(num_latents=24, num_iterations=3)
    budget = {"latent": args.new_tokens, "nocot": args.new_tokens, "cot": args.cot_tokens}
    times = {m: [] for m in budget}
    passes = {}
    for it in range(args.iters + 1):              # first round = warm-up
        for mode, n_new in budget.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, p = decode_batch(model, enc, special, mode, latent, n_new)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if it:
                times[mode].append(time.perf_counter() - t0)
            passes[mode] = statistics.mean(r["total"] for r in p)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    res = {"device": name, "shape": args.shape, "batch": args.batch, "modes": {}}
    for mode in budget:
        med = statistics.median(times[mode])
        res["modes"][mode] = {"questions_per_s": args.batch / med, "s_per_batch": med, "forward_passes": passes[mode]}
        print(f"[{args.shape} {mode}] batch {args.batch}: {args.batch / med:,.1f} questions/s "
              f"({med * 1e3:.0f} ms/batch, {passes[mode]:.0f} forward passes/question)")
    if dev.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
