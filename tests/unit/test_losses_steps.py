"""Loss terms, gradient routing, the online step vs the cached path, and a tiny overfit run."""
from __future__ import annotations

import torch

from kava_testing import QUESTIONS, build, make_batch
from kava_dist.backbone import parts
from kava_dist.losses import codi_loss, kv_loss
from kava_dist.step import kava_terms, offline_step, online_step, teacher_step
from kava_dist.targets import compute_targets
from kava_dist.student import student_forward
from kava_dist.teacher import teacher_forward


def _kv(B=2, L=3, H=2, M=4, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, H, M, D, generator=g) * torch.tensor([1.0, 5.0, 0.2]).view(1, 3, 1, 1, 1)


def test_kv_loss_zero_when_equal_and_positive_otherwise():
    k, v = _kv(), _kv(seed=1)
    valid = torch.ones(2, 3, 2, 4, dtype=torch.bool)
    for kind in ("smooth_l1", "mse", "l1"):
        for std in ("layer", "global", "none"):
            assert kv_loss(k, v, k, v, valid, kind, std).item() == 0.0
            assert kv_loss(k + 0.1, v, k, v, valid, kind, std).item() > 0.0


def test_kv_loss_ignores_invalid_slots_and_matches_formula():
    k, v = _kv(), _kv(seed=1)
    ks, vs = k + torch.randn_like(k), v + torch.randn_like(v)
    valid = torch.ones(2, 3, 2, 4, dtype=torch.bool)
    valid[:, :, :, 3] = False
    garbage = ks.clone()
    garbage[:, :, :, 3] += 1000.0
    a = kv_loss(ks, vs, k, v, valid, "mse", "layer")
    b = kv_loss(garbage, vs, k, v, valid, "mse", "layer")
    torch.testing.assert_close(a, b)
    # reference: per layer, elementwise MSE / std of that layer's valid teacher entries, mean over valid, K/V halves
    def ref(s, t):
        tot, n = 0.0, 0
        for layer in range(3):
            tv, sv = t[:, layer, :, :3], s[:, layer, :, :3]
            tot += (((sv - tv) ** 2) / tv.std()).sum().item()
            n += tv.numel()
        return tot / n
    assert abs(a.item() - 0.5 * (ref(ks, k) + ref(vs, v))) < 1e-4


def test_layer_std_equalises_layer_scales():
    k, v = _kv(), _kv(seed=1)
    valid = torch.ones(2, 3, 2, 4, dtype=torch.bool)
    scaled_err = k * 1.1  # 10% error on every layer; layer 1 has 25x the scale of layer 2
    per_layer = [kv_loss(scaled_err[:, i:i + 1], v[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], valid[:, i:i + 1], "l1", "layer")
                 for i in range(3)]
    assert max(per_layer).item() / min(per_layer).item() < 1.6
    raw = [kv_loss(scaled_err[:, i:i + 1], v[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], valid[:, i:i + 1], "l1", "none")
           for i in range(3)]
    assert max(raw).item() / min(raw).item() > 10


def test_codi_loss_zero_and_layer_std():
    h = torch.randn(3, 4, 16) * torch.tensor([1.0, 2.0, 30.0, 0.5]).view(1, 4, 1)
    for std in ("layer", "global", "none"):
        assert codi_loss(h, h, "smooth_l1", std).item() == 0.0
    ref = torch.stack([torch.nn.functional.smooth_l1_loss(h[:, i] + 0.3, h[:, i]) / h[:, i].std() for i in range(4)]).mean()
    torch.testing.assert_close(codi_loss(h + 0.3, h, "smooth_l1", "layer"), ref)


def test_student_equal_teacher_gives_zero_distillation(tiny_paths):
    """Targets taken from the student itself: KV and CODI terms are exactly 0."""
    cfg, model, tok, special = build(tiny_paths, "llama")
    batch, _ = make_batch(tok, special)
    model.eval()
    with torch.no_grad():
        out = student_forward(model, batch, special, cfg.latent)
        from kava_dist.targets import Targets
        valid = torch.ones(out.k_BLHMD.shape[:-1], dtype=torch.bool)
        t = Targets(out.k_BLHMD, out.v_BLHMD, valid, out.hidden_BLd)
        terms = kava_terms(model, batch, special, t, cfg)
    assert terms["kv"].item() == 0.0 and terms["codi"].item() == 0.0


def test_gradients_reach_only_lora_projection_and_new_tokens(tiny_paths, family):
    cfg, model, tok, special = build(tiny_paths, family)
    model.train()
    batch, _ = make_batch(tok, special)
    terms = online_step(model, batch, special, cfg)
    terms["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad <= trainable
    assert any("lora_" in n for n in with_grad)
    assert any("kava_prj" in n for n in with_grad)
    assert any("trainable_tokens_delta" in n for n in with_grad)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen) and any("mlp" in n for n in frozen)
    for n in trainable:
        assert ("lora_" in n) or ("kava_prj" in n) or ("trainable_tokens" in n), n


