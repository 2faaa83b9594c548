"""cache_store reader: rank-sliced seeded iteration with resume, prefetch, corruption detection, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store import CorruptShard, FieldSpec, StoreReader, StoreSpec, StoreWriter
from cache_store.cli import main as cli_main

S = 8


@pytest.fixture()
def store(tmp_path: Path) -> str:
    spec = StoreSpec(fields=(
        FieldSpec("x", (3, 16), "bfloat16"),
        FieldSpec("q", (3, 16), "float32", quant="int8", quant_reduce_axes=(1,)),
        FieldSpec("example_id", (), "int64"),
    ), shard_size=S)
    w = StoreWriter.create_or_open(str(tmp_path / "s"), spec, "fp", {"a": 1}, num_shards=6)
    for shard, n in [(0, 8), (1, 8), (2, 5), (4, 8), (5, 8)]:  # shard 3 unpublished, shard 2 partial
        ids = np.arange(n, dtype=np.int64) + 100 * shard
        w.write_shard(shard, {"x": torch.randn(n, 3, 16).bfloat16(), "q": torch.randn(n, 3, 16), "example_id": ids})
    return w.url


def test_batches_carry_the_rows_they_name(store: str) -> None:
    r = StoreReader(store)
    ids = r.get_batch(range(len(r)))["example_id"]
    order = np.random.default_rng(1).permutation(len(r))
    for idx in np.array_split(order, 8):
        batch = r.get_batch(idx)
        assert torch.equal(batch["example_id"], ids[torch.from_numpy(idx)])
        assert batch["x"].dtype == torch.bfloat16 and batch["q"].dtype == torch.float32


def _corrupt_one_byte(root: Path, rel: str, at: int = 100) -> None:
    p = root / rel
    b = bytearray(p.read_bytes())
    b[at] ^= 0xFF
    p.write_bytes(bytes(b))


def test_corrupt_byte_detected_by_reader_and_cli(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["verify", store]) == 0
    _corrupt_one_byte(Path(store), "x/c/4/0/0")  # shard 4, inside the first chunk's compressed bytes
    with pytest.raises(CorruptShard, match="shard 4") as ei:
        StoreReader(store, verify=True).get_batch([26])  # rows 21..28 are shard 4
    assert ei.value.shard_ids == [4] and "'x'" in str(ei.value)
    StoreReader(store, verify=True).get_batch([0, 30])  # other shards still fine
    # Without verify=True the per-chunk crc32c still refuses the damaged row, naming the shard.
    with pytest.raises(CorruptShard, match=r"corrupt shards \[4\]"):
        StoreReader(store).get_batch([21])
    with pytest.raises(CorruptShard):
        StoreReader(store, fast_read=False).get_batch([21])
    capsys.readouterr()
    assert cli_main(["verify", store]) == 1
    err = capsys.readouterr().err
    assert "CORRUPT shard 4" in err and "['x']" in err and "shard 0" not in err


def test_info_cli(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", store]) == 0
    out = capsys.readouterr().out
    assert "shards:       5/6 done" in out and "rows:         37" in out and "fp" in out and "quant=int8" in out
    assert cli_main(["info", store + "-missing"]) == 2


def test_read_field_reads_one_field(store: str) -> None:
    r = StoreReader(store)
    ids = r.read_field("example_id")
    assert ids.tolist() == [*range(8), *range(100, 108), *range(200, 205), *range(400, 408), *range(500, 508)]
    assert r.read_field("x", [3, 0]).shape == (2, 3, 16)
    assert torch.equal(r.read_field("q", [9]), r.get_batch([9])["q"])
    with pytest.raises(KeyError, match="fields are"):
        r.read_field("nope")


def test_readahead_of_a_local_store_advises_just_the_rows_ranges(store: str, monkeypatch) -> None:
    """With page_readahead, a local store's readahead asks the kernel (posix_fadvise WILLNEED) for the byte ranges the named rows will be
    read from, and for no more: not whole shard files, which on a store larger than memory would push out rows
    about to be read."""
    import os

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    advised: list[tuple[str, int, int]] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd, off, n, advice):
        assert advice == os.POSIX_FADV_WILLNEED
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), off, n))
        return real_fadvise(fd, off, n, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    StoreReader(store).readahead([11], fields=["x", "q"])    # off by default
    assert not advised
    r = StoreReader(store, page_readahead=True)
    r.readahead([11], fields=["x", "q"])                      # row 3 of shard 1
    r._fast._advisor.submit(lambda: None).result(timeout=30)  # the advice runs on its own thread: let it finish
    assert advised, "a local store's readahead advised nothing"
    for path, _, n in advised:
        assert n < os.path.getsize(path), f"advised the whole of {path}"
    read: list[tuple[str, int, int]] = []
    real_pread = os.pread

    def pread(fd, n, off):
        read.append((os.readlink(f"/proc/self/fd/{fd}"), off, n))
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", pread)
    batch = r.get_batch([11], fields=["x", "q"])
    assert batch["x"].shape == (1, 3, 16)
    assert read
    for path, off, n in read:                                 # every byte the read needed had been advised
        assert any(p == path and a <= off and off + n <= a + m for p, a, m in advised), (path, off, n, advised)
    assert {p for p, _, _ in read} <= {p for p, _, _ in advised}
