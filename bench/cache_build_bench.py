"""Cache-build job vs the bare teacher forward on the same batches, and 2 actors vs 1. Usage and figures:
docs/PERFORMANCE.md, "Cache-build job vs bare teacher forward".

Usage (GPU):      python bench/cache_build_bench.py --shapes 1b,3b --examples 2048
      (variants): python bench/cache_build_bench.py --shapes 1b --cudnn-check --variant 'store.clevel=1'
      (2 GPUs):   python bench/cache_build_bench.py --shapes 1b,3b --examples 2048 --actors 2
      (CPU smoke): python bench/cache_build_bench.py --shapes tiny --examples 48 --batch-size 8 --shard-examples 16

Per shape it writes (under --workdir, reused by later runs) a random-init Llama-3.2-1B / -3B shaped checkpoint
in bf16 with a WordLevel tokenizer over the model's whole vocabulary ("w3".."wN": one token per word, so
lengths are exact), and a jsonl of N synthetic GSM8k-AUG-like examples: question 70-130 tokens, CoT 100-200
tokens in steps (+1 step that data.drop_last_step drops), answer prompt + number + EOS = 10 tokens. Then:

  bare  the teacher (same load, dtype, attention kernels) run on the job's own batches (same shard plan, same
        length sort, same batch size), no hooks, no eviction, no store, CUDA-synchronised per batch: one cold
        pass of the decoder (every batch shape new to the process), then a warm pass of the decoder (no LM
        head: what the teacher needs; the baseline) and one of the CausalLM forward
  job   `kava_dist.build.build_targets` (what `jobs.build_cache` runs) exactly as a user runs it (local Ray,
        one actor per GPU, store on local disk,
        eviction settings of --config), rate over its active span: first shard's compute start to last
        shard's write end (the model load is excluded; the actor warms up while it starts); once with the
        defaults and once per --variant (extra overrides)

and prints a line per bare baseline and per job: examples/s and teacher tokens/s, the ratio job/bare (target
>= 0.9x vs the warm bare decoder), and with --actors K (K GPUs) a job with K actors and its speedup over one
(target >= 1.8x for K=2). --cudnn-check repeats the bare passes with cuDNN SDPA allowed (see
model.sdpa_backends). The job's store write (compression on CPU threads) is in the measurement: see
store.codec/store.clevel and build.writes_in_flight (--codec, --clevel, --writes-in-flight, --variant).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.shapes import LLAMA_1B, LLAMA_3B  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024),
    "1b": LLAMA_1B,
    "3b": LLAMA_3B,
}
ANSWER_PROMPT = " ".join(f"w{i}" for i in range(3, 11))   # 8 tokens; + number + EOS = 10


def make_tokenizer(vocab_size: int):
    """WordLevel over 'w3'..: vocab_size - 4 entries, so kava's 3 tokens + [PAD] fill the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, vocab_size - 4):
        vocab[f"w{i}"] = i
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_checkpoint(shape: str, out: Path, device: torch.device) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    cfg = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=2048, bos_token_id=1,
                      eos_token_id=2, rope_theta=500000.0)
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    make_tokenizer(cfg.vocab_size).save_pretrained(tmp)
    tmp.rename(out)
    print(f"[{shape}] wrote a random-init checkpoint ({sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M "
          f"params, bf16) to {out} in {time.time() - t0:.0f} s", flush=True)
    return out


def make_data(path: Path, n: int, vocab_size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(11, vocab_size - 4, k))

    with open(path, "w") as f:
        for _ in range(n):
            cot = int(rng.integers(100, 201))
            cuts = np.sort(rng.choice(np.arange(1, cot), 4, replace=False))
            steps = [words(int(b - a)) for a, b in zip([0, *cuts], [*cuts, cot])] + [words(20)]   # last is dropped
            f.write(json.dumps({"question": words(int(rng.integers(69, 130))), "steps": steps,
                                "answer": str(int(rng.integers(1, 1000)))}) + "\n")
    return path


def overrides(args, ckpt: Path, data: Path, store: Path, actors: int, device: torch.device) -> list[str]:
    out = [f"model.name_or_path={ckpt}", "model.teacher_adapter=",
           f"model.dtype={'bfloat16' if device.type == 'cuda' else 'float32'}",
           f"data.train_path={data}", "data.max_tokens=512", f"data.answer_prompt={ANSWER_PROMPT}",
           "data.cot_style=equation", "data.limit=0", f"store.path={store}",
           f"store.shard_examples={args.shard_examples}", f"build.batch_size={args.batch_size}",
           f"build.num_actors={actors}", f"build.object_store_mb={args.object_store_mb}",
           f"build.writes_in_flight={args.writes_in_flight}"]
    if args.codec:
        out.append(f"store.codec={args.codec}")
    if args.clevel is not None:
        out.append(f"store.clevel={args.clevel}")
    return out


