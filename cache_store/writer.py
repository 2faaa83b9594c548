"""StoreWriter: create or reopen a store and write whole shards, safely from many processes/hosts.

A shard is written in one go: claim it, write every array's shard file whole, read the files
back to checksum them, check the claim is still ours, then publish its ledger record
(publish last). A crash at any point leaves either a published shard or an invisible one
that the next run rewrites whole.

Usage::

    from cache_store import StoreWriter, StoreSpec, FieldSpec

    w = StoreWriter.create_or_open("s3://bucket/kv/llama3b-v1", spec, fingerprint=fp,
                                   fingerprint_fields=cfg_fields, num_shards=4000,
                                   storage_options={"endpoint_url": ...})
    for shard_id in w.missing_shards():
        arrays = compute_targets(shard_id)          # {"k": bf16 tensor [n, L, H, M, D], ...}, n <= shard_size
        try:
            w.write_shard(shard_id, arrays)
        except ShardClaimed:
            continue                                # another live writer is on it
    w.put_meta("build_report", {"quarantined": [...]})

Concurrency contract: `write_shard` raises `ShardClaimed` (writes nothing) when another live
writer holds the shard's claim; it returns the existing record when the shard is already
published with the same content, and raises `LedgerConflict` if published with other content.

Fault injection for tests: env CACHE_STORE_FAULT = "pause_after_first_array[:shard]" (print a
line to stderr and sleep, to be SIGKILLed), "kill_after_first_array[:shard]" (SIGKILL itself)
or "sleep_after_claim:<seconds>".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Mapping

import numpy as np
import torch

from cache_store._util import diff_fields, format_diff, hostname, json_roundtrip
from cache_store.backend import Backend, open_backend
from cache_store.claims import ClaimManager
from cache_store.errors import FingerprintMismatch, LedgerConflict, ShardClaimed, SpecMismatch, StoreNotFound
from cache_store.faults import store_fault
from cache_store.ledger import Ledger, ShardRecord, StoreRecord, StoreView, shard_record_path
from cache_store.quant import bf16_bits_to_float32, quantize
from cache_store.spec import FLOAT_DTYPES, FieldSpec, StoreSpec
from cache_store.zarr_io import ensure_arrays, shard_checksums, shard_file_key, write_shard_block

logger = logging.getLogger(__name__)

_META_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def fingerprint_mismatch_message(url: str, stored_fp: str, stored_fields: Any, given_fp: str, given_fields: Any,
                                 left: str = "store", right: str = "config") -> tuple[str, dict]:
    diff = diff_fields(stored_fields, given_fields)
    what = format_diff(diff, left, right) if diff else "none (fingerprint_fields are identical; only the fingerprint string differs)"
    return (
        f"store at {url} was built with fingerprint {stored_fp}, {right} gives {given_fp}; fields that differ: "
        f"{what}. Use a new store path or restore the {right}.", diff,
    )


def _spec_view(spec: StoreSpec) -> dict[str, Any]:
    """Spec as nested dicts keyed by field name, so a diff names e.g. 'fields.k.quant'."""
    d = spec.to_dict()
    return {**d, "field_order": [f["name"] for f in d["fields"]], "fields": {f["name"]: f for f in d["fields"]}}


def _to_numpy(field: FieldSpec, value: Any) -> np.ndarray:
    """Input -> numpy in the field's stored logical representation (bfloat16 -> uint16 bits)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        src = "bfloat16" if t.dtype == torch.bfloat16 else None
        arr = t.view(torch.int16).numpy().view(np.uint16) if src else t.numpy()
    elif isinstance(value, np.ndarray):
        arr, src = value, None
        if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:  # ml_dtypes
            arr, src = np.ascontiguousarray(arr).view(np.uint16), "bfloat16"
    else:
        raise TypeError(f"field {field.name!r}: expected a numpy array or torch tensor, got {type(value).__name__}")
    src = src or arr.dtype.name
    if field.dtype == "bfloat16":
        if src not in ("bfloat16", "uint16"):
            raise TypeError(
                f"field {field.name!r} is bfloat16, got {src}; pass a torch.bfloat16 tensor (or its uint16 bits: "
                "t.view(torch.int16).numpy().view(np.uint16)) - float inputs are not rounded silently"
            )
    elif src != field.dtype:
        if not np.can_cast(np.dtype(src), np.dtype(field.dtype), "safe"):
            raise TypeError(
                f"field {field.name!r} is {field.dtype}, got {src} (not a safe cast); convert it explicitly "
                f"(e.g. .astype({field.dtype!r})) or change the field's dtype in the spec"
            )
        arr = arr.astype(field.dtype)
    return np.ascontiguousarray(arr)


