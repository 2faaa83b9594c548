"""[6] Loss steps: teacher targets (teacher pass -> eviction), the student's KaVa terms, and the whole
online (paper) step. The offline path is the online path minus the teacher pass: targets come from the store.

Usage:
    from kava_dist.step import compute_targets, kava_terms, online_step, teacher_step, nocot_step
    tout = teacher_forward(teacher, batch, rope=cfg.eviction.rope)            # under no_grad for a cache build
    targets = compute_targets(tout, cfg.eviction, cfg.latent.num_latents)     # Targets(k, v, valid, codi_h, ...)
    terms = kava_terms(model, batch, special, targets, cfg)                   # {"loss", "ce_student", "kv", "codi"}
    terms = online_step(model, batch, special, cfg)                           # + "ce_teacher": the paper's joint step
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kava_dist.config import EvictionConfig, KavaConfig
from kava_dist.eviction import evict, score_tokens, shared_scores
from kava_dist.losses import codi_loss, kv_loss
from kava_dist.prompts import Batch, SpecialIds
from kava_dist.student import student_forward
from kava_dist.teacher import TeacherOutput, teacher_forward


@dataclass
class Targets:
    """Teacher targets of one batch, stop-gradient: what the store holds per example."""

    k_BLHMD: torch.Tensor
    v_BLHMD: torch.Tensor
    valid_BLHM: torch.Tensor
    codi_BLd: torch.Tensor
    index_BLHM: torch.Tensor | None = None

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "Targets":
        def f(t, cast=True):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast and t.is_floating_point() else None,
                        non_blocking=non_blocking)

        return Targets(f(self.k_BLHMD), f(self.v_BLHMD), f(self.valid_BLHM, False), f(self.codi_BLd),
                       f(self.index_BLHM, False))

    def pin_memory(self) -> "Targets":
        """A copy in page-locked host memory (see Batch.pin_memory)."""
        f = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Targets(f(self.k_BLHMD), f(self.v_BLHMD), f(self.valid_BLHM), f(self.codi_BLd), f(self.index_BLHM))

    def as_arrays(self) -> dict[str, torch.Tensor]:
        """Per-example field tensors in the store's layout (leading axis = example)."""
        out = {"k": self.k_BLHMD, "v": self.v_BLHMD, "valid": self.valid_BLHM, "codi_h": self.codi_BLd}
        if self.index_BLHM is not None:
            out["index"] = self.index_BLHM.to(torch.int16)
        return out


@torch.no_grad()
def compute_targets(tout: TeacherOutput, ecfg: EvictionConfig, budget: int) -> Targets:
    """Evict every layer's CoT K/V to `budget` slots per KV head (layers folded into the batch axis)."""
    L = len(tout.k_LBHND)
    B = tout.cot_mask.shape[0]
    k_post = torch.stack([k.detach() for k in tout.k_post_LBHND]).flatten(0, 1)     # [L*B, H, N, D]
    v = torch.stack([x.detach() for x in tout.v_LBHND]).flatten(0, 1)
    q = torch.stack([x.detach() for x in tout.q_LBHAD]).flatten(0, 1)
    cot_LB, ans_LB = tout.cot_mask.repeat(L, 1), tout.ans_mask.repeat(L, 1)
    scores = None
    if ecfg.share != "none":   # one kept set per example (and layer), pooled over KV heads (and layers)
        sc = score_tokens(k_post, q, cot_LB, ans_LB, ecfg.lam, ecfg.method, ecfg.gqa_pool, ecfg.seed)
        scores = shared_scores(sc.view(L, B, *sc.shape[1:]), ecfg.share).flatten(0, 1)
    res = evict(k_post, v, q, cot_LB, ans_LB, budget, lam=ecfg.lam, method=ecfg.method, gqa_pool=ecfg.gqa_pool,
                order=ecfg.order, short_cot=ecfg.short_cot, seed=ecfg.seed, score_BHN=scores)
    k_sel = res.k_sel
    if ecfg.rope == "pre":  # score on post-RoPE keys, store pre-RoPE ones
        k_pre = torch.stack([k.detach() for k in tout.k_LBHND]).flatten(0, 1)
        idx = res.index.clamp_min(0).unsqueeze(-1).expand(-1, -1, -1, k_pre.shape[-1])
        k_sel = k_pre.gather(2, idx) * (res.index >= 0).unsqueeze(-1).to(k_pre.dtype)

    def unfold(x):  # [L*B, ...] -> [B, L, ...]
        return x.view(L, B, *x.shape[1:]).transpose(0, 1).contiguous()

    return Targets(unfold(k_sel), unfold(res.v_sel), unfold(res.valid), tout.hidden_BLd.detach(), unfold(res.index))


