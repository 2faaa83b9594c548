"""Reading a cold local store while a consumer trains: with and without the loader's readahead, side by side.

A local store of 1B-shaped targets (K and V [16, 8, 24, 64] bf16 per example, Llama-3.2-1B at M = 24) is written
once. Each round drops its files from the page cache (posix_fadvise DONTNEED), then reads a random permutation in
micro-batches the way `kava_dist.loader.StoreLoader` does: a background thread reads each micro-batch with
`StoreReader.get_batch` into a bounded queue (depth `--prefetch`), and, with readahead on, announces each
micro-batch `--readahead` micro-batches before it is read (`StoreReader(..., page_readahead=True).readahead`:
WILLNEED on the rows' byte ranges, on a background thread). The consumer takes `--consumer-ms` per example of a
micro-batch (a GPU step's time) and waits when the queue is empty. The printed ratio is consumer time / wall
time: 1.0 means the reads hid behind the steps. The page cache is dropped with bench/store_targets.py's
`drop_page_cache`, as `train_bench --targets cold` does.

Usage:
    python bench/cold_read_bench.py                                   # ~1 min on 2 CPU cores
    python bench/cold_read_bench.py --examples 1024 --batch 64 --consumer-ms 2.2 --rounds 3
"""
from __future__ import annotations

import argparse
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.store_targets import drop_page_cache  # noqa: E402
from cache_store import FieldSpec, StoreReader, StoreSpec, StoreWriter  # noqa: E402


def write(root: Path, n: int, shard: int) -> str:
    shape = (16, 8, 24, 64)
    spec = StoreSpec(fields=(FieldSpec("k", shape, "bfloat16"), FieldSpec("v", shape, "bfloat16"),
                             FieldSpec("example_id", (), "int64")), shard_size=shard)
    w = StoreWriter.create_or_open(str(root), spec, "bench", {"bench": 1}, num_shards=(n + shard - 1) // shard)
    g = torch.Generator().manual_seed(0)
    for s in range(0, n, shard):
        m = min(shard, n - s)
        w.write_shard(s // shard, {"k": torch.randn(m, *shape, generator=g).bfloat16(),
                                   "v": torch.randn(m, *shape, generator=g).bfloat16(),
                                   "example_id": torch.arange(s, s + m)})
    return w.url


def one_round(url: str, order: np.ndarray, batch: int, consumer_s: float, prefetch: int, readahead: int) -> dict:
    reader = StoreReader(url, page_readahead=readahead > 0)
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    q: queue.Queue = queue.Queue(maxsize=prefetch)

    def produce() -> None:
        for i, idx in enumerate(batches):
            if readahead > 0:
                if i == 0:
                    for j in range(min(readahead, len(batches))):
                        reader.readahead(batches[j], fields=["k", "v"])
                elif i + readahead - 1 < len(batches):
                    reader.readahead(batches[i + readahead - 1], fields=["k", "v"])
            q.put(reader.get_batch(idx, fields=["k", "v", "example_id"]))
        q.put(None)

    t0 = time.perf_counter()
    th = threading.Thread(target=produce, daemon=True)
    th.start()
    waited, seen = 0.0, 0
    while True:
        w0 = time.perf_counter()
        item = q.get()
        waited += time.perf_counter() - w0
        if item is None:
            break
        seen += len(item["example_id"])
        time.sleep(consumer_s * len(item["example_id"]))
    wall = time.perf_counter() - t0
    th.join()
    return {"wall_s": wall, "waited_s": waited, "examples": seen, "ratio": consumer_s * seen / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=768)
    ap.add_argument("--shard", type=int, default=256, help="examples per shard")
    ap.add_argument("--batch", type=int, default=32, help="examples per micro-batch")
    ap.add_argument("--consumer-ms", type=float, default=2.2,
                    help="consumer time per example (2.2 ms: the 1B student at ~450 samples/s on an H200)")
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--readahead", type=int, default=16, help="micro-batches announced ahead (the loader's default)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kava_cold_read_") as tmp:
        t = time.perf_counter()
        url = write(Path(tmp) / "store", args.examples, args.shard)
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        print(f"store: {args.examples} examples, {size / 1e6:.0f} MB, written in {time.perf_counter() - t:.1f} s")
        rng = np.random.default_rng(0)
        res: dict[str, list[dict]] = {"readahead": [], "no readahead": []}
        for r in range(args.rounds):
            order = rng.permutation(args.examples)
            for name in (("readahead", "no readahead") if r % 2 == 0 else ("no readahead", "readahead")):
                files, _ = drop_page_cache(Path(tmp))
                out = one_round(url, order, args.batch, args.consumer_ms / 1000, args.prefetch,
                                args.readahead if name == "readahead" else 0)
                res[name].append(out)
                print(f"round {r} {name:>12}: {files} files dropped; wall {out['wall_s']:.2f} s, consumer waited "
                      f"{out['waited_s']:.2f} s, consumer time / wall {out['ratio']:.3f}")
        for name, rows in res.items():
            print(f"{name:>12}: consumer time / wall, mean over {len(rows)} rounds: "
                  f"{np.mean([x['ratio'] for x in rows]):.3f}")


if __name__ == "__main__":
    main()