def test_cached_path_equals_online_minus_teacher_pass(tiny_paths):
    """offline_step(targets from a frozen teacher pass) == online_step's student terms on the same weights."""
    cfg, model, tok, special = build(tiny_paths, "qwen2")
    model.eval()
    batch, _ = make_batch(tok, special)
    with torch.no_grad():
        tout = teacher_forward(model, batch, rope=cfg.eviction.rope)
        targets = compute_targets(tout, cfg.eviction, cfg.latent.num_latents)
        off = offline_step(model, batch, special, targets, cfg)
        on = online_step(model, batch, special, cfg)
    for key in ("ce_student", "kv", "codi"):
        torch.testing.assert_close(off[key], on[key], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(on["loss"] - cfg.loss.teacher_ce * on["ce_teacher"], off["loss"], rtol=1e-6, atol=1e-6)


def test_targets_shapes_and_short_cot_mask(tiny_paths):
    cfg, model, tok, special = build(tiny_paths, "llama", **{"latent.num_latents": 12})
    batch, enc = make_batch(tok, special)
    with torch.no_grad():
        t = compute_targets(teacher_forward(model, batch), cfg.eviction, 12)
    B, L, H, M, D = t.k_BLHMD.shape
    assert (B, M) == (len(enc), 12) and t.valid_BLHM.shape == (B, L, H, M)
    for i, e in enumerate(enc):
        n_valid = t.valid_BLHM[i].sum(-1)
        assert (n_valid == min(12, len(e.cot_ids))).all()
        assert (t.k_BLHMD[i][~t.valid_BLHM[i]] == 0).all()


def test_tiny_model_overfits_16_examples(tmp_path):
    """KaVa online training on 16 examples: the total loss falls by 90%. The frozen tied embedding of a
    random model bounds the logits by its norm, so the checkpoint uses a pretrained-like init scale (0.5)."""
    from kava_testing import QUESTIONS
    from kava_dist.tiny import save_tiny_checkpoint
    path = save_tiny_checkpoint(tmp_path / "m", family="llama", hidden_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, initializer_range=0.5)
    rows = (QUESTIONS * 3)[:16]
    rows = [(f"{q} #{i}", c, a) for i, (q, c, a) in enumerate(rows)]
    cfg, model, tok, special = build({"llama": path}, "llama", **{"lora.r": 16, "lora.alpha": 32})
    batch, _ = make_batch(tok, special, rows=rows)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    first = None
    for step in range(100):
        terms = online_step(model, batch, special, cfg)
        opt.zero_grad()
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        first = first if first is not None else terms["loss"].item()
    last = terms["loss"].item()
    assert last < 0.1 * first, (first, last)
    teacher_only = teacher_step(model, batch)["loss"].item()
    assert teacher_only < 0.5


def test_batch_with_only_empty_cots_trains_with_ce_and_codi(tiny_paths, family):
    """One-step problems lose their only CoT step (data.drop_last_step): a batch whose CoT segments are all
    empty trains on its CE and CODI terms with no KV slot, online and from targets (cache build)."""
    cfg, model, tok, special = build(tiny_paths, family)
    rows = [(q, c.split()[0], a) for q, c, a in QUESTIONS[:3]]          # one step each, dropped -> empty CoT
    batch, enc = make_batch(tok, special, rows=rows)
    assert batch.cot_ids.shape[1] == 0 and all(not e.cot_ids for e in enc)
    model.train()
    terms = online_step(model, batch, special, cfg)
    assert torch.isfinite(terms["loss"]) and terms["kv"].item() == 0.0 and terms["codi"].item() > 0.0
    terms["loss"].backward()
    with torch.no_grad():
        t = compute_targets(teacher_forward(model, batch), cfg.eviction, cfg.latent.num_latents)
    assert not t.valid_BLHM.any() and (t.k_BLHMD == 0).all() and (t.index_BLHM == -1).all()
    assert t.k_BLHMD.shape[:2] == (3, len(parts(model)[1].layers))


def test_targets_with_shared_eviction_keep_one_position_set_per_example(tiny_paths):
    """eviction.share=all through compute_targets: each example's slots hold the same CoT positions in every
    layer and KV head, and the fingerprint names the switch (stores built without it keep theirs)."""
    from kava_dist.fingerprint import cache_fingerprint_fields

    cfg, model, tok, special = build(tiny_paths, "qwen2", **{"eviction.share": "all"})
    batch, enc = make_batch(tok, special)
    with torch.no_grad():
        tout = teacher_forward(model, batch)
        shared = compute_targets(tout, cfg.eviction, cfg.latent.num_latents)
        own = compute_targets(tout, build(tiny_paths, "qwen2")[0].eviction, cfg.latent.num_latents)
    idx = shared.index_BLHM
    assert (idx == idx[:, :1, :1]).all() and not (own.index_BLHM == own.index_BLHM[:, :1, :1]).all()
    assert torch.equal(shared.valid_BLHM, own.valid_BLHM)
    assert cache_fingerprint_fields(cfg)["eviction.share"] == "all"
    assert "eviction.share" not in cache_fingerprint_fields(build(tiny_paths, "qwen2")[0])
