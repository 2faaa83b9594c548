"""[6] Loss steps: the student's KaVa terms and the whole online (paper) step. The offline path is the online path
minus the teacher pass: targets come from the store. The targets themselves (`Targets`, `compute_targets`) live
in kava_dist/targets.py and are re-exported here.

Usage:
    from kava_dist.step import kava_terms, online_step, teacher_step, nocot_step
    from kava_dist.targets import compute_targets
    tout = teacher_forward(teacher, batch, rope=cfg.eviction.rope)            # under no_grad for a cache build
    targets = compute_targets(tout, cfg.eviction, cfg.latent.num_latents)     # Targets(k, v, valid, codi_h, ...)
    terms = kava_terms(model, batch, special, targets, cfg)                   # {"loss", "ce_student", "kv", "codi"}
    terms = online_step(model, batch, special, cfg)                           # + "ce_teacher": the paper's joint step
"""
from __future__ import annotations

from kava_dist.config import KavaConfig
from kava_dist.losses import codi_loss, kv_loss
from kava_dist.prompts import Batch, SpecialIds
from kava_dist.student import student_forward
from kava_dist.targets import Targets, compute_targets
from kava_dist.teacher import teacher_forward

__all__ = ["Targets", "compute_targets", "kava_terms", "online_step", "offline_step", "teacher_step", "nocot_step"]


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
