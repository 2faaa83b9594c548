"""Ray build of a store: one coordinator, a pool of compute actors (e.g. a teacher per GPU), each with its own
write actors, one shard per task, retries, resume.

Generic over the work: the caller passes `make_processor` (a picklable zero-argument callable run once inside
each compute actor, e.g. one that loads a teacher model) whose result has `process(items) -> (arrays, info)`
(and optionally `launch(items)` + `finish(launched, relaunch_lock)`, the same split in two so the next shard's
device work starts while this one is copied out); `info` may hold "tokens" (int) and "quarantined" (list of
dicts: items that were dropped, with their error). This module imports no model code.

Usage:
    from cache_store.builder import BuildSettings, build_store
    report = build_store(store_args, shards, make_processor, BuildSettings(num_actors=4, num_gpus=1))
    # store_args: dict(url=, spec=, fingerprint=, fingerprint_fields=, num_shards=, storage_options=)
    # shards: {shard_id: [item, ...]}; items must be picklable and expose .id (reported on failure)
    report.ok, report.failed, report.summary(), report.overlap_s

Data flow per shard: a compute actor computes it (arrays into Ray's object store, owned by this driver), then one
of that actor's `writers_per_actor` write actors (processes on the same node, see build_actors.py) writes and
publishes it. A compute actor holds at most `writes_in_flight` computed shards that wait for or are in a write
(back-pressure on the object store), and two compute tasks, so the device always has the next shard queued.
`report.overlap_s` measures how much write time ran while the same group computed; `report.timeline` has every
shard's compute and write interval; `report.active_s` is the span from the first compute to the last write (the
throughput window). A shard counts as done only once its ledger record is published. Shards already in the
ledger are skipped (resume). A task that raises is retried from the compute (any actor); an actor that dies
(compute or write) is replaced (started in the background, the others keep working), the claims it held are
released and its in-flight shards retried; after `max_retries` a shard is reported with its error and item ids
and the build finishes everything else before returning (`report.ok` is False). A lost node (Ray reports its actors
dead and the node dead) takes its group's computed shards with it (they sat in its object store): they are
computed again elsewhere, its writers are not restarted there, and the retries it caused do not count against
`max_retries`; `report.lost_nodes` names the node and the shards redone. A shard claimed by another live
writer (a second build on the same store) is deferred, not failed. Quarantined items are recorded per shard in
meta/quarantine.shard-NNNNNN.json before the shard is published, so they survive a driver crash
(`collect_quarantine` merges them). Fault injection for tests: see build_actors.py.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from cache_store.build_actors import FORWARDED_ENV, ComputeWorker, WriteWorker

log = logging.getLogger(__name__)

class BuildError(RuntimeError):
    """The build cannot go on (no actor can start); finished shards are kept."""


@dataclass
class BuildSettings:
    num_actors: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    max_retries: int = 3
    progress: bool = True
    writes_in_flight: int = 0
    """Computed shards per compute actor that may wait for or be in a write (0 = 2 x writers_per_actor)."""
    writers_per_actor: int = 0
    """Write actors (processes) per compute actor; each writes one shard at a time (0 = 6 per GPU compute actor,
    1 per CPU one)."""
    writer_threads: int = 2
    """zarr codec threads per write actor (0 = zarr's default, about the node's core count)."""
    cpus_per_writer: float = 0.0
    """Ray CPUs each write actor reserves (0: scheduled regardless of the compute actors' reservations)."""
    actor_start_timeout_s: float = 900.0
    """An actor not started (scheduled + processor built) within this is an error naming its resources."""
    claim_retry_s: float = 30.0
    """Delay before retrying a shard that another live writer holds."""

    def writers(self) -> int:
        """Write actors per compute actor: writers_per_actor, or 6 per GPU compute actor and 1 per CPU one."""
        return max(1, self.writers_per_actor or (6 if self.num_gpus > 0 else 1))


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
    steady_rows_per_s: float = 0.0
    """Rows published per second between the first and the last shard publish (no pipeline fill; the rate a
    long build runs at)."""
    compute_s: float = 0.0
    write_s: float = 0.0
    overlap_s: float = 0.0
    retries: int = 0
    actors_replaced: int = 0
    failed: dict[int, dict] = field(default_factory=dict)
    quarantined: list[dict] = field(default_factory=list)
    nodes: dict[str, dict] = field(default_factory=dict)
    """Ray node id -> {"ip", "shards_computed", "shards_written"}: where each shard ran (this run's shards)."""
    lost_nodes: dict[str, dict] = field(default_factory=dict)
    """Ray node id -> {"ip", "shards_retried"}: nodes that ran actors of this build and died during it, and the
    shards that were in flight there (computing, computed and waiting for a write, or writing), redone elsewhere."""
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
                f"overlapped {self.overlap_s:.1f} s)" + "".join(f"; {t}" for t in self.lost_node_lines()))

    def lost_node_lines(self) -> list[str]:
        return [f"lost node {n} ({v['ip']}): shards {v['shards_retried']} redone on other nodes"
                for n, v in sorted(self.lost_nodes.items())]


