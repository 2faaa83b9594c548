"""Every test-only fault hook of the project, in one place (production code calls these; they do nothing unless
the environment variable is set). Tests set the variables; nothing else should.

    KAVA_BUILD_FAULT   comma-separated list, read by the cache build's actors:
        kill_mid_write:SHARD   SIGKILL the write actor after SHARD's first array is written, once per
                               KAVA_BUILD_FAULT_DIR (a marker file makes it one-time)
        fail_shard:SHARD       raise in the processor step of SHARD, every time
        slow:SECONDS           sleep SECONDS inside the compute lock of every shard (a slow GPU)
        nan_example:ID         make the teacher's K of example ID non-finite (it is quarantined)
    CACHE_STORE_FAULT  one of, read by StoreWriter.write_shard:
        sleep_after_claim[:SECONDS] | pause_after_first_array[:SHARD] | kill_after_first_array[:SHARD]
    KAVA_FAULT_KILL_AT_STEP=N   every training rank SIGKILLs itself after step N is logged/saved

The build's driver forwards FORWARDED_ENV to its actors.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

FORWARDED_ENV = ("KAVA_BUILD_FAULT", "KAVA_BUILD_FAULT_DIR", "CACHE_STORE_FAULT")


def build_faults() -> dict[str, str]:
    """KAVA_BUILD_FAULT as {name: argument} (the last nan_example wins here; see nan_example_ids)."""
    out = {}
    for part in filter(None, os.environ.get("KAVA_BUILD_FAULT", "").split(",")):
        name, _, arg = part.strip().partition(":")
        out[name] = arg
    return out


def nan_example_ids() -> set[int]:
    ids = set()
    for part in os.environ.get("KAVA_BUILD_FAULT", "").split(","):
        name, _, arg = part.strip().partition(":")
        if name == "nan_example" and arg:
            ids.add(int(arg))
    return ids


def arm_kill_mid_write(shard_id: int) -> bool:
    """kill_mid_write: make the store writer SIGKILL this process after the shard's first array (once)."""
    arg = build_faults().get("kill_mid_write")
    if arg is None or int(arg) != shard_id:
        return False
    marker = Path(os.environ.get("KAVA_BUILD_FAULT_DIR", "/tmp")) / f"kava_fault_shard{shard_id}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    os.environ["CACHE_STORE_FAULT"] = f"kill_after_first_array:{shard_id}"
    return True


def store_fault(point: str, shard_id: int) -> None:
    """CACHE_STORE_FAULT at `point` ("claimed" | "first_array") of writing shard `shard_id`."""
    spec = os.environ.get("CACHE_STORE_FAULT", "")
    if not spec:
        return
    name, _, arg = spec.partition(":")
    if name == "sleep_after_claim" and point == "claimed":
        time.sleep(float(arg or 1.0))
    if point == "first_array" and name in ("pause_after_first_array", "kill_after_first_array"):
        if arg and int(arg) != shard_id:
            return
        print(f"CACHE_STORE_FAULT {name} shard={shard_id} pid={os.getpid()}", file=sys.stderr, flush=True)
        if name == "kill_after_first_array":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(600)


def kill_at_step() -> int:
    return int(os.environ.get("KAVA_FAULT_KILL_AT_STEP", "0") or 0)


def maybe_kill_after_step(step: int, at: int) -> None:
    if at and step == at:
        log.warning("KAVA_FAULT_KILL_AT_STEP=%d: killing this process", at)
        os.kill(os.getpid(), signal.SIGKILL)
