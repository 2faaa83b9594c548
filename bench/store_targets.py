"""Where a benchmarked student reads its teacher targets from: the same targets held in memory, or written to
stores of each kind and read back through the production loader (kava_dist.loader.StoreLoader + StoreReader).

Kinds (`--targets` of bench/train_bench.py):
    memory    per-example CPU tensors, stacked per micro-batch (the upper bound: no store at all)
    store     a local store, page cache warm (read once before timing)
    cold      a second local store whose files are dropped from the page cache before every timed block
              (posix_fadvise DONTNEED on each file; `cold_dropped` says whether the kernel honoured it)
    int8      a local store with int8 K/V (store.dtype=int8): the loader hands over int8 values + scales, which are
              dequantised on the device after the copy (kava_dist.loader.QuantizedTargets)
    store-blosc, store-raw
              `store` written with store.codec=blosc-zstd (the default before zstd) / none (no compression): the
              read side of each codec, side by side with the default's
    s3        the store on an S3-compatible server (moto on 127.0.0.1, started here), ranged reads
    s3-cache  the same S3 store read through a local disk cache of whole shard files (StoreReader cache_dir)
The s3 kinds count the requests the server saw per block (bench/moto_counting.py).

Usage::

    src = TargetSources(["memory", "store", "s3"], targets, cfg, mc, workdir)
    loader = src.loader("store", items, plan, rank, pad_id)
    src.before_block("cold"); ...; src.after_block("s3", examples)   # -> {"requests_per_example": ...}
    src.close()
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from kava_dist.loader import StoreLoader, TokenLoader, align_store
from kava_dist.prompts import collate
from kava_dist.step import Targets

log = logging.getLogger(__name__)

KINDS = ("memory", "store", "cold", "int8", "store-blosc", "store-raw", "s3", "s3-cache")
CODEC_KINDS = {"store-blosc": "blosc-zstd", "store-raw": "none"}
"""The local warm-store kinds written with another `store.codec` than the config's."""


class MemoryTargetLoader(TokenLoader):
    """TokenLoader + per-example CPU targets (what a store read returns), stacked per micro-batch in the prefetch
    thread."""

    def __init__(self, items, targets: dict[int, dict], plan, rank, pad_id):
        super().__init__(items, plan, rank, pad_id, prefetch=4)
        self.t = targets

    def _make(self, key):
        step, micro, idx = key
        items = [self.encoded[i] for i in idx]
        rows = [self.t[e.id] for e in items]
        t = Targets(*(torch.stack([r[k] for r in rows]) for k in ("k", "v", "valid", "codi_h")))
        return step, micro, collate(items, self.pad_id), t


def write_store(url: str, targets: dict[int, dict], cfg, mc, storage_options: dict | None = None) -> float:
    """Write the targets into a cache_store at `url` with the spec of `cfg` (store.dtype, codec...); seconds taken."""
    from cache_store.writer import StoreWriter
    from kava_dist.targets import store_spec

    t0 = time.perf_counter()
    hd = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    spec = store_spec(cfg, dims=(mc.num_hidden_layers, mc.num_key_value_heads, hd, mc.hidden_size))
    ids = sorted(targets)
    size = spec.shard_size
    n = math.ceil(len(ids) / size)
    w = StoreWriter.create_or_open(url, spec, "bench", {"bench": True}, num_shards=n, storage_options=storage_options)
    for s in range(n):
        part = [targets[i] for i in ids[s * size:(s + 1) * size]]
        w.write_shard(s, {"k": torch.stack([p["k"] for p in part]), "v": torch.stack([p["v"] for p in part]),
                          "valid": torch.stack([p["valid"] for p in part]),
                          "codi_h": torch.stack([p["codi_h"] for p in part]),
                          "index": torch.stack([p["index"] for p in part]),
                          "example_id": torch.tensor(ids[s * size:(s + 1) * size], dtype=torch.int64),
                          "cot_len": torch.tensor([p["cot_len"] for p in part], dtype=torch.int32)})
    return time.perf_counter() - t0


