"""Store reads on a background thread beside a training thread that runs Python: how the GIL hand-off paces them.

The student's loader reads and decodes on background threads (kava_dist.loader.StoreLoader). The codecs let go of
the GIL while they decompress, but every read needs the GIL back between those calls; while the training thread
runs Python, a waiting thread gets it only after Python's switch interval (5 ms by default). This bench times
StoreReader.get_batch (the loader's read) of one local store, warm, on a background thread:
    alone         nothing else running;
    beside busy   the main thread runs a pure-Python loop (the worst case: a training step holds the GIL in
                  Python for part of its time and in C++/CUDA, where torch lets go of it, for the rest);
for each switch interval asked, and with `--processes N` also through cache_store.read_workers.ReadWorkers (the
reads in N worker processes, at Python's default interval); prints reads (examples/s) and the busy loop's speed
against its speed alone. `train.loader_switch_interval_ms` and `train.loader_read_processes` set them for training.

Usage:
    python bench/gil_handoff_bench.py                                   # 1B-shaped targets, zstd:1, 5/1/0.5/0.2 ms
    python bench/gil_handoff_bench.py --intervals 5,0.5 --codec blosc-zstd:1 --seconds 3 --json out.json
    python bench/gil_handoff_bench.py --intervals 5 --processes 1,2                   # + reads in worker processes
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.store_bench import make_data, make_spec  # noqa: E402
from cache_store import CodecSpec, StoreReader, StoreWriter  # noqa: E402
from cache_store.read_workers import ReadWorkers  # noqa: E402


def _busy(stop: threading.Event, count: list[int]) -> None:
    n = 0
    while not stop.is_set():
        for _ in range(1000):
            n += 1
    count.append(n)


def _reads(reader: StoreReader, n: int, batch: int, stop: threading.Event, done: list[int]) -> None:
    rng = np.random.default_rng(0)
    k = 0
    while not stop.is_set():
        reader.get_batch(np.sort(rng.choice(n, batch, replace=False)), fields=("k", "v", "valid", "codi_h"))
        k += batch
    done.append(k)


def measure(reader: StoreReader, n: int, batch: int, seconds: float, busy: bool) -> tuple[float, int]:
    """(examples/s read on a background thread, busy-loop count) over `seconds`."""
    stop, done, count = threading.Event(), [], []
    t = threading.Thread(target=_reads, args=(reader, n, batch, stop, done))
    t0 = time.perf_counter()
    t.start()
    if busy:
        threading.Timer(seconds, stop.set).start()
        _busy(stop, count)
    else:
        time.sleep(seconds)
        stop.set()
    t.join()
    return done[0] / (time.perf_counter() - t0), (count[0] if count else 0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b", help="target shape: 1b | 3b (bench/store_bench.py MODELS)")
    ap.add_argument("--codec", default="zstd:1", help="NAME:LEVEL (zstd, blosc-zstd, none)")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="examples per get_batch")
    ap.add_argument("--intervals", default="5,1,0.5,0.2", help="switch intervals to try, in ms")
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    ap.add_argument("--processes", default="", help="also read through N worker processes, e.g. 1,2")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    name, _, level = a.codec.partition(":")
    codec = CodecSpec(name, clevel=int(level or 1))
    before = sys.getswitchinterval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        S = 64
        spec = make_spec(a.model, "bf16", codec, S)
        w = StoreWriter.create_or_open(str(Path(tmp) / "s"), spec, "bench", {}, num_shards=-(-a.examples // S))
        for i in range(-(-a.examples // S)):
            w.write_shard(i, make_data(a.model, min(S, a.examples - i * S), seed=i))
        reader = StoreReader(w.url)
        reader.get_batch(np.arange(a.examples))                          # warm: page cache and shard indexes
        stop, count = threading.Event(), []
        threading.Timer(a.seconds, stop.set).start()
        _busy(stop, count)
        busy_alone = count[0]
        try:
            for ms in [float(x) for x in a.intervals.split(",") if x.strip()]:
                sys.setswitchinterval(ms / 1000)
                alone, _ = measure(reader, a.examples, a.batch, a.seconds, busy=False)
                beside, loops = measure(reader, a.examples, a.batch, a.seconds, busy=True)
                row = {"switch_interval_ms": ms, "reads_alone_ex_s": alone, "reads_beside_busy_ex_s": beside,
                       "reads_beside_vs_alone": beside / alone, "busy_loop_vs_alone": loops / busy_alone}
                rows.append(row)
                print(f"switch {ms:g} ms: reads alone {alone:.0f} ex/s, beside a busy Python thread {beside:.0f} ex/s "
                      f"({beside / alone:.2f}x); the busy thread ran at {loops / busy_alone:.2f}x its speed alone",
                      flush=True)
            for n in [int(x) for x in a.processes.split(",") if x.strip()]:
                sys.setswitchinterval(before)
                with ReadWorkers(reader, processes=n) as workers:
                    workers.get_batch(np.arange(a.batch))                  # workers started and warm
                    alone, _ = measure(workers, a.examples, a.batch, a.seconds, busy=False)
                    beside, loops = measure(workers, a.examples, a.batch, a.seconds, busy=True)
                row = {"read_processes": n, "switch_interval_ms": before * 1000, "reads_alone_ex_s": alone,
                       "reads_beside_busy_ex_s": beside, "reads_beside_vs_alone": beside / alone,
                       "busy_loop_vs_alone": loops / busy_alone}
                rows.append(row)
                print(f"{n} read process(es), switch {before * 1000:g} ms: reads alone {alone:.0f} ex/s, beside a busy "
                      f"Python thread {beside:.0f} ex/s ({beside / alone:.2f}x); the busy thread ran at "
                      f"{loops / busy_alone:.2f}x its speed alone", flush=True)
        finally:
            sys.setswitchinterval(before)
    out = {"model": a.model, "codec": a.codec, "batch": a.batch, "examples": a.examples, "rows": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
