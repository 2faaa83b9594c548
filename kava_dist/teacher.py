"""[2] Teacher forward: one pass over question + CoT + answer that yields what eviction and the losses need.

Usage:
    from kava_dist.teacher import teacher_forward
    out = teacher_forward(model, batch, rope="post", with_ce=False)     # no-grad cache build: no lm_head at all
    out.k_LBHND[l], out.v_LBHND[l]        # per-layer keys/values over the CoT span (post- or pre-RoPE keys)
    out.q_LBHAD[l]                        # per-layer post-RoPE queries of the answer tokens (importance scores)
    out.hidden_BLd                        # hidden states of all L layers at the distillation token (":")
    out.ce                                # teacher CE on CoT + answer when with_ce=True (online / teacher stage)

The sequence is segment-aligned ([q left-padded | cot right-padded | answer right-padded], see prompts.Batch):
position ids skip the pads and the attention mask hides them, so every row computes exactly what it would alone.
q/k/v are captured by forward hooks on the family's q/k/v projections (kava_dist/models/: sliced to the needed
columns inside the hook) and the family's RoPE is applied with the cos/sin the attention module receives:
attention runs in the fused SDPA kernel, never with `output_attentions=True` (which forces eager attention).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kava_dist.backbone import parts
from kava_dist.models import family_of
from kava_dist.prompts import Batch


@dataclass
class TeacherOutput:
    k_LBHND: list[torch.Tensor]
    v_LBHND: list[torch.Tensor]
    k_post_LBHND: list[torch.Tensor]   # post-RoPE keys (what importance is scored on); same list as k when rope=post
    q_LBHAD: list[torch.Tensor]
    hidden_BLd: torch.Tensor | None
    ce: torch.Tensor | None
    cot_mask: torch.Tensor
    ans_mask: torch.Tensor


def positions_from_mask(mask_BS: torch.Tensor) -> torch.Tensor:
    """Position ids that skip pads: the k-th real token of a row gets position k (pads get a harmless 0)."""
    return (mask_BS.long().cumsum(-1) - 1).clamp_min(0)


def teacher_sequence(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.cat([batch.q_ids, batch.cot_ids, batch.ans_ids], dim=1)
    mask = torch.cat([batch.q_mask, batch.cot_mask, batch.ans_mask], dim=1)
    return ids, mask, positions_from_mask(mask)


@contextmanager
def capture_qkv(model, cot_cols: slice, ans_cols: slice, hidden_col: int | None):
    """Hooks that keep, per layer: q over `ans_cols`, k/v over `cot_cols`, cos/sin, and the hidden state at
    `hidden_col` (decoder layer outputs for layers 0..L-2, the final norm output for the last, as in HF's
    `hidden_states[1:]`). Yields the dict the hooks fill."""
    lm, decoder, _ = parts(model)
    fam = family_of(lm)
    store: dict = {"q": {}, "k": {}, "v": {}, "cos": {}, "sin": {}, "h": {}}
    handles = []

    def keep(kind, idx, cols):
        def hook(_mod, _inp, out):
            store[kind][idx] = out[:, cols]
        return hook

    def keep_rope(idx):
        def hook(_mod, _args, kwargs):
            cos, sin = kwargs["position_embeddings"]
            store["cos"][idx], store["sin"][idx] = cos, sin
        return hook

    def keep_hidden(idx):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            store["h"][idx] = h[:, hidden_col]
        return hook

    layers = list(decoder.layers)
    for i, layer in enumerate(layers):
        q_proj, k_proj, v_proj = fam.projections(layer)
        handles.append(fam.attention(layer).register_forward_pre_hook(keep_rope(i), with_kwargs=True))
        handles.append(q_proj.register_forward_hook(keep("q", i, ans_cols)))
        handles.append(k_proj.register_forward_hook(keep("k", i, cot_cols)))
        handles.append(v_proj.register_forward_hook(keep("v", i, cot_cols)))
        if hidden_col is not None and i < len(layers) - 1:
            handles.append(layer.register_forward_hook(keep_hidden(i)))
    if hidden_col is not None:
        handles.append(decoder.norm.register_forward_hook(keep_hidden(len(layers) - 1)))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _prev_real_columns(mask_BS: torch.Tensor) -> torch.Tensor:
    """For every column j, the last real column < j (-1 if none): the position whose output predicts token j."""
    B, S = mask_BS.shape
    col = torch.arange(S, device=mask_BS.device).expand(B, S)
    last_real = torch.where(mask_BS, col, torch.full_like(col, -1)).cummax(dim=1).values
    return torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)


def teacher_ce(lm, hidden_BSd: torch.Tensor, ids_BS: torch.Tensor, mask_BS: torch.Tensor, start: int) -> torch.Tensor:
    """Mean CE over the real tokens at columns >= start (CoT + answer), each predicted from the previous real
    column, so pads between segments never break the shift. Only those rows go through the LM head."""
    prev_BS = _prev_real_columns(mask_BS)[:, start:]
    target_BS = ids_BS[:, start:]
    valid_BS = mask_BS[:, start:] & (prev_BS >= 0)
    h_BTd = hidden_BSd.gather(1, prev_BS.clamp_min(0).unsqueeze(-1).expand(-1, -1, hidden_BSd.shape[-1]))
    logits_BTV = lm.lm_head(h_BTd[valid_BS])
    return F.cross_entropy(logits_BTV.float(), target_BS[valid_BS])


def teacher_forward(model, batch: Batch, rope: str = "post", with_ce: bool = False,
                    with_hidden: bool = True, capture: bool = True) -> TeacherOutput:
    """One teacher pass. Runs under the caller's grad mode (no_grad for cache builds, grad for online)."""
    lm, decoder, _ = parts(model)
    rope_fn = family_of(lm).apply_rope
    ids, mask, pos = teacher_sequence(batch)
    Q, C, A = batch.q_ids.shape[1], batch.cot_ids.shape[1], batch.ans_ids.shape[1]
    cot_cols, ans_cols = slice(Q, Q + C), slice(Q + C, Q + C + A)
    hidden_col = Q + C + batch.prompt_len - 1 if with_hidden else None
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads   # explicit: a batch of empty CoTs (C = 0) has nothing to infer -1 from
    if not capture:
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        ce = teacher_ce(lm, out.last_hidden_state, ids, mask, Q) if with_ce else None
        return TeacherOutput([], [], [], [], None, ce, batch.cot_mask, batch.ans_mask)
    with capture_qkv(model, cot_cols, ans_cols, hidden_col) as st:
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    ce = teacher_ce(lm, out.last_hidden_state, ids, mask, Q) if with_ce else None
    k_out, k_post, v_out, q_out = [], [], [], []
    for i in range(len(st["q"])):
        cos, sin = st["cos"][i], st["sin"][i]
        B = ids.shape[0]
        q_BHAD = st["q"][i].view(B, A, -1, head_dim).transpose(1, 2)
        k_BHND = st["k"][i].reshape(B, C, n_kv, head_dim).transpose(1, 2)
        v_BHND = st["v"][i].reshape(B, C, n_kv, head_dim).transpose(1, 2)
        q_out.append(rope_fn(q_BHAD, cos[:, ans_cols], sin[:, ans_cols]))
        kp = rope_fn(k_BHND, cos[:, cot_cols], sin[:, cot_cols])
        k_post.append(kp)
        k_out.append(kp if rope == "post" else k_BHND)
        v_out.append(v_BHND)
    hidden = torch.stack([st["h"][i] for i in range(len(st["h"]))], dim=1) if with_hidden else None
    return TeacherOutput(k_out, v_out, k_post, q_out, hidden, ce, batch.cot_mask, batch.ans_mask)
