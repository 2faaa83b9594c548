"""cache_store on S3 through fsspec/s3fs against a local moto server (correctness, not speed)."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
import torch

from cache_store import (
    CorruptShard, FieldSpec, FingerprintMismatch, LedgerConflict, ShardClaimed, StoreReader, StoreSpec, StoreWriter,
)
from cache_store.backend import FsspecBackend
from cache_store.claims import ClaimManager
from cache_store.cli import main as cli_main

SPEC = StoreSpec(fields=(
    FieldSpec("k", (2, 2, 12, 16), "bfloat16", quant="int4", quant_reduce_axes=(2,)),
    FieldSpec("v", (2, 2, 12, 16), "bfloat16"),
    FieldSpec("example_id", (), "int64"),
), shard_size=4)


def data(shard: int, n: int = 4) -> dict[str, Any]:
    g = torch.Generator().manual_seed(shard)
    return {"k": torch.randn(n, 2, 2, 12, 16, generator=g).bfloat16(),
            "v": torch.randn(n, 2, 2, 12, 16, generator=g).bfloat16(),
            "example_id": np.arange(n, dtype=np.int64) + 10 * shard}


@pytest.mark.integration
def test_s3_store_write_read_verify(s3_store: tuple[str, dict], capsys: pytest.CaptureFixture[str]) -> None:
    url, so = s3_store
    w = StoreWriter.create_or_open(url, SPEC, "fp-s3", {"a": 1}, num_shards=3, storage_options=so)
    d0, d2 = data(0), data(2, n=3)
    w.write_shard(0, d0)
    r = StoreReader(url, storage_options=so, expected_fingerprint="fp-s3", verify=True)
    assert len(r) == 4 and r.published_shards() == [0]
    w.write_shard(2, d2)
    assert w.write_shard(2, d2).rows == 3 and w.shards_written == [0, 2]  # idempotent on S3 too
    assert r.refresh() == 7 and w.missing_shards() == [1]  # listing is not served from a stale cache
    for fast in (True, False):
        b = StoreReader(url, storage_options=so, fast_read=fast).get_batch([6, 0, 4])
        assert torch.equal(b["v"][0].view(torch.int16), d2["v"][2].view(torch.int16))
        assert torch.equal(b["v"][1].view(torch.int16), d0["v"][0].view(torch.int16))
        assert b["example_id"].tolist() == [22, 0, 20]
    assert r.get_batch(range(len(r)))["example_id"].tolist() == [0, 1, 2, 3, 20, 21, 22]   # shard order
    with pytest.raises(LedgerConflict, match="shard 0"):
        w.write_shard(0, data(5))
    with pytest.raises(FingerprintMismatch, match=r"a \(store 1 != config 2\)"):
        StoreWriter.create_or_open(url, SPEC, "fp-other", {"a": 2}, num_shards=3, storage_options=so)

    so_json = json.dumps(so)
    assert cli_main(["info", url, "--storage-options", so_json]) == 0
    assert "2/3 done" in capsys.readouterr().out
    assert cli_main(["verify", url, "--storage-options", so_json]) == 0

    # Flip one byte of a shard file in the bucket: verify and the reader name the shard.
    be = FsspecBackend(url, so)
    key = "v/c/2/0/0/0/0"
    raw = bytearray(be.read_bytes(key))
    raw[len(raw) // 2] ^= 0x10
    be.fs.pipe_file(f"{be.root}/{key}", bytes(raw))
    capsys.readouterr()
    assert cli_main(["verify", url, "--storage-options", so_json]) == 1
    assert "CORRUPT shard 2" in capsys.readouterr().err
    with pytest.raises(CorruptShard, match="shard 2"):
        StoreReader(url, storage_options=so, verify=True).get_batch([5])
    with pytest.raises(CorruptShard, match=r"\[2\]"):
        StoreReader(url, storage_options=so).get_batch([4, 5, 6])
    assert StoreReader(url, storage_options=so, verify=True).get_batch([0, 1])["example_id"].tolist() == [0, 1]


@pytest.mark.integration
def test_s3_exclusive_create_and_claims(s3_store: tuple[str, dict]) -> None:
    url, so = s3_store
    be = FsspecBackend(url, so)
    assert be.atomic_create  # s3fs: conditional PUT (If-None-Match: *), honoured by moto
    assert be.create_exclusive("x/once.json", b"1")
    assert not be.create_exclusive("x/once.json", b"2")
    assert be.read_bytes("x/once.json") == b"1"
    a, b = ClaimManager(be), ClaimManager(FsspecBackend(url, so))
    ca = a.acquire(7)
    with pytest.raises(ShardClaimed, match="shard 7"):
        b.acquire(7)
    a.release(ca)
    b.acquire(7)
    w = StoreWriter.create_or_open(url, SPEC, "fp", {}, num_shards=2, storage_options=so)
    held = ClaimManager(FsspecBackend(url, so)).acquire(1)
    with pytest.raises(ShardClaimed):
        w.write_shard(1, data(1))
    assert w.done_shards() == [] and held.gen == 0


def _target_store(url: str, so: dict, shards: int = 4, rows: int = 8,
                  dims: tuple[int, int, int, int] = (2, 2, 32, 64)) -> list[int]:
    """A store with the training spec's fields (tiny dims: layers, KV heads, head dim, d_model) on S3; returns the
    example ids in row order."""
    from kava_dist.config import load_config
    from kava_dist.targets import store_spec

    L, H, D, d = dims
    spec = store_spec(load_config(None, ["latent.num_latents=6", f"store.shard_examples={rows}"]), dims=dims)
    w = StoreWriter.create_or_open(url, spec, "fp", {}, num_shards=shards, storage_options=so)
    g = torch.Generator().manual_seed(0)
    ids = []
    for s in range(shards):
        eid = torch.arange(rows) * shards + s                 # rows of a shard are not consecutive examples
        ids += eid.tolist()
        w.write_shard(s, {"k": torch.randn(rows, L, H, 6, D, generator=g).bfloat16(),
                          "v": torch.randn(rows, L, H, 6, D, generator=g).bfloat16(),
                          "valid": torch.ones(rows, L, H, 6, dtype=torch.bool),
                          "codi_h": torch.randn(rows, L, d, generator=g).bfloat16(),
                          "index": torch.zeros(rows, L, H, 6, dtype=torch.int16), "example_id": eid,
                          "cot_len": torch.ones(rows, dtype=torch.int32)})
    return ids


def _epoch_requests(s3, ids: list[int], open_reader, make_plan, source=None) -> tuple[int, int, dict]:
    """Reset the server's counts, open the store (open_reader()), scan its example ids and read one epoch of 128
    examples through StoreLoader (plan = make_plan(aligned); it reads from source(reader) when given, as the
    trainer wraps its reader in ReadWorkers) -> (examples read, requests, counts). Every example is read once."""
    from kava_dist.loader import StoreLoader, align_store
    from kava_dist.prompts import Encoded

    items = [Encoded(id=i, question_ids=[1, 5], cot_ids=[6], prompt_ids=[7], answer_ids=[8, 2]) for i in range(128)]
    s3.reset()
    reader = open_reader()
    aligned, rows, _ = align_store(reader, items)
    plan = make_plan(aligned)
    loader = StoreLoader(source(reader) if source else reader, aligned, rows, plan, 0, pad_id=0)
    seen = [b.ids.tolist() for _, _, b, _ in loader.iterate(0, plan.steps_per_epoch)]
    counts = s3.counts()
    n = sum(map(len, seen))
    assert n == 128 and sorted(sum(seen, [])) == sorted(ids)
    return n, sum(counts["requests"].values()), counts


@pytest.mark.integration
@pytest.mark.parametrize("cache,most", [(True, 1.0), (False, 3.0)])
def test_s3_training_epoch_requests_per_example(tmp_path, cache: bool, most: float) -> None:
    """Open the store, scan example ids, train one epoch through StoreLoader (micro-batch 4, 8 shards of 16 rows):
    every request the S3 server saw, over the examples read. With a local cache_dir (whole shard files, one GET
    each) at most 1 per example; without, ranged reads of k, v, codi_h only (small files whole) at most 3.
    Reading every field of every row chunk by chunk cost ~8 per example."""
    from bench.moto_counting import CountingMoto
    from kava_dist.loader import GlobalBatchPlan

    with CountingMoto(log_path=str(tmp_path / 'moto.log')) as s3:
        url, so = s3.bucket_url(), s3.storage_options
        ids = _target_store(url, so, shards=8, rows=16)
        opts = {"cache_dir": str(tmp_path / "cache")} if cache else {}
        n, requests, counts = _epoch_requests(s3, ids, lambda: StoreReader(url, storage_options=so, **opts),
                                              lambda aligned: GlobalBatchPlan(len(aligned), 8, 4, 1, seed=0))
    print(f"cache={cache}: {requests} requests ({counts}) for {n} examples")
    assert requests <= most * n, counts


@pytest.mark.integration
def test_read_workers_keep_the_one_request_per_example_of_cache_dir(tmp_path) -> None:
    """The GPU default reads the store in worker processes (cache_store.read_workers): with a local cache_dir the
    epoch above still costs at most 1 S3 request per example, and ReadWorkers.readahead fetches whole shard files
    into cache_dir ahead of use, as the in-process reader does, so the workers' reads find them there."""
    from bench.moto_counting import CountingMoto
    from cache_store.read_workers import ReadWorkers
    from kava_dist.loader import GlobalBatchPlan

    with CountingMoto(log_path=str(tmp_path / "moto.log")) as s3:
        url, so = s3.bucket_url(), s3.storage_options
        ids = _target_store(url, so, shards=4, rows=32, dims=(4, 4, 256, 64))   # K/V files > 1 MiB
        opts = {"cache_dir": str(tmp_path / "cache")}
        workers = []

        def in_workers(reader):
            workers.append(ReadWorkers(reader, processes=2))
            return workers[-1]

        try:
            n, requests, counts = _epoch_requests(s3, ids, lambda: StoreReader(url, storage_options=so, **opts),
                                                  lambda aligned: GlobalBatchPlan(len(aligned), 8, 4, 1, seed=0),
                                                  source=in_workers)
        finally:
            for w in workers:
                w.close()
    print(f"read workers, cache_dir: {requests} requests ({counts}) for {n} examples")
    assert requests <= n, counts
    assert any((tmp_path / "cache").rglob("*")), "no shard file was cached in cache_dir"

    with CountingMoto(log_path=str(tmp_path / "moto2.log")) as s3:   # readahead alone, before any read
        url, so = s3.bucket_url(), s3.storage_options
        _target_store(url, so, shards=4, rows=32, dims=(4, 4, 256, 64))
        cache = tmp_path / "cache2"
        with ReadWorkers(StoreReader(url, storage_options=so, cache_dir=str(cache)), processes=2) as w:
            w.readahead(np.arange(128), fields=["k", "v"])
            deadline = time.monotonic() + 30
            while len([f for f in cache.rglob("*") if f.is_file() and not f.name.startswith(".")]) < 8:
                assert time.monotonic() < deadline, "readahead did not fetch the 4 shards' k and v files"
                time.sleep(0.05)
            w.get_batch(np.arange(2), fields=["example_id"])     # each worker opens the store (metadata reads)
            s3.reset()
            w.get_batch(np.arange(128), fields=["k", "v"])
            assert s3.counts()["requests"] == {}, s3.counts()      # every k and v byte came from cache_dir


