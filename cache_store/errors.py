"""Exceptions raised by cache_store, each naming what went wrong and the fix.

Usage::

    from cache_store.errors import FingerprintMismatch, ShardClaimed
    try:
        writer.write_shard(7, arrays)
    except ShardClaimed as e:      # another live writer holds shard 7
        log.info("skip shard %d: %s", e.shard_id, e)
"""

from __future__ import annotations

from typing import Any


class FingerprintMismatch(ValueError):
    """The store was built for another configuration (fingerprint differs)."""

    def __init__(self, message: str, differing: dict[str, tuple[Any, Any]] | None = None) -> None:
        super().__init__(message)
        self.differing = differing or {}


class SpecMismatch(ValueError):
    """The store layout (spec, shard size, number of shards) differs from the one requested."""


class LedgerConflict(RuntimeError):
    """A published record would be overwritten with different content (records are immutable)."""


class ShardClaimed(RuntimeError):
    """Another live writer holds the claim on this shard; nothing was written."""

    def __init__(self, message: str, shard_id: int, owner: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.shard_id = shard_id
        self.owner = owner or {}


class CorruptShard(RuntimeError):
    """A published shard's files do not match the checksums in its ledger record."""

    def __init__(self, message: str, shard_ids: list[int]) -> None:
        super().__init__(message)
        self.shard_ids = shard_ids


class StoreNotFound(FileNotFoundError):
    """No cache_store at the given URL (ledger/store.json is missing)."""
