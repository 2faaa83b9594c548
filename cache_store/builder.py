"""Ray build of a store: one coordinator, a pool of worker actors, one shard per task, retries, resume.

Generic over the work: the caller passes `make_processor` (a picklable zero-argument callable run once inside
each actor, e.g. one that loads a teacher model) whose result has `process(items) -> (arrays, info)`; `info` may
hold "tokens" (int) and "quarantined" (list of dicts: items that were dropped, with their error). This module
imports no model code.

Usage:
    from cache_store.builder import BuildSettings, build_store
    report = build_store(store_args, shards, make_processor, BuildSettings(num_actors=4, num_gpus=1))
    # store_args: dict(url=, spec=, fingerprint=, fingerprint_fields=, num_shards=, storage_options=)
    # shards: {shard_id: [item, ...]}; items must be picklable and expose .id (reported on failure)
    report.ok, report.failed, report.summary(), report.overlap_s

Each actor runs with max_concurrency = 1 + writes_in_flight and a compute lock: while shard i (and up to
writes_in_flight - 1 more) is written to the store, shard i+1 is computed, so I/O overlaps GPU work
(`report.overlap_s` measures it; `report.timeline` has every shard's compute and write interval;
`report.active_s` is the span from the first compute to the last write, the throughput window). A task
returns only once its shard is published. Shards already in the ledger
are skipped (resume). A task that raises is retried (any actor); an actor that dies is replaced (started in
the background, the others keep working), the claims it held are released and its in-flight shards retried;
after `max_retries` a shard is reported with its error and item ids and the build finishes everything else
before returning (`report.ok` is False). A shard claimed by another live writer (a second build on the same
store) is deferred, not failed. Quarantined items are recorded per shard in meta/quarantine.shard-NNNNNN.json
before the shard is published, so they survive a driver crash (`collect_quarantine` merges them).

Fault injection (tests), KAVA_BUILD_FAULT = comma-separated list of:
    kill_mid_write:SHARD   SIGKILL the actor after the first array of SHARD is written, once per
                           KAVA_BUILD_FAULT_DIR (a marker file makes it one-time)
    fail_shard:SHARD       raise in the processor step of SHARD, every time
    slow:SECONDS           sleep SECONDS inside the compute lock of every shard (a slow GPU)
KAVA_BUILD_FAULT, KAVA_BUILD_FAULT_DIR and CACHE_STORE_FAULT are forwarded from the driver to the actors.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

FORWARDED_ENV = ("KAVA_BUILD_FAULT", "KAVA_BUILD_FAULT_DIR", "CACHE_STORE_FAULT")


class BuildError(RuntimeError):
    """The build cannot go on (no actor can start); finished shards are kept."""


@dataclass
class BuildSettings:
    num_actors: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_retries: int = 3
    progress: bool = True
    writes_in_flight: int = 1
    """Shard writes an actor may have running while it computes the next shard."""
    actor_start_timeout_s: float = 900.0
    """An actor not started (scheduled + processor built) within this is an error naming its resources."""
    claim_retry_s: float = 30.0
    """Delay before retrying a shard that another live writer holds."""


@dataclass
class BuildReport:
    shards_total: int
    shards_skipped: int = 0
    shards_written: int = 0
    rows: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    startup_s: float = 0.0
    """Of `seconds`, the time until the first actor was ready (model load); rates exclude it."""
    active_s: float = 0.0
    """From the first shard's compute start to the last shard's write end (rates over the work itself)."""
    compute_s: float = 0.0
    write_s: float = 0.0
    overlap_s: float = 0.0
    retries: int = 0
    actors_replaced: int = 0
    failed: dict[int, dict] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self, timeline: bool = False) -> dict:
        keys = [k for k in self.__dataclass_fields__ if timeline or k != "timeline"]
        return {k: getattr(self, k) for k in keys} | {"ok": self.ok}

    @property
    def busy_s(self) -> float:
        return max(self.seconds - self.startup_s, 1e-9)

    def summary(self) -> str:
        s = self.busy_s
        return (f"{self.shards_written} shards written, {self.shards_skipped} already done, {len(self.failed)} failed; "
                f"{self.rows} examples ({self.rows / s:.1f}/s), {self.tokens} teacher tokens "
                f"({self.tokens / s:.0f}/s), "
                f"{self.bytes / 2**20:.1f} MiB written, {len(self.quarantined)} examples quarantined, "
                f"{self.retries} retries, {self.actors_replaced} actors replaced, {self.seconds:.1f} s "
                f"(actor start {self.startup_s:.1f} s, compute {self.compute_s:.1f} s, write {self.write_s:.1f} s, "
                f"overlapped {self.overlap_s:.1f} s)")


def _faults() -> dict[str, str]:
    out = {}
    for part in filter(None, os.environ.get("KAVA_BUILD_FAULT", "").split(",")):
        name, _, arg = part.strip().partition(":")
        out[name] = arg
    return out


def _arm_kill(shard_id: int) -> bool:
    """kill_mid_write: make the store writer SIGKILL this process after the shard's first array (once)."""
    arg = _faults().get("kill_mid_write")
    if arg is None or int(arg) != shard_id:
        return False
    marker = Path(os.environ.get("KAVA_BUILD_FAULT_DIR", "/tmp")) / f"kava_fault_shard{shard_id}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    os.environ["CACHE_STORE_FAULT"] = f"kill_after_first_array:{shard_id}"
    return True


