"""KIVI-style int8 / int4 quantisation of a field, generic over the axes a scale is shared on.

int8: symmetric abs-max.   scale = max|x| / 127 over `quant_reduce_axes`;  q = round(x / scale) in [-127, 127]
int4: asymmetric min/max.  zero = min x, scale = (max x - zero) / 15;       q = round((x - zero) / scale) in [0, 15],
      packed two per byte along the last axis (low nibble = even index).
Scales (and zeros) are rounded to the field's `scale_dtype` *before* q is computed, so the
stored scale is the one q was made with. Every element then satisfies |x - x_hat| <= scale / 2
(before the final cast to the logical dtype).

Relative error used in tests and the bench: per example, ||x - x_hat||_2 / ||x||_2.

Usage::

    from cache_store.quant import quantize, dequantize, bf16_bits_to_float32
    parts = quantize(field, x)            # x: [n, *field.shape] float32 -> {"q": .., "scale": .., ("zero": ..)}
    x_hat = dequantize(field, parts)      # torch tensor [n, *field.shape] in field.dtype
    x_hat = dequantize_torch(field, {k: torch.from_numpy(v).cuda() for k, v in parts.items()})  # same, on GPU
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import torch

from cache_store.spec import FieldSpec

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
}


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> exact float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


_WORKER: ThreadPoolExecutor | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = ThreadPoolExecutor(1, thread_name_prefix="cache_store-dequant")
        return _WORKER


def _batch_axes(field: FieldSpec) -> tuple[int, ...]:
    return tuple(a + 1 for a in field.quant_reduce_axes)  # +1: leading row axis


def _to_scale_dtype(field: FieldSpec, x: np.ndarray, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        s = x.astype(field.scale_dtype)
    if not np.isfinite(s).all():
        raise ValueError(
            f"field {field.name!r}: {what} overflows {field.scale_dtype} (max |value| {np.abs(x).max():.3g}); "
            "set scale_dtype='float32' for this field"
        )
    return s


def quantize(field: FieldSpec, x: np.ndarray) -> dict[str, np.ndarray]:
    """Quantise `x` ([n, *field.shape], any float dtype) -> {"q", "scale"[, "zero"]} with the row axis kept."""
    if field.quant is None:
        raise ValueError(f"field {field.name!r} is not quantised")
    x = np.asarray(x, dtype=np.float32)
    axes = _batch_axes(field)
    if field.quant == "int8":
        amax = np.abs(x).max(axis=axes, keepdims=True)
        scale = _to_scale_dtype(field, amax / 127.0, "scale")
        sf = scale.astype(np.float32)
        sf = np.where(sf > 0, sf, np.float32(1.0))
        q = np.clip(np.rint(x / sf), -127, 127).astype(np.int8)
        return {"q": q, "scale": np.squeeze(scale, axis=axes)}
    # int4, asymmetric
    lo = x.min(axis=axes, keepdims=True)
    hi = x.max(axis=axes, keepdims=True)
    zero = _to_scale_dtype(field, lo, "zero point")
    zf = zero.astype(np.float32)
    scale = _to_scale_dtype(field, (hi - zf) / 15.0, "scale")
    sf = scale.astype(np.float32)
    sf = np.where(sf > 0, sf, np.float32(1.0))
    q = np.clip(np.rint((x - zf) / sf), 0, 15).astype(np.uint8)
    return {"q": pack_int4(q), "scale": np.squeeze(scale, axis=axes), "zero": np.squeeze(zero, axis=axes)}


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 values in [0, 15], last axis D -> uint8 last axis ceil(D/2) (even index in the low nibble)."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(p: np.ndarray | torch.Tensor, last_dim: int) -> np.ndarray:
    """Inverse of pack_int4 -> uint8 [..., last_dim]."""
    p = p.numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), np.uint8)
    np.bitwise_and(p, 0x0F, out=out[..., 0::2])
    np.right_shift(p, 4, out=out[..., 1::2])
    return out[..., :last_dim]


def _as_numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def dequantize(field: FieldSpec, parts: dict[str, np.ndarray | torch.Tensor],
               pool: Executor | None = None, pin_memory: bool = False) -> torch.Tensor:
    """{"q", "scale"[, "zero"]} with a leading row axis -> torch tensor [n, *field.shape] in field.dtype.

    Row ranges are spread over `pool` (default: one worker thread). Math in float32, one final
    rounding to the logical dtype (round to nearest even). pin_memory: the result in page-locked memory.
    """
    if field.quant not in ("int8", "int4"):
        raise ValueError(f"field {field.name!r} is not quantised")
    q = _as_numpy(parts["q"])
    n = q.shape[0]
    expand = tuple(field.quant_reduce_axes)  # per-example axes the scale was reduced over
    scale = np.expand_dims(_as_numpy(parts["scale"]).astype(np.float32, copy=False), tuple(a + 1 for a in expand))
    zero = None
    if field.quant == "int4":
        zero = np.expand_dims(_as_numpy(parts["zero"]).astype(np.float32, copy=False), tuple(a + 1 for a in expand))
    out = torch.empty((n, *field.shape), dtype=_TORCH_DTYPES[field.dtype], pin_memory=pin_memory)

    def rows(lo: int, hi: int) -> None:
        buf = np.empty(field.shape, np.float32)  # one example, reused: stays in cache, no page faults
        tbuf = torch.from_numpy(buf)
        for i in range(lo, hi):
            qi = q[i] if field.quant == "int8" else unpack_int4(q[i], field.shape[-1])
            np.multiply(qi, scale[i], out=buf)
            if zero is not None:
                buf += zero[i]
            out[i].copy_(tbuf)  # float32 -> logical dtype (round to nearest even)

    # Rows run on worker threads even without a pool: on 2 cores a per-example torch copy from the
    # main thread measured ~9 ms (intra-op wake-ups) vs ~0.4 ms from a worker thread.
    pool = pool or _worker()
    k = max(1, min(n, getattr(pool, "_max_workers", 1)))
    bounds = np.linspace(0, n, k + 1).astype(int)
    list(pool.map(lambda ab: rows(*ab), zip(bounds[:-1], bounds[1:])))
    return out


def _expand_axes(t: torch.Tensor, field: FieldSpec) -> torch.Tensor:
    for a in field.quant_reduce_axes:
        t = t.unsqueeze(a + 1)
    return t


def dequantize_torch(field: FieldSpec, parts: dict[str, torch.Tensor], chunk_elems: int = 1 << 25) -> torch.Tensor:
    """Same result as `dequantize`, to the last bit, with torch ops on the parts' device: ship the int8/int4 parts
    to the GPU (`get_batch(..., dequantize=False)`) and expand them there. The same operations in the same order
    (int -> float32, times the float32 scale, plus the float32 zero for int4, one rounding to the logical dtype),
    each rounded once, so host and device give identical tensors. Rows go `chunk_elems` elements at a time, so
    the float32 intermediate stays bounded (128 MiB by default) whatever the batch."""
    if field.quant not in ("int8", "int4"):
        raise ValueError(f"field {field.name!r} is not quantised")
    q_N = parts["q"]
    n = q_N.shape[0]
    out_N = torch.empty((n, *field.shape), dtype=_TORCH_DTYPES[field.dtype], device=q_N.device)
    scale_N = _expand_axes(parts["scale"], field)
    zero_N = _expand_axes(parts["zero"], field) if field.quant == "int4" else None
    step = max(1, chunk_elems // max(1, math.prod(field.shape)))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        q = q_N[lo:hi]
        if field.quant == "int4":
            q = torch.stack([q & 0x0F, q >> 4], dim=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)[..., : field.shape[-1]]
        x = q.to(torch.float32).mul_(scale_N[lo:hi].to(torch.float32))
        if zero_N is not None:
            x.add_(zero_N[lo:hi].to(torch.float32))
        out_N[lo:hi].copy_(x)              # float32 -> logical dtype (round to nearest even)
    return out_N


def relative_error(x: torch.Tensor | np.ndarray, x_hat: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-example ||x - x_hat||_2 / ||x||_2 over all non-row axes (float64)."""
    a = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))).to(torch.float64).flatten(1)
    b = (x_hat if isinstance(x_hat, torch.Tensor) else torch.from_numpy(np.asarray(x_hat))).to(torch.float64).flatten(1)
    return (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)
