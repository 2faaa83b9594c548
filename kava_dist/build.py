"""Cache build as a library call: teacher forward + R-KV eviction of every training example into a Zarr store, on
Ray. `jobs/build_cache.py` is its command line.

Usage:
    from kava_dist.build import build_targets
    report = build_targets(cfg)          # raises Refusal, FingerprintMismatch, SpecMismatch, ... (one-line fixes)
    print(report.summary); sys.exit(report.exit_code)     # 0: store complete; 1: a shard or a report failed

Plans shards from the data (contiguous chunks, sorted by length inside), skips the shards the store's ledger
already has (so a rerun resumes), and runs one teacher actor per GPU (`build.num_actors`, `build.gpus_per_actor`;
one CPU actor when the cluster has no GPU). A progress bar shows examples/s with ETA, teacher tokens/s and shards
done/total; the report holds a summary (examples, tokens, bytes, compression, wall time, examples skipped and
why). Reports go to the store's meta/: data_report, build_report, quarantine, config (credentials masked),
sources (the files behind the fingerprint). See docs/CACHE_BUILD.md.

Ray: `build.ray_address` / $RAY_ADDRESS (set by `ray job submit`), a connection the caller made, or a local Ray
on loopback started here (with a token of its own, `local_auth_token`).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from cache_store._util import format_bytes
from kava_dist.config import KavaConfig
from kava_dist.guard import Refusal

log = logging.getLogger(__name__)
REFUSED_OS = (FileNotFoundError, FileExistsError, NotADirectoryError)   # already one-line refusals


@dataclass
class BuildReport:
    """What one `build_targets` call did: the store builder's report, the store's stats, the summary text, and
    whether every report under meta/ was written and the driver's ledger has every shard."""

    shards: object                     # cache_store.builder.BuildReport (shards written, skipped, failed, times)
    stats: dict = field(default_factory=dict)
    summary: str = ""
    meta_ok: bool = True
    missing: int = 0                   # shards the driver's ledger lacks although the writers reported them

    @property
    def ok(self) -> bool:
        return self.shards.ok and self.meta_ok and not self.missing

    @property
    def exit_code(self) -> int:
        """0 = store complete; 1 = some shard or report failed (rerun the same command after fixing the cause)."""
        return 0 if self.ok else 1


def init_ray(cfg: KavaConfig) -> dict:
    """Join `build.ray_address` / $RAY_ADDRESS (set by `ray job submit`), reuse a connection made by the caller,
    or start a local Ray on loopback. Returns the cluster's resources."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.build.ray_address or os.environ.get("RAY_ADDRESS") or None
    if not address:     # a local Ray: every socket on 127.0.0.1 (read by Ray at import)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        local_auth_token()
    import ray

    if ray.is_initialized():
        pass
    elif address:
        ray.init(address=address, log_to_driver=True)
    else:
        kwargs = {"include_dashboard": False}
        if cfg.build.object_store_mb:
            kwargs["object_store_memory"] = cfg.build.object_store_mb << 20
        ray.init(address="local", **kwargs)     # a new Ray, never a cluster that happens to run on this host
    return ray.cluster_resources()


def local_auth_token() -> None:
    """A local Ray keeps Ray's default token auth, with a token of its own in this process's environment (its Ray
    processes inherit it). Without one, Ray would write a new ~/.ray/auth_token, and every later `ray start` on
    this host would then require that token from `ray job submit`. A token the user configured (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token) or RAY_AUTH_MODE=disabled is left as it is."""
    if (os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN")
            or os.environ.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").exists()):
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def source_hint(differing: dict, cfg: KavaConfig) -> str:
    """For differing content hashes (data, weights, teacher adapter): the file the store was built from and the
    file this config reads, each with its hash."""
    from cache_store.errors import StoreNotFound
    from cache_store.reader import StoreReader
    from kava_dist.fingerprint import SOURCES, diff_fields, fingerprint_sources, store_sources

    keys = [k for k in differing if k in SOURCES]
    if not keys:
        return ""
    try:
        built = store_sources(StoreReader(cfg.store.path, storage_options=cfg.store.storage_options or None).get_meta)
    except (StoreNotFound, OSError, ValueError):
        built = {}
    diff = diff_fields({k: differing[k][0] for k in keys}, {k: differing[k][1] for k in keys}, built,
                       fingerprint_sources(cfg))
    return "Files: " + "; ".join(diff) + "."


def put_meta_safe(writer, name: str, obj) -> bool:
    """writer.put_meta, but a full disk (or another write error) is logged naming the path, not fatal: the
    build's other reports are still written where space allows. Returns whether it was written."""
    try:
        writer.put_meta(name, obj)
        return True
    except OSError as e:
        log.error("could not write meta/%s.json: %s", name, e)
        return False


