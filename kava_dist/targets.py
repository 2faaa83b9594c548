"""[2+3] Teacher targets for the store: the store spec of a config, and the processor a cache-build actor runs.

Usage:
    from kava_dist.targets import store_spec, TeacherTargets, plan_shards
    spec = store_spec(cfg)                                 # fields k, v, valid, codi_h, index, example_id, cot_len
    shards = plan_shards(encoded, spec.shard_size)         # {shard_id: [Encoded, ...]} sorted by length inside
    proc = TeacherTargets(cfg_dict)                        # loads the frozen teacher once (GPU if present)
    arrays, info = proc.process(shards[0])                 # per-example arrays in shard order + stats
    launched = proc.launch(shards[1]); arrays, info = proc.finish(launched)   # the same in two steps

Each shard's examples are sorted by teacher length and cut into `build.batch_size` batches, so padding stays
small; the shard's rows are stored in that order (`example_id` maps rows back to the data). A batch that fails
is retried example by example and the examples that still fail are quarantined (reported, not written).
`launch` queues a shard's device work without waiting for it and `finish` waits, checks and copies the arrays
to the host (one sync and one transfer per field per shard), so a build actor can launch shard i+1 while it
finishes shard i and the GPU never waits for the host.

`plan_actors(resources, cfg.build)` sizes the actor pool: one actor per `build.gpus_per_actor` GPUs of the
cluster, or `build.num_actors` CPU actors (default 1) when it has none.

Fault injection (tests): KAVA_BUILD_FAULT containing "nan_example:ID" makes the teacher's K of example ID
non-finite, so that example is quarantined (cache_store/faults.py lists every fault hook).
"""
from __future__ import annotations

import logging
import math
import traceback

import torch

from cache_store.faults import nan_example_ids
from kava_dist.config import KavaConfig, config_from_dict
from kava_dist.prompts import Encoded, collate

log = logging.getLogger(__name__)

STORE_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_dims(cfg: KavaConfig) -> tuple[int, int, int, int]:
    """(layers, KV heads, head dim, hidden size) from the backbone's config, without loading weights."""
    from transformers import AutoConfig

    kwargs = {"gguf_file": cfg.model.gguf_file} if cfg.model.gguf_file else {}
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    mc = AutoConfig.from_pretrained(cfg.model.name_or_path, **kwargs)
    head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    return mc.num_hidden_layers, mc.num_key_value_heads, head_dim, mc.hidden_size


def store_spec(cfg: KavaConfig, dims: tuple[int, int, int, int] | None = None):
    from cache_store.spec import CodecSpec, FieldSpec, StoreSpec

    L, H, D, d = dims or model_dims(cfg)
    M = cfg.latent.num_latents
    sd = cfg.store.dtype
    logical = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(sd, "bfloat16")
    quant = sd if sd in ("int8", "int4") else None
    fields = (
        FieldSpec("k", (L, H, M, D), logical, quant=quant, quant_reduce_axes=(2,) if quant else ()),  # per channel
        FieldSpec("v", (L, H, M, D), logical, quant=quant, quant_reduce_axes=(3,) if quant else ()),  # per token
        FieldSpec("valid", (L, H, M), "bool"),
        FieldSpec("codi_h", (L, d), "float32" if sd == "fp32" else "bfloat16"),
        FieldSpec("index", (L, H, M), "int16"),
        FieldSpec("example_id", (), "int64"),
        FieldSpec("cot_len", (), "int32"),
    )
    spec = StoreSpec(fields=fields, shard_size=cfg.store.shard_examples or None,
                     codec=CodecSpec(cfg.store.codec, clevel=cfg.store.clevel))
    return spec.resolved()


