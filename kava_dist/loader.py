"""[5] Streaming loaders: deterministic, rank-sharded, resumable micro-batches, with background prefetch.

Usage:
    from kava_dist.loader import GlobalBatchPlan, TokenLoader, StoreLoader
    plan = GlobalBatchPlan(n_items=len(encoded), global_batch=128, micro_batch=8, world_size=2, seed=0)
    loader = TokenLoader(encoded, plan, rank=0, pad_id=special.pad)                # teacher / online / nocot
    items, rows, info = align_store(reader, encoded)                              # student: data order -> rows
    plan = plan_for(cfg.train, items, world_size=2)                               # + train.group_by_length
    loader = StoreLoader(reader, items, rows, plan, rank=0, pad_id=special.pad)    # + store targets
    for step, micro, batch, targets in loader.iterate(start_step=0, num_steps=1000):
        targets = targets.to(device, non_blocking=True)   # Targets; an int8/int4 store's QuantizedTargets are
                                                          # copied quantised and dequantised on the device

The order depends only on (seed, epoch) and the global batch, never on the GPU count: global step s of epoch e
takes items perm_e[s*G:(s+1)*G], and that slice is cut into micro-batches of `micro_batch`, micro-batch j going
to rank j // accum (accum = G / (micro * world)). So 1 process x accumulation 2 sees the same examples per
optimizer step as 2 processes x accumulation 1, and resuming at step s needs nothing but s. The partial last
global batch of an epoch is dropped. For the student stage the plan indexes the training examples that the
store holds, in data order (`align_store`), so it sees the same batches as `online` on the same data.

Length grouping (`train.group_by_length`, `plan_for`): padding to the longest row of a micro-batch is compute
that counts for nothing, so the plan can group examples of similar length. With 1, each global batch keeps its
examples but is sorted by length before it is cut, so each micro-batch holds neighbours in length, and at
micro-step j every rank gets neighbouring lengths (no rank waits on another's long rows). With N > 1 the epoch's
order is cut into megabatches of N global batches, each sorted by length and cut back into global batches whose
order is then shuffled (HF Trainer's group_by_length): global batches become length-homogeneous too (a sampling
change, docs/DEVIATIONS.md D23). Either way the plan stays a function of (seed, epoch), never of the GPU count
beyond the rank layout, and an epoch still takes every kept example once.
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch

from kava_dist.prompts import Encoded, collate
from kava_dist.targets import READ_FIELDS, Targets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GlobalBatchPlan:
    n_items: int
    global_batch: int
    micro_batch: int
    world_size: int
    seed: int = 0
    group_by_length: int = 0
    """0: uniform random batches; 1: micro-batches grouped by length inside each global batch; N > 1: global
    batches grouped too, by megabatches of N global batches (module docstring)."""
    lengths: np.ndarray | None = field(default=None, compare=False, repr=False)
    """Padded-cost length of each item (`padded_length`); required when group_by_length > 0, used by
    padding_fraction."""

    def __post_init__(self):
        if min(self.global_batch, self.micro_batch, self.world_size) < 1:
            raise ValueError(f"global_batch={self.global_batch}, micro_batch={self.micro_batch} and world_size="
                             f"{self.world_size} must all be >= 1.")
        per_rank = self.micro_batch * self.world_size
        if self.global_batch % per_rank:
            raise ValueError(
                f"train.global_batch={self.global_batch} is not a multiple of train.micro_batch={self.micro_batch} x "
                f"world size {self.world_size}. Pick micro_batch so that micro x GPUs divides the global batch.")
        if self.n_items < self.global_batch:
            raise ValueError(f"only {self.n_items} training examples for train.global_batch={self.global_batch}. "
                             "Lower the global batch or add data.")
        if self.group_by_length < 0:
            raise ValueError(f"train.group_by_length={self.group_by_length} must be >= 0 (0 = off).")
        if self.group_by_length and (self.lengths is None or len(self.lengths) != self.n_items):
            raise ValueError(f"train.group_by_length={self.group_by_length} needs one length per item "
                             f"({self.n_items}); build the plan with plan_for().")

    @property
    def accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        return self.n_items // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        """Item order of `epoch`: a permutation seeded by (seed, epoch), so every epoch reshuffles; with
        group_by_length, regrouped by length (module docstring)."""
        perm = _permutation(self.seed, epoch, self.n_items)
        if not self.group_by_length:
            return perm
        cache = self.__dict__.setdefault("_grouped_cache", {})   # per plan: grouping sorts the whole epoch
        if epoch not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[epoch] = self._grouped(perm, epoch)
            cache[epoch].setflags(write=False)
        return cache[epoch]

    def padding_fraction(self, epoch: int = 0) -> float | None:
        """Share of the length units that are padding when each micro-batch of `epoch` is padded to its longest
        row (by `lengths`; None without them): what train.group_by_length saves."""
        if self.lengths is None:
            return None
        used = self.steps_per_epoch * self.global_batch
        L = np.asarray(self.lengths)[self.permutation(epoch)[:used].reshape(-1, self.micro_batch)]
        return float(1.0 - L.sum() / max(1, L.max(axis=1).sum() * self.micro_batch))

    def _grouped(self, perm: np.ndarray, epoch: int) -> np.ndarray:
        G, used = self.global_batch, self.steps_per_epoch * self.global_batch
        lengths = np.asarray(self.lengths)
        mega = self.group_by_length * G
        batches = []
        for start in range(0, used, mega):
            part = perm[start:min(start + mega, used)]
            part = part[np.argsort(-lengths[part], kind="stable")]         # longest first, ties in shuffled order
            batches += list(part.reshape(-1, G))
        order = np.arange(len(batches))
        if self.group_by_length > 1:                                         # no length curriculum over the epoch
            order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
        # inside a global batch: sorted micro-batch k -> rank k % world, micro-step k // world
        k = np.arange(self.world_size * self.accum).reshape(self.accum, self.world_size).T.reshape(-1)
        out = [batches[i].reshape(-1, self.micro_batch)[k].reshape(-1) for i in order]
        return np.concatenate(out + [perm[used:]])

    def global_indices(self, step: int) -> np.ndarray:
        """Item indices of global optimizer step `step` (all ranks, all micro-batches), in micro-batch order."""
        if step < 0:
            raise ValueError(f"step {step} must be >= 0.")
        epoch, s = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[s * self.global_batch:(s + 1) * self.global_batch]

    def micro_indices(self, step: int, rank: int) -> list[np.ndarray]:
        """Item indices of this rank's `accum` micro-batches for global optimizer step `step`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in [0, {self.world_size}).")
        micros = self.global_indices(step).reshape(-1, self.micro_batch)     # [world * accum, micro]
        return list(micros[rank * self.accum:(rank + 1) * self.accum])


