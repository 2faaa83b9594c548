"""kava_dist.fused: the patched decoder computes what HF + peft compute (losses, gradients, hooks, adapters)."""
from __future__ import annotations

import pytest
import torch

from kava_dist.fused import apply_fused, fuse_decoder, rms_norm, rope_qk


def _student_loss_and_grads(model, batch, special, cfg):
    from kava_dist.student import student_forward

    model.zero_grad(set_to_none=True)
    out = student_forward(model, batch, special, cfg.latent)
    loss = out.ce + out.k_BLHMD.float().pow(2).mean() + out.v_BLHMD.float().pow(2).mean() + out.hidden_BLd.pow(2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_rms_norm_and_rope_match_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16) * 3
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for a, b in zip(rope_qk(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_fused_student_matches_hf_path(tiny_paths, family):
    from kava_testing import build, make_batch

    cfg, ref, tok, special = build(tiny_paths, family)
    _, fused, _, _ = build(tiny_paths, family)
    counts = fuse_decoder(fused, compile=False)
    L = fused.config.num_hidden_layers
    assert counts["attention"] == counts["mlp"] == L and counts["rms_norm"] == 2 * L + 1 and counts["lora"] == 4 * L
    batch, _ = make_batch(tok, special)
    loss_ref, g_ref = _student_loss_and_grads(ref, batch, special, cfg)
    loss_f, g_f = _student_loss_and_grads(fused, batch, special, cfg)
    torch.testing.assert_close(loss_f, loss_ref, rtol=1e-5, atol=1e-6)
    assert g_ref.keys() == g_f.keys() and any("lora_A" in n for n in g_ref)
    for n in g_ref:
        torch.testing.assert_close(g_f[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    # idempotent: a second call patches nothing
    assert sum(fuse_decoder(fused, compile=False).values()) == 0


def test_fused_keeps_hooks_and_adapter_switching(tiny_paths):
    """The teacher's q/k/v capture (forward hooks) and peft's disable_adapter() still work on a fused model."""
    from kava_testing import build, make_batch

    from kava_dist.teacher import teacher_forward

    cfg, ref, tok, special = build(tiny_paths, "llama")
    _, fused, _, _ = build(tiny_paths, "llama")
    fuse_decoder(fused, compile=False)
    batch, _ = make_batch(tok, special)
    with torch.no_grad():
        for m in (ref, fused):
            m.eval()
        a, b = teacher_forward(ref, batch, with_hidden=True), teacher_forward(fused, batch, with_hidden=True)
        for x, y in zip(a.k_LBHND + a.q_LBHAD + [a.hidden_BLd], b.k_LBHND + b.q_LBHAD + [b.hidden_BLd]):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
        ids = batch.q_ids
        with ref.disable_adapter(), fused.disable_adapter():
            base_ref, base_f = ref(input_ids=ids).logits, fused(input_ids=ids).logits
        torch.testing.assert_close(base_f, base_ref, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(fused(input_ids=ids).logits, base_f)    # the adapter is back on


def test_fused_mode_resolution(tiny_paths):
    from kava_dist.config import ConfigError, load_config
    from kava_testing import build

    _, model, _, _ = build(tiny_paths, "llama")
    assert apply_fused(model, "auto", "cpu") == {}          # auto: compile on CUDA only
    assert apply_fused(model, "hf", "cpu") == {}
    assert apply_fused(model, "eager", "cpu")["attention"] == 2
    with pytest.raises(ConfigError, match="model.fused_kernels"):
        load_config(None, ["model.fused_kernels=fast"])
