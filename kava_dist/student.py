"""[6] Student: PCCoT latent reasoning (M continuous latents, T Jacobi iterations) and batched greedy decoding.

Usage:
    from kava_dist.student import student_forward, generate_answers
    out = student_forward(model, batch, special, cfg.latent)
    out.ce                       # answer CE ("The answer is:" + answer + EOS, predicted after <eot>)
    out.k_BLHMD, out.v_BLHMD     # latent K/V of the last Jacobi pass (what the answer attends to), per layer/KV head
    out.hidden_BLd               # hidden states of all layers at the distillation token (":")
    gen = generate_answers(model, batch, special, cfg.latent, max_new_tokens=16)   # gen.tokens, gen.forward_passes

Sequence (PCCoT's, which the paper uses):
    [BOS question (left-padded) | <bot> | <latent> x M | <eot> | prompt answer EOS].
1. prefix pass over question + <bot> + M placeholders; z0 = prj(h[<bot> .. latent_{M-2}]) (the AR shift);
2. T Jacobi passes, each from the same question cache: z_t = [z_{t-1}[:, :1], prj(h_t[:, :-1])];
   (with `latent.soft_tokens`, prj(h) becomes softmax(lm_head(h)) @ E + gate * prj(h): `latent_inputs`, D28)
3. answer pass over <eot> + answer on top of the T-th pass's cache (with `latent.cot_curriculum_steps`, the CoT
   minus its first r tokens sits between <eot> and the prompt while the curriculum lasts: `cot_removed`).
With `latent.fix_masks` (default) the latent passes get the real attention mask and pad-free position ids;
off reproduces PCCoT (no mask, column positions). Gradients flow through every pass (no detach).
Each pass goes through `kava_dist.passes.passes_for(model).run(...)`: the HF/peft modules (HFPasses), or in
training, when kava_dist.fused.apply_fused attached it (model.fused_kernels), the compiled per-layer graph of
FusedDecoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kava_dist.backbone import parts
from kava_dist.config import LatentConfig
from kava_dist.passes import make_cache, passes_for
from kava_dist.prompts import Batch, SpecialIds
from kava_dist.teacher import _prev_real_columns, positions_from_mask


@dataclass
class StudentOutput:
    ce: torch.Tensor
    logits_BAV: torch.Tensor
    k_BLHMD: torch.Tensor
    v_BLHMD: torch.Tensor
    hidden_BLd: torch.Tensor | None
    latents_BMd: torch.Tensor


@dataclass
class _Prefix:
    lat_mask: torch.Tensor       # [B, Q+1+M] mask over question + <bot> + latents
    qlen: torch.Tensor           # [B] real question tokens


def _embed(lm, ids):
    return lm.get_input_embeddings()(ids)


def _embedding_matrix(lm) -> torch.Tensor:
    """[V, d] input embeddings as the model reads them (peft's trainable-token rows included)."""
    emb = lm.get_input_embeddings()
    if isinstance(emb, torch.nn.Embedding):
        return emb.weight
    head = lm.get_output_embeddings().weight
    return emb(torch.arange(head.shape[0], device=head.device))


def latent_inputs(prj, h_BMd: torch.Tensor, lm=None,
                  E_Vd: torch.Tensor | None = None) -> torch.Tensor:
    """Next latent inputs from final-norm hidden states: prj(h) (PCCoT); given the input embeddings E_Vd
    (`latent.soft_tokens`), the expected next-token embedding softmax(lm_head(h)) @ E plus prj(h), whose gate starts
    at 0 (DEVIATIONS.md D28)."""
    z_BMd = prj(h_BMd)
    if E_Vd is None:
        return z_BMd
    p_BMV = torch.softmax(lm.get_output_embeddings()(h_BMd).float(), dim=-1).to(h_BMd.dtype)
    return p_BMV @ E_Vd + z_BMd


def prefix_and_latents(model, batch: Batch, special: SpecialIds, latent: LatentConfig, pre_rope: bool = False):
    """Steps 1-2. Returns (prefix info, output of the T-th pass (its kv = question + latents), its latent inputs)."""
    lm, _, prj = parts(model)
    passes = passes_for(model)
    B, Q = batch.q_ids.shape
    M, T = latent.num_latents, latent.num_iterations
    dev = batch.q_ids.device
    tail = torch.full((B, 1 + M), special.latent, dtype=torch.long, device=dev)
    tail[:, 0] = special.bot
    ids = torch.cat([batch.q_ids, tail], dim=1)
    mask = torch.cat([batch.q_mask, torch.ones_like(tail, dtype=torch.bool)], dim=1)
    pos = positions_from_mask(mask)
    out0 = passes.run(_embed(lm, ids), mask, pos)
    h_BMd = out0.last_BSd[:, Q:Q + M]            # <bot>, latent_0 .. latent_{M-2}
    E_Vd = _embedding_matrix(lm) if latent.soft_tokens else None      # once for the T passes
    z_BMd = latent_inputs(prj, h_BMd, lm, E_Vd)
    q_cache = [(k[:, :, :Q + 1], v[:, :, :Q + 1]) for k, v in out0.kv]
    if latent.fix_masks:
        lat_mask, lat_pos = mask, pos[:, Q + 1:]
    else:  # PCCoT: no mask in the latent passes, positions are column indices
        lat_mask = None
        lat_pos = torch.arange(Q + 1, Q + 1 + M, device=dev).expand(B, M)
    out = None
    for t in range(T):
        last = t == T - 1
        out = passes.run(z_BMd, lat_mask, lat_pos, q_cache, pre_rope=last and pre_rope)
        if not last:
            p_BMd = latent_inputs(prj, out.last_BSd, lm, E_Vd)
            z_BMd = torch.cat([z_BMd[:, :1], p_BMd[:, :-1]], dim=1)
    prefix = _Prefix(lat_mask=mask, qlen=batch.q_mask.sum(1))
    return prefix, out, z_BMd


def cot_tail(batch: Batch, removed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CoT after its first `removed` tokens, per row, left-padded to one width (ids [B, W], mask [B, W]):
    placed between <eot> and the answer prompt, it keeps the prompt at one column for every row."""
    keep_BW, keep_mask_BW = batch.cot_ids[:, removed:], batch.cot_mask[:, removed:]
    W = keep_BW.shape[1]
    if W == 0:
        return keep_BW, keep_mask_BW
    shift_B = W - keep_mask_BW.sum(1)                      # right-padded -> left-padded: move row b by shift_B[b]
    col_BW = torch.arange(W, device=keep_BW.device)[None] - shift_B[:, None]
    mask_BW = col_BW >= 0
    ids_BW = keep_BW.gather(1, col_BW.clamp(min=0))
    return ids_BW.masked_fill(~mask_BW, 0), mask_BW


def student_forward(model, batch: Batch, special: SpecialIds, latent: LatentConfig, rope: str = "post",
                    with_hidden: bool = True, cot_removed: int | None = None) -> StudentOutput:
    """The student's passes and answer CE. `cot_removed` (the CoT curriculum, latent.cot_curriculum_steps): the
    CoT after its first `cot_removed` tokens is written between <eot> and the answer prompt and trained with the
    answer's CE; None (or a count that removes every CoT token) is the paper's sequence."""
    lm, _, _ = parts(model)
    B, Q = batch.q_ids.shape
    M = latent.num_latents
    prefix, last, z_BMd = prefix_and_latents(model, batch, special, latent, pre_rope=rope == "pre")
    kv = [(k[:, :, Q + 1:Q + 1 + M], v[:, :, Q + 1:Q + 1 + M]) for k, v in last.kv]
    k_BLHMD = torch.stack([k for k, _ in kv], dim=1)
    v_BLHMD = torch.stack([v for _, v in kv], dim=1)
    if rope == "pre":
        k_BLHMD = torch.stack(last.pre_k, dim=1)
    # 3. answer pass: <eot> [+ CoT tail] + prompt + answer, on the T-th pass's cache
    dev = batch.q_ids.device
    eot = torch.full((B, 1), special.eot, dtype=torch.long, device=dev)
    tail_ids, tail_mask = (cot_tail(batch, cot_removed) if cot_removed is not None
                           else (batch.cot_ids[:, :0], batch.cot_mask[:, :0]))
    W = tail_ids.shape[1]
    ans_in = torch.cat([eot, tail_ids.masked_fill(~tail_mask, special.pad), batch.ans_ids], dim=1)
    ans_mask = torch.cat([torch.ones_like(eot, dtype=torch.bool), tail_mask, batch.ans_mask], dim=1)
    full_mask = torch.cat([prefix.lat_mask, ans_mask], dim=1)
    ans_pos = prefix.qlen[:, None] + 1 + M + torch.arange(ans_in.shape[1], device=dev)[None]
    if W:   # pads inside the segment take no position
        ans_pos = prefix.qlen[:, None] + M + ans_mask.long().cumsum(1)
    if not latent.fix_masks:
        ans_pos = Q + 1 + M + torch.arange(ans_in.shape[1], device=dev)[None].expand(B, -1)
    out = passes_for(model).run(_embed(lm, ans_in), full_mask, ans_pos, last.kv, lm_head=True,
                                hidden_col=W + batch.prompt_len if with_hidden else None)   # ":" of the prompt
    logits = out.logits_BSV
    if not W:
        labels = batch.ans_ids.masked_fill(~batch.ans_mask, -100)
        ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=-100)
    else:   # each tail/answer token predicted from the previous real column (pads sit between <eot> and the tail)
        prev_BS = _prev_real_columns(ans_mask)[:, 1:]
        valid_BS = ans_mask[:, 1:]
        rows_BS = torch.arange(B, device=dev)[:, None].expand_as(prev_BS)
        ce = F.cross_entropy(logits[rows_BS[valid_BS], prev_BS[valid_BS]].float(), ans_in[:, 1:][valid_BS])
    return StudentOutput(ce=ce, logits_BAV=logits, k_BLHMD=k_BLHMD, v_BLHMD=v_BLHMD, hidden_BLd=out.hidden_BLd,
                         latents_BMd=z_BMd)


def cot_removed_at(step: int, curriculum_steps: int, cot_tokens: int) -> int | None:
    """CoT tokens removed from the student's text at optimizer step `step` (0-based) of a linear curriculum that
    removes all `cot_tokens` over `curriculum_steps` steps; None once all are gone (or with no curriculum)."""
    if curriculum_steps <= 0 or step >= curriculum_steps or cot_tokens <= 0:
        return None
    return min(cot_tokens, (step * cot_tokens) // curriculum_steps)


@dataclass
class Generation:
    tokens: list[list[int]]       # generated answer tokens per row (after the forced prompt), EOS excluded
    forward_passes: list[int]     # model calls each row needed: prefill + T latent passes + prompt + decode steps
    latents_BMd: torch.Tensor


@torch.no_grad()
def generate_answers(model, q_ids: torch.Tensor, q_mask: torch.Tensor, prompt_ids: list[int], special: SpecialIds,
                     latent: LatentConfig, max_new_tokens: int = 16) -> Generation:
    """Greedy latent decoding: prefill, T Jacobi passes, forced <eot> + prompt, then one pass per token."""
    lm, decoder, _ = parts(model)
    B, Q = q_ids.shape
    M = latent.num_latents
    dev = q_ids.device
    dummy = Batch(ids=torch.zeros(B, dtype=torch.long), q_ids=q_ids, q_mask=q_mask,
                  cot_ids=q_ids[:, :0], cot_mask=q_mask[:, :0], ans_ids=q_ids[:, :0], ans_mask=q_mask[:, :0],
                  prompt_len=len(prompt_ids))
    prefix, last, z_BMd = prefix_and_latents(model, dummy, special, latent)
    forced = torch.tensor([special.eot] + list(prompt_ids), device=dev).expand(B, -1)
    pos0 = prefix.qlen + 1 + M if latent.fix_masks else torch.full((B,), Q + 1 + M, device=dev)
    rows, count = forced_then_greedy(lm, make_cache(last.kv), prefix.lat_mask, forced, pos0, special.eos,
                                     max_new_tokens)
    passes = [1 + latent.num_iterations + n for n in count]
    return Generation(tokens=rows, forward_passes=passes, latents_BMd=z_BMd)


@torch.no_grad()
def forced_then_greedy(lm, cache, mask_BK: torch.Tensor, forced_BF: torch.Tensor, pos0_B: torch.Tensor, eos: int,
                       max_new_tokens: int) -> tuple[list[list[int]], list[int]]:
    """One pass over the forced tokens (e.g. <eot> + prompt) at positions pos0_B + 0..F-1 on top of `cache`
    (masked by `mask_BK`), then greedy decoding, one pass per token. Returns (tokens per row without EOS, passes
    per row: the forced pass + one per further token the row needed)."""
    B, dev = forced_BF.shape[0], forced_BF.device
    mask = torch.cat([mask_BK, torch.ones_like(forced_BF, dtype=torch.bool)], dim=1)
    pos = pos0_B[:, None] + torch.arange(forced_BF.shape[1], device=dev)[None]
    out = lm(input_ids=forced_BF, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    count = torch.ones(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    tokens = torch.empty(B, 0, dtype=torch.long, device=dev)
    next_pos = pos[:, -1]
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = done | (nxt == eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool, device=dev)], dim=1)
        next_pos = next_pos + 1
        out = lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                 past_key_values=out.past_key_values, use_cache=True)
        count += (~done).long()
    rows = [r[: r.index(eos)] if eos in r else r for r in tokens.tolist()]
    return rows, count.tolist()
