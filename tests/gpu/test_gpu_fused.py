"""Compiled fused student passes on CUDA (kava_dist.fused, model.fused_kernels=compile) against the HF/peft modules.

Run on a CUDA machine: `python -m pytest tests/gpu -q`.
"""
from __future__ import annotations

import pytest
import torch

from kava_testing import QUESTIONS, build, make_batch
from kava_dist.fused import apply_fused
from kava_dist.student import student_forward

pytestmark = pytest.mark.gpu


def _loss_grads(model, batch, special, cfg):
    model.zero_grad(set_to_none=True)
    out = student_forward(model, batch, special, cfg.latent)
    loss = out.ce + out.k_BLHMD.float().pow(2).mean() + out.hidden_BLd.float().pow(2).mean()
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_fused_matches_hf_bf16(tiny_paths, family):
    cfg, ref, tok, special = build(tiny_paths, family, **{"model.dtype": "bfloat16"})
    _, fused, _, _ = build(tiny_paths, family, **{"model.dtype": "bfloat16"})
    ref, fused = ref.cuda().train(), fused.cuda().train()
    assert apply_fused(fused, "auto", "cuda") == "compile"
    for n in (6, 4):           # two batch shapes: the recompile with symbolic sizes must not change the result
        batch = make_batch(tok, special, rows=QUESTIONS[:n])[0].to("cuda")
        la, ga = _loss_grads(ref, batch, special, cfg)
        lb, gb = _loss_grads(fused, batch, special, cfg)
        torch.testing.assert_close(lb, la, rtol=2e-2, atol=2e-2)
        for name in ga:
            rel = (gb[name] - ga[name]).norm() / ga[name].norm().clamp_min(1e-6)
            assert rel < 5e-2, (name, float(rel))
