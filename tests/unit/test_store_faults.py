"""cache_store failure paths: reads never invent data, transient errors are retried then loud, writes that fail
leave no temp files and name a full disk. Faults are injected here (file deletion, a patched fsspec filesystem,
monkeypatched writes), never by production code."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store import CorruptShard, FieldSpec, StoreReader, StoreSpec, StoreWriter
from cache_store import backend as B

S = 4


def _spec() -> StoreSpec:
    return StoreSpec(fields=(FieldSpec("k", (2, 8), "bfloat16"), FieldSpec("example_id", (), "int64")), shard_size=S)


def _write(url: str, storage_options=None, shards: int = 3) -> StoreWriter:
    w = StoreWriter.create_or_open(url, _spec(), "fp", {"a": 1}, num_shards=shards, storage_options=storage_options)
    for s in range(shards):
        ids = np.arange(S, dtype=np.int64) + 10 * s + 1
        w.write_shard(s, {"k": torch.randn(S, 2, 8).bfloat16() + 3, "example_id": ids})
    return w


@pytest.mark.parametrize("fast", [True, False])
def test_missing_shard_file_is_an_error_naming_the_shard_never_zeros(tmp_path: Path, fast: bool) -> None:
    url = _write(str(tmp_path / "s")).url
    os.remove(tmp_path / "s" / "k" / "c" / "1" / "0" / "0")
    r = StoreReader(url, fast_read=fast)
    assert r.get_batch([0, 1])["k"].abs().sum() > 0          # other shards still read
    with pytest.raises(CorruptShard) as e:
        r.get_batch([S, S + 1])
    assert e.value.shard_ids == [1] and "ledger/shard-000001.json" in str(e.value)
    assert "cache build" in str(e.value)


def test_a_shard_whose_rows_are_all_fill_is_not_an_error(tmp_path: Path) -> None:
    """zarr stores no chunk equal to the fill value: a shard file that was never written is fine when the ledger
    says it has 0 bytes (here: an all-zero field)."""
    spec = StoreSpec(fields=(FieldSpec("z", (4,), "float32"), FieldSpec("example_id", (), "int64")), shard_size=S)
    w = StoreWriter.create_or_open(str(tmp_path / "s"), spec, "fp", {}, num_shards=1)
    w.write_shard(0, {"z": torch.zeros(S, 4), "example_id": np.arange(S, dtype=np.int64) + 1})
    assert StoreReader(w.url).get_batch([0, 1, 2, 3])["z"].abs().sum() == 0


class _Flaky:
    """Wraps an fsspec filesystem: the first `fail` calls of `method` raise a transient error."""

    def __init__(self, fs, method: str, fail: int) -> None:
        self.fs, self.method, self.fail, self.calls = fs, method, fail, 0

    def __getattr__(self, name):
        real = getattr(self.fs, name)
        if name != self.method:
            return real

        def flaky(*a, **kw):
            self.calls += 1
            if self.calls <= self.fail:
                if name == "cat":   # per-path errors, as fsspec's cat(on_error="return") hands them back
                    return {p: ConnectionError("503 Slow Down") for p in a[0]}
                raise ConnectionError("503 Slow Down")
            return real(*a, **kw)

        return flaky


def _memory_store(name: str) -> str:
    url = f"memory://faults-{name}-{os.getpid()}"
    _write(url)
    return url


def test_transient_ledger_read_error_is_retried_not_dropped(monkeypatch) -> None:
    monkeypatch.setattr(B, "with_retries", lambda fn, what, attempts=4, base_delay=0.2: _orig(fn, what, attempts, 0))
    url = _memory_store("retry")
    r = StoreReader(url)
    flaky = _Flaky(r.backend.fs, "cat", fail=1)
    r.backend.fs = flaky
    r.ledger._shards.clear()
    assert r.refresh() == 3 * S and flaky.calls == 2 and r.is_complete


def test_persistent_ledger_read_error_fails_loudly(monkeypatch) -> None:
    monkeypatch.setattr(B, "with_retries", lambda fn, what, attempts=4, base_delay=0.2: _orig(fn, what, attempts, 0))
    url = _memory_store("loud")
    r = StoreReader(url)
    r.backend.fs = _Flaky(r.backend.fs, "cat", fail=100)
    r.ledger._shards.clear()
    with pytest.raises(OSError, match="failed 4 times"):
        r.refresh()


def test_transient_chunk_read_error_is_retried(monkeypatch) -> None:
    monkeypatch.setattr(B, "with_retries", lambda fn, what, attempts=4, base_delay=0.2: _orig(fn, what, attempts, 0))
    url = _memory_store("ranges")
    r = StoreReader(url)
    want = r.get_batch([0, 5])["k"]
    r2 = StoreReader(url)
    r2.backend.fs = _Flaky(r2.backend.fs, "cat_ranges", fail=2)
    assert torch.equal(r2.get_batch([0, 5])["k"], want)


_orig = B.with_retries


def test_failed_write_leaves_no_temp_file_and_names_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    be = B.LocalBackend(str(tmp_path / "root"))
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(B.DiskFull, match="disk full at .*claims/shard-000001"):
        be.create_exclusive("claims/shard-000001", b"{}")
    with pytest.raises(B.DiskFull):
        be.write_atomic("meta/x.json", b"{}")
    monkeypatch.setattr(os, "fsync", real_fsync)
    left = [p for p in (tmp_path / "root").rglob("*") if p.is_file()]
    assert left == []
