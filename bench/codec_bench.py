"""Where the cache build's write time goes: one shard written through zarr (sharding codec, one example per
chunk) against the bare Blosc encode of the same chunks, for several codecs, side by side in one run.

Usage:
    python3 bench/codec_bench.py --shape 30,3,24,64 --rows 128          # SmolLM2-135M K (L, H_kv, M, D)
    python3 bench/codec_bench.py --shape 16,8,24,64 --rows 64 --codecs zstd:3,zstd:1,lz4:5

Data: bf16 bit patterns of N(0,1) values (real K/V compress a little better: 1.39x at zstd:3 on SmolLM2's
4x4 cache against 1.35x here, so ratios are indicative; speeds are what matters).
Prints MB/s of raw bytes for the zarr write and for the bare encode, their ratio, and the compression ratio.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec


def one(x: np.ndarray, cname: str, clevel: int, root: str) -> dict:
    rows = x.shape[0]
    z = zarr.create_array(zarr.storage.LocalStore(root), name=f"{cname}{clevel}", shape=x.shape, dtype=x.dtype,
                          chunks=(1,) + x.shape[1:], shards=x.shape, overwrite=True,
                          compressors=BloscCodec(cname=cname, clevel=clevel, shuffle="shuffle"))
    t = time.perf_counter()
    z[0:rows] = x
    t_zarr = time.perf_counter() - t
    b = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=numcodecs.Blosc.SHUFFLE)
    t = time.perf_counter()
    out = [b.encode(x[i]) for i in range(rows)]
    t_bare = time.perf_counter() - t
    return {"codec": f"{cname}:{clevel}", "zarr_MBps": x.nbytes / t_zarr / 1e6, "bare_MBps": x.nbytes / t_bare / 1e6,
            "zarr_over_bare_time": t_zarr / t_bare, "compression": x.nbytes / sum(map(len, out))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="30,3,24,64", help="per-example K shape L,H_kv,M,D")
    ap.add_argument("--rows", type=int, default=128, help="examples in the shard")
    ap.add_argument("--codecs", default="zstd:3,zstd:1,lz4:5", help="cname:clevel,...")
    args = ap.parse_args()
    shape = (args.rows,) + tuple(int(s) for s in args.shape.split(","))
    x = (np.random.default_rng(0).standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    root = tempfile.mkdtemp(prefix="codec_bench")
    try:
        print("| codec | zarr shard write MB/s | bare Blosc encode MB/s | zarr / bare time | compression |")
        print("|---|---:|---:|---:|---:|")
        for spec in args.codecs.split(","):
            cname, clevel = spec.split(":")
            r = one(x, cname, int(clevel), root)
            print(f"| {r['codec']} | {r['zarr_MBps']:.0f} | {r['bare_MBps']:.0f} | {r['zarr_over_bare_time']:.2f} | "
                  f"{r['compression']:.2f}x |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