def summary_text(result, stats: dict, data_report: dict, quarantined: list[dict], wall_s: float) -> str:
    """The end-of-build summary (also stored as meta/build_report.json's "summary")."""
    skipped = data_report.get("skipped", {})
    why = "; ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none"
    ratio = stats.get("compression_ratio")
    span = result.active_s or result.busy_s          # first compute -> last write (model load excluded)
    size = f"{format_bytes(stats['bytes_on_disk'])} on disk, {format_bytes(stats['raw_bytes'])} raw"
    lines = [
        "cache build summary",
        f"  store           {stats['url']} (fingerprint {stats['fingerprint']})",
        f"  shards          {stats['shards_done']}/{stats['shards_total']} done: {result.shards_written} written now, "
        f"{result.shards_skipped} already done, {len(result.failed)} failed",
        f"  examples        {stats['rows']} stored ({result.rows} now, {result.rows / span:.1f}/s"
        + (f", {result.steady_rows_per_s:.1f}/s between first and last publish" if result.steady_rows_per_s else "")
        + f"); "
        f"{data_report.get('rows', '?')} rows read, {data_report.get('kept', '?')} kept",
        f"  skipped         {sum(skipped.values())} by the data check ({why}); {len(quarantined)} quarantined by the "
        f"teacher (meta/quarantine.json)",
        f"  teacher tokens  {result.tokens} ({result.tokens / span:,.0f}/s)",
        f"  bytes           {size}" + (f", compression {ratio:.2f}x" if ratio else ""),
        f"  wall time       {wall_s:.1f} s (build {result.seconds:.1f} s: actor start {result.startup_s:.1f} s, "
        f"shards {span:.1f} s; compute {result.compute_s:.1f} s, write {result.write_s:.1f} s, of it "
        f"{result.overlap_s:.1f} s overlapped with compute)",
        f"  failures        {result.retries} retries, {result.actors_replaced} actors replaced",
    ]
    lines += [f"  {t}" for t in result.lost_node_lines()]
    for s, f in sorted(result.failed.items()):
        last = f["error"].strip().splitlines()[-1] if f["error"].strip() else "?"
        lines.append(f"  FAILED shard {s} after {f['attempts']} attempts: {last}; example ids {f['item_ids']}")
    return "\n".join(lines)


# BuildConfig field -> the store builder's BuildSettings field (same meaning, same default: a unit test holds them
# equal; the rule for 0 write actors lives in BuildSettings.writers)
SETTINGS = {"cpus_per_actor": "num_cpus", "max_retries": "max_retries", "writes_in_flight": "writes_in_flight",
            "writers_per_actor": "writers_per_actor", "writer_threads": "writer_threads",
            "cpus_per_writer": "cpus_per_writer"}


def build_settings(cfg: KavaConfig, num_actors: int, gpus_per_actor: float):
    """The store builder's settings from `build.*` (SETTINGS) and the planned actor pool (`plan_actors`)."""
    from cache_store.builder import BuildSettings

    return BuildSettings(num_actors=num_actors, num_gpus=gpus_per_actor,
                         **{theirs: getattr(cfg.build, ours) for ours, theirs in SETTINGS.items()})