def _finite_check(field: FieldSpec, arr: np.ndarray) -> None:
    if field.dtype not in FLOAT_DTYPES or arr.size == 0:
        return
    bad = ((arr & 0x7F80) == 0x7F80) if field.dtype == "bfloat16" else ~np.isfinite(arr)
    if bad.any():
        rows = np.nonzero(bad.reshape(arr.shape[0], -1).any(axis=1))[0]
        raise ValueError(
            f"field {field.name!r} has NaN/Inf in rows {rows[:10].tolist()}{'...' if len(rows) > 10 else ''} "
            "of this shard; drop or quarantine those examples before writing (put_meta can record them)"
        )


class StoreWriter(StoreView):
    """Writes shards of one store. Build with `create_or_open`."""

    def __init__(self, backend: Backend, record: StoreRecord, claim_ttl_s: float = 1800.0) -> None:
        self.backend = backend
        self.record = record
        self.ledger = Ledger(backend)
        self.claims = ClaimManager(backend, ttl_s=claim_ttl_s)
        self._arrays = ensure_arrays(backend.zarr_store(), record.spec, record.num_shards, create=True)
        self.shards_written: list[int] = []  # shards this writer wrote itself (diagnostics, tests)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create_or_open(
        cls, url: str, spec: StoreSpec, fingerprint: str, fingerprint_fields: dict[str, Any], num_shards: int,
        storage_options: dict[str, Any] | None = None, claim_ttl_s: float = 1800.0, create: bool = True,
    ) -> StoreWriter:
        """Create the store at `url`, or open it if it exists with the same fingerprint, spec and num_shards.
        `create=False` (a build's write actors) only opens: no store there raises StoreNotFound, so a writer on
        another node never creates a second store on its own disk."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint must be a non-empty string (e.g. a hash of the config that made the targets)")
        if int(num_shards) < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        fields = json_roundtrip(fingerprint_fields, "fingerprint_fields")
        backend = open_backend(url, storage_options)
        ledger = Ledger(backend)
        rec = ledger.read_store()
        if rec is None and not create:
            raise StoreNotFound(
                f"no store at {backend.url} as seen from {hostname()}: a build's writers open the store the driver "
                "created and never create one; put store.path where every node sees it (a shared filesystem "
                "mounted at the same path, or s3://bucket/prefix).")
        if rec is None:
            import numcodecs
            import zarr

            new = StoreRecord(
                fingerprint=fingerprint, fingerprint_fields=fields, spec=spec.resolved(), num_shards=int(num_shards),
                created={"time": time.time(), "host": hostname(), "pid": os.getpid(),
                         "versions": {"zarr": zarr.__version__, "numcodecs": numcodecs.__version__,
                                      "numpy": np.__version__, "torch": torch.__version__}},
            )
            rec, created = ledger.create_store(new)
            if created:
                return cls(backend, rec, claim_ttl_s)
        cls._check_compatible(backend, rec, spec, fingerprint, fields, int(num_shards))
        logger.info("opened store %s: %d/%d shards published", backend.url,
                    len(ledger.published_shard_ids()), rec.num_shards)
        return cls(backend, rec, claim_ttl_s)

    @staticmethod
    def _check_compatible(backend: Backend, rec: StoreRecord, spec: StoreSpec, fingerprint: str,
                          fields: dict[str, Any], num_shards: int) -> None:
        if rec.fingerprint != fingerprint or rec.fingerprint_fields != fields:
            msg, diff = fingerprint_mismatch_message(backend.url, rec.fingerprint, rec.fingerprint_fields, fingerprint, fields)
            raise FingerprintMismatch(msg, diff)
        want = spec if spec.shard_size is not None else StoreSpec(spec.fields, rec.shard_size, spec.codec)
        if want.to_dict() != rec.spec.to_dict():
            diff = diff_fields(_spec_view(rec.spec), _spec_view(want))
            only_codec = all(k == "codec" or k.endswith(".codec") or ".codec." in k or k.startswith("codec.")
                             for k in diff)
            fix = (f"Only the codec differs: write with the store's own (codec {rec.spec.codec.name}, clevel "
                   f"{rec.spec.codec.clevel}), or use a new store path." if only_codec else
                   "Use a new store path (and put the spec in the fingerprint).")
            raise SpecMismatch(
                f"store at {backend.url} was built with another spec; differences: {format_diff(diff, 'store', 'given')}. "
                + fix)
        if rec.num_shards != num_shards:
            raise SpecMismatch(
                f"store at {backend.url} was planned with num_shards={rec.num_shards}, given {num_shards}; "
                "the shard plan is fixed at creation. Use the same num_shards or a new store path."
            )

    # -- properties (url, fingerprint, spec, num_shards, shard_size: StoreView) ------------------
    def done_shards(self) -> list[int]:
        return self.ledger.published_shard_ids()

    def missing_shards(self) -> list[int]:
        done = set(self.done_shards())
        return [i for i in range(self.num_shards) if i not in done]

    # -- writing --------------------------------------------------------------------------------
    def _prepare(self, shard_id: int, arrays: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int, str]:
        """Validate everything before any byte is written -> (normalised arrays, rows, content sha256)."""
        if not 0 <= int(shard_id) < self.num_shards:
            raise IndexError(f"shard_id {shard_id} out of range: store {self.url} has shards 0..{self.num_shards - 1}")
        names = self.spec.field_names
        missing, extra = [n for n in names if n not in arrays], [n for n in arrays if n not in names]
        if missing or extra:
            raise KeyError(f"shard {shard_id}: fields missing {missing}, unexpected {extra}; the spec has {names}")
        out: dict[str, np.ndarray] = {}
        rows: int | None = None
        h = hashlib.sha256()
        for f in self.spec.fields:
            a = _to_numpy(f, arrays[f.name])
            if a.ndim != 1 + len(f.shape) or tuple(a.shape[1:]) != f.shape:
                raise ValueError(f"field {f.name!r}: expected shape [n, {', '.join(map(str, f.shape))}], got {list(a.shape)}")
            if rows is None:
                rows = a.shape[0]
            elif a.shape[0] != rows:
                raise ValueError(f"field {f.name!r} has {a.shape[0]} rows, earlier fields have {rows}; all fields need the same n")
            _finite_check(f, a)
            h.update(f"{f.name}|{a.dtype.str}|{list(a.shape)}|".encode())
            h.update(a.data)
            out[f.name] = a
        assert rows is not None
        if rows > self.shard_size:
            raise ValueError(f"shard {shard_id}: {rows} rows > shard_size {self.shard_size}; split the rows over more shards")
        return out, rows, h.hexdigest()

    def _blocks(self, data: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Stored arrays (quantised where asked), padded to shard_size rows with zeros (= empty chunks)."""
        parts: dict[str, np.ndarray] = {}
        for f in self.spec.fields:
            a = data[f.name]
            if f.quant is None:
                parts[f.name] = a
            else:
                x = bf16_bits_to_float32(a) if f.dtype == "bfloat16" else a
                for role, v in quantize(f, x).items():
                    parts[f"{f.name}.{role}"] = v
        blocks = {}
        for arr in self.spec.stored_arrays():
            p = parts[arr.path]
            if rows == self.shard_size and p.dtype == arr.dtype:       # a full shard: no padded copy needed
                blocks[arr.path] = np.ascontiguousarray(p)
                continue
            b = np.zeros((self.shard_size, *arr.shape), dtype=arr.dtype)
            b[:rows] = p
            blocks[arr.path] = b
        return blocks

    def _existing_or_conflict(self, shard_id: int, content_sha: str) -> ShardRecord | None:
        rec = self.ledger.read_shard(shard_id)
        if rec is None:
            return None
        if rec.content_sha256 == content_sha:
            logger.info("shard %d already published with the same content; nothing to do", shard_id)
            # a publisher killed between linking the record and removing its temp file leaves the temp file
            self.backend.prepare_rewrite(*shard_record_path(shard_id).rsplit("/", 1))
            return rec
        raise LedgerConflict(
            f"shard {shard_id} of store {self.url} is already published with different content "
            f"(content sha256 {rec.content_sha256[:16]}... != {content_sha[:16]}...); published shards are immutable. "
            "Inputs for a shard must be deterministic; if the published shard is wrong, build a new store."
        )

    def write_shard(self, shard_id: int, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> ShardRecord:
        """Write and publish shard `shard_id` (rows = leading axis, <= shard_size). Idempotent.

        Raises ShardClaimed if another live writer holds the shard (nothing written),
        LedgerConflict if it is already published with different content.
        """
        shard_id = int(shard_id)
        data, rows, content_sha = self._prepare(shard_id, arrays)
        done = self._existing_or_conflict(shard_id, content_sha)
        if done is not None:
            return done
        claim = self.claims.acquire(shard_id)
        try:
            store_fault("claimed", shard_id)
            done = self._existing_or_conflict(shard_id, content_sha)  # finished while we waited for the claim?
            if done is not None:
                return done
            t0 = time.perf_counter()
            self.backend.prepare_rewrite(*shard_record_path(shard_id).rsplit("/", 1))  # a killed publisher's temp file
            blocks = self._blocks(data, rows)
            for i, arr in enumerate(self.spec.stored_arrays()):
                key = shard_file_key(arr, shard_id)
                self.backend.prepare_rewrite(*key.rsplit("/", 1))
                write_shard_block(self._arrays[arr.path], shard_id, self.shard_size, blocks[arr.path])
                if i == 0:
                    store_fault("first_array", shard_id)
            for arr in self.spec.stored_arrays():
                self.backend.sync_file(shard_file_key(arr, shard_id))
            checksum, nbytes, per = shard_checksums(self.backend, self.spec, shard_id)
            record = ShardRecord(shard=shard_id, rows=rows, checksum=checksum, bytes=nbytes,
                                 content_sha256=content_sha, arrays=per)
            if not self.claims.still_held(claim):
                raise ShardClaimed(
                    f"shard {shard_id}: lost the claim while writing (took longer than claim_ttl_s="
                    f"{self.claims.ttl_s:.0f}s?); not published. Raise claim_ttl_s and retry.", shard_id,
                )
            record = self.ledger.publish_shard(record)
            self.shards_written.append(shard_id)
            dt = time.perf_counter() - t0
            logical = rows * self.spec.logical_nbytes
            logger.info("shard %d: %d rows, %.1f MB on disk (%.2fx of raw), %.2fs, %.0f MB/s raw", shard_id, rows,
                        nbytes / 1e6, nbytes / max(1, logical), dt, logical / 1e6 / max(dt, 1e-9))
            return record
        finally:
            self.claims.release(claim)

    # -- side files -----------------------------------------------------------------------------
    def put_meta(self, name: str, obj: Any) -> None:
        """Write meta/<name>.json (small JSON; replaced atomically; not part of the ledger)."""
        if not _META_NAME.match(name):
            raise ValueError(f"meta name {name!r}: use letters, digits, '_', '-', '.'")
        self.backend.write_atomic(f"meta/{name}.json", (json.dumps(json_roundtrip(obj, f"meta {name!r}"), indent=1) + "\n").encode())

    def get_meta(self, name: str, default: Any = None) -> Any:
        return get_meta(self.backend, name, default)


def get_meta(backend: Backend, name: str, default: Any = None) -> Any:
    if not _META_NAME.match(name):
        raise ValueError(f"meta name {name!r}: use letters, digits, '_', '-', '.'")
    raw = backend.try_read(f"meta/{name}.json")
    return default if raw is None else json.loads(raw)
