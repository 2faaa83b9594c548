"""The Ray cache-build job end to end on CPU: clean build vs direct computation, `ray job submit`, a killed actor,
a killed driver + resume, a shard that always fails + a quarantined example, write/compute overlap, fingerprints.

Run:  .venv/bin/python -m pytest tests/integration/test_build_cache.py -m integration -v
(~3 min on 2 cores). One Ray cluster per module: `ray start --head --block` on 127.0.0.1 with free ports, its own
--temp-dir, in a new session; teardown SIGTERMs that process group (then SIGKILL, bounded). The pytest process
joins it as a driver and calls `jobs.build_cache.main()` in-process; the driver-kill test runs the job as a
subprocess with its own local Ray (the no-cluster path). A clean build is made once and every other store is
compared with it byte for byte (zarr shard files, zarr metadata, ledger shard records).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from kava_testing import free_port

pytestmark = pytest.mark.integration

# Read by Ray when it is imported: keep every Ray socket of this process (and of the clusters it starts) on
# 127.0.0.1, no auth token under ~/.ray, no usage stats.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
os.environ.update(RAY_ENV)

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
N_GOOD = 30
SHARD, BATCH = 8, 4


def _group_members(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _end_group(pgid: int, grace_s: float = 20.0) -> None:
    """SIGTERM the process group we started (by its id), then SIGKILL what is left; bounded."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            if not [p for p in _group_members(pgid) if not _is_zombie(p)]:
                return
            time.sleep(0.2)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A tiny random Llama (char tokenizer) and a jsonl of N_GOOD good rows + 1 without answer + 1 too long."""
    from kava_dist.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("build_cache")
    ckpt = save_tiny_checkpoint(root / "ckpt", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                initializer_range=0.5)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_GOOD):
        a, b, c = (int(x) for x in rng.integers(2, 60, 3))
        q = f"Sam has {a} apples and buys {b} more" + ", then finds another bag" * (i % 4) + f". He eats {c}. How many?"
        steps = [f"<<{a}+{b}={a + b}>>", f"<<{a + b}-{c}={a + b - c}>>"] + [f"<<{a + b - c}*1={a + b - c}>>"] * (i % 3)
        rows.append({"question": q, "cot": " ".join(steps), "answer": str(a + b - c)})
    rows.insert(7, {"question": "A row without an answer?", "cot": "<<1+1=2>>", "answer": None})
    rows.insert(20, {"question": "Too long. " * 40, "cot": "<<1+1=2>> <<2+2=4>>", "answer": "4"})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "ckpt": ckpt, "jsonl": path}


def overrides(data: dict, store: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={data['ckpt']}", f"data.train_path={data['jsonl']}", f"store.path={store}",
            f"store.shard_examples={SHARD}", f"build.batch_size={BATCH}", "build.num_actors=1",
            "build.max_retries=1", "build.object_store_mb=300", *extra]


def run_main(data: dict, store: Path, *extra: str) -> int:
    from jobs.build_cache import main

    return main(["--config", str(REPO / "configs/tiny_cpu.yaml"), *overrides(data, store, *extra)])


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head --block` on loopback with free ports; the pytest process joins it as a driver."""
    import ray

    tmp = tempfile.mkdtemp(prefix="kr", dir="/tmp")               # short: Ray's unix sockets live under it
    gcs, dash = free_port(), free_port()
    ports = {k: free_port() for k in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                       "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                                       "--metrics-export-port", "--node-manager-port", "--object-manager-port")}
    cmd = [str(Path(PY).with_name("ray")), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0",
           "--object-store-memory=300000000", f"--temp-dir={tmp}", "--disable-usage-stats",
           *[f"{k}={v}" for k, v in ports.items()]]
    env = os.environ | RAY_ENV
    env.pop("RAY_ADDRESS", None)
    log = open(Path(tmp) / "ray_start.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start failed (rc={proc.poll()}):\n"
                                       f"{(Path(tmp) / 'ray_start.log').read_text()[-3000:]}")
                time.sleep(0.5)
        if "ray._private.ray_constants" in sys.modules:
            from ray._private import ray_constants
            assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before RAY_ENV was set"
        ray.init(address=f"127.0.0.1:{gcs}", log_to_driver=False)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": url, "env": env}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _end_group(proc.pid, grace_s=5)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def clean(cluster, data) -> Path:
    store = data["root"] / "clean"
    assert run_main(data, store) == 0
    return store


# ----------------------------------------------------------------------------- helpers


def store_files(store: Path) -> dict[str, bytes]:
    """Everything that must be equal between two builds: array files, zarr metadata, shard records."""
    out = {}
    for f in sorted(store.rglob("*")):
        rel = f.relative_to(store).as_posix()
        if f.is_file() and not rel.startswith(("claims/", "meta/")) and rel != "ledger/store.json":
            out[rel] = f.read_bytes()
    return out


def assert_same_store(a: Path, b: Path) -> None:
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb), f"file lists differ: {sorted(set(fa) ^ set(fb))}"
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"files differ: {differ}"
    for rel in [k for k in fa if k.startswith("ledger/shard-")]:
        ra, rb = json.loads(fa[rel]), json.loads(fb[rel])
        assert (ra["checksum"], ra["rows"]) == (rb["checksum"], rb["rows"])
    sa, sb = (json.loads((s / "ledger/store.json").read_text()) for s in (a, b))
    sa.pop("created"), sb.pop("created")
    assert sa == sb