def quarantine_meta_name(shard_id: int) -> str:
    return f"quarantine.shard-{shard_id:06d}"


class ShardWorker:
    """Ray actor body (wrapped with ray.remote in `build_store`)."""

    def __init__(self, make_processor: Callable[[], Any], store_args: dict):
        # Ray handles a failing actor constructor badly: catch and report through ready().
        self.error = None
        self.owner: dict = {}
        try:
            from cache_store.writer import StoreWriter

            self.writer = StoreWriter.create_or_open(**store_args)
            self.owner = dict(self.writer.claims.owner)
            self.proc = make_processor()
            self.lock = threading.Lock()
        except Exception:  # noqa: BLE001
            self.error = traceback.format_exc()

    def ready(self) -> dict:
        return {"error": self.error, "owner": self.owner}

    def run(self, shard_id: int, items: list) -> dict:
        from cache_store.errors import ShardClaimed

        if self.error:
            raise RuntimeError(f"actor failed to start:\n{self.error}")
        faults = _faults()
        with self.lock:                                    # one compute at a time; the write below overlaps
            t0 = time.time()
            if "slow" in faults:
                time.sleep(float(faults["slow"] or 1.0))
            if faults.get("fail_shard") not in (None, "") and int(faults["fail_shard"]) == shard_id:
                raise RuntimeError(f"KAVA_BUILD_FAULT fail_shard:{shard_id} (injected processor failure)")
            arrays, info = self.proc.process(items)
            t1 = time.time()
        quarantined = [dict(q, shard=shard_id) for q in info.get("quarantined", [])]
        if quarantined:                                    # before publishing: survives a crash of the driver
            self.writer.put_meta(quarantine_meta_name(shard_id), quarantined)
        armed = _arm_kill(shard_id)
        try:
            rec = self.writer.write_shard(shard_id, arrays)
        except ShardClaimed as e:
            return {"shard": shard_id, "claimed": str(e)}
        finally:
            if armed:
                os.environ.pop("CACHE_STORE_FAULT", None)
        t2 = time.time()
        return {"shard": shard_id, "rows": rec.rows, "bytes": rec.bytes, "tokens": int(info.get("tokens", 0)),
                "quarantined": quarantined, "actor": f"{self.owner.get('host')}:{os.getpid()}",
                "compute": (t0, t1), "write": (t1, t2)}


def _overlap(timeline: list[dict]) -> float:
    """Seconds during which an actor computed one shard while it wrote another."""
    total = 0.0
    by_actor: dict[str, list[dict]] = {}
    for r in timeline:
        by_actor.setdefault(r["actor"], []).append(r)
    for rows in by_actor.values():
        for a in rows:
            for b in rows:
                if a is not b:
                    lo, hi = max(a["write"][0], b["compute"][0]), min(a["write"][1], b["compute"][1])
                    total += max(0.0, hi - lo)
    return total


