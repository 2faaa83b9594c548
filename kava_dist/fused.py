"""[6b] Fused student passes: the decoder layer as one compiled function of tensors, for the student's training step.

Usage:
    from kava_dist.fused import apply_fused, runner_for
    apply_fused(model, cfg.model.fused_kernels, device, zero_stage)   # auto: compiled on CUDA with ZeRO 0-2
    out = runner_for(model).run(embeds_BSd, mask_BK, pos_BS, past_kv)  # what kava_dist.student calls per pass
    out.last_BSd, out.kv, out.pre_k, out.hidden_BLd, out.logits_BSV

Why (BENCHMARKS.md, "Current: fused student passes"): a student micro-step is five short passes (prefix, T=3
Jacobi passes over M=24 latents, answer) through 16-28 layers. Through the HF + peft modules that is thousands of
module calls and kernels per micro-step, and at micro 128 on an H200 the device spent 37% of its time in GEMMs
and about half in dtype copies and elementwise kernels (HF's fp32 RMSNorm round trips, RoPE's slices and cats,
K/V repeated for masked GQA). Compiling those pieces one by one cut device time by 27% but made the step
host-bound (1,300 compiled calls per micro-step). Here each decoder layer is one compiled graph (torch.compile;
model dims static, lengths symbolic after the first new shape; one graph serves every layer of the stack),
called once per layer per pass: Inductor fuses the norms, RoPE, SiLU x up, residual adds and peft's
dropout/scale, and the K/V of a cached pass are concatenated inside the graph.

Same arithmetic as the HF path (kava_dist.student.HFPasses): RMSNorm statistics in fp32 cast back before the
weight, RoPE in the activation dtype, the same causal + padding mask (built here from the 2D mask, as transformers'
sdpa_mask does), and grouped-query attention with the G query heads of a KV head stacked on the query axis
instead of K/V repeated G times (`folded_gqa_sdpa`). The q/k/v/o and MLP projection modules are still called, so
peft's LoRA (dropout, scaling) is what runs; the norms are computed from their own weights. `eager` runs the same
function uncompiled (the reference the unit tests compare with HF). Not under ZeRO-3: its parameter gathering
hooks cannot run inside a compiled graph (auto falls back to the HF modules there; an explicit `compile` is
refused by the config check).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kava_dist.backbone import parts
from kava_dist.config import FUSED_MODES
from kava_dist.student import PassOut


def _rms(norm: nn.Module, x_BSd: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm / Qwen2RMSNorm: statistics in fp32, cast back to the input dtype, then the weight."""
    xf = x_BSd.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * y.to(x_BSd.dtype)