def kava_terms(model, batch: Batch, special: SpecialIds, targets: Targets | None, cfg: KavaConfig,
               cot_removed: int | None = None) -> dict:
    """Student forward and its loss terms: student_ce * CE + alpha_codi * CODI + alpha_kv * KV. `cot_removed`:
    the CoT curriculum's current step (student.cot_removed_at); None = the paper's sequence."""
    lc = cfg.loss
    need_hidden = lc.alpha_codi > 0 and targets is not None
    out = student_forward(model, batch, special, cfg.latent, rope=cfg.eviction.rope, with_hidden=need_hidden,
                          cot_removed=cot_removed)
    terms = {"ce_student": out.ce}
    loss = lc.student_ce * out.ce
    if targets is not None and lc.alpha_kv > 0:
        t = targets.to(device=out.k_BLHMD.device)
        terms["kv"] = kv_loss(out.k_BLHMD, out.v_BLHMD, t.k_BLHMD, t.v_BLHMD, t.valid_BLHM, lc.kv_loss, lc.kv_std)
        loss = loss + lc.alpha_kv * terms["kv"]
    if need_hidden:
        terms["codi"] = codi_loss(out.hidden_BLd, targets.codi_BLd.to(out.hidden_BLd.device), lc.codi_loss, lc.codi_std)
        loss = loss + lc.alpha_codi * terms["codi"]
    terms["loss"] = loss
    return terms


def online_step(model, batch: Batch, special: SpecialIds, cfg: KavaConfig, cot_removed: int | None = None) -> dict:
    """The paper's joint step: teacher pass with grad (CE on CoT + answer), targets detached and evicted on the
    fly, then the student passes on the same weights."""
    tout = teacher_forward(model, batch, rope=cfg.eviction.rope, with_ce=True)
    targets = compute_targets(tout, cfg.eviction, cfg.latent.num_latents)
    terms = kava_terms(model, batch, special, targets, cfg, cot_removed)
    terms["ce_teacher"] = tout.ce
    terms["loss"] = terms["loss"] + cfg.loss.teacher_ce * tout.ce
    return terms


def offline_step(model, batch: Batch, special: SpecialIds, targets: Targets, cfg: KavaConfig,
                 cot_removed: int | None = None) -> dict:
    """The cached path: targets from the store; an optional teacher CE on the student's own weights."""
    terms = kava_terms(model, batch, special, targets, cfg, cot_removed)
    if cfg.loss.offline_teacher_ce > 0:
        ce = teacher_forward(model, batch, with_ce=True, capture=False).ce
        terms["ce_teacher"] = ce
        terms["loss"] = terms["loss"] + cfg.loss.offline_teacher_ce * ce
    return terms


def teacher_step(model, batch: Batch) -> dict:
    """CoT fine-tuning of the teacher: CE on CoT + answer."""
    ce = teacher_forward(model, batch, with_ce=True, capture=False).ce
    return {"loss": ce, "ce_teacher": ce}


def nocot_step(model, batch: Batch) -> dict:
    """No-CoT baseline: CE on the answer right after the question (the CoT segment is dropped)."""
    empty = batch.cot_ids[:, :0]
    nocot = Batch(ids=batch.ids, q_ids=batch.q_ids, q_mask=batch.q_mask, cot_ids=empty, cot_mask=batch.cot_mask[:, :0],
                  ans_ids=batch.ans_ids, ans_mask=batch.ans_mask, prompt_len=batch.prompt_len)
    ce = teacher_forward(model, nocot, with_ce=True, capture=False).ce
    return {"loss": ce, "ce_answer": ce}
