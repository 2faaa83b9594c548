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


def test_ranks_are_disjoint_equal_and_cover_the_permutation(store: str) -> None:
    r = StoreReader(store)
    assert len(r) == 37
    world, bs = 3, 4
    seen = []
    for rank in range(world):
        idx = [i for i, b in r.iter_batches(bs, rank=rank, world_size=world, epoch=1, seed=7, prefetch=0)]
        assert len(idx) == 37 // world // bs == 3
        flat = np.concatenate(idx)
        seen.append(flat)
        assert np.array_equal(flat, r.rank_indices(rank, world, epoch=1, seed=7)[: 3 * bs])
    allseen = np.concatenate(seen)
    assert len(set(allseen.tolist())) == len(allseen)  # disjoint
    slices = np.concatenate([r.rank_indices(k, world, 1, 7) for k in range(world)])
    perm = np.random.default_rng([7, 1]).permutation(37)
    assert np.array_equal(slices, perm[: 12 * world])  # ranks tile the seeded permutation
    assert not np.array_equal(r.rank_indices(0, world, epoch=2, seed=7), r.rank_indices(0, world, epoch=1, seed=7))


def test_batches_carry_the_rows_they_name(store: str) -> None:
    r = StoreReader(store)
    ids = r.get_batch(range(len(r)))["example_id"]
    for idx, batch in r.iter_batches(5, epoch=0, seed=1, prefetch=2, drop_last=False):
        assert torch.equal(batch["example_id"], ids[torch.from_numpy(idx)])
        assert batch["x"].dtype == torch.bfloat16 and batch["q"].dtype == torch.float32


def test_resume_with_start_reproduces_the_tail(store: str) -> None:
    r = StoreReader(store)
    full = list(r.iter_batches(4, rank=1, world_size=2, epoch=3, seed=0, prefetch=2))
    tail = list(r.iter_batches(4, rank=1, world_size=2, epoch=3, seed=0, start=2, prefetch=0))
    assert len(full) == 4 and len(tail) == 2
    for (i_a, b_a), (i_b, b_b) in zip(full[2:], tail):
        assert np.array_equal(i_a, i_b)
        assert all(torch.equal(b_a[k], b_b[k]) for k in b_a)
    partial = list(r.iter_batches(5, rank=1, world_size=2, drop_last=False, prefetch=1))
    assert [len(i) for i, _ in partial] == [5, 5, 5, 3]


def test_prefetch_stops_cleanly_when_the_consumer_breaks(store: str) -> None:
    r = StoreReader(store)
    it = r.iter_batches(2, prefetch=3)
    next(it)
    it.close()  # must not hang; the background thread exits
    assert sum(1 for _ in r.iter_batches(2, prefetch=3)) == 18


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
