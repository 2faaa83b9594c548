"""Where a cache-build actor's compute time goes, on the job's own batches (the breakdown behind the cache-build
ratio, docs/PERFORMANCE.md).

Usage (GPU):  python bench/teacher_profile.py --shape 1b --examples 1024
      (CPU smoke): python bench/teacher_profile.py --shape tiny --examples 48 --batch-size 8 --shard-examples 16

Same checkpoint, data, shard plan and batches as bench/cache_build_bench.py. After one warm pass it times, per
shard and CUDA-synchronised, each stage added on top of the last: the bare decoder; the hooked teacher forward
(post-RoPE q/k, v, hidden states); + eviction of all layers; + casts and the finiteness flag (`_batch`); the whole
processor (`process`: + the shard's copy to the host). It also reports how long `launch` takes on the host
alone (if it is close to the synced time, the actor is bound by kernel launches, not by the GPU), and prints
torch.profiler's top operators by device and host time over a few shards.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cache_build_bench import SHAPES, job_batches, make_checkpoint, make_data, overrides  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--examples", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-examples", type=int, default=64)
    ap.add_argument("--profile-shards", type=int, default=4)
    ap.add_argument("--config", default=str(REPO / "configs/paper/llama1b_aug.yaml"))
    ap.add_argument("--workdir", default="/tmp/kava_cache_build_bench")
    args = ap.parse_args()
    args.codec, args.clevel, args.writes_in_flight, args.object_store_mb = "", None, 0, 2000
    from kava_dist.config import load_config, to_dict
    from kava_dist.prompts import collate
    from kava_dist.step import compute_targets
    from kava_dist.targets import TeacherTargets
    from kava_dist.teacher import teacher_forward

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(args.shape, work / f"ckpt_{args.shape}", dev)
    data = make_data(work / f"data_{args.shape}_{args.examples}.jsonl", args.examples, SHAPES[args.shape]["vocab_size"])
    cfg = load_config(args.config, overrides(args, ckpt, data, work / "unused", 1, dev))
    proc = TeacherTargets(to_dict(cfg))
    enc, shards, _ = job_batches(cfg)
    tokens = sum(e.teacher_len for e in enc)
    model, pad = proc.teacher, proc.special.pad

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def stage_bare(items):
        for chunk in proc.batches(items):
            b = collate(chunk, pad).to(dev)
            ids = torch.cat([b.q_ids, b.cot_ids, b.ans_ids], 1)
            mask = torch.cat([b.q_mask, b.cot_mask, b.ans_mask], 1)
            model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.long().cumsum(-1) - 1).clamp_min(0),
                        use_cache=False)

    def stage_hooked(items, evict=False):
        for chunk in proc.batches(items):
            b = collate(chunk, pad).to(dev)
            t = teacher_forward(model, b, rope=cfg.eviction.rope, with_hidden=True)
            if evict:
                compute_targets(t, cfg.eviction, cfg.latent.num_latents)

    stages = {
        "bare decoder": stage_bare,
        "hooked forward": stage_hooked,
        "+ eviction": lambda items: stage_hooked(items, evict=True),
        "+ casts/flag (_batch)": lambda items: [proc._batch(c) for c in proc.batches(items)],
        "processor (process)": proc.process,
    }
    with torch.no_grad():
        for fn in stages.values():                     # warm: every shape seen once by every stage
            for s in sorted(shards):
                fn(shards[s])
        sync()
        print(f"{args.shape}: {len(enc)} examples, {tokens} tokens, {len(shards)} shards", flush=True)
        for name, fn in stages.items():
            t0 = time.perf_counter()
            for s in sorted(shards):
                fn(shards[s])
                sync()
            dt = time.perf_counter() - t0
            print(f"  {name:24s} {dt:6.2f} s  {tokens / dt:10,.0f} tok/s", flush=True)
        t_launch, t_total = 0.0, 0.0
        for s in sorted(shards):
            t0 = time.perf_counter()
            launched = proc.launch(shards[s])
            t1 = time.perf_counter()
            proc.finish(launched)
            t_total += time.perf_counter() - t0
            t_launch += t1 - t0
        print(f"  launch on the host alone {t_launch:6.2f} s of {t_total:.2f} s launch+finish", flush=True)
        if dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for s in sorted(shards)[: args.profile_shards]:
                    proc.process(shards[s])
                sync()
            ka = prof.key_averages()
            print(ka.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
            print(ka.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=60))


if __name__ == "__main__":
    main()
