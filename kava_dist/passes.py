"""One student pass (embeddings in; per-layer K/V, hidden states or logits out) and which runner computes it.

Usage:
    from kava_dist.passes import passes_for
    out = passes_for(model).run(embeds_BSd, mask_BK, pos_BS, past_kv, pre_rope=False, hidden_col=None)
    out.last_BSd, out.kv, out.pre_k, out.hidden_BLd, out.logits_BSV       # PassOut

`HFPasses` runs a pass through the HF/peft modules (the reference, and what generation uses). A runner with the
same `run` can be attached to a model with `attach_runner` (kava_dist.fused does, per `model.fused_kernels`);
`passes_for` returns it while autograd is on (training) and HFPasses otherwise.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kava_dist.backbone import parts
from kava_dist.models import family_of


@dataclass
class PassOut:
    """What one student pass returns, from HFPasses or kava_dist.fused.FusedDecoder."""
    last_BSd: torch.Tensor | None                          # final-norm hidden states (None when logits are asked)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None     # per layer post-RoPE (k, v) over past + new columns
    pre_k: list[torch.Tensor] | None = None                # per layer pre-RoPE keys of the new columns [B,h,S,D]
    hidden_BLd: torch.Tensor | None = None                 # HF hidden_states[1:] at one column
    logits_BSV: torch.Tensor | None = None


def make_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache over given per-layer (k, v); updates concatenate, so the given tensors are never modified."""
    try:
        return DynamicCache(ddp_cache_data=kv)
    except TypeError:  # older transformers
        return DynamicCache.from_legacy_cache(tuple(kv))


def cache_kv(cache, upto: int | None = None, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(lay.keys[:, :, start:upto], lay.values[:, :, start:upto]) for lay in cache.layers]
    return [(cache.key_cache[i][:, :, start:upto], cache.value_cache[i][:, :, start:upto]) for i in range(len(cache))]


@contextmanager
def _pre_rope_capture(model, captured: dict[int, torch.Tensor]):
    """Keep every layer's k_proj output (the pre-RoPE keys) in `captured[layer index]`."""
    lm, decoder, _ = parts(model)
    fam = family_of(lm)
    handles = []
    for i, layer in enumerate(decoder.layers):
        def hook(_m, _i, o, i=i):
            captured[i] = o
        handles.append(fam.projections(layer)[1].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class HFPasses:
    """The student's passes through the HF/peft modules (the reference; kava_dist.fused.FusedDecoder has the same
    `run`). mask_BK: 2D mask over past + new columns (None: causal only); past: per-layer (k, v) or None."""

    def __init__(self, model):
        self.model = model
        self.lm, self.decoder, _ = parts(model)

    def run(self, embeds_BSd, mask_BK, pos_BS, past=None, *, pre_rope: bool = False, hidden_col: int | None = None,
            lm_head: bool = False) -> PassOut:
        cache = make_cache(past) if past is not None else None
        captured: dict[int, torch.Tensor] = {}
        ctx = _pre_rope_capture(self.model, captured) if pre_rope else nullcontext()
        with ctx:
            if lm_head:
                out = self.lm(inputs_embeds=embeds_BSd, attention_mask=mask_BK, position_ids=pos_BS,
                              past_key_values=cache, use_cache=False, output_hidden_states=hidden_col is not None)
            else:
                out = self.decoder(inputs_embeds=embeds_BSd, attention_mask=mask_BK, position_ids=pos_BS,
                                   past_key_values=cache, use_cache=True, output_hidden_states=hidden_col is not None)
        hidden = None
        if hidden_col is not None:
            hidden = torch.stack(out.hidden_states[1:], dim=1)[:, :, hidden_col]   # layers' outputs, last normed
        if lm_head:
            return PassOut(last_BSd=None, kv=None, hidden_BLd=hidden, logits_BSV=out.logits)
        pre = None
        if pre_rope:
            B, S, _ = embeds_BSd.shape
            hd = family_of(self.lm).attention(self.decoder.layers[0]).head_dim
            pre = [captured[i].view(B, S, -1, hd).transpose(1, 2) for i in range(len(captured))]
        return PassOut(last_BSd=out.last_hidden_state, kv=cache_kv(out.past_key_values), pre_k=pre, hidden_BLd=hidden)


def attach_runner(model, runner) -> None:
    """Make `runner` (None: none) compute `model`'s training passes."""
    parts(model)[0]._kava_fused = runner


def runner_for(model):
    """The runner attach_runner attached, or None (the caller then uses the HF modules)."""
    return getattr(parts(model)[0], "_kava_fused", None)


def passes_for(model):
    """The attached runner if there is one and autograd is on (training), else HFPasses."""
    runner = runner_for(model)
    return runner if runner is not None and torch.is_grad_enabled() else HFPasses(model)
