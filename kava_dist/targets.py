"""[2+3] Teacher targets: what the store holds per example (one field schema), how a batch's targets are computed
(teacher pass -> eviction), the store spec of a config, opening a store checked against a config, and the
processor a cache-build actor runs.

Usage:
    from kava_dist.targets import FIELDS, READ_FIELDS, Targets, compute_targets, open_targets, store_spec
    spec = store_spec(cfg)                                 # StoreSpec of FIELDS: k, v, valid, codi_h, index, ...
    tout = teacher_forward(teacher, batch, rope=cfg.eviction.rope)
    targets = compute_targets(tout, cfg.eviction, cfg.latent.num_latents)   # Targets(k, v, valid, codi_h, index)
    reader = open_targets(cfg)                             # FingerprintMismatch unless built for these targets
    batch = reader.get_batch(rows, fields=READ_FIELDS); t = Targets.from_arrays(batch)   # what a student reads
    shards = plan_shards(encoded, spec.shard_size)         # {shard_id: [Encoded, ...]} sorted by length inside
    proc = TeacherTargets(cfg_dict)                        # loads the frozen teacher once (GPU if present)
    arrays, info = proc.process(shards[0])                 # per-example arrays in shard order + stats
    launched = proc.launch(shards[1]); arrays, info = proc.finish(launched)   # the same in two steps

`FIELDS` is the one list of the store's fields (name, dtype, shape over the model's dims): the StoreSpec, the
arrays a build writes and the fields a student step reads all come from it. The code that defines the targets
(this module's schema and computation, kava_dist/eviction.py, kava_dist/teacher.py) is hashed into the store's
fingerprint (kava_dist/fingerprint.py), so a store built by other target code is refused (docs/CACHE_BUILD.md).

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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cache_store.errors import FingerprintMismatch
from cache_store.faults import nan_example_ids
from kava_dist.config import EvictionConfig, KavaConfig, config_from_dict
from kava_dist.eviction import evict, score_tokens, shared_scores
from kava_dist.guard import Refusal
from kava_dist.prompts import Encoded, collate

if TYPE_CHECKING:
    from kava_dist.teacher import TeacherOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetField:
    """One per-example field of the store. dtype: a logical dtype, or "kv" (K/V in `store.dtype`: bf16, fp16,
    fp32; int8/int4 quantise from bf16) or "hidden" (CODI hidden states: fp32 when store.dtype=fp32, else bf16).
    shape: over the model's dims L (layers), H (KV heads), M (latents = kept slots), D (head dim), d (hidden
    size); "" = one scalar per example. quant_axis: the axis int8/int4 scales are shared over. attr: the
    `Targets` attribute holding it ("" = taken from the batch). read: a student step reads it."""

    name: str
    dtype: str
    shape: str
    quant_axis: int | None = None
    attr: str = ""
    read: bool = False


FIELDS = (
    TargetField("k", "kv", "L,H,M,D", quant_axis=2, attr="k_BLHMD", read=True),     # scales per channel
    TargetField("v", "kv", "L,H,M,D", quant_axis=3, attr="v_BLHMD", read=True),     # scales per token
    TargetField("valid", "bool", "L,H,M", attr="valid_BLHM", read=True),
    TargetField("codi_h", "hidden", "L,d", attr="codi_BLd", read=True),
    TargetField("index", "int16", "L,H,M", attr="index_BLHM"),                       # the kept CoT positions
    TargetField("example_id", "int64", "", read=True),                                # read to check the row
    TargetField("cot_len", "int32", ""),
)
READ_FIELDS = tuple(f.name for f in FIELDS if f.read)
"""The store fields a student step reads (example_id only to check the row)."""


def logical_dtype(f: TargetField, store_dtype: str) -> str:
    """The dtype field `f` is stored in (before int8/int4 quantisation) for `store.dtype`."""
    if f.dtype == "kv":
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(store_dtype, "bfloat16")
    if f.dtype == "hidden":
        return "float32" if store_dtype == "fp32" else "bfloat16"
    return f.dtype


def torch_dtype(f: TargetField, store_dtype: str) -> torch.dtype:
    return getattr(torch, logical_dtype(f, store_dtype))


@dataclass
class Targets:
    """Teacher targets of one batch, stop-gradient: what the store holds per example (the `attr` fields of
    FIELDS; example_id and cot_len come from the batch)."""

    k_BLHMD: torch.Tensor
    v_BLHMD: torch.Tensor
    valid_BLHM: torch.Tensor
    codi_BLd: torch.Tensor
    index_BLHM: torch.Tensor | None = None

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "Targets":
        def f(t, cast=True):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast and t.is_floating_point() else None,
                        non_blocking=non_blocking)

        return Targets(f(self.k_BLHMD), f(self.v_BLHMD), f(self.valid_BLHM, False), f(self.codi_BLd),
                       f(self.index_BLHM, False))

    def pin_memory(self) -> "Targets":
        """A copy in page-locked host memory (see Batch.pin_memory)."""
        f = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Targets(f(self.k_BLHMD), f(self.v_BLHMD), f(self.valid_BLHM), f(self.codi_BLd), f(self.index_BLHM))

    def as_arrays(self, store_dtype: str | None = None) -> dict[str, torch.Tensor]:
        """Per-example field tensors in the store's layout (leading axis = example); with `store_dtype`, each in
        the dtype the store keeps it in (else floats as computed)."""
        out = {}
        for f in FIELDS:
            t = getattr(self, f.attr) if f.attr else None
            if t is None:
                continue
            if store_dtype is not None or not t.is_floating_point():
                t = t.to(torch_dtype(f, store_dtype or "fp32"))
            out[f.name] = t
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor]) -> "Targets":
        """Targets of a store batch (`reader.get_batch(rows, fields=READ_FIELDS)`): the fields a student reads."""
        kw = {f.attr: arrays[f.name] for f in FIELDS if f.read and f.attr}
        kw["valid_BLHM"] = kw["valid_BLHM"].bool()
        return cls(**kw)


@torch.no_grad()
def compute_targets(tout: "TeacherOutput", ecfg: EvictionConfig, budget: int) -> Targets:
    """Evict every layer's CoT K/V to `budget` slots per KV head (layers folded into the batch axis)."""
    L = len(tout.k_LBHND)
    B = tout.cot_mask.shape[0]
    k_post = torch.stack([k.detach() for k in tout.k_post_LBHND]).flatten(0, 1)     # [L*B, H, N, D]
    v = torch.stack([x.detach() for x in tout.v_LBHND]).flatten(0, 1)
    q = torch.stack([x.detach() for x in tout.q_LBHAD]).flatten(0, 1)
    cot_LB, ans_LB = tout.cot_mask.repeat(L, 1), tout.ans_mask.repeat(L, 1)
    scores = None
    if ecfg.share != "none":   # one kept set per example (and layer), pooled over KV heads (and layers)
        sc = score_tokens(k_post, q, cot_LB, ans_LB, ecfg.lam, ecfg.method, ecfg.gqa_pool, ecfg.seed)
        scores = shared_scores(sc.view(L, B, *sc.shape[1:]), ecfg.share).flatten(0, 1)
    res = evict(k_post, v, q, cot_LB, ans_LB, budget, lam=ecfg.lam, method=ecfg.method, gqa_pool=ecfg.gqa_pool,
                order=ecfg.order, short_cot=ecfg.short_cot, seed=ecfg.seed, score_BHN=scores)
    k_sel = res.k_sel
    if ecfg.rope == "pre":  # score on post-RoPE keys, store pre-RoPE ones
        k_pre = torch.stack([k.detach() for k in tout.k_LBHND]).flatten(0, 1)
        idx = res.index.clamp_min(0).unsqueeze(-1).expand(-1, -1, -1, k_pre.shape[-1])
        k_sel = k_pre.gather(2, idx) * (res.index >= 0).unsqueeze(-1).to(k_pre.dtype)

    def unfold(x):  # [L*B, ...] -> [B, L, ...]
        return x.view(L, B, *x.shape[1:]).transpose(0, 1).contiguous()

    return Targets(unfold(k_sel), unfold(res.v_sel), unfold(res.valid), tout.hidden_BLd.detach(), unfold(res.index))


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
    """The StoreSpec of FIELDS for this config: shapes from the backbone's dims (`model_dims`, or `dims` =
    (L, H, D, d)), dtypes and int8/int4 quantisation from store.dtype, codec and shard size from store.*."""
    from cache_store.spec import CodecSpec, FieldSpec, StoreSpec

    L, H, D, d = dims or model_dims(cfg)
    size = {"L": L, "H": H, "M": cfg.latent.num_latents, "D": D, "d": d}
    sd = cfg.store.dtype
    quant = sd if sd in ("int8", "int4") else None
    fields = []
    for f in FIELDS:
        q = quant if f.quant_axis is not None else None
        fields.append(FieldSpec(f.name, tuple(size[x] for x in f.shape.split(",") if x), logical_dtype(f, sd),
                                quant=q, quant_reduce_axes=(f.quant_axis,) if q else ()))
    spec = StoreSpec(fields=tuple(fields), shard_size=cfg.store.shard_examples or None,
                     codec=CodecSpec(cfg.store.codec, clevel=cfg.store.clevel))
    return spec.resolved()