def drop_page_cache(root: Path) -> tuple[int, int]:
    """posix_fadvise(DONTNEED) on every file under `root` -> (files, bytes). Needs no privileges; the kernel
    drops the clean pages of those files (what a store read for the first time, or larger than RAM, sees)."""
    files = nbytes = 0
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            files, nbytes = files + 1, nbytes + p.stat().st_size
    return files, nbytes


class TargetSources:
    """Every requested targets kind, built once from the same teacher targets (module docstring)."""

    def __init__(self, kinds: list[str], targets: dict[int, dict], cfg, mc, workdir: Path,
                 cfg_int8=None) -> None:
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise SystemExit(f"--targets {','.join(bad)}: use {', '.join(KINDS)}.")
        self.kinds, self.targets, self.workdir = kinds, targets, Path(workdir)
        self.urls: dict[str, str] = {}
        self.write_s: dict[str, float] = {}
        self.moto = None
        self.so: dict[str, Any] = {}
        for kind in kinds:
            if kind == "memory":
                continue
            if kind in ("s3", "s3-cache"):
                if self.moto is None:
                    from bench.moto_counting import CountingMoto

                    self.moto = CountingMoto(str(self.workdir / "moto.log")).__enter__()
                    self.so = self.moto.storage_options
                    url = self.moto.bucket_url("bench")
                    self.write_s["s3"] = write_store(url, targets, cfg, mc, self.so)
                    self.s3_url = url
                self.urls[kind] = self.s3_url
                continue
            url = str(self.workdir / kind)
            kcfg = cfg_int8 if kind == "int8" else cfg
            if kind in CODEC_KINDS:
                kcfg = dataclasses.replace(cfg, store=dataclasses.replace(cfg.store, codec=CODEC_KINDS[kind]))
            self.write_s[kind] = write_store(url, targets, kcfg, mc)
            self.urls[kind] = url
        self.counts: dict[str, list[float]] = {k: [] for k in kinds if k.startswith("s3")}
        self.cold_dropped: list[int] = []

    def reader(self, kind: str):
        from cache_store.reader import StoreReader

        if kind.startswith("s3"):
            cache = str(self.workdir / "s3cache") if kind == "s3-cache" else None
            return StoreReader(self.urls[kind], storage_options=self.so, cache_dir=cache)
        return StoreReader(self.urls[kind])

    def loader(self, kind: str, items, plan, rank: int, pad_id: int, switch_interval_ms: float = 0.0,
               read_processes: int = 0):
        if kind == "memory":
            return MemoryTargetLoader(items, self.targets, plan, rank, pad_id)
        reader = self.reader(kind)
        aligned, rows, _ = align_store(reader, items)
        if kind == "store" or kind in CODEC_KINDS:   # warm: every file read once through the page cache
            for p in Path(self.urls[kind]).rglob("*"):
                if p.is_file():
                    p.read_bytes()
        if read_processes:                          # the reads in worker processes (train.loader_read_processes)
            from cache_store.read_workers import ReadWorkers

            reader = ReadWorkers(reader, read_processes)
        return StoreLoader(reader, aligned, rows, plan, rank, pad_id, switch_interval_ms=switch_interval_ms)

    def before_block(self, kind: str) -> None:
        if kind == "cold":
            files, _ = drop_page_cache(Path(self.urls[kind]))
            self.cold_dropped.append(files)
        if kind.startswith("s3") and self.moto is not None:
            self.moto.reset()

    def after_block(self, kind: str, examples: int, measured: bool) -> None:
        if kind.startswith("s3") and self.moto is not None and measured:
            c = self.moto.counts()
            self.counts[kind].append((sum(c["requests"].values()) / examples, c["get_bytes"] / examples))

    def summary(self, kind: str) -> dict[str, Any]:
        out: dict[str, Any] = {"store_write_s": self.write_s.get("s3" if kind.startswith("s3") else kind)}
        if self.counts.get(kind):
            out["requests_per_example"] = sum(r for r, _ in self.counts[kind]) / len(self.counts[kind])
            out["bytes_per_example"] = sum(b for _, b in self.counts[kind]) / len(self.counts[kind])
        if kind == "cold":
            out["cold_dropped_files"] = self.cold_dropped[-1] if self.cold_dropped else 0
        return out

    def close(self) -> None:
        if self.moto is not None:
            self.moto.__exit__()
            self.moto = None
