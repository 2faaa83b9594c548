"""The contract of a model family: what kava needs to know about one decoder architecture.

Usage:
    from kava_dist.models.family import Family
    FAMILY = Family(name="llama", decoder_class="LlamaModel", label="Llama", tiny_config=tiny_config,
                    attention=attention, projections=projections, apply_rope=apply_rope,
                    layer_forward=layer_forward, fused_ok=fused_ok)

One `Family` per file in kava_dist/models/ (llama.py, qwen2.py), listed in kava_dist/models/__init__.py. What
each field is for:
- the teacher hooks `projections(layer)` (q/k/v outputs, pre-RoPE) and `attention(layer)` (the module that
  receives `position_embeddings`, i.e. cos/sin) and rebuilds post-RoPE q/k with `apply_rope`;
- the student's fused runner (kava_dist.fused) calls `layer_forward` once per decoder layer and pass, after
  `fused_ok(config)` said the checkpoint fits it (None) or why not (a reason);
- tests and the demo build random checkpoints from `tiny_config(**dims)` (kava_dist.tiny).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    name: str                      # the HF config's model_type
    decoder_class: str             # class name of the CausalLM's `.model` (the decoder stack)
    label: str                     # how messages name it
    tiny_config: Callable          # (**dims) -> a transformers config of this family
    attention: Callable            # (decoder layer) -> the attention module (its forward gets position_embeddings)
    projections: Callable          # (decoder layer) -> (q_proj, k_proj, v_proj) modules
    apply_rope: Callable           # (x [B, n, S, D], cos [B, S, D], sin [B, S, D]) -> x rotated
    layer_forward: Callable        # the fused decoder layer: see kava_dist.models.llama.layer_forward
    fused_ok: Callable             # (config) -> None if layer_forward computes this checkpoint, else the reason