def padded_length(e: Encoded, stage: str) -> int:
    """What a row's padding is driven by: the teacher sequence for teacher/online, else question + answer (the
    student's prefix and answer passes; its latent passes are M wide for every row)."""
    if stage in ("teacher", "online"):
        return e.teacher_len
    return len(e.question_ids) + len(e.prompt_ids) + len(e.answer_ids)


def plan_for(tc, items: Sequence[Encoded], world_size: int) -> GlobalBatchPlan:
    """The plan of a run from its TrainConfig (global/micro batch, seed, group_by_length) and its items."""
    lengths = np.array([padded_length(e, tc.stage) for e in items], dtype=np.int64)
    return GlobalBatchPlan(len(items), tc.global_batch, tc.micro_batch, world_size, tc.seed, tc.group_by_length,
                           lengths)


@lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    perm.setflags(write=False)
    return perm


class Prefetcher:
    """Runs `produce(i)` for i in order on a background thread, `depth` items ahead (a bounded queue); closing it
    stops the thread even while it waits on a full queue."""

    def __init__(self, produce, items: Sequence, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce, items), daemon=True,
                                        name="kava-loader-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, produce, items):
        try:
            for it in items:
                if self._stop.is_set() or not self._put(("ok", produce(it))):
                    return
        except BaseException as e:  # surfaced in the consumer
            self._put(("err", e))
        self._put(("end", None))

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
        self._thread.join(timeout=10)


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

    def _make_pinned(self, key):
        step, micro, batch, targets = self._make(key)
        return step, micro, batch.pin_memory(), None if targets is None else targets.pin_memory()

    def iterate(self, start_step: int, num_steps: int) -> Iterator[tuple[int, int, object, Targets | None]]:
        """(step, micro index, Batch, Targets | None) on the host; with CUDA in page-locked memory (pinned in the
        prefetch thread), so the trainer's `.to(device, non_blocking=True)` lets the host run ahead of the GPU."""
        make = self._make_pinned if torch.cuda.is_available() else self._make
        if self.prefetch <= 0:
            yield from map(make, self._keys(start_step, num_steps))
            return
        pf = Prefetcher(make, self._keys(start_step, num_steps), self.prefetch)
        try:
            yield from pf
        finally:
            pf.close()


