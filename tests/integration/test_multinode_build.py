"""The cache build on a Ray cluster of two nodes, both on 127.0.0.1 (CPU, ~1-2 min):

- a head node (resource node_a, 1 CPU) and a worker node (resource node_b, 1 CPU), both on 127.0.0.1;
  build.num_actors=2 places one teacher actor per node, their write actors on the teacher's node (strict node
  affinity), all writing one store; meta/build_report.json says which node computed
  and wrote every shard;
- the same build onto an S3 store (moto on 127.0.0.1), the only storage both nodes share in a real cluster
  without a shared filesystem: both nodes compute and write, and every shard's checksum equals the local build's;
- a write actor pointed at a path with no store refuses with one line (it never creates a store);
- writers that published to storage the driver does not see (another node's disk, simulated by redirecting the
  writers to another directory) make the job exit 1: the exit code comes from the driver's own ledger.
The cluster is stopped by Cluster.shutdown(), which ends the processes of its own nodes (never `ray stop`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
os.environ.update(RAY_ENV)

from test_build_cache import REPO, data, shard_ids  # noqa: E402,F401  (fixture `data`)


@pytest.fixture(scope="module")
def two_nodes():
    """Ray's own simulated multi-node cluster (ray.cluster_utils.Cluster: a head and a worker node, each its own
    raylet and object store, in this host's process tree). `ray start --address` cannot do this on loopback: it
    replaces a loopback head address with the host's public IP before joining, and refuses to join at all with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the switch that keeps every socket on 127.0.0.1."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="krm", dir="/tmp")               # short: Ray's unix sockets live under it
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_a": 1}, "node_ip_address": "127.0.0.1", "temp_dir": tmp,
        "include_dashboard": False, "object_store_memory": 200 << 20})
    try:
        cluster.add_node(num_cpus=1, resources={"node_b": 1}, node_ip_address="127.0.0.1",
                         object_store_memory=200 << 20)
        ray.init(address=cluster.address, log_to_driver=False)
        names = {n["NodeID"]: ("node_a" if "node_a" in n["Resources"] else "node_b")
                 for n in ray.nodes() if n["Alive"]}
        assert sorted(names.values()) == ["node_a", "node_b"], ray.nodes()
        yield {"gcs": cluster.address, "names": names}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()                                        # the processes of these two nodes only
        shutil.rmtree(tmp, ignore_errors=True)


def run_job(data: dict, store, gcs: str, *extra: str) -> int:
    from jobs.build_cache import main

    return main(["--config", str(REPO / "configs/tiny_cpu.yaml"), f"model.name_or_path={data['ckpt']}",
                 f"data.train_path={data['jsonl']}", f"store.path={store}", "store.shard_examples=4",
                 "build.batch_size=4", "build.num_actors=2", "build.cpus_per_actor=1", "build.writers_per_actor=1",
                 "build.max_retries=1", f"build.ray_address={gcs}", *extra])


@pytest.mark.timeout(240)
def test_two_nodes_build_one_store(two_nodes, data, tmp_path, monkeypatch):
    monkeypatch.setenv("KAVA_BUILD_FAULT", "slow:0.5")      # every shard takes a while: both teachers get work
    store = tmp_path / "store"                               # one path both nodes see (one host)
    assert run_job(data, store, two_nodes["gcs"]) == 0
    rep = json.loads((store / "meta" / "build_report.json").read_text())
    assert rep["ok"] and len(shard_ids(store)) == rep["shards_total"] == rep["shards_written"]
    nodes = rep["nodes"]
    computed = {two_nodes["names"][n] for n, v in nodes.items() if v["shards_computed"]}
    written = {two_nodes["names"][n] for n, v in nodes.items() if v["shards_written"]}
    assert computed == written == {"node_a", "node_b"}, nodes
    for v in nodes.values():                                 # strict placement: written where computed
        assert sorted(v["shards_computed"]) == sorted(v["shards_written"]) and v["ip"] == "127.0.0.1"
    assert sorted(s for v in nodes.values() for s in v["shards_written"]) == shard_ids(store)


def _nodes_that_worked(rep: dict, names: dict) -> tuple[set, set]:
    nodes = rep["nodes"]
    return ({names[n] for n, v in nodes.items() if v["shards_computed"]},
            {names[n] for n, v in nodes.items() if v["shards_written"]})


@pytest.mark.timeout(300)
def test_two_nodes_build_one_s3_store(two_nodes, data, s3_store, tmp_path, monkeypatch):
    import fsspec

    monkeypatch.setenv("KAVA_BUILD_FAULT", "slow:0.5")
    url, so = s3_store
    assert run_job(data, url, two_nodes["gcs"], f"store.storage_options={json.dumps(so)}") == 0
    fs = fsspec.filesystem("s3", **so)
    rep = json.loads(fs.cat(f"{url}/meta/build_report.json"))
    assert rep["ok"] and rep["shards_written"] == rep["shards_total"]
    assert _nodes_that_worked(rep, two_nodes["names"]) == ({"node_a", "node_b"},) * 2, rep["nodes"]
    s3_sums = {Path(p).name: json.loads(fs.cat(p))["checksum"] for p in fs.glob(f"{url}/ledger/shard-*.json")}

    local = tmp_path / "local"                                # the same build onto one local path
    assert run_job(data, local, two_nodes["gcs"]) == 0
    local_sums = {p.name: json.loads(p.read_text())["checksum"] for p in (local / "ledger").glob("shard-*.json")}
    assert len(s3_sums) == rep["shards_total"] and s3_sums == local_sums


@pytest.mark.timeout(120)
def test_writer_never_creates_a_store(two_nodes, tmp_path):
    import ray

    from cache_store.build_actors import WriteWorker
    from cache_store.spec import FieldSpec, StoreSpec

    spec = StoreSpec(fields=(FieldSpec("x", (4,), "float32"),), shard_size=4)
    empty = tmp_path / "node_b_disk"
    empty.mkdir()
    store_args = dict(url=str(empty), spec=spec, fingerprint="fp", fingerprint_fields={"a": 1}, num_shards=2,
                      storage_options=None)
    w = ray.remote(WriteWorker).options(num_cpus=0, resources={"node_b": 0.01}).remote(store_args, 1)
    info = ray.get(w.ready.remote(), timeout=60)
    ray.kill(w)
    assert two_nodes["names"][info["node_id"]] == "node_b"
    assert info["error"] and "\n" not in info["error"], info["error"]
    assert f"no store at {empty}" in info["error"] and "shared filesystem" in info["error"]
    assert not list(empty.iterdir())                          # nothing created there


@pytest.mark.timeout(240)
def test_exit_code_comes_from_the_drivers_ledger(two_nodes, data, tmp_path, monkeypatch, caplog):
    """Writers that publish where the driver does not look (another node's disk) do not make a complete build."""
    import jobs.build_cache  # noqa: F401
    from cache_store import builder
    from cache_store.writer import StoreWriter

    elsewhere = tmp_path / "other_node_disk"
    real = builder.build_store

    def on_another_disk(store_args, *a, **kw):
        other = dict(store_args, url=str(elsewhere))
        StoreWriter.create_or_open(**other)                  # the store a writer there would have created
        return real(other, *a, **kw)

    monkeypatch.setattr(builder, "build_store", on_another_disk)
    store = tmp_path / "store"
    rc = run_job(data, store, two_nodes["gcs"])
    assert shard_ids(elsewhere) and not shard_ids(store)    # every shard went to the other disk
    assert rc == 1
    assert "lacks" in caplog.text and "not the same storage on every node" in caplog.text
