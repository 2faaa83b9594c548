"""Hints name what a user runs or owns: a missing store -> the cache-build command for that path; a store built
from other data -> the file it was built from and the file the config reads, each with its hash."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from kava_testing import QUESTIONS


def write_data(path: Path, n: int) -> Path:
    rows = [{"question": q, "cot": c, "answer": a} for q, c, a in QUESTIONS[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_store_info_on_a_missing_store_names_the_build_command(tmp_path):
    from cache_store.cli import main

    missing = tmp_path / "no_store_here"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["info", str(missing)])
    text = err.getvalue()
    assert rc == 2
    assert f"python -m jobs.build_cache --config CONFIG store.path={missing}" in text, text
    assert "StoreWriter" not in text and "write_shard" not in text


def test_data_mismatch_names_the_files_and_their_hashes(tiny_paths, tmp_path):
    """The store records the files behind its fingerprint when it is built (meta/sources); training (and a
    rebuild at the same path) with another data file names both files and both hashes."""
    from cache_store.errors import FingerprintMismatch
    from cache_store.writer import StoreWriter
    from kava_dist.build import source_hint
    from kava_dist.fingerprint import cache_fingerprint, fingerprint_sources
    from kava_dist.targets import open_targets, store_spec
    from kava_testing import make_cfg

    built_from, other = write_data(tmp_path / "built.jsonl", 4), write_data(tmp_path / "other.jsonl", 5)
    store = tmp_path / "store"
    cfg_a = make_cfg(tiny_paths["llama"], **{"data.train_path": built_from, "store.path": store,
                                            "train.stage": "student"})
    digest_a, fields_a = cache_fingerprint(cfg_a)
    writer = StoreWriter.create_or_open(str(store), store_spec(cfg_a), digest_a, fields_a, num_shards=1)
    writer.put_meta("sources", fingerprint_sources(cfg_a))          # what jobs.build_cache records

    cfg_b = make_cfg(tiny_paths["llama"], **{"data.train_path": other, "store.path": store, "train.stage": "student"})
    digest_b, fields_b = cache_fingerprint(cfg_b)
    want = [str(built_from.resolve()), fields_a["data.train_sha"], str(other.resolve()), fields_b["data.train_sha"]]
    with pytest.raises(FingerprintMismatch) as train_err:
        open_targets(cfg_b)
    assert all(w in str(train_err.value) for w in want), str(train_err.value)

    with pytest.raises(FingerprintMismatch) as build_err:
        StoreWriter.create_or_open(str(store), store_spec(cfg_b), digest_b, fields_b, num_shards=1)
    hint = source_hint(build_err.value.differing, cfg_b)
    assert all(w in hint for w in want), hint


def test_store_sources_of_an_older_store_come_from_its_config():
    from kava_dist.fingerprint import store_sources

    meta = {"config": {"data": {"train_path": "data/train.jsonl"}, "model": {"name_or_path": "m"}}}
    assert store_sources(lambda name, default=None: meta.get(name, default))["data.train_path"] == "data/train.jsonl"
