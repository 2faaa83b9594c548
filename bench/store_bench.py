"""cache_store benchmark on synthetic KV-like teacher targets (CPU).

For Llama-3.2-1B targets (K,V [16, 8, 24, 64] + codi_h [16, 2048]) and Llama-3.2-3B
(K,V [28, 8, 24, 128] + codi_h [28, 3072]), per storage mode (bf16 lossless, int8, int4 on K/V;
codi_h stays bf16) and codec, in one run:
  - write MB/s (raw bf16 bytes written per second, through StoreWriter.write_shard),
  - bytes per example on disk vs raw bf16 (whole example, and K+V only),
  - max relative error per field, per example ||x - x_hat||_2 / ||x||_2,
  - random batches (default 32) read through StoreReader: examples/s with no consumer (and, for
    int8/int4, with dequantize=False: the parts a GPU would dequantise), and
    with a simulated training consumer (sleep batch/gpu_rate per batch) without and with prefetch.

Data: keys = Gaussian + per-channel offsets with a few outlier channels x10 and per-layer scale;
values Gaussian. Reads hit the page cache (the store was just written): they measure decode
and read-path cost, not disk or network.

Usage::

    python bench/store_bench.py                                  # defaults, < 3 min on 2 cores
    python bench/store_bench.py --models 3b --n-3b 384 --modes int8 --codecs blosc-zstd:3,zstd:3
    python bench/store_bench.py --gpu-ex-per-s 150 --json out.json
    python bench/store_bench.py --malloc-reuse     # same under GLIBC_TUNABLES (see reader.py docstring)
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_store import CodecSpec, FieldSpec, StoreReader, StoreSpec, StoreWriter, relative_error  # noqa: E402
from kava_dist.loader import Prefetcher  # noqa: E402

TUNABLES = "glibc.malloc.mmap_threshold=4294967295:glibc.malloc.trim_threshold=4294967295"
MODELS = {  # name: (layers, kv heads, kept slots M, head dim, d_model)
    "1b": (16, 8, 24, 64, 2048),
    "3b": (28, 8, 24, 128, 3072),
}


def make_spec(model: str, mode: str, codec: CodecSpec, shard_size: int) -> StoreSpec:
    """mode: bf16 | int8 | int4, optionally "/<codec>" for a K/V codec override (e.g. int8/none)."""
    L, H, M, D, dm = MODELS[model]
    mode, _, kv_codec_name = mode.partition("/")
    q = None if mode == "bf16" else mode
    kv_codec = CodecSpec(kv_codec_name, clevel=codec.clevel) if kv_codec_name else None
    return StoreSpec(fields=(
        FieldSpec("k", (L, H, M, D), "bfloat16", quant=q, quant_reduce_axes=(2,) if q else (), codec=kv_codec),
        FieldSpec("v", (L, H, M, D), "bfloat16", quant=q, quant_reduce_axes=(3,) if q else (), codec=kv_codec),
        FieldSpec("valid", (L, H, M), "bool"),
        FieldSpec("codi_h", (L, dm), "bfloat16"),
        FieldSpec("example_id", (), "int64"),
        FieldSpec("cot_len", (), "int32"),
    ), shard_size=shard_size, codec=codec)


def make_data(model: str, n: int, seed: int) -> dict[str, Any]:
    L, H, M, D, dm = MODELS[model]
    g = torch.Generator().manual_seed(seed)
    layer = torch.linspace(0.5, 2.0, L).view(1, L, 1, 1, 1)
    k = torch.randn(n, L, H, M, D, generator=g) + 0.5 * torch.randn(1, L, H, 1, D, generator=g)
    k[..., torch.randperm(D, generator=g)[: max(2, D // 32)]] *= 10
    v = torch.randn(n, L, H, M, D, generator=g)
    h = torch.randn(n, L, dm, generator=g) * torch.linspace(1, 8, L).view(1, L, 1)
    rng = np.random.default_rng(seed)
    return {
        "k": (k * layer).bfloat16(), "v": (v * layer).bfloat16(),
        "valid": rng.random((n, L, H, M)) > 0.1, "codi_h": h.bfloat16(),
        "example_id": np.arange(n, dtype=np.int64) + seed * 100000,
        "cot_len": rng.integers(1, 400, size=n, dtype=np.int32),
    }


WRITE_STAGES = {"zarr write (codec + file)": "write_shard_block", "read-back checksums": "shard_checksums",
                "prepare (copy, finite check, content sha256)": "_prepare", "quantise": "quantize", "fsync": "fsync"}


def write_split(prof: cProfile.Profile) -> dict[str, float]:
    """Seconds (cumulative, this thread) of each write stage, from a profile of StoreWriter.write_shard calls."""
    st = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    out = {}
    for stage, fn in WRITE_STAGES.items():
        out[stage] = sum(v[3] for k, v in st.items() if k[2] in (fn, f"<built-in method posix.{fn}>"))
    return out


def run_one(root: Path, model: str, mode: str, codec: CodecSpec, args: argparse.Namespace) -> dict[str, Any]:
    n = args.n_1b if model == "1b" else args.n_3b
    S = args.shard_size
    num_shards = -(-n // S)
    spec = make_spec(model, mode, codec, S)
    url = str(root / f"{model}-{mode.replace('/', '_')}-{codec.name}{codec.clevel}")
    shards = [make_data(model, min(S, n - i * S), seed=i) for i in range(num_shards)]
    w = StoreWriter.create_or_open(url, spec, "bench", {"model": model, "mode": mode}, num_shards=num_shards)
    prof = cProfile.Profile()
    t0, c0 = time.perf_counter(), time.process_time()
    prof.enable()
    for i, d in enumerate(shards):
        w.write_shard(i, d)
    prof.disable()
    t_write, c_write = time.perf_counter() - t0, time.process_time() - c0
    split = write_split(prof)
    raw_bf16 = n * spec.logical_nbytes
    kv_raw = n * (spec.field("k").logical_nbytes + spec.field("v").logical_nbytes)

    r = StoreReader(url, decode_threads=args.decode_threads)
    st = r.stats()
    kv_disk = st["fields"]["k"]["bytes"] + st["fields"]["v"]["bytes"]
    # Exactness / error over every example (sequential batched read).
    err = {"k": 0.0, "v": 0.0}
    exact_other = True
    for lo in range(0, n, S):
        b = r.get_batch(range(lo, min(n, lo + S)))
        d = shards[lo // S]
        for f in ("k", "v"):
            err[f] = max(err[f], float(relative_error(d[f], b[f]).max()))
        exact_other &= torch.equal(b["codi_h"].view(torch.int16), d["codi_h"].view(torch.int16))
        exact_other &= torch.equal(b["example_id"], torch.from_numpy(d["example_id"]))
    if mode.startswith("bf16"):
        assert err["k"] == 0.0 and err["v"] == 0.0, err
    assert exact_other

    bs = args.batch
    rng = np.random.default_rng(0)
    r.get_batch(rng.choice(n, bs, replace=False))  # warm shard indexes (as a training run would)
    t0 = time.perf_counter()
    for _ in range(args.read_batches):
        r.get_batch(rng.choice(n, bs, replace=False))
    read_eps = args.read_batches * bs / (time.perf_counter() - t0)
    raw_eps = None
    if not mode.startswith("bf16"):  # quantised parts only (dequantised later on the GPU with expand_quantized)
        t0 = time.perf_counter()
        for _ in range(args.read_batches):
            r.get_batch(rng.choice(n, bs, replace=False), dequantize=False)
        raw_eps = args.read_batches * bs / (time.perf_counter() - t0)

    def consumer(prefetch: int) -> float:
        """Steady-state ex/s of a loop that 'trains' for batch/gpu_rate s per batch (first batch not timed)."""
        step = bs / args.gpu_ex_per_s
        t0, k = 0.0, 0
        order = np.random.default_rng([3, 1]).permutation(n)
        batches = [order[i * bs:(i + 1) * bs] for i in range(min(n // bs, args.consumer_batches + 1))]
        read = r.get_batch
        src = Prefetcher(read, batches, prefetch) if prefetch > 0 else (read(b) for b in batches)
        try:
            for k, batch in enumerate(src):
                if k == 0:
                    t0 = time.perf_counter()
                if k >= args.consumer_batches:
                    break
                time.sleep(step)  # the GPU step; releases the GIL like CUDA work does
        finally:
            if prefetch > 0:
                src.close()
        return k * bs / (time.perf_counter() - t0)  # k intervals of (step + wait for the next batch)

    return {
        "model": model, "mode": mode, "codec": f"{codec.name}:{codec.clevel}", "examples": n, "shard_size": S,
        "raw_bf16_bytes_per_ex": raw_bf16 / n, "disk_bytes_per_ex": st["bytes_on_disk"] / n,
        "x_raw": st["bytes_on_disk"] / raw_bf16, "x_raw_kv": kv_disk / kv_raw,
        "write_MBps": raw_bf16 / 1e6 / t_write, "write_cpu_MBps": raw_bf16 / 1e6 / max(c_write, 1e-9),
        "write_split_s": split, "read_ex_per_s": read_eps, "read_parts_ex_per_s": raw_eps,
        "consumer_no_prefetch_ex_per_s": consumer(0), "consumer_prefetch2_ex_per_s": consumer(2),
        "max_rel_err_k": err["k"], "max_rel_err_v": err["v"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1b,3b")
    p.add_argument("--modes", default="bf16,int8,int4,int8/none",
                   help="bf16 | int8 | int4, '/codec' overrides the K/V codec (int8/none: int8 K/V stored uncompressed)")
    p.add_argument("--codecs", default="blosc-zstd:3", help="comma list of name:clevel (blosc-zstd, blosc-lz4, zstd, none)")
    p.add_argument("--extra-bf16-codecs", default="zstd:3", help="more codecs to run for bf16 only ('' for none)")
    p.add_argument("--n-1b", type=int, default=160, help="examples for the 1B store")
    p.add_argument("--n-3b", type=int, default=64, help="examples for the 3B store")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--read-batches", type=int, default=10)
    p.add_argument("--consumer-batches", type=int, default=5, help="timed batches of the simulated consumer")
    p.add_argument("--gpu-ex-per-s", type=float, default=200.0, help="simulated training consumption (examples/s/GPU)")
    p.add_argument("--decode-threads", type=int, default=None)
    p.add_argument("--dir", default=None, help="where to build stores (default: a temp dir, removed after)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--malloc-reuse", action="store_true",
                   help=f"re-run under GLIBC_TUNABLES={TUNABLES} (glibc keeps freed batch memory: fewer page faults)")
    args = p.parse_args()
    if args.malloc_reuse and os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        os.environ["GLIBC_TUNABLES"] = TUNABLES
        os.execv(sys.executable, [sys.executable, *sys.argv])

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="store_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in args.codecs.split(","):
        name, _, lvl = spec.partition(":")
        for mode in args.modes.split(","):
            runs.append((mode, CodecSpec(name, clevel=int(lvl or 3))))
    for spec in filter(None, args.extra_bf16_codecs.split(",")):
        name, _, lvl = spec.partition(":")
        runs.append(("bf16", CodecSpec(name, clevel=int(lvl or 3))))

    print(f"cache_store bench: cpus={os.cpu_count()} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"batch={args.batch} shard_size={args.shard_size} simulated GPU={args.gpu_ex_per_s:g} ex/s "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} load avg={os.getloadavg()[0]:.1f}")
    print("cmd: python " + " ".join(sys.argv))
    results = []
    t_all = time.perf_counter()
    try:
        for model in args.models.split(","):
            for mode, codec in runs:
                res = run_one(root, model, mode, codec, args)
                results.append(res)
                print(f"  done {model} {mode} {res['codec']} ({time.perf_counter() - t_all:.0f}s)", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    hdr = (f"{'model':5} {'mode':9} {'codec':13} {'MB/ex':>6} {'x raw':>6} {'x raw KV':>8} {'write MB/s':>10} "
           f"{'read ex/s':>9} {'parts ex/s':>10} {'cons no-pf':>10} {'cons pf=2':>9} {'max err k':>9} {'max err v':>9}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in results:
        print(f"{r['model']:5} {r['mode']:9} {r['codec']:13} {r['disk_bytes_per_ex'] / 1e6:6.3f} {r['x_raw']:6.3f} "
              f"{r['x_raw_kv']:8.3f} {r['write_MBps']:10.0f} {r['read_ex_per_s']:9.0f} "
              f"{r['read_parts_ex_per_s'] or float('nan'):10.0f} "
              f"{r['consumer_no_prefetch_ex_per_s']:10.0f} {r['consumer_prefetch2_ex_per_s']:9.0f} "
              f"{r['max_rel_err_k']:9.4f} {r['max_rel_err_v']:9.4f}")
    print("\nwrite CPU (raw MB per CPU-second of this process; StoreWriter.write_shard's own thread, in seconds):")
    for r in results:
        print(f"  {r['model']} {r['mode']} {r['codec']}: {r['write_cpu_MBps']:.0f} MB/s per CPU-second; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in r["write_split_s"].items()))
    print(f"\nraw bf16 bytes/example: " + ", ".join(
        f"{m} {next(r['raw_bf16_bytes_per_ex'] for r in results if r['model'] == m) / 1e6:.3f} MB"
        for m in dict.fromkeys(r["model"] for r in results)))
    print("x raw = bytes on disk / raw bf16 bytes (whole example incl. codi_h kept in bf16); x raw KV = K and V only.")
    print("read ex/s = random batches, no consumer; parts ex/s = same with dequantize=False (int8/int4 parts "
          "for expand_quantized on the GPU); cons = effective ex/s with a consumer sleeping "
          f"batch/{args.gpu_ex_per_s:g}s per batch (no prefetch / prefetch=2); max err = max over examples of "
          "||x - x_hat|| / ||x||.")
    target = 10 * args.gpu_ex_per_s
    for r in results:
        if r["mode"].startswith("int8"):
            ok = r["x_raw_kv"] <= 0.55 and max(r["max_rel_err_k"], r["max_rel_err_v"]) <= 0.01
            print(f"target int8 {r['model']} {r['mode']} {r['codec']}: K/V {r['x_raw_kv']:.3f}x raw (<= 0.55), whole example "
                  f"{r['x_raw']:.3f}x, max err {max(r['max_rel_err_k'], r['max_rel_err_v']):.4f} (<= 0.01): "
                  f"{'PASS' if ok else 'FAIL'}")
    for r in results:
        best = max(r["read_ex_per_s"], r["read_parts_ex_per_s"] or 0.0)
        how = "parts" if best != r["read_ex_per_s"] else "dequantised" if r["read_parts_ex_per_s"] else "lossless"
        print(f"target reads {r['model']} {r['mode']} {r['codec']}: {best:.0f} ex/s ({how}) vs 10 x "
              f"{args.gpu_ex_per_s:g} = {target:g}: {'PASS' if best >= target else 'below'}")
    print(f"total {time.perf_counter() - t_all:.0f}s, load avg {os.getloadavg()[0]:.1f} (other processes share the CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