@pytest.mark.integration
def test_student_store_opening_with_cache_dir_reads_s3_once_per_example(tmp_path, monkeypatch) -> None:
    """The training job's store opening (kava_dist.targets.open_targets with store.cache_dir, then align_store and
    StoreLoader as the trainer builds them): one epoch costs at most 1 request per example on S3, and the resolved
    config saved with the run holds store.cache_dir / store.cache_bytes with the credentials still redacted.
    Without passing cache_dir on to the reader the same epoch costs ~2 requests per example (K/V shard files
    over 1 MiB are read by ranged GETs)."""
    import yaml

    from bench.moto_counting import CountingMoto
    from kava_dist import fingerprint
    from kava_dist.config import load_config, save_config
    from kava_dist.loader import plan_for
    from kava_dist.targets import open_targets

    monkeypatch.setattr(fingerprint, "cache_fingerprint", lambda cfg: ("fp", {}))   # _target_store's fingerprint
    with CountingMoto(log_path=str(tmp_path / "moto.log")) as s3:
        url, so = s3.bucket_url(), {**s3.storage_options, "secret": "kava-test-s3cr3t"}   # moto takes any
        ids = _target_store(url, so, shards=4, rows=32, dims=(4, 4, 256, 64))   # K/V files > 1 MiB: ranged reads
        cfg = load_config(None, [f"store.path={url}", f"store.cache_dir={tmp_path / 'nvme'}",
                                 f"store.cache_bytes={1 << 30}", "train.global_batch=8", "train.micro_batch=4"])
        cfg.store.storage_options = dict(so)
        n, requests, counts = _epoch_requests(s3, ids, lambda: open_targets(cfg),
                                              lambda aligned: plan_for(cfg.train, aligned, 1))
    print(f"open_targets, store.cache_dir set: {requests} requests ({counts}) for {n} examples")
    assert requests <= n, counts
    assert any((tmp_path / "nvme").rglob("*")), "no shard file was cached in store.cache_dir"

    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["store"]
    assert saved["cache_dir"] == str(tmp_path / "nvme") and saved["cache_bytes"] == 1 << 30
    assert "kava-test-s3cr3t" not in (tmp_path / "config.yaml").read_text()
