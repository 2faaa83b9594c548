"""Per-shard claims: at most one live writer writes a shard (zarr rewrites a shard file whole,
so two writers on one shard lose rows).

A claim is a short history of generations, each created exclusively (create-if-absent)::

    claims/shard-000012/000000.json   {"state": "held", "owner": {host, pid, pid_start, uuid}, "time": ...}
    claims/shard-000012/000001.json   {"state": "released", ...}

The newest generation is the claim's state. Taking a claim = exclusively creating the next
generation, allowed only when the newest one is released, expired (older than `ttl_s`) or
held by a dead process on this host (pid gone, or reused by another process). Two takers
racing for the same generation: exactly one create succeeds, the other gets `ShardClaimed`.
This needs only create-if-absent (no rename, no conditional delete), so it works the same on
a local filesystem and on S3. Releasing writes the next generation with state "released";
the writer also checks it still holds the newest generation right before publishing.

Usage::

    claims = ClaimManager(backend, ttl_s=1800)
    claim = claims.acquire(12)        # raises ShardClaimed if a live writer holds it
    try:
        ...write...
        if not claims.still_held(claim): raise ShardClaimed(...)
    finally:
        claims.release(claim)
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cache_store._util import canonical_json, hostname, pid_alive, pid_start_time
from cache_store.backend import Backend
from cache_store.errors import ShardClaimed

logger = logging.getLogger(__name__)


def claim_dir(shard_id: int) -> str:
    return f"claims/shard-{shard_id:06d}"


@dataclass(frozen=True)
class Claim:
    shard_id: int
    gen: int
    owner: dict[str, Any]


class ClaimManager:
    """Takes and releases shard claims for one writer identity (host, pid, uuid)."""

    def __init__(self, backend: Backend, ttl_s: float = 1800.0) -> None:
        self.backend = backend
        self.ttl_s = float(ttl_s)
        pid = os.getpid()
        self.owner = {"host": hostname(), "pid": pid, "pid_start": pid_start_time(pid), "uuid": uuid.uuid4().hex}

    def _latest(self, shard_id: int) -> tuple[int, dict[str, Any] | None]:
        gens = []
        for n in self.backend.list(claim_dir(shard_id)):
            if n.endswith(".json"):
                try:
                    gens.append(int(n[:-5]))
                except ValueError:
                    pass
        if not gens:
            return -1, None
        g = max(gens)
        raw = self.backend.try_read(f"{claim_dir(shard_id)}/{g:06d}.json")
        try:
            return g, json.loads(raw) if raw is not None else None
        except ValueError:
            return g, None  # unreadable claim object: treat as free (it holds nothing we can honour)

    def _why_free(self, rec: dict[str, Any] | None) -> str | None:
        """Reason the newest generation can be taken over, or None if it is held by a live owner."""
        if rec is None:
            return "no claim"
        if rec.get("state") != "held":
            return "released"
        age = time.time() - float(rec.get("time", 0.0))
        if age > self.ttl_s:
            return f"expired ({age:.0f}s > ttl {self.ttl_s:.0f}s)"
        owner = rec.get("owner", {})
        if owner.get("host") == self.owner["host"] and not pid_alive(int(owner.get("pid", -1)), owner.get("pid_start")):
            return f"owner pid {owner.get('pid')} on this host is dead"
        return None

    def _held_error(self, shard_id: int, rec: dict[str, Any] | None) -> ShardClaimed:
        owner = (rec or {}).get("owner", {})
        age = time.time() - float((rec or {}).get("time", time.time()))
        return ShardClaimed(
            f"shard {shard_id} of store {self.backend.url} is claimed by a live writer "
            f"(host {owner.get('host')}, pid {owner.get('pid')}, {age:.0f}s ago, ttl {self.ttl_s:.0f}s); "
            "skip it and retry later, or remove "
            f"{self.backend.describe(claim_dir(shard_id))} if that writer is known dead",
            shard_id, owner,
        )

    def _put(self, shard_id: int, gen: int, state: str) -> bool:
        rec = {"shard": shard_id, "gen": gen, "state": state, "owner": self.owner, "time": time.time()}
        return self.backend.create_exclusive(f"{claim_dir(shard_id)}/{gen:06d}.json", canonical_json(rec))

    def acquire(self, shard_id: int) -> Claim:
        gen, rec = self._latest(shard_id)
        if rec is not None and rec.get("state") == "held" and rec.get("owner", {}).get("uuid") == self.owner["uuid"]:
            return Claim(shard_id, gen, self.owner)  # already ours (re-entrant)
        why = self._why_free(rec)
        if why is None:
            raise self._held_error(shard_id, rec)
        if not self._put(shard_id, gen + 1, "held"):
            _, rec = self._latest(shard_id)  # lost the race for this generation
            raise self._held_error(shard_id, rec)
        if rec is not None and why != "released":
            logger.warning("shard %d: took over claim from %s: %s", shard_id, rec.get("owner"), why)
        return Claim(shard_id, gen + 1, self.owner)

    def still_held(self, claim: Claim) -> bool:
        gen, rec = self._latest(claim.shard_id)
        return gen == claim.gen and rec is not None and rec.get("owner", {}).get("uuid") == self.owner["uuid"]

    def current(self, shard_id: int) -> tuple[int, dict[str, Any] | None]:
        """(newest generation, its record) of the shard's claim; (-1, None) if never claimed."""
        return self._latest(shard_id)

    def release_if_owned_by(self, shard_id: int, owner_uuid: str) -> bool:
        """Release the claim if its newest generation is held by `owner_uuid` (e.g. a worker known to
        be dead on another host, which this host cannot probe). True if released by this call."""
        gen, rec = self._latest(shard_id)
        if rec is None or rec.get("state") != "held" or rec.get("owner", {}).get("uuid") != owner_uuid:
            return False
        return self._put(shard_id, gen + 1, "released")

    def release(self, claim: Claim) -> None:
        if not self._put(claim.shard_id, claim.gen + 1, "released"):
            logger.warning("shard %d: claim gen %d was taken over before release", claim.shard_id, claim.gen)
