"""The zarr v3 side of a store: one array per stored array of the spec, one example per chunk,
`shard_size` examples per shard file, and byte-level checksums of shard files.

Array `name` has shape [num_shards * shard_size, *per_example_shape], chunks (1, *shape) and
shards (shard_size, *shape); shard `i` is the single file `<name>/c/<i>/0/.../0`, which is
what checksums are taken over. Rows of a shard past the rows actually written are zarr fill
(empty chunks, not stored).

Usage::

    arrays = ensure_arrays(backend.zarr_store(), spec, num_shards)   # create if missing, check if present
    write_shard_block(arrays["k"], shard_id, shard_size, block)       # block: [shard_size, *shape], one file put
    cols = read_rows(arrays, ["k", "v"], rows)                        # one batched read per array
    checksum, nbytes, per_array = shard_checksums(backend, spec, 12)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from cache_store.backend import Backend
from cache_store.errors import SpecMismatch
from cache_store.shard_file import Unsupported, write_shard_file
from cache_store.spec import CodecSpec, StoredArray, StoreSpec

logger = logging.getLogger(__name__)

# False: every shard is written through zarr's codec pipeline (the reference path; same bytes, slower)
DIRECT_SHARD_WRITES = True
_ZARR_PATH_LOGGED: set[str] = set()

try:  # run the per-array reads of a batch concurrently on zarr's event loop
    from zarr.core.sync import sync as _zarr_sync
except ImportError:  # pragma: no cover - zarr internals moved
    _zarr_sync = None


def compressors(codec: CodecSpec) -> list[Any]:
    out: list[Any] = []
    if codec.name.startswith("blosc-"):
        out.append(BloscCodec(cname=codec.name.split("-", 1)[1], clevel=int(codec.clevel), shuffle=codec.shuffle))
    elif codec.name == "zstd":
        out.append(ZstdCodec(level=int(codec.clevel)))
    if codec.chunk_crc32c:
        out.append(Crc32cCodec())
    return out


def shard_file_key(arr: StoredArray, shard_id: int) -> str:
    """Key of shard `shard_id` of `arr` under zarr's default v3 chunk key encoding."""
    return "/".join([arr.path, "c", str(shard_id)] + ["0"] * len(arr.shape))


def _expected(arr: StoredArray, capacity: int, shard_size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    return (capacity, *arr.shape), (1, *arr.shape), (shard_size, *arr.shape)


def ensure_arrays(store: Any, spec: StoreSpec, num_shards: int, create: bool = True) -> dict[str, zarr.Array]:
    """Open every stored array, creating missing ones (create=True). Existing arrays must match the spec.

    Safe when several writers call it at once with the same spec: creation never overwrites
    (an array that appears meanwhile is opened instead) and all creators write identical metadata.
    """
    shard_size = int(spec.shard_size or 0)
    capacity = num_shards * shard_size
    if create:
        try:
            zarr.open_group(store, mode="a", zarr_format=3)
        except ContainsGroupError:
            pass  # another writer created the root group between zarr's check and its create: it is there now
        except ContainsArrayError as e:  # pragma: no cover - foreign content at root
            raise SpecMismatch(f"store root holds a zarr array, not a group: {e}") from e
    out: dict[str, zarr.Array] = {}
    for arr in spec.stored_arrays():
        shape, chunks, shards = _expected(arr, capacity, shard_size)
        z = None
        if create:
            try:
                z = zarr.create_array(
                    store, name=arr.path, shape=shape, dtype=arr.dtype, chunks=chunks, shards=shards,
                    compressors=compressors(arr.codec or spec.codec), fill_value=0, overwrite=False,
                )
            except (ContainsArrayError, ContainsGroupError):
                z = None
        if z is None:
            z = zarr.open_array(store, path=arr.path, mode="r+" if create else "r", zarr_format=3)
        got = (tuple(z.shape), tuple(z.chunks), tuple(z.shards or ()), np.dtype(z.dtype))
        want = (shape, chunks, shards, arr.dtype)
        if got != want:
            raise SpecMismatch(
                f"zarr array {arr.path!r} has (shape, chunks, shards, dtype) {got}, the ledger's spec needs {want}; "
                "the store's data does not match its ledger. Use a new store path."
            )
        out[arr.path] = z
    return out


def write_shard_block(z: zarr.Array, shard_id: int, shard_size: int, block: np.ndarray) -> None:
    """Write a whole shard (block has exactly shard_size rows) so the shard file is rewritten whole.

    The file is encoded directly and put in one write (shard_file.write_shard_file; byte-identical to
    zarr's). Arrays, blocks or shards that module does not reproduce go through zarr's own write, as does
    every write while DIRECT_SHARD_WRITES is False.
    """
    assert block.shape[0] == shard_size, (block.shape, shard_size)
    if DIRECT_SHARD_WRITES:
        try:
            write_shard_file(z, shard_id, block)
            return
        except Unsupported as e:
            if z.path not in _ZARR_PATH_LOGGED:
                _ZARR_PATH_LOGGED.add(z.path)
                logger.info("array %s: shard files written through zarr (%s)", z.path, e)
    lo = shard_id * shard_size
    z[lo : lo + shard_size] = block


def read_rows(arrays: dict[str, zarr.Array], paths: list[str], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Rows (sorted, unique, int64) of several arrays through zarr: one basic selection per run of
    consecutive rows, all issued concurrently on zarr's event loop. (zarr 3.1's orthogonal
    selection on sharded arrays measured ~10x slower for random rows.) The reader's fast path
    is fast_read.FastChunkReader; this is the reference/fallback path."""
    if rows.size == 0:
        return {p: arrays[p][0:0] for p in paths}
    breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
    runs = [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, breaks)]
    if _zarr_sync is None:  # pragma: no cover
        return {p: np.concatenate([arrays[p][a:b] for a, b in runs]) for p in paths}

    async def _all() -> list[Any]:
        return await asyncio.gather(*(arrays[p].async_array.getitem(slice(a, b)) for p in paths for a, b in runs))

    parts = _zarr_sync(_all())
    k = len(runs)
    return {p: np.concatenate(parts[i * k : (i + 1) * k]) for i, p in enumerate(paths)}


def shard_checksums(backend: Backend, spec: StoreSpec, shard_id: int) -> tuple[str, int, dict[str, dict[str, Any]]]:
    """(checksum, total bytes, {array: {bytes, sha256}}) of shard `shard_id`'s files.

    checksum = sha256 over, per stored array in field order: name, NUL, 8-byte little-endian
    length, the sha256 digest of the file's bytes (each file is hashed once). A missing file (all rows
    empty) counts as 0 bytes.
    """
    total = hashlib.sha256()
    per: dict[str, dict[str, Any]] = {}
    nbytes = 0
    for arr in spec.stored_arrays():
        data = backend.try_read(shard_file_key(arr, shard_id)) or b""
        digest = hashlib.sha256(data)
        total.update(arr.path.encode() + b"\0" + len(data).to_bytes(8, "little"))
        total.update(digest.digest())
        per[arr.path] = {"bytes": len(data), "sha256": digest.hexdigest()}
        nbytes += len(data)
    return total.hexdigest(), nbytes, per


def corrupt_arrays(record_arrays: dict[str, dict[str, Any]], actual: dict[str, dict[str, Any]]) -> list[str]:
    """Names of arrays whose shard file differs from the record."""
    return [a for a in sorted(set(record_arrays) | set(actual)) if record_arrays.get(a) != actual.get(a)]
