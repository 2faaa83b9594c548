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
"""

from __future__ import annotations

import logging

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


def unpack_int4(p: torch.Tensor, last_dim: int) -> torch.Tensor:
    """Inverse of pack_int4 (torch, uint8) -> uint8 [..., last_dim]."""
    lo = p & 0x0F
    hi = p >> 4
    out = torch.stack([lo, hi], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return out[..., :last_dim]


def _as_torch(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def dequantize(field: FieldSpec, parts: dict[str, np.ndarray | torch.Tensor]) -> torch.Tensor:
    """{"q", "scale"[, "zero"]} with a leading row axis -> torch tensor [n, *field.shape] in field.dtype."""
    axes = _batch_axes(field)
    scale = _as_torch(parts["scale"]).to(torch.float32)
    for a in axes:  # re-insert the reduced axes for broadcasting
        scale = scale.unsqueeze(a)
    if field.quant == "int8":
        x = _as_torch(parts["q"]).to(torch.float32) * scale
    elif field.quant == "int4":
        q = unpack_int4(_as_torch(parts["q"]), field.shape[-1]).to(torch.float32)
        zero = _as_torch(parts["zero"]).to(torch.float32)
        for a in axes:
            zero = zero.unsqueeze(a)
        x = q * scale + zero
    else:
        raise ValueError(f"field {field.name!r} is not quantised")
    return x.to(_TORCH_DTYPES[field.dtype])


def relative_error(x: torch.Tensor | np.ndarray, x_hat: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Per-example ||x - x_hat||_2 / ||x||_2 over all non-row axes (float64)."""
    a = _as_torch(x).to(torch.float64).flatten(1)
    b = _as_torch(x_hat).to(torch.float64).flatten(1)
    return (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)