def run_job(args, ov: list[str]) -> dict:
    from cache_store.reader import StoreReader
    from kava_dist.build import build_targets
    from kava_dist.config import load_config

    store = Path(next(o.split("=", 1)[1] for o in ov if o.startswith("store.path=")))
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.time()
    report = build_targets(load_config(args.config, ov))
    print(report.summary, flush=True)
    rc = report.exit_code
    if rc != 0:
        raise SystemExit(f"the build job failed (exit {rc}); see its log above")
    rep = StoreReader(str(store)).get_meta("build_report")
    span = max(rep["active_s"], 1e-9)
    return {"wall_s": time.time() - t0, "examples": rep["rows"], "tokens": rep["tokens"], "active_s": span,
            "examples_per_s": rep["rows"] / span, "tokens_per_s": rep["tokens"] / span,
            "steady_examples_per_s": rep["steady_rows_per_s"],
            "steady_tokens_per_s": rep["steady_rows_per_s"] * rep["tokens"] / max(rep["rows"], 1),
            "startup_s": rep["startup_s"], "compute_s": rep["compute_s"], "write_s": rep["write_s"],
            "overlap_s": rep["overlap_s"], "bytes": rep["bytes"],
            "compression_ratio": rep["store"].get("compression_ratio")}


def job_batches(cfg):
    """The teacher batches of the job's shard plan (same length sort, same batch size), on the CPU."""
    from kava_dist.backbone import load_tokenizer
    from kava_dist.prompts import add_special_tokens, collate, load_training_set
    from kava_dist.targets import plan_shards, store_spec
    from kava_dist.teacher import teacher_sequence

    tok = load_tokenizer(cfg.model)
    special = add_special_tokens(tok)
    enc, _ = load_training_set(cfg.data, tok)
    shards = plan_shards(enc, store_spec(cfg).shard_size)
    bs = cfg.build.batch_size
    batches = [teacher_sequence(collate(items[i:i + bs], special.pad))
               for s in sorted(shards) for items in [shards[s]] for i in range(0, len(items), bs)]
    return enc, shards, batches


