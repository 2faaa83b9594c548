"""StoreReader.get_batch in worker processes: reads that never wait for the training process's GIL.

Usage:
    from cache_store import StoreReader
    from cache_store.read_workers import ReadWorkers
    workers = ReadWorkers(StoreReader(url), processes=2)     # spawns 2 processes, each reopening the store
    batch = workers.get_batch(rows, fields=["k", "v"], pin_memory=True)   # same result as StoreReader.get_batch
    workers.close()

A read in the training process takes the GIL back many times per example (index lookup, file read, crc check,
decode, copy); while the training thread runs Python, each wait lasts up to Python's switch interval
(bench/gil_handoff_bench.py). Here a batch's rows are split over the worker processes; each reads its part with
its own StoreReader (the reader is pickled: it reopens the store on the other side) into a shared-memory block,
and the caller copies the blocks into its output tensors (page-locked with `pin_memory`) and frees them. The
caller's process takes its GIL a few times per batch, not per example. `readahead` (a remote store's whole shard
files into its cache_dir; with page_readahead, a local store's row ranges into the page cache) runs in the
caller's process, on the reader it was given.

Errors in a worker come back as the same exception type where it pickles (else a RuntimeError with its text); a
worker that dies is reported with its exit code. Workers are daemon processes: they end with the caller.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import queue
import threading
from multiprocessing import shared_memory
from typing import Sequence

import numpy as np
import torch

_POLL_S = 0.5


def _serve(reader, tasks, results) -> None:
    """Worker loop: (task id, rows, fields, dequantize) -> (task id, "ok", shm name, layout) or (id, "err", exc)."""
    torch.set_num_threads(1)
    while True:
        task = tasks.get()
        if task is None:
            return
        tid, rows, fields, dequantize = task
        try:
            arrays = reader.get_batch(rows, fields=fields, dequantize=dequantize)
            flat = {k: t.contiguous().view(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)
                    for k, t in arrays.items()}
            shm = shared_memory.SharedMemory(create=True, size=max(1, sum(int(f.numel()) for f in flat.values())))
            layout, off = [], 0
            for k, t in arrays.items():
                n = int(flat[k].numel())
                if n:
                    torch.frombuffer(shm.buf, dtype=torch.uint8, count=n, offset=off).copy_(flat[k])
                layout.append((k, str(t.dtype).removeprefix("torch."), tuple(t.shape), off, n))
                off += n
            name = shm.name
            shm.close()
            results.put((tid, "ok", name, layout))
        except BaseException as e:       # noqa: BLE001 - every failure goes back to the caller
            try:
                results.put((tid, "err", e))
            except Exception:            # the exception does not pickle
                results.put((tid, "err", RuntimeError(f"{type(e).__name__}: {e}")))


def _free(got: dict[int, tuple[str, list]]) -> None:
    """Unlink the shared-memory blocks of a batch that will not be used."""
    for name, _ in got.values():
        if name:
            block = shared_memory.SharedMemory(name=name)
            block.close()
            block.unlink()


class ReadWorkers:
    """`processes` worker processes serving StoreReader.get_batch for one store (see the module docstring)."""

    def __init__(self, reader, processes: int = 2):
        if processes < 1:
            raise ValueError(f"processes={processes}: use >= 1 (train.loader_read_processes), or read in-process.")
        self.spec, self.url = reader.spec, reader.url    # what StoreLoader reads of its reader besides batches
        self._reader = reader                     # readahead runs here; batches are read in the workers
        ctx = mp.get_context("spawn")             # no fork of a process that may hold CUDA or threads
        self._tasks = [ctx.Queue() for _ in range(processes)]
        self._results = ctx.Queue()
        self._procs = [ctx.Process(target=_serve, args=(reader, q, self._results), daemon=True,
                                   name=f"cache_store-read-{i}") for i, q in enumerate(self._tasks)]
        for p in self._procs:
            p.start()
        self._ids = itertools.count()
        self._lock = threading.Lock()             # one batch in flight at a time (the loader's prefetch thread)

    def readahead(self, indices: Sequence[int] | np.ndarray, fields: Sequence[str] | None = None) -> None:
        """StoreReader.readahead in this process: a remote store's shard files are fetched into its cache_dir,
        where the workers' readers find them (the cache is shared on the node); with page_readahead, a local
        store's row ranges are advised into the page cache, which the workers share too."""
        self._reader.readahead(indices, fields)

    def get_batch(self, indices: Sequence[int] | np.ndarray, dequantize: bool = True,
                  fields: Sequence[str] | None = None, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """StoreReader.get_batch, its rows split over the workers, in the same row order."""
        rows = np.asarray(indices, dtype=np.int64)
        parts = [p for p in np.array_split(np.arange(len(rows)), len(self._procs)) if len(p)] or [np.arange(0)]
        with self._lock:
            ids = {}
            for w, part in enumerate(parts):
                tid = next(self._ids)
                ids[tid] = w
                self._tasks[w].put((tid, rows[part], None if fields is None else list(fields), dequantize))
            got = self._collect(ids)
        out: dict[str, torch.Tensor] = {}
        sizes = [len(p) for p in parts]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for i, tid in enumerate(ids):
            name, layout = got[tid]
            shm = shared_memory.SharedMemory(name=name)
            try:
                for k, dtype, shape, off, n in layout:
                    dt = getattr(torch, dtype)
                    if k not in out:
                        out[k] = torch.empty((len(rows), *shape[1:]), dtype=dt, pin_memory=pin_memory)
                    if n:
                        src = torch.frombuffer(shm.buf, dtype=torch.uint8, count=n, offset=off)
                        out[k][starts[i]:starts[i + 1]].view(-1).view(torch.uint8).copy_(src)
            finally:
                shm.close()
                shm.unlink()
        return out

    def _collect(self, ids: dict[int, int]) -> dict[int, tuple[str, list]]:
        got: dict[int, tuple[str, list]] = {}
        error: BaseException | None = None
        while len(got) < len(ids):
            try:
                tid, kind, *rest = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:
                    _free(got)
                    raise RuntimeError(f"store read worker {dead[0].name} exited with code {dead[0].exitcode} while "
                                       f"reading {self.url}; see its output above. Rerun, or set "
                                       "train.loader_read_processes=0 to read in the training process.") from error
                continue
            if tid not in ids:                    # left over from a batch that failed: drop it
                _free({tid: (rest[0], rest[1])} if kind == "ok" else {})
                continue
            if kind == "err":
                error = error or rest[0]
                got[tid] = ("", [])
            else:
                got[tid] = (rest[0], rest[1])
        if error is not None:
            _free(got)
            raise error
        return got

    def close(self) -> None:
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)

    def __enter__(self) -> "ReadWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
