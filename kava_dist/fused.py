"""[6b] Fused student passes: the decoder layer as one compiled function of tensors, for the student's training step.

Usage:
    from kava_dist.fused import apply_fused
    from kava_dist.passes import runner_for
    apply_fused(model, cfg.model.fused_kernels, device, zero_stage)   # auto: compiled on CUDA with ZeRO 0-2
    out = runner_for(model).run(embeds_BSd, mask_BK, pos_BS, past_kv)  # what kava_dist.student calls per pass
    out.last_BSd, out.kv, out.pre_k, out.hidden_BLd, out.logits_BSV

Why (docs/PERFORMANCE.md, "Fused student passes"): a student micro-step is five short passes (prefix, T=3
Jacobi passes over M=24 latents, answer) through 16-28 layers. Through the HF + peft modules that is thousands of
module calls and kernels per micro-step, and at micro 128 on an H200 the device spent 37% of its time in GEMMs
and about half in dtype copies and elementwise kernels (HF's fp32 RMSNorm round trips, RoPE's slices and cats,
K/V repeated for masked GQA). Compiling those pieces one by one cut device time by 27% but made the step
host-bound (1,300 compiled calls per micro-step). Here each decoder layer is one compiled graph (torch.compile;
model dims static, lengths symbolic after the first new shape; one graph serves every layer of the stack),
called once per layer per pass: Inductor fuses the norms, RoPE, SiLU x up, residual adds and peft's
dropout/scale, and the K/V of a cached pass are concatenated inside the graph.

Same arithmetic as the HF path (kava_dist.passes.HFPasses): the layer is the model family's `layer_forward`
(kava_dist/models/llama.py: RMSNorm statistics in fp32 cast back before the weight, RoPE in the activation dtype,
grouped-query attention with the G query heads of a KV head stacked on the query axis instead of K/V repeated G
times), with the same causal + padding mask (built here from the 2D mask, as transformers' sdpa_mask does). The
q/k/v/o and MLP projection modules are still called, so peft's LoRA (dropout, scaling) is what runs. `eager`
runs the same function uncompiled (the reference the unit tests compare with HF). Not under ZeRO-3: its parameter
gathering hooks cannot run inside a compiled graph (auto falls back to the HF modules there; an explicit `compile`
is refused by the config check). Adding a model family: kava_dist/models/__init__.py.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from kava_dist.backbone import parts
from kava_dist.config import FUSED_MODES
from kava_dist.models import FAMILIES
from kava_dist.models.attention import causal_padding_mask
from kava_dist.passes import PassOut, attach_runner, runner_for

log = logging.getLogger(__name__)

__all__ = ["FusedDecoder", "apply_fused", "resolve_mode", "runner_for"]


class FusedDecoder:
    """Runs the student's passes through the family's `layer_forward` (compiled once for all layers, or eager)."""

    def __init__(self, model: nn.Module, compile: bool):
        self.lm, self.decoder, _ = parts(model)
        self.compiled = compile
        layer_forward = FAMILIES[self.lm.config.model_type].layer_forward
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
    if mode != "hf":
        fam = FAMILIES.get(getattr(lm.config, "model_type", None))
        if fam is None or type(lm.model).__name__ != fam.decoder_class or fam.fused_ok(lm.config) is not None:
            labels = "/".join(f.label for f in FAMILIES.values())
            raise ValueError(f"model.fused_kernels={mode} supports {labels} decoders with SiLU MLPs, not "
                             f"{type(lm.model).__name__} ({getattr(lm.config, 'hidden_act', '?')}); set "
                             "model.fused_kernels=hf.")
    attach_runner(model, None if mode == "hf" else FusedDecoder(model, compile=mode == "compile"))
    log.debug("student passes: %s", mode)
    return mode

