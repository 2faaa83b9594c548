"""The ledger: the source of truth of a store, one immutable JSON object per fact.

Layout under the store root::

    ledger/store.json            store metadata (format version, fingerprint, fields, spec, num_shards)
    ledger/shard-000012.json     one record per published shard {state, rows, checksum, bytes, ...}

Many writers on many hosts publish different shards at once, so there is no single
rewritten ledger file (that would lose updates): each record is its own object, created
exclusively (create-if-absent) *after* the shard's data is fully written ("publish last").
A record that exists is never replaced: publishing different content raises
`LedgerConflict` naming the shard; `store.json` is immutable after creation. A shard
without a record does not exist for readers and is redone by writers.

Usage::

    from cache_store.ledger import Ledger
    led = Ledger(backend)
    rec = led.read_store()               # StoreRecord | None
    led.published_shard_ids()            # [0, 1, 5]
    led.read_shards([0, 1])              # {0: ShardRecord, 1: ShardRecord}
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from cache_store._util import canonical_json
from cache_store.backend import Backend
from cache_store.errors import LedgerConflict
from cache_store.spec import StoreSpec

logger = logging.getLogger(__name__)

FORMAT = "kava-cache-store"
FORMAT_VERSION = 1
STORE_RECORD = "ledger/store.json"
_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".json"


def shard_record_path(shard_id: int) -> str:
    return f"ledger/{_SHARD_PREFIX}{shard_id:06d}{_SHARD_SUFFIX}"


@dataclass(frozen=True)
class ShardRecord:
    """A published shard. Deterministic content: a rebuild of the same inputs gives an equal record.

    checksum: sha256 over, for every stored array in field order, its name, its shard file's
        length and bytes (see zarr_io.shard_checksums); `arrays` holds each array's own sha256/bytes.
    content_sha256: sha256 of the input arrays as given to write_shard (idempotency check).
    """

    shard: int
    rows: int
    checksum: str
    bytes: int
    content_sha256: str
    arrays: dict[str, dict[str, Any]] = field(default_factory=dict)
    state: str = "done"

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard, "state": self.state, "rows": self.rows, "checksum": self.checksum,
            "bytes": self.bytes, "content_sha256": self.content_sha256, "arrays": self.arrays,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        return cls(
            shard=int(d["shard"]), rows=int(d["rows"]), checksum=d["checksum"], bytes=int(d["bytes"]),
            content_sha256=d["content_sha256"], arrays=d.get("arrays", {}), state=d.get("state", "done"),
        )


@dataclass(frozen=True)
class StoreRecord:
    """ledger/store.json. `created` (time, host, library versions) is informational only."""

    fingerprint: str
    fingerprint_fields: dict[str, Any]
    spec: StoreSpec
    num_shards: int
    format_version: int = FORMAT_VERSION
    created: dict[str, Any] = field(default_factory=dict)

    @property
    def shard_size(self) -> int:
        assert self.spec.shard_size is not None
        return int(self.spec.shard_size)

    @property
    def num_rows_capacity(self) -> int:
        return self.num_shards * self.shard_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": self.format_version, "fingerprint": self.fingerprint,
            "fingerprint_fields": self.fingerprint_fields, "spec": self.spec.to_dict(),
            "shard_size": self.shard_size, "num_shards": self.num_shards,
            "num_rows_capacity": self.num_rows_capacity, "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "") -> StoreRecord:
        if d.get("format") != FORMAT:
            raise ValueError(f"{where}: not a cache_store ledger (format={d.get('format')!r}, expected {FORMAT!r})")
        if int(d.get("format_version", -1)) > FORMAT_VERSION:
            raise ValueError(
                f"{where}: store format_version {d['format_version']} is newer than this code ({FORMAT_VERSION}); "
                "upgrade kava's cache_store"
            )
        return cls(
            fingerprint=d["fingerprint"], fingerprint_fields=d["fingerprint_fields"],
            spec=StoreSpec.from_dict(d["spec"]), num_shards=int(d["num_shards"]),
            format_version=int(d["format_version"]), created=d.get("created", {}),
        )


def _parse(raw: bytes, where: str) -> dict[str, Any]:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e}); the ledger object is damaged, restore it from a backup") from e


class StoreView:
    """Read-only accessors over `self.backend` and `self.record`, shared by StoreReader and StoreWriter."""

    backend: Backend
    record: StoreRecord

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def fingerprint(self) -> str:
        return self.record.fingerprint

    @property
    def fingerprint_fields(self) -> dict[str, Any]:
        return self.record.fingerprint_fields

    @property
    def spec(self) -> StoreSpec:
        return self.record.spec

    @property
    def num_shards(self) -> int:
        return self.record.num_shards

    @property
    def shard_size(self) -> int:
        return self.record.shard_size


class Ledger:
    """Reads and publishes ledger objects through a Backend. Shard records are cached (immutable)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._shards: dict[int, ShardRecord] = {}

    # -- store record ---------------------------------------------------------------------------
    def read_store(self) -> StoreRecord | None:
        raw = self.backend.try_read(STORE_RECORD)
        if raw is None:
            return None
        where = self.backend.describe(STORE_RECORD)
        return StoreRecord.from_dict(_parse(raw, where), where)

    def create_store(self, record: StoreRecord) -> tuple[StoreRecord, bool]:
        """Publish store.json if absent. Returns (the record now in the store, created_by_us)."""
        if self.backend.create_exclusive(STORE_RECORD, canonical_json(record.to_dict())):
            logger.info("created store %s (fingerprint %s)", self.backend.url, record.fingerprint)
            return record, True
        existing = self.read_store()
        assert existing is not None
        return existing, False

    # -- shard records --------------------------------------------------------------------------
    def published_shard_ids(self) -> list[int]:
        ids = []
        for n in self.backend.list("ledger"):
            if n.startswith(_SHARD_PREFIX) and n.endswith(_SHARD_SUFFIX):
                try:
                    ids.append(int(n[len(_SHARD_PREFIX) : -len(_SHARD_SUFFIX)]))
                except ValueError:
                    logger.warning("ignoring unexpected ledger object %s", n)
        return sorted(ids)

    def read_shard(self, shard_id: int) -> ShardRecord | None:
        if shard_id in self._shards:
            return self._shards[shard_id]
        raw = self.backend.try_read(shard_record_path(shard_id))
        if raw is None:
            return None
        rec = ShardRecord.from_dict(_parse(raw, self.backend.describe(shard_record_path(shard_id))))
        self._shards[shard_id] = rec
        return rec

    def read_shards(self, shard_ids: list[int]) -> dict[int, ShardRecord]:
        todo = [i for i in shard_ids if i not in self._shards]
        paths = {shard_record_path(i): i for i in todo}
        for path, raw in self.backend.read_many(list(paths)).items():
            self._shards[paths[path]] = ShardRecord.from_dict(_parse(raw, self.backend.describe(path)))
        return {i: self._shards[i] for i in shard_ids if i in self._shards}

    def publish_shard(self, record: ShardRecord) -> ShardRecord:
        """Create the shard's record; an equal existing record is fine, a different one is a conflict."""
        path = shard_record_path(record.shard)
        if self.backend.create_exclusive(path, canonical_json(record.to_dict())):
            self._shards[record.shard] = record
            return record
        self._shards.pop(record.shard, None)
        existing = self.read_shard(record.shard)
        if existing == record:
            return existing
        raise LedgerConflict(
            f"shard {record.shard} of store {self.backend.url} is already published with different content "
            f"(checksum {existing.checksum if existing else '?'} != {record.checksum}); shard records are "
            f"immutable. If the published shard is bad, delete {self.backend.describe(path)} and rerun the "
            "writer for that shard; otherwise use a new store path."
        )