def meta(store: Path, name: str):
    return json.loads((store / "meta" / f"{name}.json").read_text())


def planned(data: dict):
    """The job's own data path and shard plan, recomputed here."""
    from kava_dist.backbone import load_tokenizer
    from kava_dist.config import load_config
    from kava_dist.prompts import add_special_tokens, encode_examples, load_examples
    from kava_dist.targets import plan_shards

    cfg = load_config(REPO / "configs/tiny_cpu.yaml", overrides(data, data["root"] / "x"))
    tok = load_tokenizer(cfg.model)
    add_special_tokens(tok)
    ex, rep = load_examples(cfg.data.train_path, cfg.data.cot_style, cfg.data.numeric_answer, cfg.data.limit)
    enc, rep = encode_examples(ex, tok, cfg.data.answer_prompt, cfg.data.drop_last_step, cfg.data.max_tokens, rep)
    return cfg, enc, plan_shards(enc, SHARD)


def shard_ids(store: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (store / "ledger").glob("shard-*.json"))


# ----------------------------------------------------------------------------- tests without Ray


def test_plan_shards_and_actor_pool():
    from kava_dist.config import BuildConfig
    from kava_dist.prompts import Encoded
    from kava_dist.targets import plan_actors, plan_shards

    enc = [Encoded(id=i, question_ids=[1] * (1 + (7 * i) % 13), cot_ids=[2] * (i % 5), prompt_ids=[3], answer_ids=[4])
           for i in range(21)]
    shards = plan_shards(enc, 8)
    assert sorted(shards) == [0, 1, 2] and [len(v) for v in shards.values()] == [8, 8, 5]
    for s, items in shards.items():
        assert {e.id for e in items} == set(range(8 * s, min(21, 8 * s + 8)))          # contiguous chunks
        assert [e.teacher_len for e in items] == sorted(e.teacher_len for e in items)  # sorted inside
    assert plan_actors({"CPU": 64, "GPU": 8}, BuildConfig()) == (8, 1.0)
    assert plan_actors({"CPU": 64, "GPU": 8}, BuildConfig(num_actors=2)) == (2, 1.0)
    assert plan_actors({"CPU": 64, "GPU": 8}, BuildConfig(gpus_per_actor=2)) == (4, 2.0)
    assert plan_actors({"CPU": 2}, BuildConfig()) == (1, 0.0)
    assert plan_actors({"CPU": 16}, BuildConfig(num_actors=3)) == (3, 0.0)
    with pytest.raises(ValueError, match="gpus_per_actor"):
        plan_actors({"GPU": 1}, BuildConfig(gpus_per_actor=2))


# ----------------------------------------------------------------------------- tests on the cluster


