"""The Llama family: RMSNorm, RoPE, the fused decoder layer, the hook points and a tiny config.

Usage:
    from kava_dist.models.llama import FAMILY, apply_rope, layer_forward
    q_rot = apply_rope(q_BnSD, cos_BSD, sin_BSD)        # transformers' apply_rotary_pos_emb (unsqueeze_dim=1)
    h, k, v, k_pre = layer_forward(layer, h_BSd, cos, sin, mask_B1SK, past_k, past_v, keep_pre_rope=True)

Same arithmetic as transformers' LlamaDecoderLayer with sdpa attention: RMSNorm statistics in fp32 cast back
before the weight, RoPE in the activation dtype, SiLU(gate) x up. The q/k/v/o and MLP projection modules are
called (so peft's LoRA, with its dropout and scaling, is what runs); the norms are computed from their weights.
This is the only RoPE in kava: the teacher's post-RoPE q/k and the fused student passes both use `apply_rope`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kava_dist.models.attention import folded_gqa_sdpa
from kava_dist.models.family import Family


def rms_norm(norm: nn.Module, x_BSd: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm / Qwen2RMSNorm: statistics in fp32, cast back to the input dtype, then the weight."""
    xf = x_BSd.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * y.to(x_BSd.dtype)


def apply_rope(x_BnSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (unsqueeze_dim=1): x * cos + rotate_half(x) * sin."""
    cos, sin = cos_BSD.unsqueeze(1), sin_BSD.unsqueeze(1)
    half = x_BnSD.shape[-1] // 2
    rot = torch.cat((-x_BnSD[..., half:], x_BnSD[..., :half]), dim=-1)
    return x_BnSD * cos + rot * sin


def layer_forward(layer: nn.Module, h_BSd, cos_BSD, sin_BSD, mask_B1SK, past_k, past_v, keep_pre_rope: bool):
    """One Llama/Qwen2 decoder layer. Returns (h, k over past+new, v over past+new, new pre-RoPE k or None)."""
    attn, mlp = layer.self_attn, layer.mlp
    B, S, _ = h_BSd.shape
    x = rms_norm(layer.input_layernorm, h_BSd)
    q = attn.q_proj(x).view(B, S, -1, attn.head_dim).transpose(1, 2)
    k_pre = attn.k_proj(x).view(B, S, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos_BSD, sin_BSD), apply_rope(k_pre, cos_BSD, sin_BSD)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    dropout = attn.attention_dropout if attn.training else 0.0
    o = folded_gqa_sdpa(q, k, v, mask_B1SK, attn.scaling, dropout)
    h_BSd = h_BSd + attn.o_proj(o)
    x = rms_norm(layer.post_attention_layernorm, h_BSd)
    h_BSd = h_BSd + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return h_BSd, k, v, (k_pre if keep_pre_rope else None)


def attention(layer: nn.Module) -> nn.Module:
    """The module whose forward receives `position_embeddings` (cos, sin)."""
    return layer.self_attn


def projections(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """q_proj, k_proj, v_proj: their outputs are the pre-RoPE q, k and v (no q/k norm in this family)."""
    attn = layer.self_attn
    return attn.q_proj, attn.k_proj, attn.v_proj


def fused_ok(config) -> str | None:
    act = getattr(config, "hidden_act", "silu")
    return None if act == "silu" else f"its MLP uses {act}, layer_forward computes SiLU"


def tiny_config(**dims):
    from transformers import LlamaConfig

    return LlamaConfig(**dims)


FAMILY = Family(name="llama", decoder_class="LlamaModel", label="Llama", tiny_config=tiny_config,
                attention=attention, projections=projections, apply_rope=apply_rope, layer_forward=layer_forward,
                fused_ok=fused_ok)
