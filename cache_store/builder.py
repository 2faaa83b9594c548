"""Ray build of a store: one coordinator, a pool of worker actors, one shard per task, retries, resume.

Generic over the work: the caller passes `make_processor` (a picklable zero-argument callable run once inside
each actor, e.g. one that loads a teacher model) whose result has `process(items) -> (arrays, info)`. This
module imports no model code.

Usage:
    from cache_store.builder import BuildSettings, build_store
    report = build_store(store_args, shards, make_processor, BuildSettings(num_actors=4, num_gpus=1))
    # store_args: dict(url=, spec=, fingerprint=, fingerprint_fields=, num_shards=, storage_options=)
    # shards: {shard_id: [item, ...]}; items must be picklable and expose .id (reported on failure)
    report.ok, report.failed, report.summary()

Each actor runs with max_concurrency=2 and a compute lock: while shard i is written to the store, shard i+1
is computed, so I/O overlaps GPU work; a task returns only once its shard is published. Shards already in the
ledger are skipped (resume). A task that raises is retried (any actor); an actor that dies is replaced and its
in-flight shards retried; after `max_retries` a shard is reported with its error and item ids and the build
finishes everything else before returning (`report.ok` is False).

Fault injection (tests): KAVA_BUILD_FAULT="kill_mid_write:SHARD" SIGKILLs the actor after the first array of
SHARD is written, once per KAVA_BUILD_FAULT_DIR (a marker file makes it one-time).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class BuildSettings:
    num_actors: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_retries: int = 3
    progress: bool = True


@dataclass
class BuildReport:
    shards_total: int
    shards_skipped: int = 0
    shards_written: int = 0
    rows: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    retries: int = 0
    actors_replaced: int = 0
    failed: dict[int, dict] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"ok": self.ok}

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds else 0.0
        return (f"{self.shards_written} shards written, {self.shards_skipped} already done, {len(self.failed)} failed; "
                f"{self.rows} examples ({rate:.1f}/s), {self.tokens} teacher tokens "
                f"({self.tokens / max(self.seconds, 1e-9):.0f}/s), {self.bytes / 2**20:.1f} MiB written, "
                f"{len(self.quarantined)} examples quarantined, {self.retries} retries, "
                f"{self.actors_replaced} actors replaced, {self.seconds:.1f} s")


def _maybe_fault(shard_id: int) -> None:
    spec = os.environ.get("KAVA_BUILD_FAULT", "")
    if not spec.startswith("kill_mid_write:") or int(spec.split(":")[1]) != shard_id:
        return
    marker = Path(os.environ.get("KAVA_BUILD_FAULT_DIR", "/tmp")) / f"kava_fault_shard{shard_id}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        os.close(fd)
    except FileExistsError:
        return
    os.environ["CACHE_STORE_FAULT"] = f"kill_after_first_array:{shard_id}"


class ShardWorker:
    """Ray actor body (wrapped with ray.remote in `build_store`)."""

    def __init__(self, make_processor: Callable[[], Any], store_args: dict):
        # Ray handles a failing actor constructor badly: catch and report through ready().
        self.error = None
        try:
            from cache_store.writer import StoreWriter

            self.proc = make_processor()
            self.writer = StoreWriter.create_or_open(**store_args)
            self.lock = threading.Lock()
        except Exception:  # noqa: BLE001
            self.error = traceback.format_exc()

    def ready(self) -> str | None:
        return self.error

    def run(self, shard_id: int, items: list) -> dict:
        if self.error:
            raise RuntimeError(f"actor failed to start:\n{self.error}")
        t0 = time.perf_counter()
        with self.lock:                                    # one compute at a time; the write below overlaps
            arrays, info = self.proc.process(items)
        t1 = time.perf_counter()
        _maybe_fault(shard_id)
        rec = self.writer.write_shard(shard_id, arrays)
        os.environ.pop("CACHE_STORE_FAULT", None)
        return {"shard": shard_id, "rows": rec.rows, "bytes": rec.bytes, "tokens": info.get("tokens", 0),
                "quarantined": info.get("quarantined", []), "compute_s": t1 - t0,
                "write_s": time.perf_counter() - t1}


def build_store(store_args: dict, shards: dict[int, list], make_processor: Callable[[], Any],
                settings: BuildSettings) -> BuildReport:
    import ray
    from ray.exceptions import RayActorError, RayTaskError
    from tqdm.auto import tqdm

    from cache_store.writer import StoreWriter

    writer = StoreWriter.create_or_open(**store_args)
    done = set(writer.done_shards())
    todo = [s for s in sorted(shards) if s not in done]
    report = BuildReport(shards_total=len(shards), shards_skipped=len(shards) - len(todo))
    if not todo:
        return report
    Actor = ray.remote(ShardWorker).options(num_gpus=settings.num_gpus, num_cpus=settings.num_cpus,
                                            max_concurrency=2, max_restarts=0)
    n_actors = max(1, min(settings.num_actors, len(todo)))

    def spawn():
        a = Actor.remote(make_processor, store_args)
        err = ray.get(a.ready.remote())
        if err:
            raise RuntimeError(f"a build actor failed to start:\n{err}")
        return a

    actors = [spawn() for _ in range(n_actors)]
    queue = list(todo)
    attempts: dict[int, int] = {}
    inflight: dict[Any, tuple[int, Any]] = {}    # future -> (shard, actor)
    load = {id(a): 0 for a in actors}
    t_start = time.time()
    bar = tqdm(total=len(todo), desc="cache build", unit="shard", disable=not settings.progress, dynamic_ncols=True)

    def submit():
        for a in list(actors):
            while queue and load[id(a)] < 2:
                s = queue.pop(0)
                inflight[a.run.remote(s, shards[s])] = (s, a)
                load[id(a)] += 1

    def retry(s: int, err: str):
        attempts[s] = attempts.get(s, 0) + 1
        if attempts[s] <= settings.max_retries:
            report.retries += 1
            queue.append(s)
            log.warning("shard %d failed (attempt %d/%d), retrying: %s", s, attempts[s], settings.max_retries,
                        err.splitlines()[-1] if err else "")
        else:
            report.failed[s] = {"error": err[-4000:], "item_ids": [getattr(i, "id", None) for i in shards[s]]}
            log.error("shard %d failed %d times; giving up on it: %s", s, attempts[s], err.splitlines()[-1])

    submit()
    while inflight:
        ready, _ = ray.wait(list(inflight), num_returns=1)
        fut = ready[0]
        s, actor = inflight.pop(fut)
        load[id(actor)] -= 1
        try:
            res = ray.get(fut)
        except RayActorError:
            if actor in actors:                      # replace the dead actor once; its other shards fail too
                actors.remove(actor)
                ray.kill(actor, no_restart=True)
                new = spawn()
                actors.append(new)
                load[id(new)] = 0
                report.actors_replaced += 1
            retry(s, traceback.format_exc())
        except RayTaskError as e:
            retry(s, str(e))
        else:
            report.shards_written += 1
            report.rows += res["rows"]
            report.bytes += res["bytes"]
            report.tokens += res["tokens"]
            report.quarantined.extend(res["quarantined"])
            el = time.time() - t_start
            bar.set_postfix(ex_s=f"{report.rows / el:.1f}", tok_s=f"{report.tokens / el:.0f}",
                            done=f"{report.shards_written + report.shards_skipped}/{report.shards_total}")
            bar.update(1)
        submit()
    bar.close()
    report.seconds = time.time() - t_start
    for a in actors:
        ray.kill(a, no_restart=True)
    return report