def _release_claim_of(writer, shard_id: int, owner: dict) -> None:
    """Release shard_id's claim if its newest generation is held by `owner` (an actor Ray reported dead).

    On one host the store takes over claims of dead pids by itself; across hosts it cannot tell, so the
    coordinator, which knows the actor died, releases them."""
    if not owner.get("uuid"):
        return
    try:
        if writer.claims.release_if_owned_by(shard_id, owner["uuid"]):
            log.info("shard %d: released the claim of dead actor %s:%s", shard_id, owner.get("host"), owner.get("pid"))
    except Exception as e:  # noqa: BLE001 - best effort; the claim then expires after its TTL
        log.warning("shard %d: could not release the dead actor's claim (%s); it expires after its TTL", shard_id, e)


def build_store(store_args: dict, shards: dict[int, list], make_processor: Callable[[], Any],
                settings: BuildSettings) -> BuildReport:
    import ray
    from ray.exceptions import RayError, RayTaskError
    from tqdm.auto import tqdm

    from cache_store.writer import StoreWriter

    writer = StoreWriter.create_or_open(**store_args)
    done = set(writer.done_shards())
    todo = [s for s in sorted(shards) if s not in done]
    report = BuildReport(shards_total=len(shards), shards_skipped=len(shards) - len(todo))
    if not todo:
        return report
    depth = 1 + max(1, settings.writes_in_flight)       # tasks per actor: one computing, the others writing
    opts: dict[str, Any] = dict(num_gpus=settings.num_gpus, num_cpus=settings.num_cpus, max_concurrency=depth,
                                max_restarts=0)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    Actor = ray.remote(ShardWorker).options(**opts)
    n_actors = max(1, min(settings.num_actors, len(todo)))
    start_budget = n_actors + settings.max_retries          # actors that may die before they are ready

    actors: list = []                            # started, in the pool
    owners: dict[int, dict] = {}                 # id(actor) -> claim owner
    starting: dict[Any, tuple[Any, float]] = {}  # ready future -> (actor, started at)
    load: dict[int, int] = {}

    def spawn():
        """Start an actor in the background. Deaths mid-shard are bounded by the shards' retries; deaths while
        starting by `start_budget`."""
        a = Actor.remote(make_processor, store_args)
        starting[a.ready.remote()] = (a, time.time())

    for _ in range(n_actors):
        spawn()
    queue = list(todo)
    deferred: list[tuple[float, int]] = []       # (not before, shard): claimed by another live writer
    attempts: dict[int, int] = {}
    inflight: dict[Any, tuple[int, Any]] = {}    # future -> (shard, actor)
    examples_todo = sum(len(shards[s]) for s in todo)
    t_start = time.time()
    tty = sys.stderr.isatty()
    bar = tqdm(total=examples_todo, desc="cache build", unit="ex", disable=not settings.progress,
               dynamic_ncols=True, mininterval=0.5 if tty else 15.0)

    def submit():
        now = time.time()
        for item in [d for d in deferred if d[0] <= now]:
            deferred.remove(item)
            queue.append(item[1])
        for a in list(actors):
            while queue and load[id(a)] < depth:
                s = queue.pop(0)
                inflight[a.run.remote(s, shards[s])] = (s, a)
                load[id(a)] += 1

    def retry(s: int, err: str):
        attempts[s] = attempts.get(s, 0) + 1
        last = err.strip().splitlines()[-1] if err.strip() else "?"
        if attempts[s] <= settings.max_retries:
            report.retries += 1
            queue.append(s)
            log.warning("shard %d failed (attempt %d/%d), retrying: %s", s, attempts[s], settings.max_retries + 1, last)
        else:
            report.failed[s] = {"error": err[-4000:], "attempts": attempts[s],
                                "item_ids": [getattr(i, "id", None) for i in shards[s]]}
            bar.update(len(shards[s]))
            log.error("shard %d failed %d times; giving up on it (the others go on): %s", s, attempts[s], last)

    def replace(actor):
        if actor in actors:                      # replace a dead actor once; its other shards fail too
            actors.remove(actor)
            ray.kill(actor, no_restart=True)
            report.actors_replaced += 1
            spawn()

    try:
        while queue or inflight or deferred:
            submit()
            waitables = list(inflight) + list(starting)
            if not waitables:
                if not actors:
                    raise BuildError("no build actor is alive or starting; nothing can run the remaining shards")
                time.sleep(max(0.05, min(d[0] for d in deferred) - time.time()) if deferred else 0.05)
                continue
            ready, _ = ray.wait(waitables, num_returns=1, timeout=5.0)
            if not ready:
                for fut, (a, t0) in list(starting.items()):
                    if time.time() - t0 > settings.actor_start_timeout_s and not actors and not inflight:
                        raise BuildError(
                            f"no build actor started within {settings.actor_start_timeout_s:.0f}s; the cluster may "
                            f"lack the resources one needs (num_gpus={settings.num_gpus}, num_cpus={settings.num_cpus})"
                            ": check `ray status`, or lower build.gpus_per_actor / build.cpus_per_actor")
                continue
            fut = ready[0]
            if fut in starting:
                a, _ = starting.pop(fut)
                try:
                    info = ray.get(fut)
                except RayError as e:            # died while starting (e.g. out of memory): try another one
                    start_budget -= 1
                    if start_budget <= 0:
                        raise BuildError(
                            f"build actors kept dying while starting; the last one: {str(e)[-3000:]}\nSee the "
                            "actor logs (`ray logs`, the dashboard), e.g. out of memory or a module the workers "
                            "cannot import (run with `ray job submit --working-dir .`)") from e
                    log.warning("a build actor died while starting; starting another: %s", str(e)[-1500:])
                    spawn()
                    continue
                if info["error"]:
                    raise BuildError(f"a build actor failed to start (fix the cause and rerun):\n{info['error']}")
                actors.append(a)
                owners[id(a)], load[id(a)] = info["owner"], 0
                if not report.startup_s:
                    report.startup_s = time.time() - t_start
                    bar.reset(total=examples_todo)          # rates and ETA from here, not from the model load
                continue
            s, actor = inflight.pop(fut)
            load[id(actor)] = load.get(id(actor), 1) - 1
            try:
                res = ray.get(fut)
            except RayTaskError as e:            # the processor or the write raised: the actor is fine
                retry(s, str(e))
            except RayError:                     # the actor died (killed, OOM, node lost)
                _release_claim_of(writer, s, owners.get(id(actor), {}))
                replace(actor)
                retry(s, traceback.format_exc())
            else:
                if "claimed" in res:
                    log.warning("shard %d is held by another live writer; retrying in %.0fs: %s", s,
                                settings.claim_retry_s, res["claimed"])
                    deferred.append((time.time() + settings.claim_retry_s, s))
                    continue
                report.shards_written += 1
                report.rows += res["rows"]
                report.bytes += res["bytes"]
                report.tokens += res["tokens"]
                report.quarantined.extend(res["quarantined"])
                report.compute_s += res["compute"][1] - res["compute"][0]
                report.write_s += res["write"][1] - res["write"][0]
                report.timeline.append({k: res[k] for k in ("shard", "actor", "compute", "write")})
                el = max(time.time() - t_start - report.startup_s, 1e-9)
                bar.set_postfix_str(f"shards {report.shards_written + report.shards_skipped}/{report.shards_total}, "
                                    f"{report.tokens / el:,.0f} tok/s", refresh=False)
                bar.update(len(shards[s]))
    finally:
        bar.close()
        for a in actors + [a for a, _ in starting.values()]:
            ray.kill(a, no_restart=True)
    report.seconds = time.time() - t_start
    report.overlap_s = _overlap(report.timeline)
    if report.timeline:
        report.active_s = (max(r["write"][1] for r in report.timeline)
                           - min(r["compute"][0] for r in report.timeline))
    return report


def collect_quarantine(writer) -> list[dict]:
    """Every published shard's quarantined items (meta/quarantine.shard-*.json), in shard order."""
    done = set(writer.done_shards())
    out: list[dict] = []
    names = sorted(n for n in writer.backend.list("meta") if n.startswith("quarantine.shard-"))
    for n in names:
        shard = int(n[len("quarantine.shard-"):].split(".")[0])
        if shard in done:
            out.extend(writer.get_meta(n[: -len(".json")], []))
    return out
