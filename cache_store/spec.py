"""What a store holds: named per-example tensors (fields), their codec and the shard size.

A `StoreSpec` lists `FieldSpec`s (name, per-example shape, logical dtype, optional
quantisation) plus a `CodecSpec` and the number of examples per shard file. Each field
becomes one zarr array of shape [num_rows_capacity, *stored_shape] (quantised fields
become three: `<name>.q`, `<name>.scale` and, for int4, `<name>.zero`).

Usage::

    from cache_store.spec import FieldSpec, StoreSpec, CodecSpec, default_shard_size

    spec = StoreSpec(fields=(
        FieldSpec("k", (16, 8, 24, 64), "bfloat16", quant="int8", quant_reduce_axes=(2,)),  # per channel
        FieldSpec("v", (16, 8, 24, 64), "bfloat16", quant="int8", quant_reduce_axes=(3,)),  # per token
        FieldSpec("valid", (16, 8, 24), "bool"),
        FieldSpec("codi_h", (16, 2048), "bfloat16"),
        FieldSpec("example_id", (), "int64"),
        FieldSpec("cot_len", (), "int32"),
    ), codec=CodecSpec("blosc-zstd", clevel=3))
    # int8 hardly compresses (~0.97x): FieldSpec(..., codec=CodecSpec("none")) skips decompression on read.
    spec = spec.resolved()          # fills shard_size with default_shard_size(spec)
    spec.to_dict()                  # JSON, stored in ledger/store.json

Quantisation (KIVI-style, generic over axes): `quant_reduce_axes` are the per-example axes a
scale is shared over. Keys [L,H,M,D] per channel -> (2,), values per token -> (3,).
int8 is symmetric abs-max (x ~ q * scale); int4 is asymmetric min/max (x ~ q * scale + zero),
packed two per byte along the last axis. Scales are stored as `scale_dtype` (float16 default).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LOGICAL_DTYPES = (
    "bfloat16", "float16", "float32", "float64", "bool",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
)
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")
QUANT_SCHEMES = ("int8", "int4")
CODEC_NAMES = ("blosc-zstd", "blosc-lz4", "zstd", "none")
BLOSC_SHUFFLES = ("shuffle", "bitshuffle", "noshuffle")
MAX_DEFAULT_SHARD_SIZE = 4096
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def stored_numpy_dtype(logical: str) -> np.dtype:
    """Numpy dtype a logical dtype is stored as (bfloat16 -> its uint16 bits)."""
    return np.dtype("uint16") if logical == "bfloat16" else np.dtype(logical)


@dataclass(frozen=True)
class CodecSpec:
    """Compression of every chunk. `chunk_crc32c` adds a crc32c per chunk so zarr itself rejects a
    flipped byte on read (cheap defence in depth; the ledger checksum is the authority)."""

    name: str = "blosc-zstd"
    clevel: int = 3
    shuffle: str = "shuffle"
    chunk_crc32c: bool = True

    def __post_init__(self) -> None:
        if self.name not in CODEC_NAMES:
            raise ValueError(f"codec {self.name!r} unknown; use one of {CODEC_NAMES}")
        if self.shuffle not in BLOSC_SHUFFLES:
            raise ValueError(f"codec shuffle {self.shuffle!r} unknown; use one of {BLOSC_SHUFFLES}")
        if self.name != "none" and not 1 <= int(self.clevel) <= 22:
            raise ValueError(f"codec clevel {self.clevel} out of range; use 1..9 for blosc, 1..22 for zstd")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecSpec:
        return cls(**d)


@dataclass(frozen=True)
class FieldSpec:
    """One per-example tensor. `shape` excludes the row axis; () is a scalar per example."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quant: str | None = None
    quant_reduce_axes: tuple[int, ...] = ()
    scale_dtype: str = "float16"
    codec: CodecSpec | None = None  # None: the store's codec (e.g. CodecSpec("none") for int8 K/V)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "quant_reduce_axes", tuple(int(a) for a in self.quant_reduce_axes))
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"field name {self.name!r} is not an identifier; use letters, digits and '_' "
                "(dots are reserved for the arrays of quantised fields)"
            )
        if any(s <= 0 for s in self.shape):
            raise ValueError(f"field {self.name!r}: every dimension of shape {self.shape} must be > 0")
        if self.dtype not in LOGICAL_DTYPES:
            raise ValueError(f"field {self.name!r}: dtype {self.dtype!r} unknown; use one of {LOGICAL_DTYPES}")
        if self.quant is None:
            if self.quant_reduce_axes:
                raise ValueError(f"field {self.name!r}: quant_reduce_axes given without quant; set quant='int8' or 'int4'")
            return
        if self.quant not in QUANT_SCHEMES:
            raise ValueError(f"field {self.name!r}: quant {self.quant!r} unknown; use None, 'int8' or 'int4'")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"field {self.name!r}: quant={self.quant!r} needs a float dtype, got {self.dtype!r}")
        if self.scale_dtype not in ("float16", "float32"):
            raise ValueError(f"field {self.name!r}: scale_dtype must be 'float16' or 'float32', got {self.scale_dtype!r}")
        axes = self.quant_reduce_axes
        if not axes or len(set(axes)) != len(axes) or any(not 0 <= a < len(self.shape) for a in axes):
            raise ValueError(
                f"field {self.name!r}: quant_reduce_axes {axes} must be distinct axes of the per-example "
                f"shape {self.shape} (0..{len(self.shape) - 1}); e.g. keys [L,H,M,D] per channel -> (2,), "
                "values per token -> (3,)"
            )
        object.__setattr__(self, "quant_reduce_axes", tuple(sorted(axes)))

    @property
    def logical_itemsize(self) -> int:
        return 2 if self.dtype == "bfloat16" else np.dtype(self.dtype).itemsize

    @property
    def logical_nbytes(self) -> int:
        """Bytes of one example in its logical dtype (the 'raw' size compression is measured against)."""
        return math.prod(self.shape) * self.logical_itemsize

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return tuple(s for i, s in enumerate(self.shape) if i not in self.quant_reduce_axes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["quant_reduce_axes"] = list(self.quant_reduce_axes)
        if self.codec is None:
            d.pop("codec")  # absent = store codec (keeps older spec dicts equal)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FieldSpec:
        return cls(
            name=d["name"], shape=tuple(d["shape"]), dtype=d["dtype"], quant=d.get("quant"),
            quant_reduce_axes=tuple(d.get("quant_reduce_axes", ())), scale_dtype=d.get("scale_dtype", "float16"),
            codec=CodecSpec.from_dict(d["codec"]) if d.get("codec") else None,
        )


@dataclass(frozen=True)
class StoredArray:
    """One zarr array backing (part of) a field."""

    path: str  # zarr array name: "<field>" or "<field>.q" / ".scale" / ".zero"
    field: str
    role: str  # "data" | "q" | "scale" | "zero"
    shape: tuple[int, ...]  # per example
    dtype: np.dtype
    codec: CodecSpec | None = None  # the field's override, if any

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class StoreSpec:
    """Fields + codec + examples per shard (None = `default_shard_size`, filled by `resolved()`)."""

    fields: tuple[FieldSpec, ...]
    shard_size: int | None = None
    codec: CodecSpec = field(default_factory=CodecSpec)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        if not self.fields:
            raise ValueError("StoreSpec needs at least one field")
        names = [f.name for f in self.fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"StoreSpec has duplicate field names {dup}; give each field a unique name")
        if self.shard_size is not None and int(self.shard_size) < 1:
            raise ValueError(f"shard_size must be >= 1 (examples per shard file), got {self.shard_size}")

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no field {name!r}; fields are {[f.name for f in self.fields]}")

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def resolved(self) -> StoreSpec:
        """Copy with shard_size filled in (default_shard_size when None)."""
        if self.shard_size is not None:
            return self
        return dataclasses.replace(self, shard_size=default_shard_size(self))

    def stored_arrays(self) -> list[StoredArray]:
        """The zarr arrays, in field order (the order checksums are taken in)."""
        out = self._stored_arrays()
        return [dataclasses.replace(a, codec=self.field(a.field).codec) for a in out]

    def _stored_arrays(self) -> list[StoredArray]:
        out: list[StoredArray] = []
        for f in self.fields:
            if f.quant is None:
                out.append(StoredArray(f.name, f.name, "data", f.shape, stored_numpy_dtype(f.dtype)))
                continue
            if f.quant == "int8":
                out.append(StoredArray(f"{f.name}.q", f.name, "q", f.shape, np.dtype("int8")))
            else:
                packed = f.shape[:-1] + ((f.shape[-1] + 1) // 2,)
                out.append(StoredArray(f"{f.name}.q", f.name, "q", packed, np.dtype("uint8")))
            out.append(StoredArray(f"{f.name}.scale", f.name, "scale", f.scale_shape, np.dtype(f.scale_dtype)))
            if f.quant == "int4":
                out.append(StoredArray(f"{f.name}.zero", f.name, "zero", f.scale_shape, np.dtype(f.scale_dtype)))
        return out

    @property
    def logical_nbytes(self) -> int:
        """Bytes of one example in logical dtypes (bf16 = 2 bytes)."""
        return sum(f.logical_nbytes for f in self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fields": [f.to_dict() for f in self.fields],
            "shard_size": self.shard_size,
            "codec": self.codec.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreSpec:
        return cls(
            fields=tuple(FieldSpec.from_dict(f) for f in d["fields"]),
            shard_size=d.get("shard_size"),
            codec=CodecSpec.from_dict(d.get("codec", {})),
        )


def default_shard_size(spec: StoreSpec, target_bytes: int = 128 << 20) -> int:
    """Examples per shard so the largest array's shard file is ~target_bytes before compression.

    Clamped to [1, 4096]; e.g. Llama-3.2-3B bf16 keys (28x8x24x128, 1.4 MB/example) -> 97.
    """
    largest = max(a.nbytes for a in spec.stored_arrays())
    return int(min(MAX_DEFAULT_SHARD_SIZE, max(1, target_bytes // max(1, largest))))
