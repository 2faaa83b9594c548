"""End to end through the real jobs: `python -m jobs.build_cache` writes a store for a random-weight model of a
given shape, then `python -m jobs.train train.stage=student` trains from it; examples/s and MFU come from the
job's own files (the train run's metrics.jsonl, the store's meta/build_report.json).

Steady training rate: between the first logged step (train.log_every = --warmup-steps, so compilation and the
first reads fall before it) and the last one, (steps between them x global batch) / (their `time` difference).
MFU: that rate x the mean model FLOPs per example of the training data (bench/train_bench.py's Flops formula, the
same one train_bench's MFU uses) / --peak-tflops.

Data: synthetic GSM-style rows (char tokenizer: 1 token per character) with question / CoT lengths drawn in
[0.75, 1.25] x --q-len / --cot-len, as train_bench does.

Usage:
    python bench/job_bench.py --shape tiny --examples 64 --steps 6            # CPU smoke (~3 min on 2 cores)
    python bench/job_bench.py --shape 1b --examples 4096 --steps 12 --json bench/results/job_bench_1b.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.shapes import LLAMA_1B, LLAMA_3B  # noqa: E402

SHAPES = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2), "1b": LLAMA_1B, "3b": LLAMA_3B}
# per shape: the job's overrides (train_bench's settings: paper LoRA, M = 24, T = 3, micro 256 / 128 on an H200)
COMMON = ["data.max_tokens=512"]     # the synthetic rows are ~270 characters = tokens
OVERRIDES = {
    "tiny": ["lora.r=8", "lora.alpha=16", "latent.num_latents=6", "latent.num_iterations=2", "train.global_batch=8",
             "train.micro_batch=4", "build.batch_size=8", "store.shard_examples=16"],
    "1b": ["model.dtype=bfloat16", "lora.r=128", "lora.alpha=32", "lora.dropout=0.1", "latent.num_latents=24",
           "latent.num_iterations=3", "train.global_batch=256", "train.micro_batch=256", "train.precision=bf16",
           "build.batch_size=64", "train.group_by_length=8", "store.shard_examples=0"],
    "3b": ["model.dtype=bfloat16", "lora.r=128", "lora.alpha=32", "lora.dropout=0.1", "latent.num_latents=24",
           "latent.num_iterations=3", "train.global_batch=128", "train.micro_batch=128", "train.precision=bf16",
           "build.batch_size=32", "train.group_by_length=8", "store.shard_examples=0"],
}


def write_data(path: Path, n: int, q: int, c: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["apples", "boxes", "more", "each", "then", "how", "many", "does", "she", "have", "left", "in", "total"]
    with open(path, "w") as f:
        for _ in range(n):
            ql, cl = rng.randint(int(0.75 * q), int(1.25 * q)), rng.randint(int(0.75 * c), int(1.25 * c))
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            question = f"Tom has {a} apples and gets {b} more."
            while len(question) < ql:
                question += " " + rng.choice(words)
            steps, total = [], a + b
            while len(" ".join(steps)) < cl:
                x = rng.randint(1, 9)
                steps.append(f"<<{total}+{x}={total + x}>>")
                total += x
            f.write(json.dumps({"question": question + "?", "cot": " ".join(steps), "answer": str(total)}) + "\n")


def flops_per_example(cfg, ckpt: Path) -> float:
    """Mean model FLOPs per training example (train_bench.Flops, counted from the checkpoint's config)."""
    from transformers import AutoConfig, AutoTokenizer

    from bench.train_bench import Flops
    from kava_dist.prompts import load_training_set

    mc = AutoConfig.from_pretrained(ckpt)
    d, L = mc.hidden_size, mc.num_hidden_layers
    hd = getattr(mc, "head_dim", None) or d // mc.num_attention_heads
    q, kv = mc.num_attention_heads * hd, mc.num_key_value_heads * hd
    f = Flops.__new__(Flops)
    f.d, f.V, f.L, f.A = d, mc.vocab_size, L, q
    f.N = L * (d * q + 2 * d * kv + q * d + 3 * d * mc.intermediate_size)
    lora = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
    f.Nl = L * sum(cfg.lora.r * (i + o) for m, (i, o) in lora.items() if m in cfg.lora.target_modules)
    f.M, f.T = cfg.latent.num_latents, cfg.latent.num_iterations
    f.prj = 2 * d * d if cfg.latent.use_projection else 0
    items, _ = load_training_set(cfg.data, AutoTokenizer.from_pretrained(ckpt))
    return statistics.mean(f.student(e) for e in items)


def run(cmd: list[str], log: Path, timeout: int) -> float:
    t0 = time.perf_counter()
    path = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... exited {p.returncode}; log tail:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="training steps (train.max_steps)")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps before the first timed log line")
    ap.add_argument("--q-len", type=int, default=100)
    ap.add_argument("--cot-len", type=int, default=150)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--workdir", default="", help="keep the checkpoint, data, store and run here (default: temp)")
    ap.add_argument("--json", default="")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per job")
    ap.add_argument("overrides", nargs="*", help="more config overrides for both jobs")
    a = ap.parse_args(argv)
    from kava_dist.config import load_config
    from kava_dist.tiny import save_tiny_checkpoint

    tmp = None if a.workdir else tempfile.TemporaryDirectory(prefix="kava_job_bench_")
    root = Path(a.workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    s = SHAPES[a.shape]
    t0 = time.perf_counter()
    ckpt = save_tiny_checkpoint(root / "ckpt", hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                                num_layers=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
                                num_kv_heads=s["num_key_value_heads"], **({"vocab_size": s["vocab_size"]}
                                                                          if "vocab_size" in s else {}))
    write_data(root / "data.jsonl", a.examples, a.q_len, a.cot_len)
    print(f"[job_bench] {a.shape}: checkpoint and {a.examples} rows in {time.perf_counter() - t0:.0f} s", flush=True)
    over = ["--config", "configs/tiny_cpu.yaml", f"model.name_or_path={ckpt}", f"data.train_path={root / 'data.jsonl'}",
            f"store.path={root / 'store'}", *COMMON, *OVERRIDES[a.shape], *a.overrides]
    build_s = run([sys.executable, "-m", "jobs.build_cache", *over], root / "build.log", a.timeout)
    report = json.loads((root / "store" / "meta" / "build_report.json").read_text())
    train_over = [*over, "train.stage=student", f"train.out_dir={root / 'run'}", f"train.max_steps={a.steps}",
                  f"train.log_every={a.warmup_steps}", "train.save_every=0"]
    train_s = run([sys.executable, "-m", "jobs.train", *train_over], root / "train.log", a.timeout)
    lines = [json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cfg = load_config("configs/tiny_cpu.yaml", over[2:] + train_over[len(over):])
    first, last = lines[0], lines[-1]
    steady = (last["step"] - first["step"]) * cfg.train.global_batch / max(1e-9, last["time"] - first["time"])
    fpe = flops_per_example(cfg, ckpt)
    out = {"shape": a.shape, "examples": a.examples, "steps": a.steps, "global_batch": cfg.train.global_batch,
           "micro_batch": cfg.train.micro_batch, "build_wall_s": build_s, "train_wall_s": train_s,
           "build_rows": report.get("rows"), "build_steady_rows_per_s": report.get("steady_rows_per_s"),
           "build_report": {k: report.get(k) for k in ("active_s", "compute_s", "write_s", "overlap_s", "startup_s")},
           "train_samples_per_s_steady": steady, "train_samples_per_s_since_start": last["samples_per_s"],
           "model_flops_per_example": fpe, "mfu": steady * fpe / (a.peak_tflops * 1e12), "peak_tflops": a.peak_tflops,
           "metrics_lines": len(lines), "overrides": over[2:]}
    print(f"[job_bench] {a.shape}: build {build_s:.0f} s (job; {report.get('rows')} rows stored, steady "
          f"{report.get('steady_rows_per_s') or 0:.1f} rows/s, compute {report.get('compute_s') or 0:.1f} s, write "
          f"{report.get('write_s') or 0:.1f} s), train {train_s:.0f} s (job); student from the store: "
          f"{steady:.2f} samples/s steady (steps {first['step']}-{last['step']}), "
          f"{last['samples_per_s']:.2f} since start; MFU {100 * out['mfu']:.3g}% (peak {a.peak_tflops:g} TFLOP/s, "
          f"{fpe / 1e9:.3g} GFLOP/example)", flush=True)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