def _rope(x_BnSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (unsqueeze_dim=1)."""
    cos, sin = cos_BSD.unsqueeze(1), sin_BSD.unsqueeze(1)
    half = x_BnSD.shape[-1] // 2
    rot = torch.cat((-x_BnSD[..., half:], x_BnSD[..., :half]), dim=-1)
    return x_BnSD * cos + rot * sin


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


def layer_forward(layer: nn.Module, h_BSd, cos_BSD, sin_BSD, mask_B1SK, past_k, past_v, keep_pre_rope: bool):
    """One Llama/Qwen2 decoder layer. Returns (h, k over past+new, v over past+new, new pre-RoPE k or None)."""
    attn, mlp = layer.self_attn, layer.mlp
    B, S, _ = h_BSd.shape
    x = _rms(layer.input_layernorm, h_BSd)
    q = attn.q_proj(x).view(B, S, -1, attn.head_dim).transpose(1, 2)
    k_pre = attn.k_proj(x).view(B, S, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, S, -1, attn.head_dim).transpose(1, 2)
    q, k = _rope(q, cos_BSD, sin_BSD), _rope(k_pre, cos_BSD, sin_BSD)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    dropout = attn.attention_dropout if attn.training else 0.0
    o = folded_gqa_sdpa(q, k, v, mask_B1SK, attn.scaling, dropout)
    h_BSd = h_BSd + attn.o_proj(o)
    x = _rms(layer.post_attention_layernorm, h_BSd)
    h_BSd = h_BSd + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    return h_BSd, k, v, (k_pre if keep_pre_rope else None)


def causal_padding_mask(mask_BK: torch.Tensor | None, B: int, S: int, P: int, device) -> torch.Tensor:
    """[B, 1, S, P+S] bool: query i (column P+i) sees key j if j <= P+i and key j is real (transformers' sdpa_mask
    with a 2D padding mask and a cache of P columns)."""
    q_idx = torch.arange(S, device=device)[:, None] + P
    kv_idx = torch.arange(P + S, device=device)[None, :]
    causal = (kv_idx <= q_idx)[None, None]
    if mask_BK is None:
        return causal.expand(B, 1, S, P + S)
    return causal & mask_BK.bool()[:, None, None, :]


class FusedDecoder:
    """Runs the student's passes through `layer_forward` (compiled once for all layers, or eager)."""

    def __init__(self, model: nn.Module, compile: bool):
        self.lm, self.decoder, _ = parts(model)
        self.compiled = compile
        # dynamic=None: compiled for the first shapes, then once more with only the dims that changed (batch
        # rows, sequence length) symbolic; hidden size, heads and head dim stay static for Inductor's kernels
        self.layer = torch.compile(layer_forward, dynamic=None) if compile else layer_forward
        if compile:   # graphs: with/without a cache, pre-RoPE keys kept or not, then symbolic-length refinements
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)

    def run(self, embeds_BSd, mask_BK, pos_BS, past=None, *, pre_rope: bool = False, hidden_col: int | None = None,
            lm_head: bool = False) -> PassOut:
        dec = self.decoder
        B, S, _ = embeds_BSd.shape
        P = 0 if past is None else past[0][0].shape[2]
        cos, sin = dec.rotary_emb(embeds_BSd, pos_BS)
        mask = causal_padding_mask(mask_BK, B, S, P, embeds_BSd.device)
        h, kv, pre, hidden = embeds_BSd, [], [], []
        layers = list(dec.layers)
        for i, layer in enumerate(layers):
            pk, pv = past[i] if past is not None else (None, None)
            h, k, v, kp = self.layer(layer, h, cos, sin, mask, pk, pv, pre_rope)
            kv.append((k, v))
            pre.append(kp)
            if hidden_col is not None and i < len(layers) - 1:
                hidden.append(h[:, hidden_col])
        h = dec.norm(h)
        hid = None
        if hidden_col is not None:
            hid = torch.stack(hidden + [h[:, hidden_col]], dim=1)
        if lm_head:
            return PassOut(last_BSd=None, kv=None, hidden_BLd=hid, logits_BSV=self.lm.lm_head(h))
        return PassOut(last_BSd=h, kv=kv, pre_k=pre if pre_rope else None, hidden_BLd=hid)


def resolve_mode(mode: str, device: torch.device | str, zero_stage: int = 0) -> str:
    """auto = compile on CUDA under ZeRO 0-2, else hf (the HF/peft modules as they are)."""
    if mode not in FUSED_MODES:
        raise ValueError(f"model.fused_kernels={mode!r} is not one of {FUSED_MODES}.")
    if mode == "auto":
        return "compile" if torch.device(device).type == "cuda" and zero_stage < 3 else "hf"
    return mode


def apply_fused(model: nn.Module, mode: str, device: torch.device | str, zero_stage: int = 0) -> str:
    """Attach the fused runner to `model` per `model.fused_kernels`; returns the resolved mode."""
    mode = resolve_mode(mode, device, zero_stage)
    lm = parts(model)[0]
    if mode != "hf" and (type(lm.model).__name__ not in ("LlamaModel", "Qwen2Model")
                         or getattr(lm.config, "hidden_act", "silu") != "silu"):
        raise ValueError(f"model.fused_kernels={mode} supports Llama/Qwen2 decoders with SiLU MLPs, not "
                         f"{type(lm.model).__name__} ({getattr(lm.config, 'hidden_act', '?')}); set "
                         "model.fused_kernels=hf.")
    lm._kava_fused = None if mode == "hf" else FusedDecoder(model, compile=mode == "compile")
    return mode


def runner_for(model: nn.Module):
    """The fused runner attached by apply_fused, or None (the caller then uses the HF modules)."""
    return getattr(parts(model)[0], "_kava_fused", None)
