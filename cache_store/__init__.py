"""cache_store: a compact, verifiable, multi-writer store of named per-example tensors (zarr v3).

Built once by many writers (processes/hosts), read at random by many training runs. Imports no
model code: it stores named tensors per example, described by a `StoreSpec`.

Usage::

    from cache_store import StoreWriter, StoreReader, StoreSpec, FieldSpec

    spec = StoreSpec(fields=(FieldSpec("k", (16, 8, 24, 64), "bfloat16", quant="int8", quant_reduce_axes=(2,)),
                             FieldSpec("example_id", (), "int64")))
    w = StoreWriter.create_or_open("/data/kv", spec, fingerprint="abc", fingerprint_fields={...}, num_shards=10)
    w.write_shard(0, {"k": k_bf16, "example_id": ids})
    r = StoreReader("/data/kv", expected_fingerprint="abc")
    r.get_batch([0, 1])

CLI: `python -m cache_store info PATH` and `python -m cache_store verify PATH`.
Layout: see ledger.py (ledger/), claims.py (claims/), zarr_io.py (arrays), writer.py (meta/).
"""

from cache_store.errors import (
    CorruptShard,
    FingerprintMismatch,
    LedgerConflict,
    ShardClaimed,
    SpecMismatch,
    StoreNotFound,
)
from cache_store.ledger import ShardRecord, StoreRecord
from cache_store.quant import relative_error
from cache_store.reader import StoreReader
from cache_store.spec import CodecSpec, FieldSpec, StoreSpec, default_shard_size
from cache_store.writer import StoreWriter

__all__ = [
    "CodecSpec", "CorruptShard", "FieldSpec", "FingerprintMismatch", "LedgerConflict", "ShardClaimed",
    "ShardRecord", "SpecMismatch", "StoreNotFound", "StoreReader", "StoreRecord", "StoreSpec", "StoreWriter",
    "default_shard_size", "relative_error",
]
