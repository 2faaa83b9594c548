"""[5] Streaming loaders: deterministic, rank-sharded, resumable micro-batches, with background prefetch.

Usage:
    from kava_dist.loader import GlobalBatchPlan, TokenLoader, StoreLoader
    plan = GlobalBatchPlan(n_items=len(encoded), global_batch=128, micro_batch=8, world_size=2, seed=0)
    loader = TokenLoader(encoded, plan, rank=0, pad_id=special.pad)                # teacher / online / nocot
    loader = StoreLoader(reader, encoded_by_id, plan, rank=0, pad_id=special.pad)  # student: + store targets
    for step, micro, batch, targets in loader.iterate(start_step=0, num_steps=1000): ...

The order depends only on (seed, epoch) and the global batch, never on the GPU count: global step s of epoch e
takes items perm_e[s*G:(s+1)*G], and that slice is cut into micro-batches of `micro_batch`, micro-batch j going
to rank j // accum (accum = G / (micro * world)). So 1 process x accumulation 2 sees the same examples per
optimizer step as 2 processes x accumulation 1, and resuming at step s needs nothing but s. The partial last
global batch of an epoch is dropped.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from kava_dist.prompts import Encoded, collate
from kava_dist.step import Targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlobalBatchPlan:
    n_items: int
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int = 0

    def __post_init__(self):
        per_rank = self.micro_batch * self.world_size
        if self.global_batch % per_rank:
            raise ValueError(
                f"train.global_batch={self.global_batch} is not a multiple of train.micro_batch={self.micro_batch} x "
                f"world size {self.world_size}. Pick micro_batch so that micro x GPUs divides the global batch.")
        if self.n_items < self.global_batch:
            raise ValueError(f"only {self.n_items} training examples for train.global_batch={self.global_batch}. "
                             "Lower the global batch or add data.")

    @property
    def accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_items)

    def micro_indices(self, step: int, rank: int) -> list[np.ndarray]:
        """Item indices of this rank's `accum` micro-batches for global optimizer step `step`."""
        epoch, s = divmod(step, self.steps_per_epoch)
        g = self.permutation(epoch)[s * self.global_batch:(s + 1) * self.global_batch]
        micros = g.reshape(-1, self.micro_batch)                  # [world * accum, micro]
        return list(micros[rank * self.accum:(rank + 1) * self.accum])


class _Prefetcher:
    """Runs `produce(i)` for i in order on a background thread, `depth` items ahead."""

    def __init__(self, produce, items: Sequence, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce, items), daemon=True)
        self._thread.start()

    def _run(self, produce, items):
        try:
            for it in items:
                if self._stop.is_set():
                    return
                self._q.put(("ok", produce(it)))
        except BaseException as e:  # surfaced in the consumer
            self._q.put(("err", e))
        self._q.put(("end", None))

    def __iter__(self):
        while True:
            kind, val = self._q.get()
            if kind == "end":
                return
            if kind == "err":
                raise val
            yield val

    def close(self):
        self._stop.set()


class TokenLoader:
    """Micro-batches of tokenised examples (no store): teacher, online and nocot stages."""

    def __init__(self, encoded: Sequence[Encoded], plan: GlobalBatchPlan, rank: int, pad_id: int, prefetch: int = 2):
        self.encoded, self.plan, self.rank, self.pad_id, self.prefetch = list(encoded), plan, rank, pad_id, prefetch

    def _make(self, key):
        step, micro, idx = key
        return step, micro, collate([self.encoded[i] for i in idx], self.pad_id), None

    def _keys(self, start_step: int, num_steps: int):
        for step in range(start_step, num_steps):
            for j, idx in enumerate(self.plan.micro_indices(step, self.rank)):
                yield step, j, idx

    def iterate(self, start_step: int, num_steps: int) -> Iterator[tuple[int, int, object, Targets | None]]:
        if self.prefetch <= 0:
            yield from map(self._make, self._keys(start_step, num_steps))
            return
        pf = _Prefetcher(self._make, self._keys(start_step, num_steps), self.prefetch)
        try:
            yield from pf
        finally:
            pf.close()


class StoreLoader(TokenLoader):
    """Micro-batches whose teacher targets come from the store (one batched, chunk-aligned read each)."""

    def __init__(self, reader, encoded_by_id: dict[int, Encoded], plan: GlobalBatchPlan, rank: int, pad_id: int,
                 prefetch: int = 4, dtype: torch.dtype | None = None):
        super().__init__([], plan, rank, pad_id, prefetch)
        self.reader, self.by_id, self.dtype = reader, encoded_by_id, dtype

    def _make(self, key):
        step, micro, idx = key
        order = np.argsort(idx)                      # read in store order, hand back in plan order
        arrays = self.reader.get_batch([int(i) for i in idx[order]])
        inv = torch.from_numpy(np.argsort(order))
        arrays = {k: v[inv] for k, v in arrays.items()}
        ids = arrays["example_id"].tolist()
        missing = [i for i in ids if i not in self.by_id]
        if missing:
            raise KeyError(f"store rows reference example ids {missing[:5]} that the training data does not have: "
                           "data.train_path or data.* differ from the build (the fingerprint should have caught this).")
        batch = collate([self.by_id[i] for i in ids], self.pad_id)
        t = Targets(arrays["k"], arrays["v"], arrays["valid"].bool(), arrays["codi_h"])
        if self.dtype is not None:
            t = t.to(dtype=self.dtype)
        return step, micro, batch, t