def store_example_ids(reader) -> np.ndarray:
    """`example_id` of every visible store row, in row order (one small read of that field only)."""
    return np.asarray(reader.read_field("example_id"), dtype=np.int64)


def align_store(reader, encoded: Sequence[Encoded]) -> tuple[list[Encoded], np.ndarray, dict]:
    """The training examples that have a row in the store, in data order, and their row numbers.

    The plan then indexes the data, not the store, so `student` sees the same examples per step as `online`
    whatever the store's shard layout. Examples without a row (quarantined by the build, or in shards not
    yet published) are left out and counted; store rows whose example the data lacks are an error."""
    ids = store_example_ids(reader)
    row_of = {int(e): r for r, e in enumerate(ids.tolist())}
    if len(row_of) != len(ids):
        raise ValueError(f"store {reader.url} holds duplicate example ids; rebuild it.")
    have = {e.id for e in encoded}
    extra = [e for e in row_of if e not in have]
    if extra:
        raise KeyError(f"store {reader.url} has rows for example ids {sorted(extra)[:5]} (of {len(extra)}) that the "
                       "training data does not have: data.train_path or data.* differ from the build.")
    items = [e for e in encoded if e.id in row_of]
    rows = np.array([row_of[e.id] for e in items], dtype=np.int64)
    info = {"store_rows": len(ids), "data_examples": len(encoded), "aligned": len(items),
            "missing_from_store": len(encoded) - len(items)}
    return items, rows, info


@dataclass
class QuantizedTargets:
    """Targets of a micro-batch from an int8/int4 store, as read: each quantised field (`k`, `v`) as its stored
    parts ("k.q" int8/uint8 values, "k.scale"[, "k.zero"]), page-locked with CUDA, the other fields as read.

    `.to(device)` copies the parts (half the bytes of bf16 for int8) and dequantises them there
    (cache_store.quant.dequantize_torch), returning plain `Targets`: the same tensors to the last bit as the host
    dequantisation (`StoreReader.get_batch(..., dequantize=True)`), with the arithmetic on the device."""

    parts: dict[str, torch.Tensor]
    fields: dict[str, object]
    """FieldSpec of each quantised field in `parts`, by name."""
    dtype: torch.dtype | None = None
    """Cast of the floating targets after dequantisation (StoreLoader's dtype); None keeps the store's dtype."""

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "QuantizedTargets | Targets":
        """Copied to `device` and dequantised there -> Targets. `dtype` alone (no device) only records the cast, so
        the parts stay quantised until they reach the device; neither (`.to()`): dequantised where they are."""
        if device is None and dtype is not None:
            return QuantizedTargets(self.parts, self.fields, dtype)
        dtype = dtype if dtype is not None else self.dtype
        from cache_store.quant import dequantize_torch

        moved = {p: t.to(device, non_blocking=non_blocking) for p, t in self.parts.items()}
        full = {n: moved[n] for n in ("valid", "codi_h") if n in moved}
        for name, spec in self.fields.items():
            full[name] = dequantize_torch(spec, {p.rsplit(".", 1)[1]: t for p, t in moved.items()
                                                 if p.startswith(name + ".")})
        t = Targets.from_arrays(full)
        return t if dtype is None else t.to(dtype=dtype)

    def pin_memory(self) -> "QuantizedTargets":
        """A copy in page-locked host memory (parts already pinned are kept as they are)."""
        return QuantizedTargets({p: t if t.is_pinned() else t.pin_memory() for p, t in self.parts.items()},
                                self.fields, self.dtype)


def read_processes(setting: int, device: torch.device | str, cpus: int | None = None,
                   local_ranks: int | None = None) -> int:
    """The store-read worker processes per rank for train.loader_read_processes: N >= 0 as given; -1 (auto) gives
    4 on a CUDA device when the node has at least 8 CPU cores per local rank, else 0. On one H200 the 1B student
    trains from a warm store at 0.989x its in-memory rate with 4 workers and 0.961x with threads
    (docs/PERFORMANCE.md); on CPU the training itself needs the cores."""
    if setting >= 0:
        return setting
    if torch.device(device).type != "cuda":
        return 0
    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    if local_ranks is None:   # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return 4 if cpus >= 8 * max(1, local_ranks) else 0


