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
