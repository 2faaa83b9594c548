"""Teacher forward + eviction vs the bare SDPA forward, same batches, same run (docs/PERFORMANCE.md, "Teacher forward
+ eviction").

Usage (GPU):  python bench/teacher_bench.py --shapes 1b,3b --batch 32 --seq 256 --iters 10
      (CPU smoke): python bench/teacher_bench.py --shapes tiny --batch 4 --seq 64 --iters 2

Random-init Llama-3.2 shapes in bf16. One batch of B rows x `seq` tokens: question (left-padded to Q), CoT
(right-padded to C), answer (A) with per-row lengths drawn around realistic GSM8k-AUG proportions; the bare
forward runs on exactly the same ids and mask. Timings alternate between the variants and report medians.
Prints tokens/s for: bare CausalLM forward (SDPA, logits), bare decoder forward (no LM head), and kava's
teacher_forward (hooks: post-RoPE q/k, v, hidden at ':') + compute_targets (R-KV eviction of every layer).
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

from kava_dist.config import EvictionConfig  # noqa: E402
from kava_dist.prompts import Batch  # noqa: E402
from kava_dist.step import compute_targets  # noqa: E402
from kava_dist.teacher import teacher_forward, teacher_sequence  # noqa: E402

from bench.shapes import LLAMA_1B, LLAMA_3B  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024),
    "1b": LLAMA_1B,
    "3b": LLAMA_3B,
}


def synthetic_batch(B: int, seq: int, vocab: int, device, seed: int = 0) -> Batch:
    """Q:C:A = 0.38:0.58:0.04 of `seq` (GSM8k-AUG-like), each row 70-100% of its segment's width."""
    g = torch.Generator().manual_seed(seed)
    A = max(4, int(0.04 * seq))
    Q = int(0.38 * seq)
    C = seq - Q - A

    def seg(width, left):
        lens = (torch.rand(B, generator=g) * 0.3 * width + 0.7 * width).long().clamp(1, width)
        ids = torch.randint(10, vocab, (B, width), generator=g)
        col = torch.arange(width)[None]
        mask = col >= (width - lens[:, None]) if left else col < lens[:, None]
        return ids, mask

    q, qm = seg(Q, True)
    c, cm = seg(C, False)
    a, am = seg(A, False)
    return Batch(ids=torch.arange(B), q_ids=q, q_mask=qm, cot_ids=c, cot_mask=cm, ans_ids=a, ans_mask=am,
                 prompt_len=3).to(device)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_shape(name: str, args, device) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[name], tie_word_embeddings=True, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    batch = synthetic_batch(args.batch, args.seq, cfg.vocab_size, device)
    ids, mask, pos = teacher_sequence(batch)
    ecfg = EvictionConfig(method=args.method)
    n_tok = ids.numel()

    def bare_lm():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)

    def bare_decoder():
        model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)

    def kava():
        out = teacher_forward(model, batch, rope="post")
        compute_targets(out, ecfg, args.budget)

    def evict_only(out=[]):
        if not out:
            out.append(teacher_forward(model, batch, rope="post"))
        return lambda: compute_targets(out[0], ecfg, args.budget)

    variants = {"bare_forward": bare_lm, "bare_decoder": bare_decoder, "teacher+evict": kava}
    times = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():  # warmup
            for _ in range(2):
                fn()
        for _ in range(args.iters):
            for k, fn in variants.items():
                times[k].append(timed(fn, device))
        ev = evict_only()
        ev_times = [timed(ev, device) for _ in range(args.iters)]
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"shape": name, "batch": args.batch, "seq": args.seq, "real_tokens": int(mask.sum()),
           "tokens_per_s": {k: n_tok / v for k, v in med.items()},
           "median_s": med, "evict_only_s": statistics.median(ev_times),
           "ratio_vs_bare_forward": med["bare_forward"] / med["teacher+evict"],
           "ratio_vs_bare_decoder": med["bare_decoder"] / med["teacher+evict"]}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,3b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--budget", type=int, default=24)
    ap.add_argument("--method", default="rkv")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}")
    results = []
    for name in args.shapes.split(","):
        r = run_shape(name, args, device)
        results.append(r)
        tps = r["tokens_per_s"]
        print(f"[{name}] B={r['batch']} x {r['seq']} tokens: bare forward {tps['bare_forward']:,.0f} tok/s | "
              f"bare decoder {tps['bare_decoder']:,.0f} tok/s | teacher+evict {tps['teacher+evict']:,.0f} tok/s | "
              f"evict alone {r['evict_only_s'] * 1e3:.1f} ms | ratio vs bare forward {r['ratio_vs_bare_forward']:.3f} | "
              f"vs bare decoder {r['ratio_vs_bare_decoder']:.3f}" + (f" | peak {r['peak_mem_gib']:.1f} GiB" if 'peak_mem_gib' in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": gpu, "results": results}, indent=2))


if __name__ == "__main__":
    main()
