"""Teacher hooks and the PCCoT student on tiny random Llama/Qwen2 models (left padding, GQA)."""
from __future__ import annotations

import torch

from kava_testing import build, make_batch
from kava_dist.backbone import parts
from kava_dist.prompts import collate
from kava_dist.passes import cache_kv, make_cache
from kava_dist.student import generate_answers, student_forward
from kava_dist.teacher import positions_from_mask, teacher_forward, teacher_sequence


def test_teacher_hooks_match_hf_cache_and_hidden_states(tiny_paths, family):
    cfg, model, tok, special = build(tiny_paths, family)
    batch, _ = make_batch(tok, special)
    model.eval()
    with torch.no_grad():
        out = teacher_forward(model, batch, rope="post", with_ce=True)
        lm, decoder, _ = parts(model)
        ids, mask, pos = teacher_sequence(batch)
        ref = lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, output_hidden_states=True)
    Q, C = batch.q_ids.shape[1], batch.cot_ids.shape[1]
    for layer, (k_ref, v_ref) in enumerate(cache_kv(ref.past_key_values)):
        torch.testing.assert_close(out.k_LBHND[layer], k_ref[:, :, Q:Q + C], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.v_LBHND[layer], v_ref[:, :, Q:Q + C], rtol=0, atol=0)
    col = Q + C + batch.prompt_len - 1
    ref_h = torch.stack(ref.hidden_states[1:], dim=1)[:, :, col]
    torch.testing.assert_close(out.hidden_BLd, ref_h, rtol=0, atol=1e-6)
    assert out.q_LBHAD[0].shape[1] == lm.config.num_attention_heads
    assert out.k_LBHND[0].shape[1] == lm.config.num_key_value_heads


def test_teacher_rows_independent_of_padding(tiny_paths, family):
    """A row's CoT K/V, answer queries, hidden targets and CE equal those of the row alone (no pads)."""
    cfg, model, tok, special = build(tiny_paths, family)
    batch, enc = make_batch(tok, special)
    model.eval()
    with torch.no_grad():
        full = teacher_forward(model, batch)
        for i in (0, 3):
            one = teacher_forward(model, collate([enc[i]], special.pad))
            n_c, n_a = len(enc[i].cot_ids), len(enc[i].prompt_ids) + len(enc[i].answer_ids)
            for layer in range(len(full.k_LBHND)):
                torch.testing.assert_close(full.k_LBHND[layer][i, :, :n_c], one.k_LBHND[layer][0, :, :n_c], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(full.q_LBHAD[layer][i, :, :n_a], one.q_LBHAD[layer][0, :, :n_a], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(full.hidden_BLd[i], one.hidden_BLd[0], atol=1e-5, rtol=1e-4)


def test_teacher_ce_counts_each_real_token_once(tiny_paths):
    cfg, model, tok, special = build(tiny_paths, "llama")
    batch, enc = make_batch(tok, special)
    with torch.no_grad():
        ce_batch = teacher_forward(model, batch, with_ce=True, capture=False).ce
        # reference: each row alone, unpadded, standard shifted CE over CoT + answer tokens
        lm = parts(model)[0]
        tot, n = 0.0, 0
        for e in enc:
            ids = torch.tensor([e.question_ids + e.cot_ids + e.prompt_ids + e.answer_ids])
            logits = lm(input_ids=ids).logits[0, :-1]
            tgt = ids[0, 1:]
            start = len(e.question_ids) - 1
            tot += torch.nn.functional.cross_entropy(logits[start:], tgt[start:], reduction="sum").item()
            n += tgt[start:].numel()
    assert abs(ce_batch.item() - tot / n) < 1e-4


def test_pre_rope_keys_are_k_proj_outputs(tiny_paths):
    cfg, model, tok, special = build(tiny_paths, "llama")
    batch, _ = make_batch(tok, special)
    with torch.no_grad():
        post = teacher_forward(model, batch, rope="post")
        pre = teacher_forward(model, batch, rope="pre")
    assert not torch.allclose(post.k_LBHND[0], pre.k_LBHND[0])
    torch.testing.assert_close(post.v_LBHND[1], pre.v_LBHND[1])
    torch.testing.assert_close(pre.k_post_LBHND[0], post.k_LBHND[0])


def _sequential_rollout(model, enc, special, M):
    """Coconut/CODI-style reference for one unpadded row: feed latents one at a time."""
    lm, decoder, prj = parts(model)
    q = torch.tensor([enc.question_ids + [special.bot]])
    out = decoder(input_ids=q, use_cache=True)
    cache = out.past_key_values
    z = prj(out.last_hidden_state[:, -1:])
    kv_lat = []
    for j in range(M):
        out = decoder(inputs_embeds=z, past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[q.shape[1] + j]]))
        cache = out.past_key_values
        z = prj(out.last_hidden_state[:, -1:])
    Lq = q.shape[1]
    kv_lat = [(k[:, :, Lq:Lq + M], v[:, :, Lq:Lq + M]) for k, v in cache_kv(cache)]
    ans = torch.tensor([[special.eot] + enc.prompt_ids + enc.answer_ids])
    logits = lm(input_ids=ans, past_key_values=cache, position_ids=Lq + M + torch.arange(ans.shape[1])[None]).logits
    return kv_lat, logits


