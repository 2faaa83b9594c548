"""cache_store.read_workers: StoreReader.get_batch served by worker processes gives the same bytes, and its
failures reach the caller."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import torch

from cache_store import CodecSpec, FieldSpec, StoreReader, StoreSpec, StoreWriter
from cache_store.read_workers import ReadWorkers


def _store(tmp_path, quant=None):
    spec = StoreSpec(fields=(FieldSpec("k", (2, 3, 4, 8), "bfloat16", quant=quant,
                                       quant_reduce_axes=(2,) if quant else ()),
                             FieldSpec("valid", (2, 3, 4), "bool"), FieldSpec("codi_h", (2, 16), "bfloat16"),
                             FieldSpec("example_id", (), "int64")), shard_size=8, codec=CodecSpec("zstd", clevel=1))
    w = StoreWriter.create_or_open(str(tmp_path / f"s_{quant}"), spec, "fp", {}, num_shards=3)
    g = torch.Generator().manual_seed(0)
    for s in range(3):
        n = 8 if s < 2 else 5
        w.write_shard(s, {"k": torch.randn(n, 2, 3, 4, 8, generator=g).bfloat16(),
                          "valid": torch.rand(n, 2, 3, 4, generator=g) > 0.3,
                          "codi_h": torch.randn(n, 2, 16, generator=g).bfloat16(),
                          "example_id": torch.arange(n) + 100 * s})
    return StoreReader(w.url)


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].contiguous().view(-1).view(torch.uint8), b[k].contiguous().view(-1).view(torch.uint8)), k


@pytest.mark.parametrize("quant", [None, "int8"])
def test_workers_return_what_the_reader_returns(tmp_path, quant):
    reader = _store(tmp_path, quant)
    rows = np.array([20, 3, 3, 0, 17, 9, 11, 4, 12])                    # any order, repeats, across shards
    with ReadWorkers(reader, processes=2) as workers:
        for kw in ({}, {"fields": ["k", "example_id"]}, {"dequantize": False}):
            _same(reader.get_batch(rows, **kw), workers.get_batch(rows, **kw))
        _same(reader.get_batch(rows[:1]), workers.get_batch(rows[:1]))  # fewer rows than workers
        assert workers.get_batch(rows, fields=["example_id"])["example_id"].tolist() == \
            reader.get_batch(rows, fields=["example_id"])["example_id"].tolist()


def test_a_workers_error_reaches_the_caller_with_its_type(tmp_path):
    reader = _store(tmp_path)
    with ReadWorkers(reader, processes=2) as workers:
        with pytest.raises(type(_error(reader))):
            workers.get_batch(np.array([0, 999]))
        _same(reader.get_batch(np.array([1, 2])), workers.get_batch(np.array([1, 2])))   # still serving


def _error(reader) -> BaseException:
    try:
        reader.get_batch(np.array([0, 999]))
    except Exception as e:   # the in-process reader's error for a row past the end
        return e
    raise AssertionError("reading row 999 of a 21-row store did not fail")


def test_a_dead_worker_is_reported_with_the_fix(tmp_path):
    reader = _store(tmp_path)
    workers = ReadWorkers(reader, processes=2)
    try:
        workers.get_batch(np.array([0, 1]))
        victim = workers._procs[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        with pytest.raises(RuntimeError, match="train.loader_read_processes=0"):
            workers.get_batch(np.arange(8))
    finally:
        workers.close()
    assert not any(p.is_alive() for p in workers._procs)


def test_bad_process_count_names_the_setting(tmp_path):
    with pytest.raises(ValueError, match="train.loader_read_processes"):
        ReadWorkers(_store(tmp_path), processes=0)