class StoreLoader(TokenLoader):
    """Micro-batches whose teacher targets come from the store (one batched, chunk-aligned read each).

    `items` and `rows` come from `align_store`: the plan indexes `items`, row `rows[i]` holds item i's targets.
    Each micro-batch is read in plan order straight into its output tensors (page-locked with CUDA, so no second
    copy is made to pin it), only the fields a step uses, on the prefetch thread (decompression on the reader's
    decode threads, which let go of the GIL). `readahead` micro-batches beyond the prefetch queue, the reader
    starts fetching what they need (a remote store with a local cache_dir: its shard files; a local store read
    with `page_readahead`: the rows' byte ranges into the page cache; otherwise nothing).

    An int8/int4 store's K/V are handed over as their quantised parts (`QuantizedTargets`): the trainer's
    `.to(device)` copies int8 values and scales and dequantises on the device, so neither the host CPU nor PCIe
    carries the bf16 targets."""

    def __init__(self, reader, items: Sequence[Encoded], rows: np.ndarray, plan: GlobalBatchPlan, rank: int,
                 pad_id: int, prefetch: int = 4, dtype: torch.dtype | None = None, readahead: int = 16,
                 switch_interval_ms: float = 0.0):
        super().__init__(items, plan, rank, pad_id, prefetch)
        self.switch_interval_ms = switch_interval_ms
        if len(rows) != len(self.encoded):
            raise ValueError(f"{len(rows)} store rows for {len(self.encoded)} items; build both with align_store().")
        self.reader, self.rows, self.dtype = reader, np.asarray(rows, dtype=np.int64), dtype
        self.readahead = readahead
        spec = getattr(reader, "spec", None)      # an int8/int4 store's quantised K/V fields, by name
        self.quant = ({n: spec.field(n) for n in ("k", "v") if spec.field(n).quant is not None}
                      if spec is not None else {})

    def _keys(self, start_step: int, num_steps: int):
        keys = super()._keys(start_step, num_steps)
        ahead = getattr(self.reader, "readahead", None)
        if ahead is None or self.readahead <= 0:
            yield from keys
            return
        window: deque = deque()
        for key in keys:                       # announce each micro-batch `readahead` keys before it is read
            window.append(key)
            ahead(self.rows[key[2]], fields=READ_FIELDS)
            if len(window) > self.readahead:
                yield window.popleft()
        yield from window

    def iterate(self, start_step: int, num_steps: int) -> Iterator[tuple[int, int, object, Targets | None]]:
        """TokenLoader.iterate; with `switch_interval_ms` > 0 (train.loader_switch_interval_ms) Python's thread
        switch interval is that while the iterator is open, so the read threads get the GIL sooner."""
        if self.switch_interval_ms <= 0:
            yield from super().iterate(start_step, num_steps)
            return
        before = sys.getswitchinterval()
        sys.setswitchinterval(self.switch_interval_ms / 1000)
        try:
            yield from super().iterate(start_step, num_steps)
        finally:
            sys.setswitchinterval(before)

    def _make(self, key):
        step, micro, idx = key
        items = [self.encoded[i] for i in idx]
        rows = self.rows[idx]
        arrays = self.reader.get_batch(rows, fields=READ_FIELDS, pin_memory=torch.cuda.is_available(),
                                       **({"dequantize": False} if self.quant else {}))
        got = arrays["example_id"].tolist()
        want = [e.id for e in items]
        if got != want:
            raise KeyError(f"store {self.reader.url} rows {rows.tolist()} hold example ids {got}, expected {want}: "
                           "the store changed under the run. Restart the run (it re-reads the row map).")
        batch = collate(items, self.pad_id)
        if self.quant:
            return step, micro, batch, QuantizedTargets({p: a for p, a in arrays.items() if p != "example_id"},
                                                        self.quant, self.dtype)
        t = Targets.from_arrays(arrays)
        if self.dtype is not None:
            t = t.to(dtype=self.dtype)
        return step, micro, batch, t
