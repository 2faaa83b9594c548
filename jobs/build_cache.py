"""Cache build: teacher forward + R-KV eviction of every training example into a Zarr store, on Ray.

Usage:
    python -m jobs.build_cache --config configs/paper/llama1b_aug.yaml model.teacher_adapter=runs/t/adapter
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.build_cache --config configs/paper/llama1b_aug.yaml store.path=s3://bucket/kava/llama1b_aug

Plans shards from the data (contiguous chunks, sorted by length inside), skips the shards the store's ledger
already has (so a rerun resumes), and runs one teacher actor per GPU (`build.num_actors`, `build.gpus_per_actor`;
one CPU actor when the cluster has no GPU). Exits 1 if a shard failed after its retries (the others are done).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("jobs.build_cache")


def init_ray(cfg) -> dict:
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.build.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        kwargs = {"include_dashboard": False}
        if cfg.build.object_store_mb:
            kwargs["object_store_memory"] = cfg.build.object_store_mb << 20
        ray.init(**kwargs)
    return ray.cluster_resources()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from cache_store.builder import BuildSettings, build_store
    from cache_store.reader import StoreReader
    from cache_store.writer import StoreWriter
    from kava_dist.backbone import load_tokenizer
    from kava_dist.config import load_config, to_dict
    from kava_dist.fingerprint import cache_fingerprint
    from kava_dist.prompts import add_special_tokens, encode_examples, load_examples
    from kava_dist.targets import TeacherTargets, plan_shards, store_spec

    cfg = load_config(args.config, args.overrides)
    if not cfg.store.path:
        raise SystemExit("store.path is empty: say where the store goes (a local dir or s3://bucket/prefix).")
    tok = load_tokenizer(cfg.model)
    add_special_tokens(tok)
    d = cfg.data
    examples, report = load_examples(d.train_path, d.cot_style, d.numeric_answer, d.limit)
    encoded, report = encode_examples(examples, tok, d.answer_prompt, d.drop_last_step, d.max_tokens, report)
    log.info("data: %s", report.summary())
    digest, fields = cache_fingerprint(cfg)
    spec = store_spec(cfg)
    shards = plan_shards(encoded, spec.shard_size)
    store_args = dict(url=cfg.store.path, spec=spec, fingerprint=digest, fingerprint_fields=fields,
                      num_shards=len(shards), storage_options=cfg.store.storage_options or None)
    writer = StoreWriter.create_or_open(**store_args)     # refuses another fingerprint, naming the fields
    writer.put_meta("data_report", report.to_dict())
    writer.put_meta("config", to_dict(cfg))
    resources = init_ray(cfg)
    gpus = int(resources.get("GPU", 0))
    per = cfg.build.gpus_per_actor if gpus else 0.0
    n_actors = cfg.build.num_actors or (max(1, int(gpus // per)) if per else 1)
    log.info("store %s: %d examples in %d shards of %d (%d already done); %d actor(s), %.2g GPU each; fingerprint %s",
             cfg.store.path, len(encoded), len(shards), spec.shard_size, len(writer.done_shards()), n_actors, per, digest)
    settings = BuildSettings(num_actors=n_actors, num_gpus=per, num_cpus=cfg.build.cpus_per_actor,
                             max_retries=cfg.build.max_retries)
    result = build_store(store_args, shards, functools.partial(TeacherTargets, to_dict(cfg)), settings)
    writer.put_meta("build_report", result.to_dict())
    if result.quarantined:
        writer.put_meta("quarantine", result.quarantined)
    stats = StoreReader(cfg.store.path, storage_options=cfg.store.storage_options or None).stats()
    log.info("build: %s", result.summary())
    log.info("store: %s", json.dumps(stats, default=str))
    if not result.ok:
        log.error("%d shard(s) failed: %s. Fix the cause and rerun the same command: finished shards are kept.",
                  len(result.failed), sorted(result.failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
