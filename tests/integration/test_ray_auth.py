"""The documented cluster path with Ray's token authentication left on (docs/CACHE_BUILD.md, "A Ray cluster"):
the auth lines of that section run verbatim, then `ray start --head --block` on 127.0.0.1 and `ray job submit` of
the cache build. A submit without the token is refused (authentication really is on); with it the store is built.
Everything runs in subprocesses with RAY_AUTH_MODE unset (scripts/test.sh sets it to disabled for the other tests)
and HOME pointing at a temporary folder, so no token lands in the real ~/.ray. The cluster is stopped by ending
the `ray start` process it began, and the test checks that this took its node's processes with it.

Run:  .venv/bin/python -m pytest tests/integration/test_ray_auth.py -m integration -v   (~1-2 min on 2 cores)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kava_testing import QUESTIONS, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
BIN = str(Path(PY).parent)


def doc_auth_lines() -> str:
    """The shell lines of the cluster section that set up authentication, verbatim."""
    text = (REPO / "docs/CACHE_BUILD.md").read_text()
    section = text.split("## A Ray cluster", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    lines = [ln for ln in block.splitlines() if not ln.lstrip().startswith("#")
             and ("get-auth-token" in ln or "RAY_AUTH" in ln)]
    assert lines, "docs/CACHE_BUILD.md's cluster commands do not set up Ray's token authentication"
    return "\n".join(lines)


def _group(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.timeout(600)
def test_cache_build_submitted_to_a_cluster_with_token_auth(tiny_paths, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": q, "cot": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    store = tmp_path / "store"
    home, stranger = tmp_path / "home", tmp_path / "stranger"
    home.mkdir(), stranger.mkdir()
    temp = tempfile.mkdtemp(prefix="ka", dir="/tmp")          # short: Ray's unix sockets live under it
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}    # RAY_AUTH_MODE=disabled goes
    env.update(HOME=str(home), PATH=f"{BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_memory_monitor_refresh_ms="0")   # a busy test host must not get the job killed by Ray's OOM policy
    gcs, dash = free_port(), free_port()
    ports = " ".join(f"{k}={free_port()}" for k in (
        "--ray-client-server-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port"))
    auth = doc_auth_lines()
    start = (f"{auth}\nexec ray start --head --block --port={gcs} --node-ip-address=127.0.0.1 "
             f"--dashboard-host=127.0.0.1 --dashboard-port={dash} --num-cpus=2 --num-gpus=0 "
             f"--object-store-memory=300000000 --temp-dir={temp} --disable-usage-stats {ports}")
    url = f"http://127.0.0.1:{dash}"
    log = open(Path(temp) / "ray_start.log", "wb")
    head = subprocess.Popen(["bash", "-ec", start], env=env, cwd=temp, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
                break
            except urllib.error.HTTPError:             # 401/403: the dashboard is up and wants a token
                break
            except Exception:
                if head.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray start failed (rc={head.poll()}):\n"
                                       f"{(Path(temp) / 'ray_start.log').read_text()[-3000:]}")
                time.sleep(0.5)
        assert (home / ".ray/auth_token").exists()

        build = [PY, "-m", "jobs.build_cache", "--config", "configs/tiny_cpu.yaml",
                 f"model.name_or_path={tiny_paths['llama']}", f"data.train_path={data}", f"store.path={store}",
                 "store.shard_examples=4", "build.batch_size=4", "build.num_actors=1", "build.max_retries=1"]
        submit = ["ray", "job", "submit", "--address", url, "--working-dir", str(REPO), "--"] + build

        # a client without the token (another HOME, nothing exported) is refused
        refused = subprocess.run(submit, env=env | {"HOME": str(stranger)}, cwd=REPO, capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode != 0
        assert "Missing authentication token" in refused.stdout + refused.stderr, refused.stderr[-2000:]

        # with the documented setup the job runs and builds the store
        script = auth + "\nexec " + " ".join(f"'{a}'" for a in submit)
        ok = subprocess.run(["bash", "-ec", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
        assert ok.returncode == 0, f"rc={ok.returncode}\n{ok.stdout[-4000:]}\n{ok.stderr[-3000:]}"
        assert "cache build summary" in ok.stdout
        from cache_store.reader import StoreReader

        reader = StoreReader(str(store))
        assert len(reader) == len(QUESTIONS) and reader.stats()["shards_done"] == reader.stats()["shards_total"]
        assert reader.get_meta("sources")["data.train_path"] == str(data.resolve())
    finally:
        # stop the cluster this test started, and only it: end its `ray start --block` process
        if head.poll() is None:
            os.kill(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.time() + 30
        while _group(head.pid) and time.time() < deadline:
            time.sleep(0.5)
        left = _group(head.pid)
        if left:                                       # do not leave them running, then fail
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"processes of the stopped node still running: {left}"


@pytest.mark.timeout(300)
def test_direct_build_keeps_auth_without_writing_a_token(tiny_paths, tmp_path):
    """`python -m jobs.build_cache` with no cluster starts its own Ray with token auth (Ray's default) and a token
    held in its environment: no ~/.ray/auth_token appears that would switch later `ray start`s to token auth."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"question": q, "cot": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_memory_monitor_refresh_ms="0")
    out = subprocess.run([PY, "-m", "jobs.build_cache", "--config", "configs/tiny_cpu.yaml",
                          f"model.name_or_path={tiny_paths['llama']}", f"data.train_path={data}",
                          f"store.path={tmp_path / 'store'}", "store.shard_examples=4", "build.batch_size=4",
                          "build.num_actors=1", "build.object_store_mb=200"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Token authentication is enabled" in out.stderr         # Ray's own notice: auth stayed on
    assert not (home / ".ray/auth_token").exists()