def open_targets(cfg: KavaConfig):
    """Open cfg.store.path for reading (store.verify, store.cache_dir / cache_bytes for an object store), refused
    (FingerprintMismatch, naming the differing fields and the files behind them) unless it was built for this
    config's targets (`cache_fingerprint`), empty, or incomplete without store.allow_partial (Refusal naming the
    build command)."""
    from cache_store.reader import StoreReader
    from kava_dist.fingerprint import CODE_FIELD, cache_fingerprint, diff_fields, fingerprint_sources, store_sources

    if not cfg.store.path:
        raise ValueError("train.stage=student needs store.path: build it first with `python -m jobs.build_cache`.")
    sc = cfg.store
    reader = StoreReader(sc.path, storage_options=sc.storage_options or None, verify=sc.verify,
                         cache_dir=sc.cache_dir or None, cache_bytes=sc.cache_bytes)
    if sc.cache_dir:
        from cache_store.backend import LocalBackend

        if isinstance(reader.backend, LocalBackend):
            log.info("store.cache_dir=%s is ignored: store %s is on a local filesystem", sc.cache_dir, sc.path)
        else:
            log.info("store %s: shard files cached whole in %s (store.cache_bytes=%s)", sc.path, sc.cache_dir,
                     sc.cache_bytes or "unbounded")
    digest, fields = cache_fingerprint(cfg)
    if reader.fingerprint != digest:
        stored = reader.fingerprint_fields or {}
        diff = diff_fields(stored, fields, store_sources(reader.get_meta), fingerprint_sources(cfg))
        differing = {k: (stored.get(k), fields.get(k)) for k in set(stored) | set(fields)
                     if stored.get(k) != fields.get(k)}
        code = ""
        if CODE_FIELD in differing:
            code = (" The target code (kava_dist/eviction.py, teacher.py, targets.py) differs from the code that "
                    "built the store: rebuild it with `python -m jobs.build_cache` (a new store.path, or delete "
                    "the old store first).")
        raise FingerprintMismatch(
            f"store {cfg.store.path} holds targets for another config (fingerprint {reader.fingerprint} != {digest}); "
            f"differing fields (store != config): {'; '.join(diff) or 'format'}. Train with the settings the store "
            f"was built with, or build a new store for these.{code}", differing)
    if len(reader) == 0:
        raise ValueError(f"store {cfg.store.path} has no published shards yet; wait for the build or rerun it.")
    if not reader.is_complete:
        missing = sorted(set(range(reader.num_shards)) - set(reader.published_shards()))
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        if not cfg.store.allow_partial:
            raise Refusal(
                f"store {cfg.store.path} is incomplete: {len(missing)} of {reader.num_shards} shards missing "
                f"({shown}). Finish it: rerun the cache build with this config (python -m jobs.build_cache --config "
                f"...; finished shards are kept), or set store.allow_partial=true to train on its {len(reader)} rows.")
        log.warning("store.allow_partial=true: training on the %d rows of incomplete store %s (%d of %d shards "
                    "missing: %s)", len(reader), cfg.store.path, len(missing), reader.num_shards, shown)
    return reader


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
        from kava_dist.teacher import teacher_forward

        cpu_batch = collate(items, self.special.pad)
        batch = cpu_batch.to(self.device)
        tout = teacher_forward(self.teacher, batch, rope=self.cfg.eviction.rope, with_hidden=True)
        t = compute_targets(tout, self.cfg.eviction, self.cfg.latent.num_latents)
        # Cast to the stored dtypes and check finiteness on the device: no host work and no sync per batch.
        arrays = t.as_arrays(self.cfg.store.dtype)
        bad = [i for i, e in enumerate(items) if e.id in self._nan_ids]
        if bad:                                                          # fault injection (tests)
            arrays["k"] = arrays["k"].clone()
            arrays["k"][bad] = float("nan")
        arrays["_finite"] = torch.isfinite(arrays["k"]).all() & torch.isfinite(arrays["v"]).all()
        from_batch = {"example_id": cpu_batch.ids, "cot_len": cpu_batch.cot_mask.sum(1)}
        for f in FIELDS:
            if not f.attr:
                arrays[f.name] = from_batch[f.name].to(torch_dtype(f, self.cfg.store.dtype), copy=True)
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

