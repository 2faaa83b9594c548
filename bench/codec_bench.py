"""Where the cache build's write time goes: one shard written through zarr (sharding codec, one example per
chunk) against the bare Blosc encode of the same chunks, for several codecs, side by side in one run.

Usage:
    python3 bench/codec_bench.py --shape 30,3,24,64 --rows 128          # SmolLM2-135M K (L, H_kv, M, D)
    python3 bench/codec_bench.py --shape 16,8,24,64 --rows 64 --codecs zstd:3,zstd:1,lz4:5

Data: bf16 bit patterns of N(0,1) values (real K/V compress a little better: 1.39x at zstd:3 on SmolLM2's
4x4 cache against 1.35x here, so ratios are indicative; speeds are what matters).
Prints MB/s of raw bytes for the zarr write, for the store's direct shard-file write (cache_store.shard_file:
the same chunks encoded with numcodecs and the file assembled and put in one write; "same file" checks it is
byte-identical to zarr's) and for the bare encode, their time ratios to the bare encode, and the compression
ratio. Each is the best of --repeat interleaved timings of a fresh shard file.

With --writers 1,2,4 it also times the store's real write path (`StoreWriter.write_shard`: checks, content hash,
zarr write, fsync, read-back checksum, ledger publish) with K shards written at once from K threads, as
build.writes_in_flight does inside a cache-build actor, in the Llama-1B K/V shapes of the --shape argument
(fields k and v, one shard of --rows examples each): the store's write capacity on this machine in examples/s,
once with every shard file written through zarr (zarr_io.DIRECT_SHARD_WRITES = False) and once direct.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
import shutil
import tempfile
import time

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(x: np.ndarray, cname: str, clevel: int, root: str, repeat: int = 3) -> dict:
    """Best of `repeat` timings (interleaved) of zarr's shard write, the direct shard-file write and the bare encode."""
    from cache_store.shard_file import write_shard_file

    rows = x.shape[0]
    store = zarr.storage.LocalStore(root)
    z, zd = (zarr.create_array(store, name=f"{cname}{clevel}{tag}", shape=x.shape, dtype=x.dtype,
                               chunks=(1,) + x.shape[1:], shards=x.shape, overwrite=True,
                               compressors=BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle"))
              for tag in ("", "_direct"))
    b = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=numcodecs.Blosc.SHUFFLE)
    t_zarr = t_direct = t_bare = float("inf")
    for _ in range(repeat):
        for a in (z, zd):                                          # fresh files, as a new shard is written
            shutil.rmtree(Path(root) / a.path / "c", ignore_errors=True)
        t = time.perf_counter()
        z[0:rows] = x
        t_zarr = min(t_zarr, time.perf_counter() - t)
        t = time.perf_counter()
        write_shard_file(zd, 0, x)
        t_direct = min(t_direct, time.perf_counter() - t)
        t = time.perf_counter()
        out = [b.encode(x[i]) for i in range(rows)]
        t_bare = min(t_bare, time.perf_counter() - t)
    key = "c/" + "/".join(["0"] * x.ndim)
    same = (Path(root) / z.path / key).read_bytes() == (Path(root) / zd.path / key).read_bytes()
    return {"codec": f"{cname}:{clevel}", "zarr_MBps": x.nbytes / t_zarr / 1e6, "direct_MBps": x.nbytes / t_direct / 1e6,
            "bare_MBps": x.nbytes / t_bare / 1e6, "zarr_over_bare_time": t_zarr / t_bare,
            "direct_over_bare_time": t_direct / t_bare, "same_file": same, "compression": x.nbytes / sum(map(len, out))}


def store_writes(x: np.ndarray, codec: str, clevel: int, writers: int, root: str, shards: int = 8,
                 direct: bool = True) -> dict:
    """`shards` shards (fields k and v = x) written by `writers` threads through StoreWriter.write_shard
    (direct=False: every shard file through zarr's write instead of the direct shard-file write)."""
    from concurrent.futures import ThreadPoolExecutor

    from cache_store import zarr_io
    from cache_store.spec import CodecSpec, FieldSpec, StoreSpec
    from cache_store.writer import StoreWriter

    rows = x.shape[0]
    spec = StoreSpec(fields=(FieldSpec("k", x.shape[1:], "bfloat16"), FieldSpec("v", x.shape[1:], "bfloat16")),
                     shard_size=rows, codec=CodecSpec(codec, clevel=clevel)).resolved()
    path = f"{root}/store_{codec}{clevel}_{writers}_{int(direct)}"
    w = StoreWriter.create_or_open(path, spec, fingerprint="bench", fingerprint_fields={}, num_shards=shards + 1)
    saved, zarr_io.DIRECT_SHARD_WRITES = zarr_io.DIRECT_SHARD_WRITES, direct
    try:
        w.write_shard(shards, {"k": x, "v": x})                    # warm-up (creates the arrays' files)
        t = time.perf_counter()
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(lambda s: w.write_shard(s, {"k": x, "v": x}), range(shards)))
        dt = time.perf_counter() - t
    finally:
        zarr_io.DIRECT_SHARD_WRITES = saved
    shutil.rmtree(path, ignore_errors=True)
    return {"writers": writers, "MBps": shards * 2 * x.nbytes / dt / 1e6, "examples_per_s": shards * rows / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="30,3,24,64", help="per-example K shape L,H_kv,M,D")
    ap.add_argument("--rows", type=int, default=128, help="examples in the shard")
    ap.add_argument("--codecs", default="zstd:3,zstd:1,lz4:5", help="cname:clevel,...")
    ap.add_argument("--repeat", type=int, default=3, help="timings per codec; the best is shown")
    ap.add_argument("--writers", default="", help="also time StoreWriter.write_shard with K threads: 1,2,4")
    args = ap.parse_args()
    shape = (args.rows,) + tuple(int(s) for s in args.shape.split(","))
    x = (np.random.default_rng(0).standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    root = tempfile.mkdtemp(prefix="codec_bench")
    try:
        print("| codec | zarr shard write MB/s | direct shard write MB/s | bare Blosc encode MB/s | zarr / bare time | "
              "direct / bare time | same file | compression |")
        print("|---|---:|---:|---:|---:|---:|---|---:|")
        for spec in args.codecs.split(","):
            cname, clevel = spec.split(":")
            r = one(x, cname, int(clevel), root, args.repeat)
            print(f"| {r['codec']} | {r['zarr_MBps']:.0f} | {r['direct_MBps']:.0f} | {r['bare_MBps']:.0f} | "
                  f"{r['zarr_over_bare_time']:.2f} | {r['direct_over_bare_time']:.2f} | {'yes' if r['same_file'] else 'NO'} | "
                  f"{r['compression']:.2f}x |", flush=True)
        if args.writers:
            print("\n| codec | shard writers | StoreWriter MB/s (k+v), zarr write | direct write | examples/s, zarr write "
                  "| direct write |")
            print("|---|---:|---:|---:|---:|---:|")
            for spec in args.codecs.split(","):
                cname, clevel = spec.split(":")
                for k in (int(v) for v in args.writers.split(",")):
                    rz, rd = (store_writes(x.view(np.uint16), f"blosc-{cname}", int(clevel), k, root, direct=d)
                              for d in (False, True))
                    print(f"| {cname}:{clevel} | {k} | {rz['MBps']:.0f} | {rd['MBps']:.0f} | {rz['examples_per_s']:.0f} | "
                          f"{rd['examples_per_s']:.0f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
