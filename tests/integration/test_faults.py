"""Every failure path refuses or recovers, never silently loses or invents data (docs/GUARANTEES.md).

Run: python -m pytest tests/integration/test_faults.py -s      (prints the table; ~2-3 min on 2 cores)

One tiny store is built once (jobs.build_cache, Ray, 4 shards of 8 examples); each fault runs on a copy of it.
Faults are injected here: files deleted or bytes flipped, ledger records moved away, a flaky fsspec filesystem,
writes monkeypatched to raise ENOSPC. Each case records (fault, expected, observed, silent?) and the last test
prints the table and fails if any fault went silent.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
SECRET_KEY, SECRET = "AKIAPLANTEDKEY0001", "planted-secret-value-0002"
TABLE: list[tuple[str, str, str, bool]] = []


def record(fault: str, expected: str, observed: str, ok: bool) -> None:
    TABLE.append((fault, expected, observed.replace("\n", " ")[:110], ok))
    assert ok, f"{fault}: expected {expected}, observed {observed}"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(ROOT), RAY_ADDRESS="local")   # a Ray of its own, even if another one runs here
    return env


def job(args: list[str], timeout: int = 300) -> tuple[int, str, str, float]:
    t0 = time.time()
    p = subprocess.run([PY, "-m", *args], cwd=str(ROOT), env=_env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.time() - t0


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from kava_dist.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("faults")
    ckpt = save_tiny_checkpoint(root / "tiny", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1)
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(32):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            f.write(json.dumps({"question": f"Tom has {a} apples and gets {b} more. How many?",
                                "cot": f"<<{a}+{b}={a + b}>> <<{a + b}*1={a + b}>>", "answer": str(a + b)}) + "\n")
    common = ["--config", "configs/tiny_cpu.yaml", f"model.name_or_path={ckpt}", f"data.train_path={root / 'data.jsonl'}",
              "latent.num_latents=4", "store.shard_examples=8", "store.dtype=fp32"]
    store = root / "store"
    rc, out, err, _ = job(["jobs.build_cache", *common, f"store.path={store}",
                           f"store.storage_options={{key: {SECRET_KEY}, secret: {SECRET}}}"], timeout=400)
    assert rc == 0, err[-3000:]
    return {"root": root, "common": common, "store": store}


def copy_store(ws, name: str) -> Path:
    dst = ws["root"] / name
    shutil.copytree(ws["store"], dst)
    return dst


def train(ws, store: Path, out: Path, *extra: str, timeout: int = 300):
    return job(["jobs.train", *ws["common"], "train.stage=student", f"store.path={store}", f"train.out_dir={out}",
                "train.max_steps=2", *extra], timeout=timeout)


def test_missing_chunk_file_is_refused_not_zeros(ws) -> None:
    from cache_store import CorruptShard, StoreReader

    store = copy_store(ws, "missing_chunk")
    os.remove(store / "k" / "c" / "2" / "0" / "0" / "0" / "0")
    try:
        batch = StoreReader(str(store)).get_batch(list(range(16, 24)))
        observed = f"read returned K with |sum| {float(batch['k'].abs().sum()):.3g}"
        ok = False
    except CorruptShard as e:
        observed, ok = f"CorruptShard {e.shard_ids}: ...{str(e)[-70:]}", e.shard_ids == [2]
    record("missing chunk file (rm k/c/2/...)", "error naming shard 2 + repair", observed, ok)


def test_corrupt_shards_mid_training_exit_2_with_one_line(ws) -> None:
    store = copy_store(ws, "corrupt_mid")
    for f in (store / "k" / "c").glob("*/0/0/0/0"):      # flip bytes in every K shard file: the first batch hits one
        b = bytearray(f.read_bytes())
        b[len(b) // 3] ^= 0xFF
        f.write_bytes(bytes(b))
    rc, _, err, _ = train(ws, store, ws["root"] / "run_corrupt")
    lines = error_lines(err)
    ok = rc == 2 and len(lines) == 1 and "corrupt shards" in lines[0] and "jobs.build_cache" in lines[0] \
        and "Traceback" not in err
    record("corrupt chunk during training", "rc 2, one line: shard + repair command",
           f"rc {rc}: {lines[0][:90] if lines else err[-200:]}", ok)


def test_incomplete_store_is_refused_before_the_model(ws) -> None:
    store = copy_store(ws, "incomplete")
    (store / "ledger" / "shard-000001.json").unlink()
    out = ws["root"] / "run_incomplete"
    rc, _, err, dt = train(ws, store, out)
    lines = error_lines(err)
    ok = rc == 2 and len(lines) == 1 and "1 of 4 shards missing (1)" in lines[0] and "allow_partial" in lines[0] \
        and not out.exists()
    record("store missing one ledger record", "rc 2 naming shard 1 + how to finish; no run dir",
           f"rc {rc} in {dt:.0f}s: {lines[0][:80] if lines else err[-200:]}", ok)


def test_transient_object_store_error_is_retried(ws, monkeypatch) -> None:
    import fsspec

    from cache_store import StoreReader
    from cache_store import backend as B

    orig = B.with_retries
    monkeypatch.setattr(B, "with_retries", lambda fn, what, attempts=4, base_delay=0.2: orig(fn, what, attempts, 0))
    url = f"memory://faults-{os.getpid()}/store"
    fs = fsspec.filesystem("memory")
    fs.put(str(ws["store"]), url.split("://", 1)[1], recursive=True)
    r = StoreReader(url)
    real_cat, calls = r.backend.fs.cat, []

    def flaky_cat(paths, **kw):
        calls.append(1)
        if len(calls) == 1:
            return {p: ConnectionError("503 Slow Down") for p in paths}
        return real_cat(paths, **kw)

    r.backend.fs.cat = flaky_cat
    r.ledger._shards.clear()
    n = r.refresh()
    r.backend.fs.cat = real_cat
    record("transient S3 error reading ledger records", "retried; store complete (4/4)",
           f"{len(calls)} reads, {len(r.published_shards())}/4 shards, {n} rows", r.is_complete and len(calls) == 2)


def test_malformed_lines_quarantined_and_too_many_refused(ws) -> None:
    from kava_dist.config import load_config
    from kava_dist.prompts import load_examples, load_training_set

    lines = (ws["root"] / "data.jsonl").read_text().splitlines()
    one = ws["root"] / "one_bad.jsonl"
    one.write_text("\n".join(lines[:10] + ['{"question": "x", "answer": '] + lines[10:]) + "\n")
    exs, rep = load_examples(one)
    ok1 = len(exs) == 32 and rep.quarantined and rep.quarantined[0]["where"].startswith(f"{one}:11:")
    record("one malformed JSON line", "counted + quarantined with file:line; load goes on",
           f"{len(exs)} kept, quarantined {rep.quarantined[:1]}", bool(ok1))
    many = ws["root"] / "many_bad.jsonl"
    many.write_text("\n".join(lines[:10] + ["{oops"] * 5) + "\n")
    cfg = load_config(None, [f"data.train_path={many}"])
    try:
        load_training_set(cfg.data, None)
        observed, ok = "loaded", False
    except ValueError as e:
        observed, ok = str(e)[:100], "max_bad_fraction" in str(e) and "many_bad.jsonl:11" in str(e)
    record("5 of 15 lines malformed", "refused past data.max_bad_fraction, naming file:line", observed, ok)
    out = ws["root"] / "run_many_bad"
    rc, _, err, _ = job(["jobs.train", *ws["common"], f"data.train_path={many}", f"train.out_dir={out}",
                         "train.stage=online", "train.max_steps=1"])
    lines = error_lines(err)
    record("training on that file", "rc 2, one line naming file:line; no run dir left",
           f"rc {rc}: {lines[0][-70:] if lines else err[-150:]}; run dir left: {out.exists()}",
           rc == 2 and len(lines) == 1 and "many_bad.jsonl:11" in lines[0] and "Traceback" not in err
           and not out.exists())


def test_resume_refuses_a_store_whose_rows_changed_and_redacts_secrets(ws) -> None:
    store = copy_store(ws, "growing")
    aside = ws["root"] / "shard-000002.json"
    shutil.move(store / "ledger" / "shard-000002.json", aside)
    out = ws["root"] / "run_resume"
    secret = [f"store.storage_options={{key: {SECRET_KEY}, secret: {SECRET}}}"]
    rc, _, err, _ = train(ws, store, out, "store.allow_partial=true", "train.stop_at_step=1", *secret)
    assert rc == 0, err[-3000:]
    partial_logged = "store.allow_partial=true: training on the 24 rows" in err
    record("deliberate store.allow_partial=true", "trains on 24 of 32 rows, says so in log + config",
           f"rc {rc}, logged: {partial_logged}", partial_logged and "allow_partial: true" in (out / "config.yaml").read_text())
    shutil.move(aside, store / "ledger" / "shard-000002.json")          # the build finished meanwhile
    rc, _, err, _ = train(ws, store, out, "store.allow_partial=true", "--resume", *secret)
    lines = error_lines(err)
    ok = rc == 2 and len(lines) == 1 and "examples 24 -> 32" in lines[0]
    record("store completed between kill and --resume", "rc 2 naming what changed",
           f"rc {rc}: {lines[0][:90] if lines else err[-200:]}", ok)
    leaks = [str(p.relative_to(ws["root"])) for d in (out, ws["store"]) for p in d.rglob("*")
             if p.is_file() and (SECRET.encode() in p.read_bytes() or SECRET_KEY.encode() in p.read_bytes())]
    files = sum(1 for d in (out, ws["store"]) for p in d.rglob("*") if p.is_file())
    record("planted storage_options key/secret", "absent from every written file (run + store)",
           f"{files} files grepped, leaks: {leaks or 'none'}", not leaks)


def test_eval_dataset_name_cannot_escape(ws) -> None:
    from kava_dist.evaluate import resolve_dataset, write_result
    from kava_dist.guard import Refusal

    (ws["root"] / "esc").mkdir(exist_ok=True)
    shutil.copy(ws["root"] / "data.jsonl", ws["root"] / "esc" / "evil.test.jsonl.gz")
    data_dir = ws["root"] / "d1" / "d2"
    data_dir.mkdir(parents=True, exist_ok=True)
    name, _ = resolve_dataset("../../esc/evil", data_dir)
    try:
        write_result({"summary": {"dataset": "../../esc/evil"}}, ws["root"] / "run" / "eval")
        refused = False
    except Refusal:
        refused = True
    ok = name == "evil" and refused and not (ws["root"] / "esc" / "evil.json").exists()
    record("--datasets ../../esc/evil", "written as RUN/eval/evil.json; a path-like name refused",
           f"name {name!r}, path-like name refused: {refused}", ok)


def test_full_disk_in_build_driver_still_reports(ws, monkeypatch, capsys) -> None:
    import jobs.build_cache as bc
    from cache_store.writer import StoreWriter

    store = copy_store(ws, "full_disk")
    real = StoreWriter.put_meta

    def full(self, name, obj):
        if name == "quarantine":
            raise OSError(errno.ENOSPC, "No space left on device", str(store / "meta" / "quarantine.json"))
        return real(self, name, obj)

    monkeypatch.setattr(StoreWriter, "put_meta", full)
    rc = bc.main([*ws["common"][:], f"store.path={store}"])
    out = capsys.readouterr()
    tmp = [str(p) for p in store.rglob("*.tmp")]
    ok = rc == 1 and "cache build summary" in out.out and not tmp and (store / "meta" / "config.json").exists()
    record("disk full writing meta/quarantine", "rc 1, summary printed, other reports written, no temp files",
           f"rc {rc}, summary: {'cache build summary' in out.out}, tmp files: {len(tmp)}", ok)


def test_refusals_are_one_line_rc2_before_startup(ws) -> None:
    rc, _, err, dt = job(["jobs.build_cache", *ws["common"], "store.path=/tmp/x", "loss.kv_loss=bogus"])
    lines = error_lines(err)
    record("build_cache with a bad config value", "rc 2, one line naming the field",
           f"rc {rc} in {dt:.0f}s: {lines[0][:80] if lines else err[-150:]}",
           rc == 2 and len(lines) == 1 and "loss.kv_loss" in lines[0] and "Traceback" not in err)
    out = ws["root"] / "run_nodata"
    rc, _, err, dt = job(["jobs.train", *ws["common"], "data.train_path=/nonexistent/train.jsonl",
                          f"train.out_dir={out}", "train.stage=online"])
    lines = error_lines(err)
    record("training with a missing data file", "rc 2 before model start-up, no run dir left",
           f"rc {rc} in {dt:.0f}s, run dir left: {out.exists()}",
           rc == 2 and len(lines) == 1 and "does not exist" in lines[0] and not out.exists()
           and "student passes" not in err)     # logged once the model is loaded: refused before it


def test_zz_print_table() -> None:
    """Runs last (file order): the table of every fault tried above."""
    w = (max(len(r[0]) for r in TABLE), max(len(r[1]) for r in TABLE))
    print(f"\n{'fault':<{w[0]}} | {'expected':<{w[1]}} | observed")
    for fault, exp, obs, ok in TABLE:
        print(f"{fault:<{w[0]}} | {exp:<{w[1]}} | {obs}{'' if ok else '  <-- SILENT/WRONG'}")
    silent = sum(1 for r in TABLE if not r[3])
    print(f"{len(TABLE)} faults tried, {silent} silent")
    assert TABLE and silent == 0
