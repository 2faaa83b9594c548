"""The cache probe: the teacher answering from its evicted cache, checked against plain decoding."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kava_testing import build, make_batch
from kava_dist.backbone import parts
from kava_dist.cache_probe import LAYOUTS, probe_batch, probe_markdown, rotate_keys
from kava_dist.evaluate import greedy_decode, left_pad
from kava_dist.passes import cache_kv, make_cache
from kava_dist.student import forced_then_greedy
from kava_dist.targets import compute_targets
from kava_dist.teacher import teacher_forward, teacher_sequence

NEW = 5


def _setup(tiny_paths, family):
    cfg, model, tok, special = build(tiny_paths, family, lora=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():   # the tiny checkpoint's small init decodes one token everywhere: spread its weights
        for w in model.parameters():
            if w.dim() == 2:
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
    model.eval()
    batch, enc = make_batch(tok, special, drop_last_step=False)
    return cfg, model, special, batch, enc


def test_whole_cache_equals_plain_decoding_after_the_cot(tiny_paths, family):
    """Budget "all", teacher layout: the answer of plain greedy decoding of question + CoT + prompt, row by row."""
    cfg, model, special, batch, enc = _setup(tiny_paths, family)
    res = probe_batch(model, batch, special, cfg, ["all", 64], ["teacher"], NEW)
    got = res[("teacher", "all")]
    assert res[("teacher", "64")] == got      # slots past a row's CoT are masked out, however many there are
    ids, mask = left_pad([e.question_ids + e.cot_ids + e.prompt_ids for e in enc], special.pad)
    want, _ = greedy_decode(model, ids, mask, special.eos, NEW)
    assert got == want
    assert len({tuple(r) for r in want}) > 1 and len({t for r in want for t in r}) > 2   # answers tell rows apart


def test_evicted_cache_equals_decoding_with_the_dropped_cot_masked(tiny_paths):
    """eviction.share=all keeps one set of CoT positions per example: the probe's gathered cache must answer as
    the full cache does with every other CoT column hidden from the prompt and answer."""
    cfg, model, special, batch, enc = _setup(tiny_paths, "llama")
    cfg = replace(cfg, eviction=replace(cfg.eviction, share="all"))
    M = 3
    got = probe_batch(model, batch, special, cfg, [M], ["teacher"], NEW)[("teacher", str(M))]
    lm = parts(model)[0]
    with torch.no_grad():
        tout = teacher_forward(model, batch, rope="post")
        index_BM = compute_targets(tout, cfg.eviction, M).index_BLHM[:, 0, 0]
        ids, mask, pos = teacher_sequence(batch)
        Q, C = batch.q_ids.shape[1], batch.cot_ids.shape[1]
        out = lm(input_ids=ids[:, :Q + C], attention_mask=mask[:, :Q + C], position_ids=pos[:, :Q + C], use_cache=True)
        kept_BC = torch.zeros_like(batch.cot_mask)
        kept_BC.scatter_(1, index_BM.clamp_min(0), index_BM >= 0)
        assert int(kept_BC.sum()) == sum(min(M, len(e.cot_ids)) for e in enc)
        mask_BK = torch.cat([batch.q_mask, kept_BC & batch.cot_mask], dim=1)
        pos0 = batch.q_mask.sum(1) + batch.cot_mask.sum(1)
        want, _ = forced_then_greedy(lm, make_cache(cache_kv(out.past_key_values)), mask_BK,
                                     batch.ans_ids[:, :batch.prompt_len], pos0, special.eos, NEW)
    assert got == want
    whole = probe_batch(model, batch, special, cfg, ["all"], ["teacher"], NEW)[("teacher", "all")]
    assert got != whole     # the dropped columns mattered, so the mask above was tested


def test_student_layouts_use_the_students_positions(tiny_paths):
    """student_post keeps the teacher's post-RoPE keys and moves only the answer; student_pre re-rotates the kept
    pre-RoPE keys at the latent slots: each changes what the model attends to, so answers differ from the
    teacher layout."""
    cfg, model, special, batch, enc = _setup(tiny_paths, "llama")
    res = probe_batch(model, batch, special, cfg, [3, "all"], list(LAYOUTS), NEW)
    assert set(res) == {(lay, m) for lay in LAYOUTS for m in ("3", "all")}
    for rows in res.values():
        assert len(rows) == len(enc) and all(len(r) <= NEW for r in rows)
    assert res[("student_post", "3")] != res[("teacher", "3")]
    assert res[("student_pre", "3")] != res[("student_post", "3")]


def test_rotating_kept_pre_rope_keys_at_their_own_positions_gives_the_post_rope_keys(tiny_paths, family):
    """student_pre's rotation: at the kept entries' original positions it must reproduce the teacher's cache."""
    cfg, model, special, batch, enc = _setup(tiny_paths, family)
    with torch.no_grad():
        tout = teacher_forward(model, batch, rope="pre")
        t_all = compute_targets(tout, replace(cfg.eviction, rope="pre", share="all"), 3)
        t_post = compute_targets(tout, replace(cfg.eviction, share="all"), 3)
        pos_BM = batch.q_mask.sum(1)[:, None] + t_all.index_BLHM[:, 0, 0]     # one kept set per row (share=all)
        got = rotate_keys(model, t_all.k_BLHMD.transpose(0, 1), pos_BM)
    torch.testing.assert_close(got, t_post.k_BLHMD.transpose(0, 1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(t_all.k_BLHMD, t_post.k_BLHMD)    # pre- and post-RoPE keys differ


def test_bad_probe_settings_name_the_fix():
    from kava_dist.cache_probe import _check

    with pytest.raises(ValueError, match="teacher, student_post, student_pre"):
        _check([24], ["teachr"])
    with pytest.raises(ValueError, match="positive ints"):
        _check([0], ["teacher"])


def test_markdown_has_a_row_per_layout():
    res = {"budgets": ["all", "2"], "layouts": ["teacher"],
           "summary": {"teacher": {"all": {"accuracy": 1.0, "ci95": [0.9, 1.0]},
                                   "2": {"accuracy": 0.5, "ci95": [0.3, 0.7]}}}}
    md = probe_markdown(res, "probe")
    assert "| teacher | 100.0 [90.0, 100.0] | 50.0 [30.0, 70.0] |" in md