@pytest.mark.timeout(240)
def test_clean_build_equals_direct_targets(clean, data):
    from cache_store.reader import StoreReader
    from kava_dist.backbone import load_teacher
    from kava_dist.prompts import collate
    from kava_dist.targets import compute_targets
    from kava_dist.teacher import teacher_forward

    cfg, enc, shards = planned(data)
    r = StoreReader(str(clean))
    assert r.stats()["shards_done"] == r.num_shards == len(shards) == 4
    assert len(r) == len(enc) == N_GOOD
    rep = meta(clean, "data_report")
    assert rep["rows"] == N_GOOD + 2 and rep["kept"] == N_GOOD
    assert rep["skipped"] == {"missing answer": 1, f"longer than data.max_tokens={cfg.data.max_tokens}": 1}
    assert meta(clean, "quarantine") == []
    br = meta(clean, "build_report")
    assert br["ok"] and br["rows"] == N_GOOD and br["shards_written"] == 4 and br["tokens"] > 0
    assert "compression" in br["summary"] and "1 missing answer" in br["summary"]

    teacher, _, special = load_teacher(cfg.model)
    row = 0
    for s in sorted(shards):
        got = r.get_batch(list(range(row, row + len(shards[s]))))
        row += len(shards[s])
        for i in range(0, len(shards[s]), BATCH):                  # the processor's batches: same padding
            items = shards[s][i:i + BATCH]
            with torch.no_grad():
                b = collate(items, special.pad)
                t = compute_targets(teacher_forward(teacher, b, rope=cfg.eviction.rope, with_hidden=True),
                                    cfg.eviction, cfg.latent.num_latents).as_arrays()
            sl = slice(i, i + len(items))
            for name in ("k", "v", "codi_h"):
                want = t[name].to(torch.bfloat16)
                assert got[name].dtype == torch.bfloat16
                assert torch.equal(got[name][sl].view(torch.int16), want.view(torch.int16)), (s, i, name)
            assert torch.equal(got["valid"][sl], t["valid"].bool())
            assert torch.equal(got["index"][sl], t["index"].to(torch.int16))
            assert got["example_id"][sl].tolist() == [e.id for e in items]
            assert got["cot_len"][sl].tolist() == [len(e.cot_ids) for e in items]


@pytest.mark.timeout(300)
def test_ray_job_submit_matches_clean(cluster, data, clean):
    from ray.job_submission import JobStatus, JobSubmissionClient

    store = data["root"] / "submitted"
    sid = f"kava-build-{os.getpid()}-{int(time.time())}"
    cmd = [str(Path(PY).with_name("ray")), "job", "submit", "--address", cluster["dashboard"], "--working-dir",
           str(REPO), "--submission-id", sid, "--", PY, "-m", "jobs.build_cache", "--config", "configs/tiny_cpu.yaml",
           *overrides(data, store)]
    out = subprocess.run(cmd, env=cluster["env"], cwd=REPO, capture_output=True, text=True, timeout=280)
    status = JobSubmissionClient(cluster["dashboard"]).get_job_status(sid)
    assert status == JobStatus.SUCCEEDED, \
        f"job {status}; rc={out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-3000:]}"
    assert "cache build summary" in out.stdout
    assert_same_store(clean, store)


@pytest.mark.timeout(240)
def test_actor_killed_mid_shard_is_replaced(clean, data, monkeypatch, tmp_path):
    store = data["root"] / "killed_actor"
    monkeypatch.setenv("KAVA_BUILD_FAULT", "kill_mid_write:1")
    monkeypatch.setenv("KAVA_BUILD_FAULT_DIR", str(tmp_path))
    assert run_main(data, store) == 0
    assert (tmp_path / "kava_fault_shard1").exists(), "the fault did not fire"
    br = meta(store, "build_report")
    assert br["ok"] and br["actors_replaced"] >= 1 and br["retries"] >= 1
    assert_same_store(clean, store)


