"""kava_dist.fused: the fused student passes compute what the HF + peft modules compute (losses and gradients)."""
from __future__ import annotations

import pytest
import torch

from kava_dist.fused import apply_fused, runner_for
from kava_dist.models.attention import causal_padding_mask, folded_gqa_sdpa
from kava_dist.student import student_forward


def _loss_and_grads(model, batch, special, cfg, rope="post"):
    model.zero_grad(set_to_none=True)
    out = student_forward(model, batch, special, cfg.latent, rope=rope)
    loss = out.ce + out.k_BLHMD.float().pow(2).mean() + out.v_BLHMD.float().pow(2).mean() + out.hidden_BLd.pow(2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), out, grads


def test_folded_gqa_matches_repeated_kv():
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    B, H, h, S, P, D = 3, 8, 2, 5, 4, 16
    q, k, v = torch.randn(B, H, S, D), torch.randn(B, h, P + S, D), torch.randn(B, h, P + S, D)
    mask_BK = torch.ones(B, P + S, dtype=torch.bool)
    mask_BK[0, :2] = False                                   # a left-padded row
    mask = causal_padding_mask(mask_BK, B, S, P, "cpu")
    assert mask[0, 0, 0].tolist() == [False, False, True, True, True] + [False] * 4
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, H // h), repeat_kv(v, H // h),
                                                           attn_mask=mask, scale=0.3)
    out = folded_gqa_sdpa(q, k, v, mask, 0.3)
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(B, S, H * D), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fix_masks", [True, False])
def test_fused_student_matches_hf_path(tiny_paths, family, fix_masks):
    from kava_testing import build, make_batch

    over = {"latent.fix_masks": str(fix_masks).lower()}
    cfg, ref, tok, special = build(tiny_paths, family, **over)
    _, fused, _, _ = build(tiny_paths, family, **over)
    assert apply_fused(fused, "eager", "cpu") == "eager" and runner_for(fused) is not None
    assert runner_for(ref) is None
    batch, _ = make_batch(tok, special)
    assert not batch.q_mask.all()                            # left padding: the masks matter
    for rope in ("post", "pre"):
        loss_ref, out_ref, g_ref = _loss_and_grads(ref, batch, special, cfg, rope)
        loss_f, out_f, g_f = _loss_and_grads(fused, batch, special, cfg, rope)
        torch.testing.assert_close(loss_f, loss_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_f.k_BLHMD, out_ref.k_BLHMD, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_f.hidden_BLd, out_ref.hidden_BLd, rtol=1e-5, atol=1e-6)
        assert g_ref.keys() == g_f.keys() and any("lora_A" in n for n in g_ref) and any("kava_prj" in n for n in g_ref)
        for n in g_ref:
            torch.testing.assert_close(g_f[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_runner_only_in_training(tiny_paths):
    """Generation (no autograd) keeps the HF modules and their cache; its answers do not change."""
    from kava_testing import build, make_batch

    from kava_dist.student import generate_answers

    cfg, model, tok, special = build(tiny_paths, "llama")
    batch, enc = make_batch(tok, special)
    prompt = enc[0].prompt_ids
    a = generate_answers(model.eval(), batch.q_ids, batch.q_mask, prompt, special, cfg.latent, max_new_tokens=4)
    apply_fused(model, "eager", "cpu")
    b = generate_answers(model, batch.q_ids, batch.q_mask, prompt, special, cfg.latent, max_new_tokens=4)
    assert a.tokens == b.tokens


def test_fused_mode_resolution(tiny_paths):
    from kava_dist.config import ConfigError, load_config
    from kava_dist.fused import resolve_mode
    from kava_testing import build

    assert resolve_mode("auto", "cpu") == "hf"
    assert resolve_mode("auto", "cuda", zero_stage=2) == "compile"
    assert resolve_mode("auto", "cuda", zero_stage=3) == "hf"
    _, model, _, _ = build(tiny_paths, "llama")
    assert apply_fused(model, "hf", "cpu") == "hf" and runner_for(model) is None
    with pytest.raises(ConfigError, match="model.fused_kernels"):
        load_config(None, ["model.fused_kernels=fast"])
    with pytest.raises(ConfigError, match="zero_stage=2"):
        load_config(None, ["model.fused_kernels=compile", "train.zero_stage=3"])


def test_cached_token_indices_keep_peft_arithmetic(tiny_paths):
    """backbone.cache_token_indices: the trainable-token embedding and tied head give peft's own values and
    gradients, with the index tensor built once."""
    from kava_testing import build

    from kava_dist.backbone import parts

    cfg, model, tok, special = build(tiny_paths, "llama")
    lm = parts(model)[0]
    layers = [m for m in model.modules() if hasattr(m, "token_indices") and "get_merged_weights" in vars(m)]
    assert layers, "add_lora patched no trainable-token layer"
    emb = lm.get_input_embeddings()
    for p in emb.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)                 # deltas that change the new-token rows
    ids = torch.tensor([[special.bot, special.latent, 5, special.eot]])
    out = emb(ids)
    (out.square().sum()).backward()
    g_fast = {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}
    for m in layers:
        del m.get_merged_weights                               # back to peft's method
    emb.zero_grad()
    ref = emb(ids)
    (ref.square().sum()).backward()
    torch.testing.assert_close(out, ref)
    assert g_fast and all(torch.equal(g_fast[n], p.grad) for n, p in emb.named_parameters() if p.grad is not None)
    base = next(m.base_layer.weight for m in layers if isinstance(m.base_layer, torch.nn.Embedding))
    assert not torch.allclose(out, torch.nn.functional.embedding(ids, base))     # the deltas are in use


def test_fused_student_with_cot_tail_matches_hf_path(tiny_paths):
    """The CoT curriculum's answer pass (pads between <eot> and the tail) runs the same in the fused layer."""
    from kava_testing import build, make_batch

    cfg, ref, tok, special = build(tiny_paths, "llama")
    _, fused, _, _ = build(tiny_paths, "llama")
    apply_fused(fused, "eager", "cpu")
    batch, _ = make_batch(tok, special)
    outs = []
    for model in (ref, fused):
        model.zero_grad(set_to_none=True)
        out = student_forward(model, batch, special, cfg.latent, cot_removed=2)
        (out.ce + out.hidden_BLd.pow(2).mean()).backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (o_ref, g_ref), (o_f, g_f) = outs
    torch.testing.assert_close(o_f.ce, o_ref.ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o_f.hidden_BLd, o_ref.hidden_BLd, rtol=1e-5, atol=1e-6)
    for n in g_ref:
        torch.testing.assert_close(g_f[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
