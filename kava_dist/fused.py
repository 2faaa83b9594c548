"""[6b] Fused decoder kernels: compiled replacements for the memory-bound pieces of every decoder layer.

Usage:
    from kava_dist.fused import fuse_decoder
    counts = fuse_decoder(model, compile=True)   # {"rms_norm": 33, "mlp": 16, "attention": 16, "lora": 64}
    counts = apply_fused(model, cfg.model.fused_kernels, device)   # auto: compile on CUDA, hf (unpatched) on CPU

Why (docs/TRAINING.md, BENCHMARKS.md "Student MFU"): a micro-128 student step on an H200 spent 37% of its device
time in GEMMs and about half in dtype copies and elementwise kernels. HF's RMSNorm computes in fp32 through six
kernels and two full-size casts, RoPE through ten (slices, neg, cat, four multiplies), SiLU x up through two, and
peft's LoRA adds a scaling multiply and an add per projection; each kernel reads and writes the whole activation.
Here each of those becomes one fused kernel forward and one or two backward (torch.compile, dynamic shapes, so a
new question length does not recompile).

The arithmetic is the same as the modules they replace: same dtypes, casts in the same places (RMSNorm: fp32
statistics, cast back before the weight; RoPE in the activation dtype), so `eager` (the same functions, not
compiled) matches HF within rounding; tests/unit/test_fused.py checks losses and gradients against the HF path.
Every nn.Module is still called through __call__: q/k/v/o and MLP projections, peft's lora_A/lora_B/dropout and
the norms themselves. Forward hooks (the teacher's q/k/v capture), peft's adapter switching (disable_adapter()
falls back to peft's own forward) and DeepSpeed ZeRO-3's parameter gathering therefore see the same calls.
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from kava_dist.config import FUSED_MODES

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- the fused functions


def rms_norm(x_BSd: torch.Tensor, w_d: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm / Qwen2RMSNorm: statistics in fp32, cast back to the input dtype, then the weight."""
    xf = x_BSd.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w_d * y.to(x_BSd.dtype)


def silu_mul(gate_BSf: torch.Tensor, up_BSf: torch.Tensor) -> torch.Tensor:
    return F.silu(gate_BSf) * up_BSf


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rope_qk(q_BHSD: torch.Tensor, k_BhSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor):
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=1) for q and k in one call."""
    cos, sin = cos_BSD.unsqueeze(1), sin_BSD.unsqueeze(1)
    return _rotate(q_BHSD, cos, sin), _rotate(k_BhSD, cos, sin)


def lora_add(result_BSo: torch.Tensor, delta_BSo: torch.Tensor, scaling: float) -> torch.Tensor:
    return result_BSo + delta_BSo * scaling


def folded_gqa_sdpa(q_BHSD, k_BhKD, v_BhKD, mask_B1SK, scaling: float, dropout: float) -> torch.Tensor:
    """Masked grouped-query attention without repeating K/V: the G query heads that share a KV head are stacked
    along the query axis ([B, h, G*S, D]) and the mask rows are repeated G times. Each query row sees the same
    keys, mask and scale as in HF's sdpa path (which copies K and V G times, forward and backward, because the
    fused kernels take no GQA with a mask). Returns [B, S, H, D] like transformers' sdpa_attention_forward."""
    B, H, S, D = q_BHSD.shape
    h, K = k_BhKD.shape[1], k_BhKD.shape[2]
    G = H // h
    q_BhGSD = q_BHSD.reshape(B, h, G * S, D)       # HF's repeat_kv: query head i reads KV head i // G
    mask = mask_B1SK.expand(B, 1, S, K)[:, :, None].expand(B, 1, G, S, K).reshape(B, 1, G * S, K)
    out = F.scaled_dot_product_attention(q_BhGSD, k_BhKD, v_BhKD, attn_mask=mask, dropout_p=dropout, scale=scaling)
    # out is [B, h, G*S, D] in whatever layout the kernel chose (CUDA kernels: physically [B, G*S, h, D])
    return out.unflatten(2, (G, S)).permute(0, 3, 1, 2, 4).reshape(B, S, H, D)


def _can_fold(module, q_BHSD, mask, kwargs) -> bool:
    return (module.config._attn_implementation == "sdpa" and module.num_key_value_groups > 1
            and isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1 and q_BHSD.shape[2] > 1
            and not kwargs.get("output_attentions", False) and kwargs.get("position_bias") is None)


