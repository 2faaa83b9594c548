"""Every experiment plan in configs/experiments resolves, and each student reads a store one of its cache jobs builds
with the same cache fingerprint (a mismatch would otherwise surface only on the GPU, minutes into the run)."""
from __future__ import annotations

from pathlib import Path

import pytest

from kava_dist import fingerprint
from kava_dist.config import load_config
from kava_dist.schedule import load_plan

ROOT = Path(__file__).resolve().parents[2]
PLANS = sorted(p for p in (ROOT / "configs" / "experiments").rglob("*.yaml") if "jobs:" in p.read_text())


def _config(argv: list[str]):
    i = argv.index("--config")
    return load_config(ROOT / argv[i + 1], [a for a in argv[i + 2:] if "=" in a])


def _fields(cfg, monkeypatch) -> dict:
    """The cache fingerprint's fields with the file digests left out (models, data and adapters are absent here)."""
    monkeypatch.setattr(fingerprint, "path_digest", lambda *a, **k: "")
    monkeypatch.setattr(fingerprint, "tokenizer_digest", lambda cfg: "")
    return fingerprint.cache_fingerprint_fields(cfg)


def test_there_are_plans():
    assert any(p.name == "whole_chain.yaml" for p in PLANS)


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_students_read_a_store_their_plan_builds_with_the_same_fingerprint(plan, monkeypatch):
    _, _, jobs = load_plan(plan, ["device=cpu"], [])
    stores = {}
    for j in jobs:
        if j.kind == "cache":
            cfg = _config(j.argv)
            stores[cfg.store.path] = (j.name, _fields(cfg, monkeypatch))
    for j in jobs:
        if j.kind != "train":
            continue
        cfg = _config(j.argv)                                   # every train job's config resolves
        if cfg.train.stage != "student":
            continue
        assert cfg.store.path in stores, f"{plan.name}: {j.name} reads {cfg.store.path}, which no cache job builds"
        builder, want = stores[cfg.store.path]
        got = _fields(cfg, monkeypatch)
        diff = {k: (want.get(k), got.get(k)) for k in set(want) | set(got) if want.get(k) != got.get(k)}
        assert not diff, f"{plan.name}: {j.name} and {builder} differ in the cache fingerprint: {diff}"
