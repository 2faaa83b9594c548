"""A node lost in the middle of a cache build, on a Ray cluster of two nodes on 127.0.0.1 (CPU, ~1-2 min).

A head (resource node_a, 1 CPU) and a worker node (node_b, 1 CPU), both Ray's `cluster_utils.Cluster` nodes on
this host (`ray start --address` cannot join a loopback-only head on one host: Ray swaps the loopback address
for the host's public IP before joining). A clean build with one teacher per node is the reference; a second
build (every shard slowed down so both teachers always have work) loses node_b: once two shards are published
its raylet is SIGKILLed by PID, which takes its teacher, its write actor and the computed shards in its object
store with it. The build must finish on node_a alone, the store must be byte-identical to the clean one, and
meta/build_report.json must name the lost node and the shards that were redone. The cluster is stopped by
Cluster.shutdown() (the processes of its own nodes only, never `ray stop`).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "RAY_memory_monitor_refresh_ms": "0"}     # a busy test host must not get the actors killed by Ray's OOM policy
os.environ.update(RAY_ENV)

from test_build_cache import REPO, assert_same_store, data, shard_ids  # noqa: E402,F401  (fixture `data`)

# the head notices a dead raylet after 4 missed health checks of 0.5 s (Ray's default: 5 of 3 s)
FAST_HEALTH_CHECK = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                     "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}


@pytest.fixture()
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="krl", dir="/tmp")               # short: Ray's unix sockets live under it
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 1}, "node_ip_address": "127.0.0.1", "temp_dir": tmp,
        "include_dashboard": False, "object_store_memory": 200 << 20, "_system_config": FAST_HEALTH_CHECK})
    try:
        worker = cluster.add_node(num_cpus=1, resources={"node_b": 1}, node_ip_address="127.0.0.1",
                                  object_store_memory=200 << 20)
        ray.init(address=cluster.address, log_to_driver=False)
        names = {n["NodeID"]: ("node_a" if "node_a" in n["Resources"] else "node_b")
                 for n in ray.nodes() if n["Alive"]}
        assert sorted(names.values()) == ["node_a", "node_b"], ray.nodes()
        yield {"cluster": cluster, "worker": worker, "gcs": cluster.address, "names": names}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()                                        # the processes of these two nodes only
        shutil.rmtree(tmp, ignore_errors=True)


def run_job(data: dict, store: Path, gcs: str) -> int:
    from jobs.build_cache import main

    return main(["--config", str(REPO / "configs/tiny_cpu.yaml"), f"model.name_or_path={data['ckpt']}",
                 f"data.train_path={data['jsonl']}", f"store.path={store}", "store.shard_examples=4",
                 "build.batch_size=4", "build.num_actors=2", "build.cpus_per_actor=1", "build.writers_per_actor=1",
                 "build.max_retries=2", f"build.ray_address={gcs}"])


def _raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


@pytest.mark.timeout(300)
def test_node_lost_mid_build(two_nodes, data, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    assert run_job(data, clean, two_nodes["gcs"]) == 0
    total = len(shard_ids(clean))
    assert total >= 6

    monkeypatch.setenv("KAVA_BUILD_FAULT", "slow:1.0")      # both teachers stay busy until the queue is empty
    store = tmp_path / "store"
    pid = _raylet_pid(two_nodes["worker"])
    killed: dict = {}

    def kill_node_b():
        deadline = time.time() + 180
        while time.time() < deadline and len(list((store / "ledger").glob("shard-*.json"))) < 2:
            time.sleep(0.05)
        killed["published"] = len(list((store / "ledger").glob("shard-*.json")))
        os.kill(pid, signal.SIGKILL)                          # node_b's raylet: the node is gone
        killed["at"] = time.time()

    t = threading.Thread(target=kill_node_b, daemon=True)
    t.start()
    rc = run_job(data, store, two_nodes["gcs"])
    t.join(timeout=5)
    assert "at" in killed and killed["published"] < total, killed
    assert rc == 0
    assert shard_ids(store) == list(range(total))
    assert_same_store(clean, store)

    rep = json.loads((store / "meta" / "build_report.json").read_text())
    names = two_nodes["names"]
    lost = rep["lost_nodes"]
    assert [names[n] for n in lost] == ["node_b"], lost
    (b_id, b), = lost.items()
    assert b["ip"] == "127.0.0.1" and b["shards_retried"], b
    retried = set(b["shards_retried"])
    a_id = next(n for n, v in names.items() if v == "node_a")
    assert retried <= set(rep["nodes"][a_id]["shards_written"])     # every lost shard was redone on node_a
    assert not retried & set(rep["nodes"].get(b_id, {}).get("shards_written", []))
    assert rep["retries"] >= len(retried) and rep["actors_replaced"] >= 1
    assert "lost node" in rep["summary"] and b_id in rep["summary"]
    written = sorted(s for v in rep["nodes"].values() for s in v["shards_written"])
    assert written == list(range(total))                              # each shard published exactly once
