"""[6] KaVa loss terms: KV matching against the compressed teacher cache and CODI hidden-state distillation.

Usage:
    from kava_dist.losses import kv_loss, codi_loss
    l_kv = kv_loss(ks_BLHMD, vs_BLHMD, kt_BLHMD, vt_BLHMD, valid_BLHM, kind="smooth_l1", std="layer")
    l_codi = codi_loss(hs_BLd, ht_BLd, kind="smooth_l1", std="layer")

The paper's KV-matching and CODI losses (arXiv 2510.02312; docs/DEVIATIONS.md D9, D10, D20): element-wise loss
(smooth-L1 with beta=1, MSE or L1), divided by the std of the *detached teacher* target (per layer, K and V apart,
or one global std, or not at all), mean over the valid slots, and L_KV = (L_K + L_V) / 2. Teacher tensors are
always detached here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def elementwise(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if kind == "smooth_l1":
        return F.smooth_l1_loss(a, b, reduction="none", beta=1.0)
    if kind == "mse":
        return F.mse_loss(a, b, reduction="none")
    if kind == "l1":
        return F.l1_loss(a, b, reduction="none")
    raise ValueError(f"unknown loss kind {kind!r}; use smooth_l1, mse or l1.")


def _masked_std(x_BL_: torch.Tensor, w_BL_: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    n = w_BL_.sum(dims).clamp_min(1.0)
    mean = (x_BL_ * w_BL_).sum(dims) / n
    var = (((x_BL_ - _expand(mean, x_BL_, dims)) ** 2) * w_BL_).sum(dims) / (n - 1).clamp_min(1.0)
    return var.sqrt()


def _expand(s: torch.Tensor, like: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    for d in sorted(dims):
        s = s.unsqueeze(d)
    return s


def _one_kv(student: torch.Tensor, teacher: torch.Tensor, w: torch.Tensor, kind: str, std: str) -> torch.Tensor:
    teacher = teacher.detach().float()
    student = student.float()
    w = w.expand_as(teacher)
    err = elementwise(kind, student, teacher)                    # [B, L, H, M, D]
    if std == "layer":
        s_L = _masked_std(teacher, w, dims=(0, 2, 3, 4)).clamp_min(1e-6)
        err = err / s_L.view(1, -1, 1, 1, 1)
    elif std == "global":
        s = _masked_std(teacher.reshape(1, -1), w.reshape(1, -1), dims=(1,)).clamp_min(1e-6)
        err = err / s
    elif std != "none":
        raise ValueError(f"unknown std mode {std!r}; use layer, global or none.")
    return (err * w).sum() / w.sum().clamp_min(1.0)


def kv_loss(ks_BLHMD: torch.Tensor, vs_BLHMD: torch.Tensor, kt_BLHMD: torch.Tensor, vt_BLHMD: torch.Tensor,
            valid_BLHM: torch.Tensor, kind: str = "smooth_l1", std: str = "layer") -> torch.Tensor:
    """L_KV = (L_K + L_V)/2 over valid slots; zero (with a graph) when nothing is valid."""
    if ks_BLHMD.shape != kt_BLHMD.shape or vs_BLHMD.shape != vt_BLHMD.shape:
        raise ValueError(f"student K/V {tuple(ks_BLHMD.shape)}/{tuple(vs_BLHMD.shape)} do not match teacher "
                         f"{tuple(kt_BLHMD.shape)}/{tuple(vt_BLHMD.shape)}: the store was built for another "
                         "backbone or latent.num_latents.")
    w = valid_BLHM.unsqueeze(-1).to(torch.float32)
    return 0.5 * (_one_kv(ks_BLHMD, kt_BLHMD, w, kind, std) + _one_kv(vs_BLHMD, vt_BLHMD, w, kind, std))


def codi_loss(hs_BLd: torch.Tensor, ht_BLd: torch.Tensor, kind: str = "smooth_l1", std: str = "layer") -> torch.Tensor:
    """Hidden-state distillation at the distillation token over all layers (PCCoT 'Part 3')."""
    ht = ht_BLd.detach().float()
    hs = hs_BLd.float()
    err_BLd = elementwise(kind, hs, ht)
    if std == "layer":
        s_L = ht.transpose(0, 1).reshape(ht.shape[1], -1).std(dim=1).clamp_min(1e-6)
        return (err_BLd.mean(dim=(0, 2)) / s_L).mean()
    if std == "global":
        return err_BLd.mean() / ht.std().clamp_min(1e-6)
    if std == "none":
        return err_BLd.mean()
    raise ValueError(f"unknown std mode {std!r}; use layer, global or none.")