def _overlap(timeline: list[dict]) -> float:
    """Seconds during which a group (compute actor + its writers) computed one shard while it wrote another."""
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


def _dead_nodes() -> set[str]:
    """Node ids the cluster reports dead (Ray's GCS; a node is marked dead before its actors are)."""
    import ray

    try:
        return {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    except Exception as e:  # noqa: BLE001 - a GCS hiccup: treat every node as alive, the next failure asks again
        log.warning("could not list the cluster's nodes: %s", e)
        return set()


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


class _Group:
    """One compute actor, its write actors, and the shards between them."""

    def __init__(self, key: str):
        self.key = key
        self.compute = None                      # the ready compute actor (None while it starts)
        self.node = ""                           # its node: write actors are placed there
        self.ip = ""
        self.writers: list = []                  # ready write actors
        self.writers_starting = 0
        self.computing = 0                       # compute tasks submitted, not returned
        self.waiting: list[tuple[int, Any, dict]] = []   # computed shards: (shard, arrays ref, meta)
        self.writing = 0                         # write tasks submitted, not returned


def build_store(store_args: dict, shards: dict[int, list], make_processor: Callable[[], Any],
                settings: BuildSettings) -> BuildReport:
    import ray
    from ray.exceptions import RayActorError, RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm.auto import tqdm

    from cache_store.writer import StoreWriter

    writer = StoreWriter.create_or_open(**store_args)
    done = set(writer.done_shards())
    todo = [s for s in sorted(shards) if s not in done]
    report = BuildReport(shards_total=len(shards), shards_skipped=len(shards) - len(todo))
    if not todo:
        return report
    n_writers = settings.writers()
    cap = settings.writes_in_flight or 2 * n_writers
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    runtime: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    Compute = ray.remote(ComputeWorker).options(num_gpus=settings.num_gpus, num_cpus=settings.num_cpus,
                                                max_concurrency=2, max_restarts=0, **runtime)
    Writer = ray.remote(WriteWorker)
    groups = [_Group(f"group{i}") for i in range(max(1, min(settings.num_actors, len(todo))))]
    start_budget = len(groups) * (1 + n_writers) + settings.max_retries   # actors that may die while starting

    starting: dict[Any, tuple[str, _Group, Any, float]] = {}   # ready future -> (kind, group, actor, started at)
    owners: dict[int, dict] = {}                 # id(write actor) -> its claim owner
    wnode: dict[int, tuple[str, str]] = {}       # id(write actor) -> (node id, node ip)
    wload: dict[int, int] = {}                   # id(write actor) -> write tasks queued or running
    inflight: dict[Any, tuple] = {}              # future -> ("compute", shard, group, arrays ref, actor, node)
    #                                                        | ("write", shard, group, actor, meta)
    used_nodes: dict[str, str] = {}              # node id -> ip: every node that ran an actor of this build
    lost_on: dict[str, set[int]] = {}            # node id -> shards retried after an actor there died
    dead_nodes: set[str] = set()                 # nodes found dead so far (their actors are not restarted there)

    def spawn_compute(g: _Group):
        a = Compute.remote(make_processor)
        starting[a.node.remote()] = ("node", g, a, time.time())   # placed: its writers start while it loads

    def spawn_writer(g: _Group):
        if g.node in dead_nodes:     # the group's next compute actor starts its writers on its own node
            return
        opts: dict[str, Any] = dict(num_cpus=settings.cpus_per_writer, max_concurrency=1, max_restarts=0, **runtime)
        if g.node:   # strict: the arrays pass through this node's object store; a lost node replaces its compute
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(g.node, soft=False)
        w = Writer.options(**opts).remote(store_args, settings.writer_threads)
        g.writers_starting += 1
        starting[w.ready.remote()] = ("writer", g, w, time.time())

    for g in groups:
        spawn_compute(g)
    queue = list(todo)
    deferred: list[tuple[float, int]] = []       # (not before, shard): claimed by another live writer
    attempts: dict[int, int] = {}
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
        for g in groups:
            while (g.compute is not None and queue and g.computing < 2
                   and g.computing + len(g.waiting) + g.writing < cap):
                s = queue.pop(0)
                arrays_ref, meta_ref = g.compute.compute.options(num_returns=2).remote(s, shards[s])
                inflight[meta_ref] = ("compute", s, g, arrays_ref, g.compute, g.node)
                g.computing += 1
            while g.waiting and g.writers:
                w = min(g.writers, key=lambda a: wload[id(a)])
                if wload[id(w)] >= 2:                       # one running and one queued per writer
                    break
                s, arrays_ref, meta = g.waiting.pop(0)
                inflight[w.write.remote(s, arrays_ref, meta["quarantined"])] = ("write", s, g, w, meta)
                wload[id(w)] += 1
                g.writing += 1

    def retry(s: int, err: str, lost_node: str = ""):
        """Queue shard s again, or report it failed after max_retries; a retry caused by a lost node is free."""
        last = err.strip().splitlines()[-1] if err.strip() else "?"
        if lost_node:
            lost_on.setdefault(lost_node, set()).add(s)
            report.retries += 1
            queue.append(s)
            log.warning("shard %d was in flight on lost node %s; computing it again elsewhere", s, lost_node)
            return
        attempts[s] = attempts.get(s, 0) + 1
        if attempts[s] <= settings.max_retries:
            report.retries += 1
            queue.append(s)
            log.warning("shard %d failed (attempt %d/%d), retrying: %s", s, attempts[s], settings.max_retries + 1, last)
        else:
            report.failed[s] = {"error": err[-4000:], "attempts": attempts[s],
                                "item_ids": [getattr(i, "id", None) for i in shards[s]]}
            bar.update(len(shards[s]))
            log.error("shard %d failed %d times; giving up on it (the others go on): %s", s, attempts[s], last)

    def node_lost(node: str) -> bool:
        """Whether `node` is dead; the first time, every group there gives back the shards it computed and that
        wait for a write (their arrays were in that node's object store) and drops its dead write actors."""
        if not node:
            return False
        if node in dead_nodes:
            return True
        if node not in _dead_nodes():
            return False
        dead_nodes.add(node)
        log.error("node %s (%s) is lost: its shards are computed again on the other nodes", node,
                  used_nodes.get(node, "?"))
        for g in groups:
            for item in [it for it in g.waiting if it[2].get("node") == node]:
                g.waiting.remove(item)
                retry(item[0], "", lost_node=node)
            for w in list(g.writers):
                if wnode.get(id(w), ("",))[0] == node:
                    g.writers.remove(w)
                    report.actors_replaced += 1
            if g.node == node and g.compute is not None:
                replace(g, g.compute, "compute")
        return True

    def replace(g: _Group, actor, kind: str):
        """Replace a dead actor once (its other in-flight tasks fail too and find it already gone)."""
        if kind == "compute" and g.compute is actor:
            g.compute = None
        elif kind == "writer" and actor in g.writers:
            g.writers.remove(actor)
        else:
            return
        ray.kill(actor, no_restart=True)
        report.actors_replaced += 1
        (spawn_compute if kind == "compute" else spawn_writer)(g)

    def started(fut):
        nonlocal start_budget
        kind, g, a, t0 = starting.pop(fut)
        if kind == "node":
            try:
                g.node = ray.get(fut)
            except RayError:
                g.node = ""              # died already: ready() below reports it
            for _ in range(n_writers - len(g.writers) - g.writers_starting):
                spawn_writer(g)
            starting[a.ready.remote()] = ("compute", g, a, t0)
            return
        if kind == "writer":
            g.writers_starting -= 1
        try:
            info = ray.get(fut)
        except RayError as e:            # died while starting (e.g. out of memory): try another one
            start_budget -= 1
            if start_budget <= 0:
                raise BuildError(
                    f"build actors kept dying while starting; the last one: {str(e)[-3000:]}\nSee the actor "
                    "logs (`ray logs`, the dashboard), e.g. out of memory or a module the workers cannot import "
                    "(run with `ray job submit --working-dir .`)") from e
            log.warning("a build %s actor died while starting; starting another: %s", kind, str(e)[-1500:])
            if kind == "writer" and (g.compute is None or node_lost(g.node)):
                return           # e.g. its node is gone: the group's next compute actor starts writers on its node
            (spawn_compute if kind == "compute" else spawn_writer)(g)
            return
        if info["error"]:
            raise BuildError(f"a build {kind} actor failed to start (fix the cause and rerun):\n{info['error']}")
        if kind == "writer":
            g.writers.append(a)
            owners[id(a)], wload[id(a)] = info["owner"], 0
            wnode[id(a)] = (info.get("node_id", ""), info.get("node_ip", ""))
            used_nodes[wnode[id(a)][0]] = wnode[id(a)][1]
            return
        g.compute, g.node, g.ip = a, info["node_id"], info.get("node_ip", "")
        used_nodes[g.node] = g.ip
        for _ in range(n_writers - len(g.writers) - g.writers_starting):   # writers lost while it started
            spawn_writer(g)
        if not report.startup_s:
            report.startup_s = time.time() - t_start
            bar.reset(total=examples_todo)          # rates and ETA from here, not from the model load

    def finished(fut):
        entry = inflight.pop(fut)
        if entry[0] == "compute":
            _, s, g, arrays_ref, actor, node = entry
            g.computing -= 1
            try:
                meta = ray.get(fut)
            except RayTaskError as e:            # the processor raised: the actor is fine
                retry(s, str(e))
            except RayError:                     # the actor died (killed, OOM, node lost)
                lost = node_lost(node)
                replace(g, actor, "compute")
                retry(s, traceback.format_exc(), lost_node=node if lost else "")
            else:
                g.waiting.append((s, arrays_ref, dict(meta, node=node)))   # its arrays live on that node
            return
        _, s, g, w, meta = entry
        wload[id(w)] -= 1
        g.writing -= 1
        try:
            res = ray.get(fut)
        except RayTaskError as e:                # the write raised (store error): redo the shard
            retry(s, str(e))
            return
        except RayActorError:                    # the writer died
            _release_claim_of(writer, s, owners.get(id(w), {}))
            node = wnode.get(id(w), ("",))[0]
            lost = node_lost(node)
            replace(g, w, "writer")
            retry(s, traceback.format_exc(), lost_node=node if lost else "")
            return
        except RayError:                         # its computed arrays are gone (their node died): compute again
            node = meta.get("node", "")
            retry(s, traceback.format_exc(), lost_node=node if node_lost(node) else "")
            return
        if "claimed" in res:
            log.warning("shard %d is held by another live writer; retrying in %.0fs: %s", s, settings.claim_retry_s,
                        res["claimed"])
            deferred.append((time.time() + settings.claim_retry_s, s))
            return
        report.shards_written += 1
        report.rows += res["rows"]
        report.bytes += res["bytes"]
        report.tokens += meta["tokens"]
        report.quarantined.extend(meta["quarantined"])
        report.compute_s += meta["compute"][1] - meta["compute"][0]
        report.write_s += res["write"][1] - res["write"][0]
        report.timeline.append({"shard": s, "actor": g.key, "rows": res["rows"], "compute": meta["compute"],
                                "write": res["write"]})
        wid, wip = wnode.get(id(w), ("", ""))
        for node, ip, key in ((g.node, g.ip, "shards_computed"), (wid, wip, "shards_written")):
            n = report.nodes.setdefault(node, {"ip": ip, "shards_computed": [], "shards_written": []})
            n[key].append(s)
        el = max(time.time() - t_start - report.startup_s, 1e-9)
        bar.set_postfix_str(f"shards {report.shards_written + report.shards_skipped}/{report.shards_total}, "
                            f"{report.tokens / el:,.0f} tok/s", refresh=False)
        bar.update(len(shards[s]))

    try:
        while queue or inflight or deferred or any(g.waiting for g in groups):
            submit()
            waitables = list(inflight) + list(starting)
            if not waitables:
                if not any(g.compute for g in groups):
                    raise BuildError("no build actor is alive or starting; nothing can run the remaining shards")
                time.sleep(max(0.05, min(d[0] for d in deferred) - time.time()) if deferred else 0.05)
                continue
            ready, _ = ray.wait(waitables, num_returns=1, timeout=5.0, fetch_local=False)
            if not ready:
                for _, (kind, _, _, t0) in list(starting.items()):
                    if (kind in ("node", "compute") and time.time() - t0 > settings.actor_start_timeout_s
                            and not any(g.compute for g in groups) and not inflight):
                        raise BuildError(
                            f"no build actor started within {settings.actor_start_timeout_s:.0f}s; the cluster may "
                            f"lack the resources one needs (num_gpus={settings.num_gpus}, num_cpus={settings.num_cpus})"
                            ": check `ray status`, or lower build.gpus_per_actor / build.cpus_per_actor")
                continue
            if ready[0] in starting:
                started(ready[0])
            else:
                finished(ready[0])
    finally:
        bar.close()
        for a in [g.compute for g in groups if g.compute] + [w for g in groups for w in g.writers] + [
                a for _, _, a, _ in starting.values()]:
            ray.kill(a, no_restart=True)
    report.seconds = time.time() - t_start
    gone = _dead_nodes() | dead_nodes if used_nodes else set()
    for node in sorted(gone & set(used_nodes)):
        report.lost_nodes[node] = {"ip": used_nodes[node], "shards_retried": sorted(lost_on.get(node, ()))}
    report.overlap_s = _overlap(report.timeline)
    if report.timeline:
        report.active_s = (max(r["write"][1] for r in report.timeline)
                           - min(r["compute"][0] for r in report.timeline))
        ends = sorted(report.timeline, key=lambda r: r["write"][1])
        if len(ends) > 1 and ends[-1]["write"][1] > ends[0]["write"][1]:
            report.steady_rows_per_s = (sum(r["rows"] for r in ends[1:])
                                        / (ends[-1]["write"][1] - ends[0]["write"][1]))
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
