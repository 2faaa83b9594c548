"""The Qwen2 family: Llama's decoder layer with biased q/k/v projections (the bias lives in the modules, so the
Llama hooks, RoPE and fused layer compute it unchanged); its own config class.

Usage:
    from kava_dist.models.qwen2 import FAMILY
    FAMILY.tiny_config(vocab_size=128, hidden_size=64, ...)        # a transformers Qwen2Config
"""
from __future__ import annotations

from kava_dist.models import llama
from kava_dist.models.family import Family


def tiny_config(**dims):
    from transformers import Qwen2Config

    return Qwen2Config(**dims)


FAMILY = Family(name="qwen2", decoder_class="Qwen2Model", label="Qwen2", tiny_config=tiny_config,
                attention=llama.attention, projections=llama.projections, apply_rope=llama.apply_rope,
                layer_forward=llama.layer_forward, fused_ok=llama.fused_ok)
