"""Reader scaling on an S3-compatible store: N concurrent reader processes (the ranks of one node), each reading its
rank's share of one epoch exactly as training does (StoreReader + align_store's example_id scan + StoreLoader over
the GlobalBatchPlan), against a moto server on 127.0.0.1 that counts requests and bytes (bench/moto_counting.py).

Per mode and N: requests and bytes the server saw per training example (everything from opening the store to the
end of the epoch, start-up included), and the aggregate examples/s (loopback moto, so this measures request
counts and CPU cost, not a real object store's latency or bandwidth). Modes: `ranged` (the default reader:
coalesced ranged GETs, small shard files whole) and `cache` (StoreReader cache_dir: whole shard files on the
node's disk, shared by its ranks, fetched ahead of use).

Usage:
    python bench/s3_readers_bench.py                                   # tiny dims, 1/2/4/8 readers, both modes
    python bench/s3_readers_bench.py --dims 1b --examples 512 --shard-examples 64 --readers 1,2,4 --json out.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIMS = {"tiny": (2, 2, 32, 64), "1b": (16, 8, 64, 2048), "3b": (28, 8, 128, 3072)}   # L, H, D, d


def build(url: str, so: dict, dims: str, examples: int, shard_examples: int, m: int) -> None:
    import torch

    from cache_store import StoreWriter
    from kava_dist.config import load_config
    from kava_dist.targets import store_spec

    L, H, D, d = DIMS[dims]
    spec = store_spec(load_config(None, [f"latent.num_latents={m}", f"store.shard_examples={shard_examples}"]),
                      dims=(L, H, D, d))
    shards = -(-examples // shard_examples)
    w = StoreWriter.create_or_open(url, spec, "bench", {}, num_shards=shards, storage_options=so)
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        n = min(shard_examples, examples - s * shard_examples)
        eid = torch.arange(n) * shards + s                  # a shard holds scattered examples (length-sorted builds)
        w.write_shard(s, {"k": torch.randn(n, L, H, m, D, generator=g).bfloat16(),
                          "v": torch.randn(n, L, H, m, D, generator=g).bfloat16(),
                          "valid": torch.rand(n, L, H, m, generator=g) > 0.1,
                          "codi_h": torch.randn(n, L, d, generator=g).bfloat16(),
                          "index": torch.randint(0, 300, (n, L, H, m), generator=g, dtype=torch.int16),
                          "example_id": eid, "cot_len": torch.full((n,), 100, dtype=torch.int32)})


def worker(a: argparse.Namespace) -> None:
    """One rank: open, scan, read its share of epoch 0 through StoreLoader; print one JSON line."""
    from cache_store import StoreReader
    from kava_dist.loader import GlobalBatchPlan, StoreLoader, align_store
    from kava_dist.prompts import Encoded

    t0 = time.perf_counter()
    so = json.loads(a.so)
    reader = StoreReader(a.url, storage_options=so, cache_dir=a.cache_dir or None)
    items = [Encoded(id=i, question_ids=[1, 5], cot_ids=[6], prompt_ids=[7], answer_ids=[8, 2])
             for i in range(a.examples)]
    aligned, rows, _ = align_store(reader, items)
    plan = GlobalBatchPlan(len(aligned), a.global_batch, a.micro_batch, a.world, seed=0)
    loader = StoreLoader(reader, aligned, rows, plan, a.rank, pad_id=0)
    n = sum(len(b.ids) for _, _, b, _ in loader.iterate(0, plan.steps_per_epoch))
    print(json.dumps({"rank": a.rank, "examples": n, "seconds": time.perf_counter() - t0}), flush=True)


def run(mode: str, n: int, a: argparse.Namespace, s3, url: str, tmp: Path) -> dict:
    cache = str(tmp / f"cache_{mode}_{n}") if mode == "cache" else ""
    s3.reset()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--url", url, "--so", json.dumps(s3.storage_options),
                               "--cache-dir", cache, "--examples", str(a.examples), "--global-batch",
                               str(a.global_batch), "--micro-batch", str(a.global_batch // n), "--world", str(n),
                               "--rank", str(r)], cwd=REPO, stdout=subprocess.PIPE, text=True) for r in range(n)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise SystemExit(f"a reader process failed ({[p.returncode for p in procs]})")
    c = s3.counts()
    ex = sum(o["examples"] for o in outs)
    req = sum(c["requests"].values())
    return {"mode": mode, "readers": n, "examples": ex, "requests": req, "requests_by_method": c["requests"],
            "requests_per_example": req / ex, "bytes_per_example": c["get_bytes"] / ex,
            "wall_s": wall, "examples_per_s": ex / wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="tiny", choices=sorted(DIMS))
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--shard-examples", type=int, default=64)
    ap.add_argument("--latents", type=int, default=24)
    ap.add_argument("--global-batch", type=int, default=64, help="each of N readers reads micro-batches of G / N")
    ap.add_argument("--readers", default="1,2,4,8")
    ap.add_argument("--modes", default="ranged,cache")
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for k in ("--url", "--so", "--cache-dir"):
        ap.add_argument(k, default="", help=argparse.SUPPRESS)
    for k in ("--micro-batch", "--world", "--rank"):
        ap.add_argument(k, type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    from bench.moto_counting import CountingMoto

    rows = []
    with tempfile.TemporaryDirectory(prefix="kava_s3_readers_") as tmp, CountingMoto(str(Path(tmp) / "moto.log")) as s3:
        url = s3.bucket_url("readers")
        t = time.perf_counter()
        build(url, s3.storage_options, a.dims, a.examples, a.shard_examples, a.latents)
        print(f"[s3_readers] store: {a.examples} examples of {a.dims} dims, {a.shard_examples} per shard, "
              f"written in {time.perf_counter() - t:.1f} s", flush=True)
        for mode in a.modes.split(","):
            for n in [int(x) for x in a.readers.split(",")]:
                rows.append(run(mode, n, a, s3, url, Path(tmp)))
                r = rows[-1]
                print(f"[s3_readers] {mode:6s} N={n}: {r['requests_per_example']:.3f} requests/example, "
                      f"{r['bytes_per_example'] / 1e6:.3f} MB/example, {r['examples_per_s']:.0f} examples/s", flush=True)
    print("\n| mode | readers | examples | requests | requests / example | MB / example | examples/s (loopback) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['readers']} | {r['examples']} | {r['requests']} | {r['requests_per_example']:.3f} | "
              f"{r['bytes_per_example'] / 1e6:.3f} | {r['examples_per_s']:.0f} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