@pytest.mark.timeout(300)
def test_driver_killed_then_resume(clean, data):
    store = data["root"] / "killed_driver"
    env = os.environ | RAY_ENV | {"KAVA_BUILD_FAULT": "slow:2"}
    env.pop("RAY_ADDRESS", None)
    log = data["root"] / "killed_driver.log"
    with open(log, "wb") as out:        # a local Ray started by the job itself (no cluster address)
        proc = subprocess.Popen([PY, "-m", "jobs.build_cache", "--config", "configs/tiny_cpu.yaml",
                                 *overrides(data, store, "build.writes_in_flight=1")],   # publish as it computes cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 200
        while not shard_ids(store):
            assert proc.poll() is None, f"the job ended early (rc={proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no shard published in time:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _end_group(proc.pid, grace_s=1)  # what is left of that job's local Ray (same process group)
    time.sleep(1)                       # the actor (own process group) exits once its raylet is gone
    done_at_kill = shard_ids(store)
    assert 1 <= len(done_at_kill) < 4, done_at_kill
    assert run_main(data, store) == 0    # rerun: resumes from the ledger
    br = meta(store, "build_report")
    assert br["shards_skipped"] == len(done_at_kill) and br["shards_written"] == 4 - len(done_at_kill)
    assert_same_store(clean, store)


@pytest.mark.timeout(240)
def test_failing_shard_reported_and_example_quarantined(clean, data, monkeypatch, capsys):
    _, _, shards = planned(data)
    nan_id = shards[0][3].id
    store = data["root"] / "failing"
    monkeypatch.setenv("KAVA_BUILD_FAULT", f"fail_shard:2,nan_example:{nan_id}")
    assert run_main(data, store) == 1
    assert shard_ids(store) == [0, 1, 3]
    br = meta(store, "build_report")
    assert not br["ok"] and list(br["failed"]) == ["2"]
    f = br["failed"]["2"]
    assert "fail_shard:2" in f["error"] and f["attempts"] == 2       # build.max_retries=1
    assert f["item_ids"] == [e.id for e in shards[2]]
    q = meta(store, "quarantine")
    assert [(x["example_id"], x["shard"]) for x in q] == [(nan_id, 0)] and "non-finite" in q[0]["error"]
    assert br["rows"] == N_GOOD - 1 - len(shards[2])
    printed = capsys.readouterr().out
    assert "FAILED shard 2" in printed and str(shards[2][0].id) in printed
    for rel in ("k/c/1/0/0/0/0", "v/c/3/0/0/0/0", "ledger/shard-000001.json"):   # untouched shards = clean
        assert (store / rel).read_bytes() == (clean / rel).read_bytes()


@pytest.mark.timeout(240)
def test_fingerprint_mismatch_names_fields(clean, data, tmp_path, capsys):
    store = tmp_path / "copy"
    shutil.copytree(clean, store)
    assert run_main(data, store, "eviction.lam=0.5", "latent.num_latents=5") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error: ")]   # one line, rc 2
    assert len(err) == 1 and "eviction.lam" in err[0] and "latent.num_latents" in err[0]
    assert "fingerprint" in err[0] and "new store path" in err[0].lower()
    assert_same_store(clean, store)


# ----------------------------------------------------------------------------- overlap of compute and writes


class SleepProc:
    """A fake processor: `load_s` of 'model load', `compute_s` of 'GPU' work per shard, arrays from the item ids."""

    def __init__(self, compute_s: float, load_s: float = 0.0):
        self.compute_s = compute_s
        time.sleep(load_s)

    def process(self, items):
        time.sleep(self.compute_s)
        ids = torch.tensor([i.id for i in items], dtype=torch.int64)
        return {"x": ids[:, None].float().repeat(1, 4), "example_id": ids}, {"tokens": 10 * len(items)}


class Item:
    def __init__(self, i):
        self.id = i


@pytest.mark.timeout(180)
def test_writes_overlap_compute(cluster, tmp_path, monkeypatch):
    import functools

    from ray import cloudpickle

    from cache_store.builder import BuildSettings, build_store
    from cache_store.spec import FieldSpec, StoreSpec

    spec = StoreSpec(fields=(FieldSpec("x", (4,), "float32"), FieldSpec("example_id", (), "int64")), shard_size=4)
    store_args = dict(url=str(tmp_path / "s"), spec=spec, fingerprint="fp", fingerprint_fields={"a": 1},
                      num_shards=6, storage_options=None)
    shards = {s: [Item(4 * s + j) for j in range(4)] for s in range(6)}
    cloudpickle.register_pickle_by_value(sys.modules[__name__])       # Ray workers cannot import this test file
    monkeypatch.setenv("CACHE_STORE_FAULT", "sleep_after_claim:0.6")   # every write takes >= 0.6 s
    # the write actors start while the 'model' loads (as they do while a teacher loads), then overlap the compute
    rep = build_store(store_args, shards, functools.partial(SleepProc, 0.6, 8.0),
                      BuildSettings(num_actors=1, progress=False))
    assert rep.ok and rep.shards_written == 6 and rep.rows == 24 and rep.tokens == 240
    assert rep.write_s >= 6 * 0.6 and rep.compute_s >= 6 * 0.6
    # one actor: shard i+1 computes while shard i is written, so most of the write time is hidden
    assert rep.overlap_s >= 0.6 * rep.write_s, rep.timeline
    tl = sorted(rep.timeline, key=lambda r: r["compute"][0])
    assert all(b["compute"][0] < a["write"][1] for a, b in zip(tl, tl[1:])), tl
    assert rep.seconds - rep.startup_s < 0.8 * (rep.compute_s + rep.write_s)