def plan_actors(resources: dict, build) -> tuple[int, float]:
    """(number of actors, GPUs per actor) for a Ray cluster's `resources` and a BuildConfig.

    GPUs in the cluster: `build.num_actors` or one actor per `build.gpus_per_actor` GPUs, each reserving
    that many. No GPUs (or gpus_per_actor=0): `build.num_actors` CPU actors (0 -> 1)."""
    gpus = float(resources.get("GPU", 0))
    per = float(build.gpus_per_actor) if gpus else 0.0
    if per > 0:
        fit = int(gpus // per)
        if fit < 1:
            raise ValueError(f"build.gpus_per_actor={per} but the cluster has {gpus:g} GPU(s); lower it.")
        n = build.num_actors or fit
        if n > fit:
            log.warning("build.num_actors=%d > %d actors that fit on %g GPUs; the extra ones wait for a GPU",
                        n, fit, gpus)
        return n, per
    return max(1, build.num_actors), 0.0


def plan_shards(encoded: list[Encoded], shard_size: int) -> dict[int, list[Encoded]]:
    """Contiguous chunks of the data (deterministic), each sorted by teacher length (stable)."""
    n = math.ceil(len(encoded) / shard_size)
    return {s: sorted(encoded[s * shard_size:(s + 1) * shard_size], key=lambda e: e.teacher_len) for s in range(n)}


class TeacherTargets:
    """Runs inside one cache-build actor: the frozen teacher, forward + eviction, arrays for one shard."""

    def __init__(self, cfg_dict: dict):
        from kava_dist.backbone import load_teacher

        self.cfg = config_from_dict(cfg_dict)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher, self.tokenizer, self.special = load_teacher(self.cfg.model, device=self.device)
        self._nan_ids = nan_example_ids()
        # finish() copies shards out on this stream (created here: two actor threads call finish concurrently)
        self._copy_stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self._warmup()

    def _warmup(self) -> None:
        """One small forward + eviction at start-up (CUDA context, cuBLAS handles, kernels), so it is counted
        in the actor's start and not in its first shard."""
        ids = list(range(10, 42))
        e = Encoded(id=-1, question_ids=ids, cot_ids=ids + ids, prompt_ids=ids[:3], answer_ids=ids[:2])
        self.process([e] * min(2, self.cfg.build.batch_size))

    def batches(self, items: list[Encoded]) -> list[list[Encoded]]:
        """The forward batches `process` runs for a shard's items (in order)."""
        bs = self.cfg.build.batch_size
        return [items[i:i + bs] for i in range(0, len(items), bs)]

    @torch.no_grad()
    def _batch(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Forward + eviction of one batch, launched on the device without waiting for it: the fields in their
        stored dtypes (still on the device) and "_finite", a device bool saying K/V are all finite."""
        from kava_dist.step import compute_targets
        from kava_dist.teacher import teacher_forward

        cpu_batch = collate(items, self.special.pad)
        batch = cpu_batch.to(self.device)
        tout = teacher_forward(self.teacher, batch, rope=self.cfg.eviction.rope, with_hidden=True)
        t = compute_targets(tout, self.cfg.eviction, self.cfg.latent.num_latents)
        # Cast to the stored dtype and check finiteness on the device: no host work and no sync per batch.
        kv_dtype = STORE_TORCH_DTYPE.get(self.cfg.store.dtype, torch.bfloat16)   # int8/int4 quantise from bf16
        arrays = t.as_arrays()
        arrays["k"], arrays["v"] = arrays["k"].to(kv_dtype), arrays["v"].to(kv_dtype)
        arrays["codi_h"] = arrays["codi_h"].to(torch.float32 if self.cfg.store.dtype == "fp32" else torch.bfloat16)
        bad = [i for i, e in enumerate(items) if e.id in self._nan_ids]
        if bad:                                                          # fault injection (tests)
            arrays["k"] = arrays["k"].clone()
            arrays["k"][bad] = float("nan")
        arrays["_finite"] = torch.isfinite(arrays["k"]).all() & torch.isfinite(arrays["v"]).all()
        arrays["example_id"] = cpu_batch.ids.clone()
        arrays["cot_len"] = cpu_batch.cot_mask.sum(1).to(torch.int32)
        return arrays

    def launch(self, items: list[Encoded]) -> dict:
        """Launch every batch of a shard on the device (no sync). Returns {"batches": [(items, arrays | None,
        error | None)], "done": CUDA event after the last batch}. A batch that raises at launch (e.g. out of
        memory) is kept with its error for `finish` to redo."""
        launched = []
        for chunk in self.batches(items):
            try:
                launched.append((chunk, self._batch(chunk), None))
            except Exception as err:  # noqa: BLE001 - OOM, a malformed example: redone one by one in finish
                if "out of memory" in str(err).lower() and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                launched.append((chunk, None, err))
        done = None
        if self.device.type == "cuda":                     # finish() copies out once this shard's work is done
            done = torch.cuda.Event()
            done.record()
        return {"batches": launched, "done": done}

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        """Device tensor -> pinned host copy, queued on the current (copy) stream; the caller synchronises it.
        (A pageable copy runs at ~1.6 GB/s on an H100 host and blocks the stream; pinned runs at PCIe speed.)"""
        if not t.is_cuda:
            return t
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        return h

    def finish(self, launched: dict, relaunch_lock=None) -> tuple[dict[str, torch.Tensor], dict]:
        """Wait for a launched shard, redo failed or non-finite batches one example at a time (examples that still
        fail are quarantined), and copy the shard's arrays to the host in one transfer per field. Device work
        of the next shard may run meanwhile; `relaunch_lock` (if given) is held while redoing examples."""
        from contextlib import nullcontext

        cuda = self.device.type == "cuda"
        on_copy_stream = torch.cuda.stream(self._copy_stream) if cuda else nullcontext()
        batches = launched["batches"]
        finite = [a["_finite"] for _, a, _ in batches if a is not None]
        if cuda:     # the copies wait for this shard's work only, not for the next shard launched meanwhile
            self._copy_stream.wait_event(launched["done"])
        with on_copy_stream:
            flags = self._host(torch.stack(finite)) if finite else None
        if cuda:
            self._copy_stream.synchronize()                              # the one wait of the shard
        ok = iter(flags.tolist() if flags is not None else [])
        parts, quarantined, tokens = [], [], 0
        for chunk, arrays, err in batches:
            if arrays is not None and next(ok):
                parts.append(arrays)
                tokens += sum(e.teacher_len for e in chunk)
                continue
            err = err or FloatingPointError("teacher produced non-finite K/V")
            log.warning("batch of %d failed (%s); retrying one by one", len(chunk), err)
            with relaunch_lock or nullcontext():
                for e in chunk:
                    try:
                        one = self._batch([e])
                        if not bool(one["_finite"]):
                            raise FloatingPointError("teacher produced non-finite K/V")
                        parts.append(one)
                        tokens += e.teacher_len
                    except Exception as one_err:  # noqa: BLE001 - quarantined with its error, never fatal
                        quarantined.append({"example_id": e.id, "error": repr(one_err),
                                            "trace": traceback.format_exc(limit=3)})
                if cuda:
                    self._copy_stream.wait_stream(torch.cuda.current_stream())
        if not parts:
            raise RuntimeError(f"every example of the shard failed; first error: {quarantined[0]['error']}")
        with on_copy_stream:
            arrays = {k: self._host(torch.cat([p[k] for p in parts], dim=0)) for k in parts[0] if k != "_finite"}
        if cuda:
            self._copy_stream.synchronize()
        return arrays, {"tokens": tokens, "quarantined": quarantined, "rows": int(arrays["example_id"].shape[0])}

    def process(self, items: list[Encoded]) -> tuple[dict[str, torch.Tensor], dict]:
        """Targets of one shard: `finish(launch(items))`."""
        return self.finish(self.launch(items))