def run_bare(args, ov: list[str], device: torch.device) -> dict:
    """The teacher forward alone on the job's own batches: a cold pass (every batch shape new to the process),
    then warm passes of the decoder (no LM head: what the teacher needs) and of the CausalLM forward."""
    from kava_dist.config import load_config, to_dict
    from kava_dist.targets import TeacherTargets

    cfg = load_config(args.config, ov)
    threads = torch.get_num_threads()
    if device.type == "cpu":      # as in the job's actor: Ray sets OMP_NUM_THREADS to its num_cpus
        torch.set_num_threads(max(1, int(cfg.build.cpus_per_actor)))
    proc = TeacherTargets(to_dict(cfg))           # the job actor's processor: same load, same warm-up
    model = proc.teacher
    enc, shards, batches = job_batches(cfg)
    tokens = sum(e.teacher_len for e in enc)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fns = {"decoder": lambda i, m, p: model.model(input_ids=i, attention_mask=m, position_ids=p, use_cache=False),
           "causal_lm": lambda i, m, p: model(input_ids=i, attention_mask=m, position_ids=p, use_cache=False)}

    def one_pass(fn) -> float:
        total = 0.0
        for ids, mask, pos in batches:
            ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
            sync()
            t0 = time.perf_counter()
            fn(ids, mask, pos)
            sync()
            total += time.perf_counter() - t0
        return total

    with torch.no_grad():
        times = {"decoder_cold": one_pass(fns["decoder"]), "decoder": one_pass(fns["decoder"])}
        times["causal_lm"] = one_pass(fns["causal_lm"]) if args.causal_lm else float("nan")
    t0 = time.perf_counter()          # the actor's compute alone: hooks + eviction + casts + copies to the host
    for s in sorted(shards):
        proc.process(shards[s])
    times["processor"] = time.perf_counter() - t0
    del model, proc
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"examples": len(enc), "tokens": tokens, "batches": len(batches),
            "sdpa_backends": list(cfg.model.sdpa_backends),
            **{f"{k}_s": v for k, v in times.items()},
            **{f"{k}_tokens_per_s": tokens / v for k, v in times.items()},
            **{f"{k}_examples_per_s": len(enc) / v for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,3b", help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-examples", type=int, default=64)
    ap.add_argument("--actors", type=int, default=1, help="K > 1: also run the job with K actors (K GPUs)")
    ap.add_argument("--config", default=str(REPO / "configs/paper/llama1b_aug.yaml"),
                    help="eviction/latent/store settings (model and data are replaced)")
    ap.add_argument("--codec", default="", help="store.codec override (blosc-zstd | zstd | none)")
    ap.add_argument("--clevel", type=int, default=None, help="store.clevel override")
    ap.add_argument("--writes-in-flight", type=int, default=0, help="build.writes_in_flight (0 = auto)")
    ap.add_argument("--object-store-mb", type=int, default=2000)
    ap.add_argument("--variant", action="append", default=[],
                    help="an extra job run with these space-separated overrides, against the same bare baseline "
                         "(repeatable), e.g. --variant 'store.clevel=1 build.writes_in_flight=4'")
    ap.add_argument("--causal-lm", action="store_true", help="also time a warm pass of the CausalLM forward")
    ap.add_argument("--cudnn-check", action="store_true",
                    help="also time the bare passes with cuDNN SDPA allowed (cold = first time each shape is seen)")
    ap.add_argument("--workdir", default="/tmp/kava_cache_build_bench")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    n_gpu = torch.cuda.device_count()
    if args.actors > 1 and device.type == "cuda" and n_gpu < args.actors:
        raise SystemExit(f"--actors {args.actors} needs {args.actors} GPUs; this machine has {n_gpu}")
    print(f"device: {gpu} x{n_gpu or 1}; torch {torch.__version__}; {args.examples} examples per shape", flush=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results, lines = [], []
    variants = [("default", [])] + [(v.strip(), v.split()) for v in args.variant]
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            raise SystemExit(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
        ckpt = make_checkpoint(shape, work / f"ckpt_{shape}", device)
        data = make_data(work / f"data_{shape}_{args.examples}.jsonl", args.examples, SHAPES[shape]["vocab_size"])
        ov1 = overrides(args, ckpt, data, work / f"store_{shape}_1", 1, device)
        bare = run_bare(args, ov1, device)
        res = {"shape": shape, "bare": bare, "jobs": {}}
        line = (f"[{shape}] {bare['examples']} examples, {bare['tokens']} tokens, {bare['batches']} batches | bare "
                f"decoder {bare['decoder_examples_per_s']:.1f} ex/s {bare['decoder_tokens_per_s']:,.0f} tok/s (cold "
                f"pass {bare['decoder_cold_tokens_per_s']:,.0f} tok/s; CausalLM {bare['causal_lm_tokens_per_s']:,.0f}) | "
                f"processor alone {bare['processor_tokens_per_s']:,.0f} tok/s")
        if args.cudnn_check:        # the same bare passes with cuDNN SDPA allowed (torch's default order)
            bc = run_bare(args, ov1 + ["model.sdpa_backends=[cudnn,flash,efficient,math]"], device)
            res["bare_cudnn"] = bc
            line += (f" | with cuDNN SDPA: cold {bc['decoder_cold_tokens_per_s']:,.0f} tok/s, warm "
                     f"{bc['decoder_tokens_per_s']:,.0f}")
        print(line, flush=True)
        lines.append(line)
        for label, extra in variants:
            job = run_job(args, ov1 + extra)
            ratio = job["tokens_per_s"] / bare["decoder_tokens_per_s"]
            steady = job["steady_tokens_per_s"] / bare["decoder_tokens_per_s"]
            res["jobs"][label] = job | {"ratio_vs_bare_decoder": ratio, "steady_ratio_vs_bare_decoder": steady,
                                        "ratio_vs_bare_causal_lm": (job["tokens_per_s"] / bare["causal_lm_tokens_per_s"]
                                                                    if args.causal_lm else None)}
            line = (f"[{shape}] job ({label}): {job['examples_per_s']:.1f} ex/s {job['tokens_per_s']:,.0f} tok/s "
                    f"(compute {job['compute_s']:.1f} s, write {job['write_s']:.1f} s, overlapped "
                    f"{job['overlap_s']:.1f} s, span {job['active_s']:.1f} s, actor start {job['startup_s']:.1f} s, "
                    f"{job['compression_ratio'] or 0:.2f}x compression) | job/bare {ratio:.3f} over the span, "
                    f"{steady:.3f} steady ({job['steady_examples_per_s']:.1f} ex/s between first and last publish; "
                    f"target >= 0.9)")
            print(line, flush=True)
            lines.append(line)
        if args.actors > 1:
            job = res["jobs"]["default"]
            jobk = run_job(args, overrides(args, ckpt, data, work / f"store_{shape}_{args.actors}", args.actors,
                                           device))
            res[f"job_{args.actors}_actors"] = jobk
            res["actor_speedup"] = jobk["tokens_per_s"] / job["tokens_per_s"]
            res["actor_speedup_steady"] = jobk["steady_tokens_per_s"] / max(job["steady_tokens_per_s"], 1e-9)
            line = (f"[{shape}] {args.actors} actors: {jobk['examples_per_s']:.1f} ex/s {jobk['tokens_per_s']:,.0f} "
                    f"tok/s = {res['actor_speedup']:.2f}x of 1 actor over the span, "
                    f"{res['actor_speedup_steady']:.2f}x steady (target >= {0.9 * args.actors:.1f}x)")
            print(line, flush=True)
            lines.append(line)
        results.append(res)
        if args.json:           # after every shape: a call cut short still leaves what it measured
            Path(args.json).write_text(json.dumps({"device": gpu, "gpus": n_gpu, "args": vars(args),
                                                   "results": results}, indent=2))
    print("\nsummary (" + gpu + "):\n" + "\n".join(lines), flush=True)

if __name__ == "__main__":
    main()
