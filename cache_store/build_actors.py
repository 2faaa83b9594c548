"""The two Ray actor bodies of a store build: a compute worker (the processor, e.g. a teacher on a GPU) and
write workers (compression + store writes, each its own process), and the build's fault injection.

Usage (inside cache_store.builder; Ray wraps the classes):
    compute = ray.remote(ComputeWorker).options(num_gpus=1, max_concurrency=2).remote(make_processor)
    arrays_ref, meta_ref = compute.compute.options(num_returns=2).remote(shard_id, items)
    writer = ray.remote(WriteWorker).options(num_cpus=0).remote(store_args, threads=2)
    result = ray.get(writer.write.remote(shard_id, arrays_ref, ray.get(meta_ref)["quarantined"]))

Why two kinds: a teacher process that also compresses and writes shards loses half its speed to the writes
(CPU threads and the GIL compete with the thread that launches GPU kernels); writer processes scale the write
rate with the node's cores instead. The compute worker runs two tasks at a time: one launches shard i+1's
device work (under a lock) while the other waits for shard i and copies it to the host, so the GPU never waits
for the host. Arrays travel through Ray's object store as numpy (zero-copy for the writer on the same node).

Fault injection for tests (KAVA_BUILD_FAULT, CACHE_STORE_FAULT): see cache_store/faults.py.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from typing import Any, Callable

import numpy as np

from cache_store.errors import StoreNotFound
from cache_store.faults import FORWARDED_ENV  # noqa: F401  (re-exported for builder.py)
from cache_store.faults import arm_kill_mid_write as _arm_kill
from cache_store.faults import build_faults as faults


def quarantine_meta_name(shard_id: int) -> str:
    return f"quarantine.shard-{shard_id:06d}"


def to_numpy(arrays: dict) -> dict[str, np.ndarray]:
    """Host arrays as numpy (torch bfloat16 -> its uint16 bits), so Ray's object store holds them zero-copy."""
    import torch

    out = {}
    for k, v in arrays.items():
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            v = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
        out[k] = v
    return out


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray (unit use)
        return ""


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray (unit use)
        return ""


class ComputeWorker:
    """Ray actor body: runs the processor (built once by `make_processor`) on one shard per task.

    The processor (a model load) is built in a background thread, so `node()` answers at once and the driver
    can start this actor's write actors on the same node while the model loads; `ready()` waits for the load."""

    def __init__(self, make_processor: Callable[[], Any]):
        self.error = None                  # Ray handles a failing actor constructor badly: report through ready()
        self.lock = threading.Lock()
        self._loaded = threading.Event()

        def load():
            try:
                self.proc = make_processor()
            except Exception:  # noqa: BLE001
                self.error = traceback.format_exc()
            finally:
                self._loaded.set()

        threading.Thread(target=load, name="load-processor", daemon=True).start()

    def node(self) -> str:
        return _node_id()

    def ready(self) -> dict:
        self._loaded.wait()
        return {"error": self.error, "node_id": _node_id(), "node_ip": _node_ip(), "pid": os.getpid()}

    def compute(self, shard_id: int, items: list) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, meta): call with .options(num_returns=2) so the driver waits on the small meta alone."""
        self._loaded.wait()
        if self.error:
            raise RuntimeError(f"actor failed to start:\n{self.error}")
        f = faults()
        split = hasattr(self.proc, "launch") and hasattr(self.proc, "finish")
        with self.lock:                                     # one shard's device work at a time
            t0 = time.time()
            if "slow" in f:
                time.sleep(float(f["slow"] or 1.0))
            if f.get("fail_shard") not in (None, "") and int(f["fail_shard"]) == shard_id:
                raise RuntimeError(f"KAVA_BUILD_FAULT fail_shard:{shard_id} (injected processor failure)")
            if split:
                launched = self.proc.launch(items)
            else:
                arrays, info = self.proc.process(items)
        if split:                                           # outside the lock: the next shard launches meanwhile
            arrays, info = self.proc.finish(launched, relaunch_lock=self.lock)
        out = to_numpy(arrays)
        meta = {"shard": shard_id, "tokens": int(info.get("tokens", 0)), "pid": os.getpid(),
                "quarantined": [dict(q, shard=shard_id) for q in info.get("quarantined", [])],
                "compute": (t0, time.time())}
        return out, meta


class WriteWorker:
    """Ray actor body: writes computed shards into the store, one at a time (its own process and GIL)."""

    def __init__(self, store_args: dict, threads: int = 0):
        self.error = None
        self.owner: dict = {}
        try:
            if threads > 0:                  # zarr's codec threads in this process (encode runs outside the GIL)
                import zarr

                zarr.config.set({"threading.max_workers": int(threads), "async.concurrency": int(threads) * 2})
            from cache_store.writer import StoreWriter

            self.writer = StoreWriter.create_or_open(**store_args, create=False)   # the driver created it
            self.owner = dict(self.writer.claims.owner)
        except StoreNotFound as e:           # one line naming the fix (a store path this node does not see)
            self.error = str(e)
        except Exception:  # noqa: BLE001
            self.error = traceback.format_exc()

    def ready(self) -> dict:
        return {"error": self.error, "owner": self.owner, "node_id": _node_id(), "node_ip": _node_ip(),
                "pid": os.getpid()}

    def write(self, shard_id: int, arrays: dict[str, np.ndarray], quarantined: list[dict]) -> dict:
        from cache_store.errors import ShardClaimed

        if self.error:
            raise RuntimeError(f"writer failed to start:\n{self.error}")
        t1 = time.time()
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
        return {"shard": shard_id, "rows": rec.rows, "bytes": rec.bytes, "write": (t1, time.time()),
                "pid": os.getpid()}
