"""cache_store shard claims: exclusive, released, expiring, taken over from dead local owners."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cache_store import FieldSpec, ShardClaimed, StoreSpec, StoreWriter
from cache_store.backend import LocalBackend
from cache_store.claims import ClaimManager, claim_dir


def test_create_exclusive_is_exclusive_and_whole(tmp_path: Path) -> None:
    be = LocalBackend(str(tmp_path))
    assert be.create_exclusive("a/b.json", b"one")
    assert not be.create_exclusive("a/b.json", b"two")
    assert be.read_bytes("a/b.json") == b"one"
    assert be.list("a") == ["b.json"]  # temp files are cleaned up (and hidden)
    be.write_atomic("a/b.json", b"three")
    assert be.read_bytes("a/b.json") == b"three"
    with pytest.raises(ValueError, match="relative"):
        be.write_atomic("../escape", b"x")


def test_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    be = LocalBackend(str(tmp_path))
    a, b = ClaimManager(be), ClaimManager(be)
    ca = a.acquire(3)
    assert a.acquire(3) == ca  # re-entrant for the same owner
    with pytest.raises(ShardClaimed, match="shard 3") as ei:
        b.acquire(3)
    assert ei.value.shard_id == 3 and ei.value.owner["uuid"] == a.owner["uuid"]
    assert a.still_held(ca)
    a.release(ca)
    assert not a.still_held(ca)
    cb = b.acquire(3)
    assert cb.gen == ca.gen + 2  # held, released, held
    b.acquire(4)  # other shards are independent


def _rewrite_claim(be: LocalBackend, shard: int, **changes: object) -> None:
    gen = max(int(n[:-5]) for n in be.list(claim_dir(shard)))
    p = Path(be.root) / claim_dir(shard) / f"{gen:06d}.json"
    rec = json.loads(p.read_text())
    for k, v in changes.items():
        if k == "owner":
            rec["owner"].update(v)  # type: ignore[arg-type]
        else:
            rec[k] = v
    p.write_text(json.dumps(rec))


def test_expired_claim_is_taken_over(tmp_path: Path) -> None:
    be = LocalBackend(str(tmp_path))
    a, b = ClaimManager(be, ttl_s=60), ClaimManager(be, ttl_s=60)
    ca = a.acquire(0)
    _rewrite_claim(be, 0, owner={"host": "another-host"}, time=time.time() - 30)
    with pytest.raises(ShardClaimed):
        b.acquire(0)  # foreign host, live for all we know, not expired
    _rewrite_claim(be, 0, time=time.time() - 61)
    cb = b.acquire(0)
    assert not a.still_held(ca) and b.still_held(cb)


def test_claim_of_dead_local_process_is_taken_over_at_once(tmp_path: Path) -> None:
    be = LocalBackend(str(tmp_path))
    a, b = ClaimManager(be), ClaimManager(be)
    a.acquire(1)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _rewrite_claim(be, 1, owner={"pid": p.pid, "pid_start": None})  # owner: a process that has exited
    b.acquire(1)
    a.acquire(2)
    _rewrite_claim(be, 2, owner={"pid_start": -5})  # our own pid, but "started" at another time: pid reused
    b.acquire(2)


def test_write_shard_raises_shard_claimed_and_writes_nothing(tmp_path: Path) -> None:
    spec = StoreSpec(fields=(FieldSpec("x", (4,), "float32"),), shard_size=4)
    w1 = StoreWriter.create_or_open(str(tmp_path / "s"), spec, "fp", {}, num_shards=2)
    w2 = StoreWriter.create_or_open(str(tmp_path / "s"), spec, "fp", {}, num_shards=2)
    held = w1.claims.acquire(0)
    with pytest.raises(ShardClaimed, match="claimed by a live writer"):
        w2.write_shard(0, {"x": np.ones((4, 4), np.float32)})
    assert w2.done_shards() == [] and not (tmp_path / "s" / "x" / "c" / "0").exists()
    w1.claims.release(held)
    w2.write_shard(0, {"x": np.ones((4, 4), np.float32)})
    assert w2.shards_written == [0]


def test_release_if_owned_by(tmp_path: Path) -> None:
    be = LocalBackend(str(tmp_path))
    a, coordinator = ClaimManager(be), ClaimManager(be)
    a.acquire(5)
    assert not coordinator.release_if_owned_by(5, "someone-else")
    assert coordinator.release_if_owned_by(5, a.owner["uuid"])
    assert coordinator.current(5)[1]["state"] == "released"
    assert not coordinator.release_if_owned_by(5, a.owner["uuid"])  # already released
    coordinator.acquire(5)
