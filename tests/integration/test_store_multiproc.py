"""cache_store with several OS processes: SIGKILL mid-shard + resume, claim races, concurrent writers, CLI.

This file is also the worker script the tests start:
    python tests/integration/test_store_multiproc.py URL SHARD[,SHARD...] [--barrier]
It prints READY, waits for a line on stdin if --barrier, writes the shards and prints one JSON
line per shard: {"shard": i, "result": "wrote" | "existing" | "claimed"}.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # when run as a worker script
    sys.path.insert(0, str(REPO))

from cache_store import FieldSpec, ShardClaimed, StoreReader, StoreSpec, StoreWriter  # noqa: E402
from cache_store.claims import claim_dir  # noqa: E402

SPEC = StoreSpec(fields=(
    FieldSpec("k", (2, 2, 24, 16), "bfloat16", quant="int8", quant_reduce_axes=(2,)),
    FieldSpec("v", (2, 2, 24, 16), "bfloat16"),
    FieldSpec("valid", (2, 2, 24), "bool"),
    FieldSpec("codi_h", (2, 64), "bfloat16"),
    FieldSpec("example_id", (), "int64"),
    FieldSpec("cot_len", (), "int32"),
), shard_size=8)
NUM_SHARDS = 6
FP, FIELDS = "fp-integration", {"teacher": "tiny", "eviction": {"lam": 0.1}}


def shard_rows(shard: int) -> int:
    return 5 if shard == 4 else 8  # one partial shard


def shard_data(shard: int) -> dict[str, object]:
    """Deterministic per shard, so separate processes produce the same inputs."""
    n = shard_rows(shard)
    g = torch.Generator().manual_seed(1000 + shard)
    rng = np.random.default_rng(1000 + shard)
    return {
        "k": torch.randn(n, 2, 2, 24, 16, generator=g).bfloat16(),
        "v": torch.randn(n, 2, 2, 24, 16, generator=g).bfloat16(),
        "valid": rng.random((n, 2, 2, 24)) > 0.2,
        "codi_h": torch.randn(n, 2, 64, generator=g).bfloat16(),
        "example_id": np.arange(n, dtype=np.int64) + 100 * shard,
        "cot_len": rng.integers(1, 300, size=n, dtype=np.int32),
    }


def open_writer(url: str) -> StoreWriter:
    return StoreWriter.create_or_open(url, SPEC, FP, FIELDS, num_shards=NUM_SHARDS)


def worker_main(argv: list[str]) -> None:
    url, shards = argv[0], [int(s) for s in argv[1].split(",")]
    w = open_writer(url)
    print("READY", flush=True)
    if "--barrier" in argv:
        sys.stdin.readline()
    for s in shards:
        try:
            w.write_shard(s, shard_data(s))
            res = "wrote" if s in w.shards_written else "existing"
        except ShardClaimed:
            res = "claimed"
        print(json.dumps({"shard": s, "result": res, "pid": os.getpid()}), flush=True)


# ------------------------------------------------------------------------------------------------
def spawn(url: str, shards: list[int], barrier: bool = False, fault: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("CACHE_STORE_FAULT", None)
    if fault:
        env["CACHE_STORE_FAULT"] = fault
    cmd = [sys.executable, __file__, url, ",".join(map(str, shards))] + (["--barrier"] if barrier else [])
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_line(proc: subprocess.Popen, stream_name: str, needle: str, timeout: float = 60) -> str:
    stream = getattr(proc, stream_name)
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        if sel.select(timeout=max(0.0, deadline - time.time())):
            line = stream.readline()
            if not line:
                break
            seen.append(line)
            if needle in line:
                return line
    proc.kill()
    try:                                    # what the child said before it ended: the reason it never got there
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        err = ""
    raise AssertionError(f"no {needle!r} on {stream_name} within {timeout}s; got {seen[-20:]} rc={proc.poll()}; "
                         f"its stderr ends: {(err or '')[-3000:]}")


def finish(proc: subprocess.Popen, timeout: float = 90) -> list[dict]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def data_files(root: Path) -> dict[str, bytes]:
    """Every file of the store except claims/ and ledger/store.json (which holds a creation time)."""
    out = {}
    for p in root.rglob("*"):
        rel = str(p.relative_to(root))
        if p.is_file() and not rel.startswith("claims") and rel != "ledger/store.json":
            out[rel] = p.read_bytes()
    return out


def check_contents(url: str) -> None:
    r = StoreReader(url, verify=True)
    assert r.published_shards() == list(range(NUM_SHARDS))
    b = r.get_batch(range(len(r)))
    at = 0
    for s in range(NUM_SHARDS):
        d = shard_data(s)
        n = shard_rows(s)
        for name in ("v", "codi_h"):
            assert torch.equal(b[name][at : at + n].view(torch.int16), d[name].view(torch.int16)), (s, name)
        assert torch.equal(b["example_id"][at : at + n], torch.from_numpy(d["example_id"]))
        assert torch.equal(b["valid"][at : at + n], torch.from_numpy(d["valid"]))
        at += n


# ------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sigkill_mid_shard_then_resume_equals_clean_build(tmp_path: Path) -> None:
    clean = open_writer(str(tmp_path / "clean"))
    for s in range(NUM_SHARDS):
        clean.write_shard(s, shard_data(s))

    url = str(tmp_path / "killed")
    proc = spawn(url, list(range(NUM_SHARDS)), fault="pause_after_first_array:2")
    wait_line(proc, "stderr", "CACHE_STORE_FAULT pause_after_first_array shard=2")
    # Mid-build: shards 0 and 1 are published, shard 2 has its first array written and no record.
    root = tmp_path / "killed"
    assert (root / "k.q" / "c" / "2" / "0" / "0" / "0" / "0").exists()
    assert not (root / "v" / "c" / "2").exists()
    r = StoreReader(url)
    assert r.published_shards() == [0, 1] and len(r) == 16
    assert torch.equal(r.get_batch([15])["example_id"], torch.tensor([107]))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert StoreReader(url).published_shards() == [0, 1]

    # Rerun: the dead process's claim on shard 2 (same host, dead pid) is taken over at once.
    w = open_writer(url)
    assert w.missing_shards() == [2, 3, 4, 5]
    for s in w.missing_shards():
        w.write_shard(s, shard_data(s))
    assert w.shards_written == [2, 3, 4, 5]
    assert r.refresh() == 8 * 5 + 5

    got, want = data_files(root), data_files(tmp_path / "clean")
    assert sorted(got) == sorted(want)  # same files: no leftovers of the killed write
    assert [k for k in want if got[k] != want[k]] == []  # byte-identical data, zarr metadata and records
    check_contents(url)


@pytest.mark.integration
@pytest.mark.parametrize("fault", [None, "sleep_after_claim:1.5"])
def test_two_processes_racing_for_one_shard_exactly_one_writes(tmp_path: Path, fault: str | None) -> None:
    url = str(tmp_path / "race")
    open_writer(url)
    procs = [spawn(url, [3], barrier=True, fault=fault) for _ in range(2)]
    for p in procs:
        wait_line(p, "stdout", "READY")
    for p in procs:  # release both at once
        p.stdin.write("go\n")
        p.stdin.flush()
    results = sorted(r["result"] for p in procs for r in finish(p))
    assert results.count("wrote") == 1, results
    assert results[0] in ("claimed", "existing")
    if fault:  # the winner holds the claim for 1.5 s, so the loser must have met it
        assert results == ["claimed", "wrote"]
    held = [json.loads(p.read_text()) for p in sorted((tmp_path / "race" / claim_dir(3)).glob("*.json"))]
    assert [c["state"] for c in held].count("held") == 1
    r = StoreReader(url, verify=True)
    assert r.published_shards() == [3]
    assert torch.equal(r.get_batch(range(8))["example_id"], torch.from_numpy(shard_data(3)["example_id"]))


@pytest.mark.integration
def test_four_processes_create_and_write_disjoint_shards(tmp_path: Path) -> None:
    url = str(tmp_path / "four")  # store does not exist yet: the four race to create it too
    plan = {0: [0, 4], 1: [1, 5], 2: [2], 3: [3]}
    procs = [spawn(url, shards, barrier=True) for shards in plan.values()]
    for p in procs:
        wait_line(p, "stdout", "READY")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p, shards in zip(procs, plan.values()):
        assert [(r["shard"], r["result"]) for r in finish(p)] == [(s, "wrote") for s in shards]
    check_contents(url)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = subprocess.run([sys.executable, "-m", "cache_store", "verify", url], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "OK: 6 published shards" in cli.stdout


@pytest.mark.integration
def test_verify_cli_exits_nonzero_naming_the_corrupt_shard(tmp_path: Path) -> None:
    url = str(tmp_path / "cli")
    w = open_writer(url)
    for s in range(NUM_SHARDS):
        w.write_shard(s, shard_data(s))
    f = tmp_path / "cli" / "codi_h" / "c" / "5" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # one bit, in a compressed chunk
    f.write_bytes(bytes(raw))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cli = subprocess.run([sys.executable, "-m", "cache_store", "verify", url], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "CORRUPT shard 5" in cli.stderr and "['codi_h']" in cli.stderr and "[5]" in cli.stderr
    assert "verify" in cli.stderr  # tqdm progress bar
    info = subprocess.run([sys.executable, "-m", "cache_store", "info", url], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and "6/6 done" in info.stdout and FP in info.stdout


if __name__ == "__main__":
    worker_main(sys.argv[1:])