class Kernels:
    """The four functions, compiled (dynamic shapes) or as plain eager functions."""

    def __init__(self, compile: bool):
        wrap = (lambda f: torch.compile(f, dynamic=True)) if compile else (lambda f: f)
        self.compiled = compile
        self.rms_norm, self.silu_mul = wrap(rms_norm), wrap(silu_mul)
        self.rope_qk, self.lora_add = wrap(rope_qk), wrap(lora_add)


# ----------------------------------------------------------------------------- module forwards


def _norm_forward(self, hidden_states):
    return self._kava_kernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(self._kava_kernels.silu_mul(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                       **kwargs):
    """LlamaAttention / Qwen2Attention.forward with RoPE fused and, for masked GQA under sdpa, folded query heads
    instead of repeated K/V (Qwen2's sliding window lives in its sdpa mask; it is passed on as there otherwise)."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = self._kava_kernels.rope_qk(q, k, cos, sin)
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    dropout = self.attention_dropout if self.training else 0.0
    if _can_fold(self, q, attention_mask, kwargs):
        out, weights = folded_gqa_sdpa(q, k, v, attention_mask, self.scaling, dropout), None
    else:
        attention = _attention_interface(self)
        if hasattr(self, "sliding_window"):
            kwargs["sliding_window"] = self.sliding_window
        out, weights = attention(self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


def _attention_interface(module):
    """What the module's own forward would call: the registered kernel, or its modeling file's eager attention."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = module.config._attn_implementation
    if impl != "eager" and impl in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[impl]
    return sys.modules[type(module).__module__].eager_attention_forward


def _lora_forward(self, x, *args, **kwargs):
    """peft lora.Linear.forward for its common case (one active plain-LoRA adapter, not merged, no mixed batch):
    the scaling multiply and the add are one kernel. Everything else goes to peft's own forward."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name is None or name not in self.lora_A
            or name in getattr(self, "lora_variant", {}) or x.dtype != self.lora_A[name].weight.dtype):
        return self._kava_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x)))
    return self._kava_kernels.lora_add(result, delta, self.scaling[name])


# ----------------------------------------------------------------------------- patching


def _is_rms_norm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight")


def _is_silu_mlp(m: nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def _is_attention(m: nn.Module) -> bool:
    return (type(m).__name__ in ("LlamaAttention", "Qwen2Attention")
            and all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "layer_idx")))


def _is_lora_linear(m: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(m, Linear)


def apply_fused(model: nn.Module, mode: str, device: torch.device | str) -> dict[str, int]:
    """`model.fused_kernels` as configured: auto = compile on CUDA, hf elsewhere. Returns the counts ({} for hf)."""
    if mode not in FUSED_MODES:
        raise ValueError(f"model.fused_kernels={mode!r} is not one of {FUSED_MODES}.")
    if mode == "auto":
        mode = "compile" if torch.device(device).type == "cuda" else "hf"
    return {} if mode == "hf" else fuse_decoder(model, compile=mode == "compile")


def fuse_decoder(model: nn.Module, compile: bool) -> dict[str, int]:
    """Patch, in place, the forwards of every RMSNorm, SiLU MLP, Llama/Qwen2 attention and peft LoRA Linear
    inside `model` (plain, peft-wrapped or the module inside a DeepSpeed engine). Idempotent. Returns counts."""
    kernels = Kernels(compile)
    counts = {"rms_norm": 0, "mlp": 0, "attention": 0, "lora": 0}
    for m in model.modules():
        if getattr(m, "_kava_kernels", None) is not None:
            continue
        if _is_rms_norm(m):
            kind, fwd = "rms_norm", _norm_forward
        elif _is_silu_mlp(m):
            kind, fwd = "mlp", _mlp_forward
        elif _is_attention(m):
            kind, fwd = "attention", _attention_forward
        elif _is_lora_linear(m):
            kind, fwd = "lora", _lora_forward
            m._kava_peft_forward = m.forward
        else:
            continue
        m._kava_kernels = kernels
        m.forward = types.MethodType(fwd, m)
        counts[kind] += 1
    log.debug("fused kernels (%s): %s", "compiled" if compile else "eager", counts)
    return counts
