"""Masked attention pieces every family's fused layer shares: the causal + padding mask and grouped-query SDPA
without repeated K/V.

Usage:
    from kava_dist.models.attention import causal_padding_mask, folded_gqa_sdpa
    mask_B1SK = causal_padding_mask(mask_BK, B, S, P, device)      # P cached columns, S new ones
    o_BSx = folded_gqa_sdpa(q_BHSD, k_BhKD, v_BhKD, mask_B1SK, scaling)   # [B, S, H*D], ready for o_proj
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def folded_gqa_sdpa(q_BHSD, k_BhKD, v_BhKD, mask_B1SK, scaling: float, dropout: float = 0.0) -> torch.Tensor:
    """Masked grouped-query attention without repeating K/V: the G query heads that share a KV head are stacked
    along the query axis ([B, h, G*S, D]) and the mask rows are repeated G times. Each query row sees the same
    keys, mask and scale as in HF's sdpa path (which copies K and V G times, forward and backward, because the
    fused SDPA kernels take no GQA with a mask). Returns [B, S, H*D], ready for o_proj."""
    B, H, S, D = q_BHSD.shape
    h, K = k_BhKD.shape[1], k_BhKD.shape[2]
    G = H // h
    q_BhGSD = q_BHSD.reshape(B, h, G * S, D)       # HF's repeat_kv: query head i reads KV head i // G
    mask = mask_B1SK.expand(B, 1, S, K)[:, :, None].expand(B, 1, G, S, K).reshape(B, 1, G * S, K)
    out = F.scaled_dot_product_attention(q_BhGSD, k_BhKD, v_BhKD, attn_mask=mask, dropout_p=dropout, scale=scaling)
    # out is [B, h, G*S, D] in whatever layout the kernel chose (CUDA kernels: physically [B, G*S, h, D])
    return out.unflatten(2, (G, S)).permute(0, 3, 1, 2, 4).reshape(B, S, H * D)


def causal_padding_mask(mask_BK: torch.Tensor | None, B: int, S: int, P: int, device) -> torch.Tensor:
    """[B, 1, S, P+S] bool: query i (column P+i) sees key j if j <= P+i and key j is real (transformers' sdpa_mask
    with a 2D padding mask and a cache of P columns)."""
    q_idx = torch.arange(S, device=device)[:, None] + P
    kv_idx = torch.arange(P + S, device=device)[None, :]
    causal = (kv_idx <= q_idx)[None, None]
    if mask_BK is None:
        return causal.expand(B, 1, S, P + S)
    return causal & mask_BK.bool()[:, None, None, :]
