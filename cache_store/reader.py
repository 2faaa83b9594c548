"""StoreReader: random batched reads of published shards, verification. (Which rows a training rank reads, and
when, is the loader's job: kava_dist/loader.py.)

Only shards with a ledger record are visible; rows are numbered by concatenating published
shards in shard-id order (so a store still being built is readable; `refresh()` picks up
newly published shards). Row numbers are stable once the store is complete, or while
shards are published in id order.

Usage::

    from cache_store import StoreReader
    r = StoreReader("s3://bucket/kv/llama3b-v1", storage_options=so, expected_fingerprint=fp, verify=True)
    len(r)                                   # rows in published shards
    batch = r.get_batch([5, 17, 3])          # {"k": bf16 [3, L, H, M, D], "valid": bool [...], ...}
    ids = r.read_field("example_id")         # one field of every visible row (no K/V read)
    raw = r.get_batch([5, 17], dequantize=False)              # int8/int4 parts: "k.q", "k.scale", ...
    batch = r.expand_quantized({k: t.cuda() for k, t in raw.items()})   # dequantise on the GPU
    r.stats()    # bytes on disk, raw bytes, disk_over_raw (0.5 = half of raw), compression_ratio (raw/disk), shards

Reads are chunk-aligned and batched: the rows of a batch are mapped to (shard, row); each
shard's index is read once and cached (published shards are immutable); the needed chunks of
every array are fetched in one batched call (os.pread locally, concurrent ranged GETs on S3)
and decoded on `decode_threads` threads (fast_read.py). Quantised fields are dequantised to
their logical dtype; bfloat16 fields come back as torch.bfloat16. `fast_read=False` reads
through zarr instead (reference path; zarr 3.1's orthogonal selection on sharded arrays
measured ~10x slower for random rows, so it issues one basic selection per run of rows).

Throughput notes: decompression dominates lossless reads (blosc-zstd ~0.4-0.5 GB/s per core
here; plain zstd ~2x faster to decode at ~5% more bytes); int8 hardly compresses, so
FieldSpec(codec=CodecSpec("none")) plus get_batch(dequantize=False) and expand_quantized on the
GPU leaves little CPU work per batch. Each batch allocates fresh output memory and page faults
showed up in profiles (high sys time); GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967295:
glibc.malloc.trim_threshold=4294967295 in the training process lets glibc reuse it (one A/B on
a shared 2-core VM: 3B bf16 reads 70 -> 142 ex/s; re-check on the training machine).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import numpy as np
import torch

from cache_store.backend import LocalBackend, ShardFileCache, open_backend
from cache_store.errors import CorruptShard, FingerprintMismatch, StoreNotFound
from cache_store.fast_read import ChunkCorrupt, FastChunkReader
from cache_store.ledger import STORE_RECORD, Ledger, ShardRecord, StoreRecord, StoreView
from cache_store.quant import dequantize as _dequantize
from cache_store.quant import dequantize_torch
from cache_store.writer import fingerprint_mismatch_message, get_meta
from cache_store.zarr_io import corrupt_arrays, ensure_arrays, read_rows, shard_checksums, shard_file_key

logger = logging.getLogger(__name__)



class _PinnedAlloc:
    """An alloc for FastChunkReader.read: uninitialised page-locked torch tensors, handed to the reader as numpy
    views; the tensors themselves are returned (so torch's caching host allocator sees the non-blocking copies
    made from them and does not reuse a buffer before its copy is done). Parts of a quantised field that are
    dequantised on the host are not pinned (only the result is)."""

    def __init__(self, spec: Any, dequantize: bool) -> None:
        self.host = {a.path for a in spec.stored_arrays() if spec.field(a.field).quant is not None} if dequantize else set()
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, path: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if path in self.host:
            return np.empty(shape, dtype)
        t = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, pin_memory=True)
        self.tensors[path] = t
        return t.numpy()


class StoreReader(StoreView):
    def __init__(
        self, url: str, storage_options: dict[str, Any] | None = None, expected_fingerprint: str | None = None,
        verify: bool = False, expected_fingerprint_fields: dict[str, Any] | None = None, fast_read: bool = True,
        decode_threads: int | None = None, cache_dir: str | None = None, cache_bytes: int = 0,
        page_readahead: bool = False,
    ) -> None:
        """fast_read: read chunks directly (fast_read.py); False reads through zarr (reference path).
        decode_threads: threads decompressing a batch (default min(4, cpus)).
        cache_dir: for a remote store, keep whole shard files on this local disk (one GET per file, shared by the
        processes of a host; backend.ShardFileCache), at most cache_bytes (0 = unbounded).
        page_readahead: `readahead` on a local store advises the rows' byte ranges into the page cache
        (posix_fadvise WILLNEED, on a background thread). Off by default: on a local disk it did not help
        (bench/cold_read_bench.py, docs/PERFORMANCE.md)."""
        self._init_args = (url, storage_options, expected_fingerprint, verify, expected_fingerprint_fields,
                           fast_read, decode_threads, cache_dir, cache_bytes, page_readahead)
        self.page_readahead = bool(page_readahead)
        self._fast_opts = (bool(fast_read), decode_threads)
        self._cache_opts = (cache_dir, int(cache_bytes))
        self.backend = open_backend(url, storage_options)
        self.ledger = Ledger(self.backend)
        rec = self.ledger.read_store()
        if rec is None:
            raise StoreNotFound(
                f"no cache_store at {self.backend.url} ({STORE_RECORD} is missing); check the path/storage_options, "
                f"or build the store: `python -m jobs.build_cache --config CONFIG store.path={self.backend.url}` "
                "(docs/CACHE_BUILD.md)"
            )
        self.record: StoreRecord = rec
        if expected_fingerprint is not None and expected_fingerprint != rec.fingerprint:
            msg, diff = fingerprint_mismatch_message(
                self.backend.url, rec.fingerprint, rec.fingerprint_fields, expected_fingerprint,
                expected_fingerprint_fields if expected_fingerprint_fields is not None else {}, "store", "reader",
            )
            if expected_fingerprint_fields is None:
                msg = (f"store at {self.backend.url} was built with fingerprint {rec.fingerprint} "
                       f"(fields {rec.fingerprint_fields}), the reader expects {expected_fingerprint}. "
                       "Point the reader at the store built for this config, or rebuild it.")
            raise FingerprintMismatch(msg, diff)
        self.verify = bool(verify)
        self._lock = threading.Lock()
        self._verified: set[int] = set()
        self._files_seen: set[tuple[str, int]] = set()
        self._arrays: dict[str, Any] | None = None
        self._fast: FastChunkReader | None = None
        self._shard_ids = np.zeros(0, np.int64)
        self._offsets = np.zeros(1, np.int64)
        self.refresh()

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers: reopen on the other side
        return {"args": self._init_args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"])  # type: ignore[misc]

    # -- metadata (url, fingerprint, fingerprint_fields, spec, num_shards, shard_size: StoreView) ---
    def get_meta(self, name: str, default: Any = None) -> Any:
        return get_meta(self.backend, name, default)

    def refresh(self) -> int:
        """Re-list published shards; returns len(self)."""
        ids = self.ledger.published_shard_ids()
        recs = self.ledger.read_shards(ids)
        lost = [i for i in ids if i not in recs]
        if lost:  # listed, then unreadable: never shrink the store silently
            raise CorruptShard(
                f"ledger records of shards {lost} of store {self.url} are listed but could not be read; check the "
                "store (python -m cache_store verify URL) or rerun the cache build: finished shards are kept", lost)
        offsets = np.concatenate([[0], np.cumsum([recs[i].rows for i in ids], dtype=np.int64)]).astype(np.int64)
        with self._lock:
            self._shard_ids, self._offsets = np.asarray(ids, np.int64), offsets
        return len(self)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def published_shards(self) -> list[int]:
        return self._shard_ids.tolist()

    def shard_records(self) -> dict[int, ShardRecord]:
        return self.ledger.read_shards(self.published_shards())

    # -- reading --------------------------------------------------------------------------------
    def _get_arrays(self) -> dict[str, Any]:
        with self._lock:
            if self._arrays is None:
                store = self.backend.zarr_store(read_only=True)
                self._arrays = ensure_arrays(store, self.spec, self.num_shards, create=False)
                if self._fast_opts[0]:
                    cache_dir, cache_bytes = self._cache_opts
                    cache = (ShardFileCache(self.backend, cache_dir, cache_bytes)
                             if cache_dir and not isinstance(self.backend, LocalBackend) else None)
                    self._fast = FastChunkReader.for_arrays(self.backend, self.spec, self._arrays,
                                                            decode_threads=self._fast_opts[1], cache=cache)
                    if self._fast is not None:
                        self._fast.expected_file = self._expected_file
            return self._arrays

    def _expected_file(self, path: str, shard_id: int) -> dict[str, Any]:
        """{"bytes", "sha256"} the ledger record gives array `path` of shard `shard_id` ({"bytes": 0}: no file)."""
        rec = self.ledger.read_shard(shard_id)
        if rec is None:
            raise CorruptShard(f"shard {shard_id} of store {self.url} has no ledger record; rerun the cache build "
                               "(finished shards are kept)", [shard_id])
        return rec.arrays.get(path) or {"bytes": 0}

    def _expected_bytes(self, path: str, shard_id: int) -> int:
        """Bytes the ledger record says array `path` of shard `shard_id` has on disk (0: no file was written)."""
        return int(self._expected_file(path, shard_id).get("bytes", 0))

    def _check_files(self, paths: list[str], shard_ids: np.ndarray) -> None:
        """zarr reads a missing shard file as fill values (zeros): refuse instead, once per (array, shard)."""
        for s in np.unique(shard_ids).tolist():
            for p in paths:
                if (p, s) in self._files_seen:
                    continue
                arr = next(a for a in self.spec.stored_arrays() if a.path == p)
                if self._expected_bytes(p, s) and not self.backend.exists(shard_file_key(arr, s)):
                    raise ChunkCorrupt(f"shard file of {p!r} shard {s} is missing", p, s)
                self._files_seen.add((p, s))

    @property
    def is_complete(self) -> bool:
        """Every planned shard is published (row numbers can no longer shift)."""
        return len(self._shard_ids) == self.num_shards

    def locate(self, indices: Sequence[int] | np.ndarray,
               snapshot: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers -> (shard ids, row within shard), against `snapshot` (shard ids, offsets) or the current view."""
        shard_ids, offsets = snapshot if snapshot is not None else (self._shard_ids, self._offsets)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = int(offsets[-1])
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
            raise IndexError(f"rows {bad} out of range: store {self.url} has {n} visible rows (refresh() to see new shards)")
        pos = np.searchsorted(offsets, idx, side="right") - 1
        return shard_ids[pos], idx - offsets[pos]

    def verify_shard(self, shard_id: int) -> None:
        """Compare shard files with the ledger checksum; raise CorruptShard naming the shard and arrays."""
        rec = self.ledger.read_shard(shard_id)
        if rec is None:
            raise KeyError(f"shard {shard_id} is not published in {self.url}")
        checksum, _, per = shard_checksums(self.backend, self.spec, shard_id)
        if checksum != rec.checksum:
            bad = corrupt_arrays(rec.arrays, per)
            raise CorruptShard(
                f"shard {shard_id} of store {self.url} is corrupt: checksum {checksum[:16]}... != ledger "
                f"{rec.checksum[:16]}... (arrays {bad}). Rebuild it: delete ledger/shard-{shard_id:06d}.json "
                "and rerun the writer for that shard (or restore the files from a copy).", [shard_id],
            )
        with self._lock:
            self._verified.add(shard_id)

    def _verify_once(self, shard_ids: np.ndarray) -> None:
        for s in np.unique(shard_ids).tolist():
            if s not in self._verified:
                self.verify_shard(s)

    def get_batch(self, indices: Sequence[int] | np.ndarray, dequantize: bool = True,
                  fields: Sequence[str] | None = None, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Rows `indices` (any order, repeats allowed) -> {field: tensor [len(indices), *shape]}.

        dequantize=False returns a quantised field `k` as its stored parts "k.q", "k.scale"
        (and "k.zero") instead, for `cache_store.quant.dequantize_torch` on the GPU (half the bytes
        to move, no CPU dequantisation). fields: read only these (default: all). pin_memory: decode
        straight into page-locked tensors (torch's caching host allocator; needs CUDA), ready for
        `.to("cuda", non_blocking=True)` without another copy."""
        names = self.spec.field_names if fields is None else [self.spec.field(n).name for n in fields]
        return self._read(indices, names, dequantize=dequantize, pin_memory=pin_memory)

    def readahead(self, indices: Sequence[int] | np.ndarray, fields: Sequence[str] | None = None) -> None:
        """Start fetching, in the background, what rows `indices` will need: a remote store's shard files into
        its cache_dir; with page_readahead, a local store's row byte ranges into the page cache (posix_fadvise
        WILLNEED). Otherwise nothing."""
        self._get_arrays()
        if self._fast is None or (self._fast.cache is None and not self.page_readahead):
            return
        names = self.spec.field_names if fields is None else list(fields)
        sid, rows = self.locate(indices)
        self._fast.readahead([a.path for a in self.spec.stored_arrays() if a.field in names], sid, rows)

    def expand_quantized(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A get_batch(..., dequantize=False) batch, moved to any device -> the dequantised batch
        (torch ops on that device; equal to get_batch(...) with dequantize=True)."""
        out = {k: v for k, v in batch.items() if "." not in k}
        for f in self.spec.fields:
            if f.quant is not None and f"{f.name}.q" in batch:
                parts = {k.rsplit(".", 1)[1]: v for k, v in batch.items() if k.startswith(f.name + ".")}
                out[f.name] = dequantize_torch(f, parts)
        return out

    def read_field(self, name: str, indices: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
        """One field for rows `indices` (default: every visible row), reading only that field's arrays
        (e.g. all `example_id`s without touching K/V)."""
        self.spec.field(name)  # KeyError naming the fields if unknown
        return self._read(np.arange(len(self)) if indices is None else indices, [name])[name]

    def _read(self, indices: Sequence[int] | np.ndarray, names: list[str],
              snapshot: tuple[np.ndarray, np.ndarray] | None = None, dequantize: bool = True,
              pin_memory: bool = False) -> dict[str, torch.Tensor]:
        sid, local = self.locate(indices, snapshot)
        alloc = None
        if self.verify:
            self._verify_once(sid)
        arrays = self._get_arrays()
        fields = [self.spec.field(n) for n in names]
        paths = [a.path for a in self.spec.stored_arrays() if a.field in names]
        try:
            if self._fast is not None:
                alloc = _PinnedAlloc(self.spec, dequantize) if pin_memory else None
                cols = self._fast.read(paths, sid, local, alloc=alloc)
            else:
                self._check_files(paths, sid)
                uniq, inv = np.unique(sid * self.shard_size + local, return_inverse=True)
                cols = {p: a[inv] for p, a in read_rows(arrays, paths, uniq).items()}
        except Exception as e:  # crc mismatch, codec error, missing file: name the shard(s)
            bad = []
            suspects = [e.shard_id] if isinstance(e, ChunkCorrupt) else np.unique(sid).tolist()
            for s in suspects:
                try:
                    self.verify_shard(s)
                except CorruptShard:
                    bad.append(s)
            if bad:
                recs = " ".join(f"ledger/shard-{b:06d}.json" for b in bad)
                raise CorruptShard(
                    f"corrupt shards {bad} of store {self.url} (corrupt or incomplete: {e}); repair: delete {recs} and "
                    "rerun the cache build with the same config (finished shards are kept)", bad,
                ) from e
            raise
        pinned = alloc.tensors if self._fast is not None and alloc is not None else {}
        out: dict[str, torch.Tensor] = {}
        for f in fields:
            if f.name in pinned:
                out[f.name] = pinned[f.name].view(torch.bfloat16) if f.dtype == "bfloat16" else pinned[f.name]
            elif f.quant is not None and not dequantize:
                out.update({p: pinned.get(p, torch.from_numpy(cols[p])) for p in paths if p.startswith(f.name + ".")})
            elif f.quant is not None:
                parts = {p.rsplit(".", 1)[1]: cols[p] for p in paths if p.startswith(f.name + ".")}
                out[f.name] = _dequantize(f, parts, pool=self._fast.pool if self._fast is not None else None,
                                          pin_memory=pin_memory)
            elif f.dtype == "bfloat16":
                out[f.name] = torch.from_numpy(np.ascontiguousarray(cols[f.name]).view(np.int16)).view(torch.bfloat16)
            else:
                out[f.name] = torch.from_numpy(np.ascontiguousarray(cols[f.name]))
        return out

    def stats(self) -> dict[str, Any]:
        recs = self.shard_records()
        rows = sum(r.rows for r in recs.values())
        disk = sum(r.bytes for r in recs.values())
        raw = rows * self.spec.logical_nbytes
        fields = {}
        for f in self.spec.fields:
            fb = sum(r.arrays.get(a.path, {}).get("bytes", 0) for r in recs.values()
                     for a in self.spec.stored_arrays() if a.field == f.name)
            fraw = rows * f.logical_nbytes
            fields[f.name] = {"bytes": fb, "raw_bytes": fraw, "disk_over_raw": fb / fraw if fraw else None,
                              "shape": list(f.shape), "dtype": f.dtype, "quant": f.quant}
        return {
            "url": self.url, "fingerprint": self.fingerprint, "shards_done": len(recs), "shards_total": self.num_shards,
            "shard_size": self.shard_size, "rows": rows, "bytes_on_disk": disk, "raw_bytes": raw,
            "disk_over_raw": disk / raw if raw else None, "compression_ratio": raw / disk if disk else None,
            "bytes_per_example": disk / rows if rows else None,
            "fields": fields,
        }
