"""The build's knobs have one set of defaults: BuildConfig (kava) and the store builder's BuildSettings agree on
every field they share, and kava_dist.build passes each through."""
from __future__ import annotations

import dataclasses

from cache_store.builder import BuildSettings
from kava_dist.build import SETTINGS, build_settings
from kava_dist.config import BuildConfig, load_config


def test_shared_build_defaults_agree():
    ours, theirs = BuildConfig(), BuildSettings()
    assert {k: getattr(ours, k) for k in SETTINGS} == {k: getattr(theirs, v) for k, v in SETTINGS.items()}
    assert set(SETTINGS.values()) <= {f.name for f in dataclasses.fields(BuildSettings)}


def test_build_settings_pass_every_field_through():
    cfg = load_config(None, ["build.writers_per_actor=3", "build.writer_threads=5", "build.max_retries=7"])
    s = build_settings(cfg, num_actors=2, gpus_per_actor=1.0)
    assert (s.num_actors, s.num_gpus, s.writers(), s.writer_threads, s.max_retries) == (2, 1.0, 3, 5, 7)
    assert build_settings(load_config(None, []), 1, 1.0).writers() == 6      # 0 = 6 per GPU actor
    assert build_settings(load_config(None, []), 1, 0.0).writers() == 1      # and 1 per CPU actor
