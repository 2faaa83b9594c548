"""Shared fixtures: tiny random Llama/Qwen2 checkpoints (char tokenizer) and small batches. No network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # keep every Ray socket on loopback

from kava_testing import QUESTIONS, SHARED_DATA, build, make_batch, make_cfg  # noqa: F401,E402


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: needs Ray / several processes / a moto server")
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run on a CUDA machine)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here; run tests/gpu on a CUDA machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    from kava_dist.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {
        "llama": save_tiny_checkpoint(root / "llama", family="llama", hidden_size=64, num_layers=2,
                                      num_heads=4, num_kv_heads=2),
        "qwen2": save_tiny_checkpoint(root / "qwen2", family="qwen2", hidden_size=64, num_layers=3,
                                      num_heads=4, num_kv_heads=1),
    }


@pytest.fixture(params=["llama", "qwen2"])
def family(request):
    return request.param
