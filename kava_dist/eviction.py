"""KaVa teacher-cache eviction: compress per-(layer, kv-head) CoT keys/values to M slots.

Implements the paper's KV-cache compression (KaVa's R-KV variant, arXiv 2510.02312, Listing 1) with the choices
of docs/DEVIATIONS.md D3-D8 and D21:

    S = lam * I + (1 - lam) * R        (lam = 0.1 by default)

    I  importance: answer-token queries -> CoT keys, logits q.k/sqrt(D) in fp32,
       GQA pooled to one row per kv head ("max": max of the logits over the query
       group, then softmax over the valid CoT positions; "mean": softmax per query
       head, then mean over the group), then mean over the valid answer rows.
    R  redundancy: kn = k/(|k|+1e-8); cos = kn.kn^T with the diagonal and every
       entry involving a pad set to 0; cos_score_j = sum_i(-cos[i, j]) / n_valid;
       R = softmax over the valid CoT positions.

The top-min(M, N_C) positions are kept per (example, kv head) independently. Pads
are never selected. Scoring and selection run in fp32 under no_grad; the returned
k/v entries are gathered from the original tensors (bit-exact in their dtype).

Usage::

    from kava_dist.eviction import evict
    # k, v: [B, H_kv, N, D] teacher CoT keys/values (post-RoPE), zero/any padded
    # q:    [B, H_q, A, D]  post-RoPE queries of the answer tokens
    res = evict(k, v, q, cot_mask, answer_mask, budget=24)           # R-KV, lam=0.1
    res.k_sel, res.v_sel  # [B, H_kv, M, D], input dtype, zeros in empty slots
    res.valid             # [B, H_kv, M] bool (False in the N_C < M slots by default)
    res.index             # [B, H_kv, M] int64 CoT positions, -1 where empty

    # One selection for every KV head and layer of an example (eviction.share=all): pool, then select.
    sc = score_tokens(kL, qL, cot_mask.repeat(L, 1), answer_mask.repeat(L, 1)).view(L, B, H, N)
    res = evict(kL, vL, qL, cot_mask.repeat(L, 1), answer_mask.repeat(L, 1), 24,
                score_BHN=shared_scores(sc, "all").flatten(0, 1))

    # All layers in one call: fold L into B (masks repeated L times).
    kL = k_LBHND.flatten(0, 1); qL = q_LBHAD.flatten(0, 1)
    res = evict(kL, vL, qL, cot_mask.repeat(L, 1), answer_mask.repeat(L, 1), 24)

Decisions beyond the paper (docs/DEVIATIONS.md D21):
  * Ties are broken by lower CoT position (stable sort), so results are deterministic.
  * The cosine column sums use the exact identity
        sum_{i != j} kn_i . kn_j = (sum_i kn_i) . kn_j - |kn_j|^2
    (pads zeroed), so no [B, H, N, N] tensor is built.
  * An example with no valid answer rows gets I = 0 (R alone decides, scaled by 1-lam).
  * "random" draws one uniform score per (b, kv head, position) from a CPU
    torch.Generator seeded by `seed`; its result therefore depends on B/H/N (folding
    layers into B gives a different draw than per-layer calls). "crop" scores -position.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

METHODS = ("rkv", "attention", "redundancy", "crop", "random")
GQA_POOLS = ("max", "mean")
ORDERS = ("position", "score")
SHORT_COT = ("mask", "zero_target")

_NEEDS_Q = ("rkv", "attention")


class EvictionResult(NamedTuple):
    k_sel: torch.Tensor  # [B, H_kv, M, D] input dtype
    v_sel: torch.Tensor  # [B, H_kv, M, D] input dtype
    valid: torch.Tensor  # [B, H_kv, M] bool
    index: torch.Tensor  # [B, H_kv, M] int64, -1 where empty


# --------------------------------------------------------------------------- checks

def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name}={value!r}; use one of {choices}")


def _check_inputs(k, q_answer, cot_mask, answer_mask, lam, method, gqa_pool) -> None:
    _check_choice("method", method, METHODS)
    _check_choice("gqa_pool", gqa_pool, GQA_POOLS)
    if k.dim() != 4:
        raise ValueError(f"k must be [B, H_kv, N, D]; got shape {tuple(k.shape)}")
    B, H, N, D = k.shape
    if not isinstance(cot_mask, torch.Tensor) or cot_mask.dtype != torch.bool:
        raise TypeError("cot_mask must be a bool tensor [B, N]; pass cot_mask.bool()")
    if tuple(cot_mask.shape) != (B, N):
        raise ValueError(f"cot_mask shape {tuple(cot_mask.shape)} != (B, N) = {(B, N)} "
                         f"taken from k {tuple(k.shape)}")
    if cot_mask.device != k.device:
        raise ValueError(f"cot_mask is on {cot_mask.device} but k is on {k.device}; move it")
    if method in ("rkv",):
        if not (isinstance(lam, (int, float)) and 0.0 <= float(lam) <= 1.0):
            raise ValueError(f"lam must be a number in [0, 1]; got {lam!r}")
    if method not in _NEEDS_Q:
        return
    if q_answer is None or answer_mask is None:
        raise ValueError(f"method={method!r} needs q_answer [B, H_q, A, D] and answer_mask [B, A]")
    if q_answer.dim() != 4:
        raise ValueError(f"q_answer must be [B, H_q, A, D]; got shape {tuple(q_answer.shape)}")
    Bq, Hq, A, Dq = q_answer.shape
    if Bq != B or Dq != D:
        raise ValueError(f"q_answer {tuple(q_answer.shape)} and k {tuple(k.shape)} must agree "
                         f"on B (dim 0) and D (dim 3)")
    if Hq % H != 0:
        raise ValueError(f"H_q={Hq} (q_answer dim 1) is not a multiple of H_kv={H} (k dim 1); "
                         f"GQA needs H_q = G * H_kv")
    if not isinstance(answer_mask, torch.Tensor) or answer_mask.dtype != torch.bool:
        raise TypeError("answer_mask must be a bool tensor [B, A]; pass answer_mask.bool()")
    if tuple(answer_mask.shape) != (B, A):
        raise ValueError(f"answer_mask shape {tuple(answer_mask.shape)} != (B, A) = {(B, A)} "
                         f"taken from q_answer {tuple(q_answer.shape)}")
    if q_answer.device != k.device or answer_mask.device != k.device:
        raise ValueError(f"q_answer ({q_answer.device}), answer_mask ({answer_mask.device}) "
                         f"and k ({k.device}) must be on one device")


# --------------------------------------------------------------------------- scores

def _masked_softmax_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """In-place softmax over the last dim of fp32 `x`, restricted to `mask` (broadcast).

    Masked entries come out as exactly 0; a row with no valid entry is all 0 (no NaN).
    """
    x.masked_fill_(~mask, float("-inf"))
    m = x.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)  # -inf row -> finite
    x.sub_(m).exp_()
    x.div_(x.sum(dim=-1, keepdim=True).clamp_(min=torch.finfo(x.dtype).tiny))
    return x


def _importance(k_BHND, q_BHAD, cot_BN, ans_BA, gqa_pool) -> torch.Tensor:
    B, H, N, D = k_BHND.shape
    G = q_BHAD.shape[1] // H
    A = q_BHAD.shape[2]
    q_BHGAD = q_BHAD.float().reshape(B, H, G, A, D)  # head h -> kv head h // G (repeat_kv)
    # The only [B, H_q, A, N] tensor; everything below works in place or reduces it.
    logit_BHGAN = torch.einsum("bhgad,bhnd->bhgan", q_BHGAD, k_BHND)
    logit_BHGAN.mul_(1.0 / math.sqrt(D))
    cot_B111N = cot_BN[:, None, None, None, :]
    ans_f_BA = ans_BA.float()
    n_ans_B = ans_f_BA.sum(-1).clamp(min=1.0)
    if gqa_pool == "max":
        p_BHAN = _masked_softmax_(logit_BHGAN.amax(dim=2), cot_BN[:, None, None, :])
        imp_BHN = torch.einsum("bhan,ba->bhn", p_BHAN, ans_f_BA) / n_ans_B[:, None, None]
    else:
        p_BHGAN = _masked_softmax_(logit_BHGAN, cot_B111N)
        imp_BHN = torch.einsum("bhgan,ba->bhn", p_BHGAN, ans_f_BA) / (G * n_ans_B[:, None, None])
    return imp_BHN


def _redundancy(k_BHND, cot_BN) -> torch.Tensor:
    kn_BHND = k_BHND / (k_BHND.norm(dim=-1, keepdim=True) + 1e-8)
    kn_BHND = kn_BHND * cot_BN[:, None, :, None]  # pads -> 0: every cos entry with a pad is 0
    # column sum of cos with zero diagonal: (sum_i kn_i) . kn_j - kn_j . kn_j
    sum_BHD = kn_BHND.sum(dim=2)
    colsum_BHN = torch.einsum("bhnd,bhd->bhn", kn_BHND, sum_BHD) - kn_BHND.pow(2).sum(-1)
    n_valid_B = cot_BN.sum(-1).clamp(min=1).float()
    cos_score_BHN = -colsum_BHN / n_valid_B[:, None, None]
    return _masked_softmax_(cos_score_BHN, cot_BN[:, None, :])


@torch.no_grad()
def score_tokens(k, q_answer, cot_mask, answer_mask, lam=0.1, method="rkv", gqa_pool="max",
                 seed=0) -> torch.Tensor:
    """Per-(b, kv head) eviction scores over the CoT span: [B, H_kv, N] fp32, -inf at pads.

    Higher = kept first. rkv: lam*I + (1-lam)*R; attention: I; redundancy: R;
    crop: -position; random: uniform draw from torch.Generator(seed) on CPU.
    q_answer / answer_mask may be None for redundancy, crop and random.
    """
    _check_inputs(k, q_answer, cot_mask, answer_mask, lam, method, gqa_pool)
    B, H, N, D = k.shape
    if N == 0:  # empty span: nothing to score
        return torch.empty(B, H, 0, device=k.device, dtype=torch.float32)
    if method in ("crop", "random"):
        if method == "crop":
            score_BHN = -torch.arange(N, device=k.device, dtype=torch.float32).expand(B, H, N)
        else:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            score_BHN = torch.rand(B, H, N, generator=gen, dtype=torch.float32).to(k.device)
        return score_BHN.masked_fill(~cot_mask[:, None, :], float("-inf"))
    k_BHND = k.float()
    if method == "attention":
        score_BHN = _importance(k_BHND, q_answer, cot_mask, answer_mask, gqa_pool)
    elif method == "redundancy":
        score_BHN = _redundancy(k_BHND, cot_mask)
    else:
        lam = float(lam)
        score_BHN = (1.0 - lam) * _redundancy(k_BHND, cot_mask)
        if lam > 0.0:
            score_BHN += lam * _importance(k_BHND, q_answer, cot_mask, answer_mask, gqa_pool)
    return score_BHN.masked_fill_(~cot_mask[:, None, :], float("-inf"))


# --------------------------------------------------------------------------- selection

@torch.no_grad()
def evict(k, v, q_answer, cot_mask, answer_mask, budget, lam=0.1, method="rkv", gqa_pool="max",
          order="position", short_cot="mask", seed=0, score_BHN=None) -> EvictionResult:
    """Keep top-min(budget, N_C) CoT entries per (b, kv head); see the module docstring. `score_BHN` replaces
    the method's scores (e.g. scores pooled over heads and layers, `shared_scores`)."""
    _check_choice("order", order, ORDERS)
    _check_choice("short_cot", short_cot, SHORT_COT)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int (M, e.g. 24); got {budget!r}")
    if not isinstance(v, torch.Tensor) or v.shape != k.shape:
        raise ValueError(f"v shape {tuple(getattr(v, 'shape', ()))} must equal k shape "
                         f"{tuple(k.shape)} ([B, H_kv, N, D])")
    if score_BHN is None:
        score_BHN = score_tokens(k, q_answer, cot_mask, answer_mask, lam, method, gqa_pool, seed)
    elif tuple(score_BHN.shape) != tuple(k.shape[:3]):
        raise ValueError(f"score_BHN {tuple(score_BHN.shape)} must be [B, H_kv, N] = {tuple(k.shape[:3])}")
    B, H, N, D = k.shape
    M = budget
    dev = k.device

    # Stable descending sort: valid (finite) scores first, ties -> lower position.
    order_BHN = torch.sort(score_BHN, dim=-1, descending=True, stable=True).indices
    K = min(M, N)
    idx_BHK = order_BHN[..., :K]
    n_keep_B = cot_mask.sum(-1).clamp(max=M)  # min(M, N_C[b])
    slot_K = torch.arange(K, device=dev)
    keep_BHK = (slot_K[None, None, :] < n_keep_B[:, None, None]).expand(B, H, K)
    if order == "position":
        # Empty slots get sentinel N so they sort to the end.
        idx_BHK = torch.sort(torch.where(keep_BHK, idx_BHK, N), dim=-1).values
    idx_BHK = torch.where(keep_BHK, idx_BHK, -1)
    if K < M:
        idx_BHK = torch.cat([idx_BHK, idx_BHK.new_full((B, H, M - K), -1)], dim=-1)
    index_BHM = idx_BHK.to(torch.int64)

    filled_BHM = index_BHM >= 0
    gather_BHMD = index_BHM.clamp(min=0)[..., None].expand(B, H, M, D)
    if N == 0:  # nothing to gather from
        k_sel = k.new_zeros(B, H, M, D)
        v_sel = v.new_zeros(B, H, M, D)
    else:
        f_BHM1 = filled_BHM[..., None]
        k_sel = torch.where(f_BHM1, k.gather(2, gather_BHMD), k.new_zeros(()))
        v_sel = torch.where(f_BHM1, v.gather(2, gather_BHMD), v.new_zeros(()))
    valid_BHM = filled_BHM if short_cot == "mask" else torch.ones_like(filled_BHM)
    return EvictionResult(k_sel, v_sel, valid_BHM, index_BHM)


SHARE = ("none", "heads", "all")


def shared_scores(score_LBHN: torch.Tensor, share: str) -> torch.Tensor:
    """Pool per-(layer, b, kv head) scores so that one selection serves several heads: `heads` = the mean over
    a layer's KV heads, `all` = the mean over every layer and head; `none` leaves them. Pads stay -inf (every
    head and layer of an example shares its CoT mask), so they are still never kept."""
    _check_choice("share", share, SHARE)
    if share == "none":
        return score_LBHN
    dims = (2,) if share == "heads" else (0, 2)
    return score_LBHN.mean(dim=dims, keepdim=True).expand_as(score_LBHN)
