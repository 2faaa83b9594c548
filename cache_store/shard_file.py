"""Whole shard files of a sharded zarr v3 array, encoded directly with numcodecs and written in one store put.

zarr's own write of a shard runs every chunk through its async codec pipeline (and first reads back the old
shard file), which costs more than the encode itself. For the store's layout (inner chunks of one example,
shards of `shard_size` examples, see zarr_io) this module produces the same file directly: each example's
bytes (little-endian, C order) through the array's inner bytes-to-bytes codecs (zstd, blosc, crc32c) in
order, the encoded chunks back to back in row order (zarr's Morton order reduces to row order when only
the first axis has more than one chunk per shard), chunks equal to the fill value left out (unless the
array writes empty chunks), then the shard index: (offset, nbytes) little-endian uint64 pairs per chunk,
(2**64-1, 2**64-1) for absent chunks, followed by its crc32c, at the end of the file or at its start
(offsets then count the index). A shard whose chunks are all fill is deleted, as zarr does. Chunks are
encoded on a thread pool shared by the process (numcodecs encodes outside Python's interpreter lock, so the
threads run in parallel), as zarr encodes them. The file is byte-for-byte the one zarr 3.1 writes for the
same block (tests/unit/test_shard_file.py checks this), so reading stays plain zarr and the ledger's file
checksums do not depend on which path wrote a shard.

Usage::

    plan = shard_plan(z)                         # raises Unsupported(reason) for layouts/codecs not handled
    data = encode_shard(plan, block)             # bytes of the shard file, None when every chunk is fill
    write_shard_file(z, shard_id, block)         # plan + encode + one put (or delete) through z's store
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numcodecs
import numpy as np
import zarr

logger = logging.getLogger(__name__)

try:
    import google_crc32c
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
    from zarr.codecs.sharding import ShardingCodecIndexLocation
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.core.sync import sync
except ImportError as e:  # pragma: no cover - zarr internals moved: every write takes zarr's own path
    _IMPORT_ERROR: str | None = f"zarr/numcodecs internals unavailable ({e})"
else:
    _IMPORT_ERROR = None

ABSENT_CHUNK = np.uint64(2**64 - 1)
"""Offset and size in a shard index of a chunk the file does not hold (zarr's sentinel; fast_read reads it)."""
_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


_POOL: tuple[int, ThreadPoolExecutor | None] | None = None
_POOL_LOCK = threading.Lock()


def _encode_pool() -> ThreadPoolExecutor | None:
    """Threads shared by every shard write of the process to encode its chunks (numcodecs encodes outside the
    interpreter lock), as many as zarr's own chunk concurrency allows on the cores this process may use; None on
    one core."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():  # a forked child has none of its parent's threads
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            workers = max(1, min(cores, int(zarr.config.get("async.concurrency") or cores)))
            _POOL = (os.getpid(), ThreadPoolExecutor(workers, thread_name_prefix="shard_encode")) if workers > 1 else (
                os.getpid(), None)
        return _POOL[1]


class Unsupported(Exception):
    """The array's layout or codecs are not ones this module reproduces; write through zarr instead."""


def _crc32c(data: bytes | np.ndarray) -> bytes:
    return b"".join((data, struct.pack("<I", google_crc32c.value(data))))


def _bytes_step(codec: object) -> Callable[[bytes], bytes]:
    """A numcodecs encoder equal to zarr's for one inner bytes-to-bytes codec."""
    if isinstance(codec, ZstdCodec):
        zstd = numcodecs.Zstd(level=codec.level, checksum=codec.checksum)
        return zstd.encode
    if isinstance(codec, BloscCodec):
        blosc = numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=_BLOSC_SHUFFLE[codec.shuffle.value],
                                blocksize=codec.blocksize, typesize=codec.typesize)
        return lambda b: blosc.encode(np.frombuffer(b, dtype=np.uint8))
    if isinstance(codec, Crc32cCodec):
        return _crc32c
    raise Unsupported(f"inner codec {codec!r}")


def _little_endian(codec: object, what: str) -> None:
    if not isinstance(codec, BytesCodec) or (codec.endian is not None and codec.endian.value != "little"):
        raise Unsupported(f"{what} serializer {codec!r} (only the little-endian bytes codec is reproduced)")


@dataclass(frozen=True)
class ShardPlan:
    """How one array's shard files are laid out and encoded."""

    rows: int                                  # examples (inner chunks) per shard
    row_shape: tuple[int, ...]                 # per-example shape
    dtype: np.dtype                            # the array's dtype, little-endian
    steps: tuple[Callable[[bytes], bytes], ...]
    index_crcs: int                            # crc32c codecs after the index's bytes codec
    index_at_start: bool
    write_empty_chunks: bool


