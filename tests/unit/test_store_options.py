"""store.* options of training reads: the local shard cache of a remote store (store.cache_dir / cache_bytes)."""
from __future__ import annotations

import pytest

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
