"""store.* options of training reads: the local shard cache of a remote store (store.cache_dir / cache_bytes)."""
from __future__ import annotations

import pytest
import torch

from kava_dist.config import ConfigError, describe, load_config


def test_cache_bytes_without_cache_dir_is_refused_naming_the_fix():
    with pytest.raises(ConfigError, match="store.cache_dir is empty"):
        load_config(None, ["store.cache_bytes=1000000"])
    with pytest.raises(ConfigError, match="store.cache_bytes=-1 must be >= 0"):
        load_config(None, ["store.cache_dir=/tmp/c", "store.cache_bytes=-1"])
    cfg = load_config(None, ["store.cache_dir=/nvme/kava", "store.cache_bytes=5000000000"])
    assert (cfg.store.cache_dir, cfg.store.cache_bytes) == ("/nvme/kava", 5_000_000_000)
    off = load_config(None)
    assert (off.store.cache_dir, off.store.cache_bytes) == ("", 0)                 # off by default
    text = " ".join(describe().split())
    assert "store.cache_dir = ''" in text and "shared by the node's ranks" in text


def test_new_stores_default_to_zstd_level_1_and_old_blosc_stores_still_train(tmp_path, monkeypatch):
    """zstd:1 is the codec of a new store; the codec is not in the fingerprint, so a store built with the old
    default (blosc-zstd:1) is opened by training with the new defaults and read with its own recorded codec."""
    from cache_store import CodecSpec, StoreReader, StoreWriter
    from cache_store.errors import SpecMismatch
    from kava_dist import fingerprint
    from kava_dist.targets import store_spec
    from kava_dist.targets import open_targets

    monkeypatch.setattr(fingerprint, "tokenizer_digest", lambda cfg: "tok")      # no model needed
    dims = (2, 2, 8, 16)
    new = load_config(None, ["latent.num_latents=3", "store.shard_examples=4"])
    old = load_config(None, ["latent.num_latents=3", "store.shard_examples=4", "store.codec=blosc-zstd",
                             "store.clevel=1"])
    assert (new.store.codec, new.store.clevel) == ("zstd", 1)
    assert store_spec(new, dims=dims).codec == CodecSpec("zstd", clevel=1)
    assert fingerprint.cache_fingerprint(new) == fingerprint.cache_fingerprint(old)

    digest, fields = fingerprint.cache_fingerprint(old)
    w = StoreWriter.create_or_open(str(tmp_path / "s"), store_spec(old, dims=dims), digest, fields, num_shards=1)
    g = torch.Generator().manual_seed(0)
    k = torch.randn(4, 2, 2, 3, 8, generator=g).bfloat16()
    w.write_shard(0, {"k": k, "v": -k, "valid": torch.ones(4, 2, 2, 3, dtype=torch.bool),
                      "codi_h": torch.randn(4, 2, 16, generator=g).bfloat16(),
                      "index": torch.zeros(4, 2, 2, 3, dtype=torch.int16), "example_id": torch.arange(4),
                      "cot_len": torch.ones(4, dtype=torch.int32)})
    new.store.path = w.url
    reader = open_targets(new)                                              # the training side: accepted
    assert reader.spec.codec == CodecSpec("blosc-zstd", clevel=1)
    assert torch.equal(reader.get_batch([2, 0])["k"].view(torch.int16), k[[2, 0]].view(torch.int16))
    assert isinstance(StoreReader(w.url), StoreReader)
    with pytest.raises(SpecMismatch, match=r"Only the codec differs: write with the store.s own \(codec blosc-zstd, clevel 1\)"):
        StoreWriter.create_or_open(w.url, store_spec(new, dims=dims), digest, fields, num_shards=1)


def test_resume_accepts_new_store_write_and_cache_options():
    """A run saved before the codec default changed (or without a local shard cache) resumes: how new stores are
    written and where shard files are cached do not change what training reads."""
    from kava_dist.config import load_config
    from kava_dist.engine import config_diff

    saved = load_config(None, ["store.codec=blosc-zstd", "store.clevel=1"])
    now = load_config(None, ["store.codec=zstd", "store.clevel=3", "store.cache_dir=/tmp/shards",
                             "store.cache_bytes=1000000"])
    assert config_diff(saved, now) == []
    assert config_diff(saved, load_config(None, ["store.codec=blosc-zstd", "store.dtype=int8"])) == [
        "store.dtype: 'bf16' -> 'int8'"]