def build_targets(cfg: KavaConfig) -> BuildReport:
    """Build (or finish) the store at cfg.store.path. Raises a one-line error naming the fix when nothing can be
    built (no store.path, a bad data file, no example left, a store of another config, no actor can start)."""
    from cache_store.builder import BuildError
    from cache_store.builder import BuildReport as ShardsReport
    from cache_store.builder import build_store, collect_quarantine
    from cache_store.errors import FingerprintMismatch
    from cache_store.reader import StoreReader
    from cache_store.writer import StoreWriter
    from kava_dist.backbone import load_tokenizer
    from kava_dist.config import to_dict
    from kava_dist.fingerprint import cache_fingerprint, fingerprint_sources
    from kava_dist.guard import redact
    from kava_dist.prompts import add_special_tokens, check_data_file, load_training_set
    from kava_dist.targets import TeacherTargets, plan_actors, plan_shards, store_spec

    t0 = time.time()
    if not cfg.store.path:
        raise Refusal("store.path is empty: say where the store goes (a local dir or s3://bucket/prefix).")
    check_data_file(cfg.data.train_path)
    tok = load_tokenizer(cfg.model)
    add_special_tokens(tok)
    encoded, report = load_training_set(cfg.data, tok)
    log.info("data: %s", report.summary())
    if not encoded:
        raise Refusal(f"no example left after the data check ({report.summary()}); check data.train_path / "
                      "data.max_tokens")
    digest, fields = cache_fingerprint(cfg)
    spec = store_spec(cfg)
    shards = plan_shards(encoded, spec.shard_size)
    so = cfg.store.storage_options or None
    store_args = dict(url=cfg.store.path, spec=spec, fingerprint=digest, fingerprint_fields=fields,
                      num_shards=len(shards), storage_options=so)
    try:
        writer = StoreWriter.create_or_open(**store_args)
    except FingerprintMismatch as e:
        hint = source_hint(e.differing, cfg)
        raise FingerprintMismatch(f"{e} {hint}".strip(), e.differing) from None
    except OSError as e:
        if isinstance(e, REFUSED_OS):
            raise
        raise Refusal(str(e)) from None
    meta_ok = put_meta_safe(writer, "data_report", report.to_dict())
    meta_ok &= put_meta_safe(writer, "config", redact(to_dict(cfg)))
    if writer.get_meta("sources") is None:      # the files behind the fingerprint's hashes, as built
        meta_ok &= put_meta_safe(writer, "sources", fingerprint_sources(cfg))
    done = writer.done_shards()
    if len(done) == len(shards):
        log.info("store %s is already complete (%d shards); nothing to compute", cfg.store.path, len(shards))
        result = ShardsReport(shards_total=len(shards), shards_skipped=len(shards))
    else:
        resources = init_ray(cfg)
        try:
            n_actors, per = plan_actors(resources, cfg.build)
        except ValueError as e:
            raise Refusal(str(e)) from None
        settings = build_settings(cfg, n_actors, per)
        log.info("store %s: %d examples in %d shards of %d (%d already done); %d teacher actor(s), %g GPU and %g CPU "
                 "each, %d write actors each; fingerprint %s", cfg.store.path, len(encoded), len(shards),
                 spec.shard_size, len(done), n_actors, per, cfg.build.cpus_per_actor, settings.writers(),
                 digest)
        try:
            result = build_store(store_args, shards, functools.partial(TeacherTargets, to_dict(cfg)), settings)
        except BuildError as e:
            raise Refusal(str(e)) from None
    quarantined = collect_quarantine(writer)
    meta_ok &= put_meta_safe(writer, "quarantine", quarantined)
    stats = StoreReader(cfg.store.path, storage_options=so).stats()
    text = summary_text(result, stats, report.to_dict(), quarantined, time.time() - t0)
    if result.shards_written or result.failed:       # a rerun on a complete store keeps the last real report
        meta_ok &= put_meta_safe(writer, "build_report", result.to_dict() | {"summary": text, "store": stats})
    log.info("store stats: %s", json.dumps({k: v for k, v in stats.items() if k != "fields"}, default=str))
    if not meta_ok:
        log.error("some reports under %s/meta could not be written (see above); free space and rerun the same "
                  "command: finished shards are kept.", cfg.store.path)
    if not result.ok:
        log.error("%d shard(s) failed: %s (errors and example ids in meta/build_report.json). Fix the cause and "
                  "rerun the same command: finished shards are kept.", len(result.failed), sorted(result.failed))
    missing = len(shards) - len(writer.done_shards())     # the driver's own ledger decides, not the writers' word
    if result.ok and missing:
        log.error("the writers reported every shard published, but the ledger at %s (as this driver sees it) lacks %d "
                  "of %d: the store path is not the same storage on every node; use a shared filesystem mounted at "
                  "the same path, or s3://bucket/prefix, and rerun.", cfg.store.path, missing, len(shards))
    return BuildReport(result, stats, text, meta_ok, missing if result.ok else 0)