def shard_plan(z: zarr.Array) -> ShardPlan:
    """The plan for `z`, or Unsupported naming what is not reproduced (the caller then writes through zarr)."""
    if _IMPORT_ERROR is not None:
        raise Unsupported(_IMPORT_ERROR)
    md = z.metadata
    if getattr(md, "zarr_format", None) != 3 or len(md.codecs) != 1 or not isinstance(md.codecs[0], ShardingCodec):
        # array-to-array filters (e.g. transpose) before sharding, or no sharding at all
        raise Unsupported(f"codec chain {md.codecs!r} is not a single sharding codec")
    if not isinstance(md.chunk_grid, RegularChunkGrid):
        raise Unsupported(f"chunk grid {md.chunk_grid!r}")
    sc = md.codecs[0]
    shard_shape = tuple(md.chunk_grid.chunk_shape)
    shape = tuple(md.shape)
    # inner chunks of one example spanning every other axis: then the Morton order is the row order
    if not shape or tuple(sc.chunk_shape) != (1, *shape[1:]) or shard_shape != (shard_shape[0], *shape[1:]):
        raise Unsupported(f"chunks {sc.chunk_shape} / shards {shard_shape} of shape {shape} are not one example per chunk")
    dtype = np.dtype(md.dtype.to_native_dtype())
    if dtype.kind not in "biuf":
        raise Unsupported(f"dtype {dtype}")
    fill = np.asarray(md.fill_value, dtype=dtype)
    if fill.tobytes().strip(b"\0"):
        # with a zero fill, "chunk equals fill" is "chunk bytes all zero" (zarr compares floats' bit patterns
        # against a 0.0 fill, so -0.0 is data); other fills would need zarr's NaN/sign rules
        raise Unsupported(f"fill value {md.fill_value!r}")
    inner = list(sc.codecs)
    if not inner:
        raise Unsupported("no inner serializer")
    _little_endian(inner[0], "inner")
    steps = tuple(_bytes_step(c) for c in inner[1:])
    idx = list(sc.index_codecs)
    if not idx:
        raise Unsupported("no index serializer")
    _little_endian(idx[0], "index")
    if not all(isinstance(c, Crc32cCodec) for c in idx[1:]):
        raise Unsupported(f"index codecs {idx!r}")
    return ShardPlan(rows=shard_shape[0], row_shape=shape[1:], dtype=dtype.newbyteorder("<"), steps=steps,
                     index_crcs=len(idx) - 1, index_at_start=sc.index_location == ShardingCodecIndexLocation.start,
                     write_empty_chunks=bool(z.async_array.config.write_empty_chunks))


def encode_shard(plan: ShardPlan, block: np.ndarray) -> bytes | None:
    """The shard file's bytes for `block` ([plan.rows, *plan.row_shape] of the array's dtype), None if all fill."""
    if block.shape != (plan.rows, *plan.row_shape):
        raise Unsupported(f"block shape {block.shape} is not a whole shard {(plan.rows, *plan.row_shape)}")
    if block.dtype != plan.dtype:
        # zarr would cast (or byte-swap a big-endian block); its casting rules are not reproduced here
        raise Unsupported(f"block dtype {block.dtype} is not the array's {plan.dtype}")
    raw = np.ascontiguousarray(block).reshape(plan.rows, -1).view(np.uint8)
    if plan.write_empty_chunks:
        present = np.ones(plan.rows, dtype=bool)
    else:  # a row of data almost always has a nonzero byte near its start: scan whole rows only when not
        present = raw[:, :64].any(axis=1)
        if not present.all():
            present[~present] = raw[~present].any(axis=1)
    if not present.any():
        return None

    def encode(i: int) -> bytes:
        data = raw[i]
        for step in plan.steps:
            data = step(data)
        return data

    rows = [int(i) for i in np.flatnonzero(present)]
    pool = _encode_pool() if plan.steps and len(rows) > 1 else None
    chunks = list(pool.map(encode, rows)) if pool is not None else [encode(i) for i in rows]
    index = np.full((plan.rows, 2), ABSENT_CHUNK, dtype="<u8")
    offset = 0
    for i, data in zip(rows, chunks):
        index[i] = (offset, len(data))
        offset += len(data)
    index_nbytes = 16 * plan.rows + 4 * plan.index_crcs
    if plan.index_at_start:
        index[present, 0] += np.uint64(index_nbytes)
    index_bytes = index.tobytes()
    for _ in range(plan.index_crcs):
        index_bytes = _crc32c(index_bytes)
    assert len(index_bytes) == index_nbytes
    return b"".join([index_bytes, *chunks] if plan.index_at_start else [*chunks, index_bytes])


def write_shard_file(z: zarr.Array, shard_id: int, block: np.ndarray, plan: ShardPlan | None = None) -> None:
    """Write shard `shard_id` of `z` (block: the whole shard) as one put through z's store.

    Raises Unsupported, before anything is written, for arrays, blocks or shards this module does not
    reproduce (a shard past the end of the array included)."""
    plan = plan or shard_plan(z)
    lo = int(shard_id) * plan.rows
    if shard_id < 0 or lo + plan.rows > z.shape[0]:
        raise Unsupported(f"shard {shard_id} of {plan.rows} rows is not inside the array's {z.shape[0]} rows")
    data = encode_shard(plan, block)
    key = z.metadata.encode_chunk_key((int(shard_id),) + (0,) * len(plan.row_shape))
    path = z.async_array.store_path / key
    if data is None:
        sync(path.delete())
    else:
        sync(path.set(default_buffer_prototype().buffer.from_bytes(data)))