def test_jacobi_with_t_ge_m_equals_sequential_rollout(tiny_paths, family):
    M = 4
    cfg, model, tok, special = build(tiny_paths, family, **{"latent.num_latents": M, "latent.num_iterations": M})
    model.eval()
    batch, enc = make_batch(tok, special)
    with torch.no_grad():
        out = student_forward(model, batch, special, cfg.latent)
        for i in (0, 2, 5):
            kv_ref, logits_ref = _sequential_rollout(model, enc[i], special, M)
            for layer, (k_ref, v_ref) in enumerate(kv_ref):
                torch.testing.assert_close(out.k_BLHMD[i, layer], k_ref[0], atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(out.v_BLHMD[i, layer], v_ref[0], atol=2e-5, rtol=1e-4)
            n = logits_ref.shape[1]
            torch.testing.assert_close(out.logits_BAV[i, :n], logits_ref[0], atol=5e-5, rtol=1e-4)


def test_jacobi_with_t_lt_m_differs_from_sequential(tiny_paths):
    M = 4
    cfg, model, tok, special = build(tiny_paths, "llama", **{"latent.num_latents": M, "latent.num_iterations": 1})
    batch, enc = make_batch(tok, special)
    with torch.no_grad():
        out = student_forward(model, batch, special, cfg.latent)
        kv_ref, _ = _sequential_rollout(model, enc[0], special, M)
    assert not torch.allclose(out.k_BLHMD[0, 0], kv_ref[0][0][0], atol=1e-4)


def test_student_shapes_and_left_padding(tiny_paths, family):
    cfg, model, tok, special = build(tiny_paths, family)
    model.eval()
    batch, enc = make_batch(tok, special)
    lm = parts(model)[0]
    L, H = lm.config.num_hidden_layers, lm.config.num_key_value_heads
    D = lm.config.hidden_size // lm.config.num_attention_heads
    M = cfg.latent.num_latents
    with torch.no_grad():
        out = student_forward(model, batch, special, cfg.latent)
        assert out.k_BLHMD.shape == (len(enc), L, H, M, D) and out.v_BLHMD.shape == out.k_BLHMD.shape
        assert out.hidden_BLd.shape == (len(enc), L, lm.config.hidden_size)
        for i in (1, 4):
            one = student_forward(model, collate([enc[i]], special.pad), special, cfg.latent)
            torch.testing.assert_close(out.k_BLHMD[i], one.k_BLHMD[0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(out.hidden_BLd[i], one.hidden_BLd[0], atol=2e-5, rtol=1e-4)


def test_pccot_mask_quirk_switch_changes_padded_rows_only(tiny_paths):
    cfg, model, tok, special = build(tiny_paths, "llama")
    quirk = build(tiny_paths, "llama", **{"latent.fix_masks": False})[0]
    batch, enc = make_batch(tok, special)
    longest = max(range(len(enc)), key=lambda i: len(enc[i].question_ids))
    shortest = min(range(len(enc)), key=lambda i: len(enc[i].question_ids))
    with torch.no_grad():
        a = student_forward(model, batch, special, cfg.latent)
        b = student_forward(model, batch, special, quirk.latent)
    torch.testing.assert_close(a.k_BLHMD[longest], b.k_BLHMD[longest], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a.k_BLHMD[shortest], b.k_BLHMD[shortest], atol=1e-4)


def test_generate_counts_forward_passes(tiny_paths):
    cfg, model, tok, special = build(tiny_paths, "llama")
    batch, enc = make_batch(tok, special)
    lm = parts(model)[0]
    calls = {"n": 0}
    handle = lm.model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    gen = generate_answers(model, batch.q_ids, batch.q_mask, enc[0].prompt_ids, special, cfg.latent, max_new_tokens=5)
    handle.remove()
    assert calls["n"] == max(gen.forward_passes)          # the batch runs as long as its slowest row
    T = cfg.latent.num_iterations
    for toks, n in zip(gen.tokens, gen.forward_passes):
        assert 1 + T + 1 <= n <= 1 + T + 1 + 4
        if len(toks) < 5:                                 # stopped at EOS: one pass per token after the first
            assert n == 1 + T + 1 + len(toks)
    # greedy tokens agree with the teacher-forced student logits on the first generated token
    with torch.no_grad():
        out = student_forward(model, batch, special, cfg.latent, with_hidden=False)
    first = out.logits_BAV[:, batch.prompt_len].argmax(-1)
    for i, toks in enumerate(gen.tokens):
        if toks:
            assert toks[0] == first[i].item()


def test_make_cache_does_not_modify_source(tiny_paths):
    cfg, model, tok, special = build(tiny_paths, "llama")
    k = torch.randn(1, 2, 3, 16)
    cache = make_cache([(k, k.clone())])
    cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 0)
    assert k.shape == (1, 2, 3, 16) and cache_kv(cache)[0][0].shape[2] == 4
    assert positions_from_mask(torch.tensor([[False, True, True]])).tolist() == [[0, 0, 1]]


def test_sdpa_backends_are_set_by_loading(tiny_paths):
    """model.sdpa_backends sets torch's process-wide SDPA flags when a backbone loads (cuDNN off by default)."""
    b = torch.backends.cuda
    saved = (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled())
    try:
        b.enable_cudnn_sdp(True)
        build(tiny_paths, "llama", lora=False)
        assert (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled()) \
            == (True, True, False, True)
        build(tiny_paths, "llama", lora=False, **{"model.sdpa_backends": "[cudnn,math]"})
        assert (b.flash_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled()) == (False, True, True)
        b.enable_flash_sdp(True)
        build(tiny_paths, "llama", lora=False, **{"model.sdpa_backends": "[]"})   # [] leaves the flags alone
        assert (b.flash_sdp_enabled(), b.cudnn_sdp_enabled()) == (True, True)
    finally:
        for on, fn in zip(saved, (b.enable_flash_sdp, b.enable_mem_efficient_sdp, b.enable_cudnn_sdp,
                                  b.enable_math_sdp)):
            fn(on)


def test_cot_curriculum_tail_is_padding_independent_and_vanishes(tiny_paths, family):
    """latent.cot_curriculum_steps: the CoT after its first r tokens sits between <eot> and the prompt, left-padded
    so the prompt column is shared; each row's CE equals that row alone, and removing every CoT token gives the
    paper's answer pass bit for bit."""
    from kava_dist.student import cot_removed_at, cot_tail

    cfg, model, tok, special = build(tiny_paths, family)
    model.eval()
    batch, enc = make_batch(tok, special)
    C = batch.cot_ids.shape[1]
    ids, mask = cot_tail(batch, 3)
    for i, e in enumerate(enc):
        assert ids[i][mask[i]].tolist() == e.cot_ids[3:]           # the row's own tail, at the right edge
    with torch.no_grad():
        plain = student_forward(model, batch, special, cfg.latent)
        gone = student_forward(model, batch, special, cfg.latent, cot_removed=C)
        assert torch.equal(plain.ce, gone.ce) and torch.equal(plain.hidden_BLd, gone.hidden_BLd)
        out = student_forward(model, batch, special, cfg.latent, cot_removed=3)
        tokens = [len(e.cot_ids[3:]) + len(e.prompt_ids) + len(e.answer_ids) for e in enc]
        alone = [student_forward(model, collate([e], special.pad), special, cfg.latent, cot_removed=3)
                 for e in enc]
    ref = sum(a.ce * n for a, n in zip(alone, tokens)) / sum(tokens)
    torch.testing.assert_close(out.ce, ref, rtol=1e-4, atol=1e-5)
    for i, a in enumerate(alone):                                  # CODI's ":" column is found in every row
        torch.testing.assert_close(out.hidden_BLd[i], a.hidden_BLd[0], rtol=1e-4, atol=1e-5)
    assert not torch.equal(out.ce, plain.ce)
    assert [cot_removed_at(s, 4, 10) for s in range(6)] == [0, 2, 5, 7, None, None]
    assert cot_removed_at(3, 0, 10) is None


def test_soft_tokens_start_as_the_models_own_rollout_of_expected_embeddings(tiny_paths, family):
    """latent.soft_tokens (D28): with the projection's gate at its initial 0, each latent input is the expected
    embedding softmax(logits) @ E of the model's prediction at the slot before, so with T >= M the Jacobi passes
    equal a sequential rollout that feeds the model its own soft tokens (computed here by plain HF forwards over the
    whole sequence, LoRA-wrapped embeddings and full fine-tuning alike). A nonzero gate adds prj(h)."""
    M = 4
    for lora in (True, False):
        cfg, model, tok, special = build(tiny_paths, family, lora=lora, **{
            "latent.num_latents": M, "latent.num_iterations": M, "latent.soft_tokens": True})
        model.eval()
        batch, enc = make_batch(tok, special)
        lm = parts(model)[0]
        emb = lm.get_input_embeddings()
        E_Vd = emb(torch.arange(lm.get_output_embeddings().weight.shape[0]))
        with torch.no_grad():
            out = student_forward(model, batch, special, cfg.latent)
            for i in (0, 2, 5):
                x = emb(torch.tensor([enc[i].question_ids + [special.bot]]))
                for j in range(M):
                    p_V = torch.softmax(lm(inputs_embeds=x).logits[0, -1], dim=-1)
                    z_d = p_V @ E_Vd
                    torch.testing.assert_close(out.latents_BMd[i, j], z_d, atol=2e-5, rtol=1e-4)
                    x = torch.cat([x, z_d[None, None]], dim=1)
            for n, p in model.named_parameters():
                if n.endswith("gate"):
                    p.fill_(0.5)
            gated = student_forward(model, batch, special, cfg.latent).latents_BMd
        assert not torch.allclose(gated, out.latents_BMd, atol=1e-3)


def test_soft_tokens_need_the_projection():
    import pytest

    from kava_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="latent.use_projection=true"):
        load_config(None, ["latent.soft_tokens=true", "latent.use_projection=false"])
