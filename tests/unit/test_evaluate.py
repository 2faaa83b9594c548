"""Evaluation harness: CODI answer extraction, Wilson intervals, dataset resolution, and forward-pass counts of
the latent / Full-CoT / No-CoT decode loops checked against a pre-hook that counts decoder calls.

Usage:
    .venv/bin/python -m pytest tests/unit/test_evaluate.py -q
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kava_dist.backbone import parts
from kava_dist.evaluate import (decode_batch, evaluate_dataset, extract_answer, greedy_decode, is_correct,
                                left_pad, resolve_dataset, summary_markdown, wilson_interval)



def _root_conftest():
    """tests/conftest.py's helpers, loaded by path: `from conftest import ...` picks tests/integration/conftest.py
    when the unit and integration tiers are collected in one pytest run."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("kava_tests_root_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ct = _root_conftest()
QUESTIONS, build, make_batch = _ct.QUESTIONS, _ct.build, _ct.make_batch

EXTRACTION = [
    ("1,234", 1234.0),
    ("The total is 1,234,567 dollars", 1234567.0),
    ("-5", -5.0),
    ("it fell to -12 degrees", -12.0),
    ("3.50", 3.5),
    ("costs $3.50.", 3.5),
    ("18 dollars.", 18.0),
    ("18.", 18.0),
    ("first 3 then 4 then 25", 25.0),
    ("no number here", None),
    ("", None),
    ("The answer is: 7", 7.0),
    ("<<3+4=7>> <<7*2=14>> The answer is: 14", 14.0),
    ("The answer is: 12 and later 13", 13.0),      # CODI: the last number after the prompt
    ("The answer is:", None),                       # a prompt with nothing after it is no answer
    ("<<6*3=18>> so 18", 18.0),                     # no prompt: the last number of the whole text
    ("0.25", 0.25),
    ("-0.5 kg", -0.5),
    ("1,000.75", 1000.75),
    ("x=5y", 5.0),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_extract_answer_table(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_compares_as_float():
    assert is_correct(extract_answer("3.50"), "3.5")
    assert is_correct(extract_answer("The answer is: 1,234"), "1234")
    assert is_correct(extract_answer("18 dollars."), "18")
    assert is_correct(extract_answer("-7"), "-7")
    assert not is_correct(extract_answer("7"), "-7")
    assert not is_correct(None, "0")
    assert not is_correct(extract_answer("nothing"), "0")
    assert not is_correct(5.0, "not a number")
    assert is_correct(0.1 + 0.2, "0.3")            # float rounding only


def test_wilson_interval_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)
    lo, hi = wilson_interval(81, 263)                   # Wikipedia-style worked value
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(500, 1000)
    assert hi - lo == pytest.approx(2 * 1.959964 * (0.25 / 1000) ** 0.5, rel=1e-2)


def test_resolve_dataset_names_and_paths(tmp_path):
    (tmp_path / "gsm8k.test.jsonl.gz").write_bytes(gzip.compress(b'{"question": "q", "answer": "1"}\n'))
    assert resolve_dataset("gsm8k", tmp_path) == ("gsm8k", tmp_path / "gsm8k.test.jsonl.gz")
    assert resolve_dataset(str(tmp_path / "gsm8k.test.jsonl.gz"))[0] == "gsm8k"
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        resolve_dataset("svamp", tmp_path)


# ----------------------------------------------------------------------------- decode loops


def _counter(model):
    calls = {"n": 0}
    handle = parts(model)[0].model.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls, handle


def _enc(tok, special):
    return make_batch(tok, special)[1]


@pytest.fixture(scope="module")
def tiny(tiny_paths):
    cfg, model, tok, special = build(tiny_paths, "llama")
    model.eval()
    return cfg, model, tok, special


def _eos_special(model, enc, special, mode, cfg, step=2):
    """Make the token row 0 emits at `step` the EOS, so rows stop at different lengths."""
    toks, _ = decode_batch(model, enc[:1], special, mode, cfg.latent, max_new_tokens=step + 1)
    return dataclasses.replace(special, eos=toks[0][step])


@pytest.mark.parametrize("mode", ["latent", "cot", "nocot"])
def test_forward_passes_match_decoder_calls(tiny, mode):
    cfg, model, tok, special = tiny
    enc = _enc(tok, special)
    T, max_new = cfg.latent.num_iterations, 6
    fixed = (2 + T) if mode == "latent" else 1        # passes before the first further token
    for sp in (special, _eos_special(model, enc, special, mode, cfg)):
        stopped = 0
        for e in enc:                                  # one row at a time: the count is exact
            calls, h = _counter(model)
            toks, passes = decode_batch(model, [e], sp, mode, cfg.latent, max_new)
            h.remove()
            p = passes[0]
            assert calls["n"] == p["total"]
            assert p["prefill"] == 1 and p["latent"] == (T if mode == "latent" else 0)
            assert p["total"] == p["prefill"] + p["latent"] + p["prompt"] + p["decode"]
            if len(toks[0]) < max_new:                 # stopped at EOS: one pass per token before it
                stopped += 1
                assert p["total"] == fixed + len(toks[0])
            else:                                      # ran out of tokens: no pass after the last one
                assert p["total"] == fixed + max_new - 1
        calls, h = _counter(model)                     # a batch runs as long as its slowest row
        _, passes = decode_batch(model, enc, sp, mode, cfg.latent, max_new)
        h.remove()
        assert calls["n"] == max(p["total"] for p in passes)
        if sp is not special:
            assert stopped >= 1


@pytest.mark.parametrize("mode", ["cot", "nocot"])
def test_greedy_decode_left_padding_matches_uncached_rows(tiny, mode):
    """Batched, left-padded, cached greedy decoding gives each row the tokens of an uncached greedy rollout."""
    cfg, model, tok, special = tiny
    enc = _enc(tok, special)
    prompt = enc[0].prompt_ids if mode == "nocot" else []
    batched, _ = decode_batch(model, enc, special, mode, cfg.latent, max_new_tokens=4)
    lm = parts(model)[0]
    for e, got in zip(enc, batched):
        ids = list(e.question_ids) + list(prompt)
        ref = []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == special.eos:
                    break
                ref.append(nxt)
                ids.append(nxt)
        assert got == ref


def test_greedy_decode_zero_and_one_token(tiny):
    cfg, model, tok, special = tiny
    enc = _enc(tok, special)
    ids, mask = left_pad([e.question_ids for e in enc], special.pad)
    toks, passes = greedy_decode(model, ids, mask, special.eos, max_new_tokens=1)
    assert passes == [1] * len(enc) and all(len(t) <= 1 for t in toks)


def _write_set(path, rows):
    with gzip.open(path, "wt") as f:
        for q, c, a in rows:
            f.write(json.dumps({"question": q, "cot": c, "answer": a}) + "\n")


@pytest.mark.parametrize("mode", ["latent", "cot", "nocot"])
def test_evaluate_dataset_records_and_summary(tiny, tmp_path, mode):
    cfg, model, tok, special = tiny
    path = tmp_path / "toy.test.jsonl.gz"
    _write_set(path, QUESTIONS + [("Broken row", "", "not a number")])
    calls, h = _counter(model)
    res = evaluate_dataset(model, tok, special, cfg, path, mode=mode, batch_size=1, max_new_tokens=5, progress=False,
                           warmup=False)
    h.remove()
    s, recs = res["summary"], res["records"]
    assert s["dataset"] == "toy" and s["n"] == len(QUESTIONS) and s["data_report"]["skipped"]
    assert [r["id"] for r in recs] == list(range(len(QUESTIONS)))          # original order
    assert calls["n"] == sum(r["forward_passes"] for r in recs)            # batch size 1: exact
    assert s["prefill_passes"] == 1.0
    assert s["forward_passes"] == pytest.approx(sum(r["forward_passes"] for r in recs) / len(recs))
    assert 0.0 <= s["ci95"][0] <= s["accuracy"] <= s["ci95"][1] <= 1.0
    assert all(r["latency_s"] > 0 and r["group"].startswith("toy") for r in recs)
    assert s["peak_memory_bytes"] > 0 and s["memory_kind"] in ("cpu_peak_rss", "cuda_max_allocated")
    md = summary_markdown({"toy": s})
    assert "| toy |" in md and "Wilson" in md


def test_correct_prediction_is_scored(tiny, tmp_path, monkeypatch):
    """A model whose output decodes to the gold answer is scored correct (end-to-end through the harness)."""
    cfg, model, tok, special = tiny
    path = tmp_path / "one.test.jsonl.gz"
    _write_set(path, [("What is 2+5?", "<<2+5=7>>", "7")])
    import kava_dist.evaluate as ev

    monkeypatch.setattr(ev, "decode_batch", lambda *a, **k: (
        [tok("7 apples", add_special_tokens=False)["input_ids"]],
        [{"prefill": 1, "latent": 0, "prompt": 0, "decode": 7, "total": 8}]))
    res = ev.evaluate_dataset(model, tok, special, cfg, path, mode="nocot", progress=False)
    assert res["records"][0]["correct"] and res["summary"]["accuracy"] == 1.0


# ----------------------------------------------------------------------------- report tables


def _fake_run(root, stage, seed, accs, **over):
    from kava_dist.config import load_config, save_config

    cfg = load_config(None, [f"train.stage={stage}", f"train.seed={seed}", f"train.out_dir={root}",
                             "data.train_path=data/gsm8k_aug.train.jsonl.gz"] + [f"{k}={v}" for k, v in over.items()])
    save_config(cfg, root / "config.yaml")
    (root / "eval").mkdir(parents=True)
    for name, acc in accs.items():
        s = {"dataset": name, "mode": "latent", "n": 100, "correct": int(acc * 100), "accuracy": acc,
             "ci95": list(wilson_interval(int(acc * 100), 100)), "forward_passes": 7.0 + seed,
             "prefill_passes": 1.0, "passes_after_prefill": 6.0 + seed, "generated_tokens": 3.0, "latency_s": 0.01,
             "peak_memory_bytes": 2**30, "memory_kind": "cuda_max_allocated", "device": "cuda:0",
             "dtype": "bfloat16", "batch_size": 64, "max_new_tokens": 16, "num_latents": 24, "num_iterations": 3}
        (root / "eval" / f"{name}.json").write_text(json.dumps({"summary": s, "records": []}))
    return root


def test_report_groups_seeds_into_mean_std(tmp_path):
    from kava_dist.report import group_runs, load_runs, table1, table2

    dirs = [_fake_run(tmp_path / "kava_s0", "student", 0, {"gsm8k": 0.50, "svamp": 0.40}),
            _fake_run(tmp_path / "kava_s1", "student", 1, {"gsm8k": 0.60, "svamp": 0.40}),
            _fake_run(tmp_path / "kava_m16_s0", "student", 0, {"gsm8k": 0.30}, **{"latent.num_latents": 16}),
            _fake_run(tmp_path / "nocot_s0", "nocot", 0, {"gsm8k": 0.25, "gsm_hard": 0.05})]
    groups = group_runs(load_runs([str(d) for d in dirs]))
    assert [len(g.runs) for g in groups] == [2, 1, 1]
    t1 = table1(groups)
    assert "GSM8k-AUG" in t1 and "| GSM8k | GSM-Hard | SVAMP |" in t1       # paper column order
    assert "| KaVa · kava | 0, 1 | 55.0 ± 7.1 | – | 40.0 ± 0.0 |" in t1      # sample std over seeds
    assert "| No-CoT · nocot | 0 | 25.0 | 5.0 | – |" in t1
    assert "KaVa · kava_m16" in t1
    t2 = table2(groups)
    assert "| KaVa · kava | GSM8k-AUG | GSM8k | 7.50 ± 0.71 | 1 ± 0 | 6.50 ± 0.71 |" in t2


def test_report_labels_name_differing_fields(tmp_path):
    from kava_dist.report import group_runs, load_runs

    dirs = [_fake_run(tmp_path / "a" / "kava_s0", "student", 0, {"gsm8k": 0.5}),
            _fake_run(tmp_path / "b" / "kava_s0", "student", 0, {"gsm8k": 0.5}, **{"loss.alpha_kv": 2})]
    labels = sorted(g.label for g in group_runs(load_runs([str(d) for d in dirs])))
    assert labels == ["KaVa · kava (loss.alpha_kv=1.0)", "KaVa · kava (loss.alpha_kv=2.0)"]


def test_method_labels_name_the_baselines() -> None:
    from kava_dist.report import method_label
    from kava_dist.config import load_config

    label = lambda *o: method_label(load_config(None, list(o)))   # noqa: E731
    assert label("train.stage=student") == "KaVa" and label("train.stage=online") == "KaVa (online)"
    assert label("train.stage=student", "loss.alpha_kv=0") == "CODI-style"
    assert label("train.stage=student", "loss.alpha_codi=0") == "PCCoT-style"
    assert label("train.stage=nocot", "loss.alpha_kv=0") == "No-CoT"


def test_exact_match_scores_digit_strings_that_the_numeric_regex_gets_wrong():
    from kava_dist.evaluate import score

    gold = "8 5 6 8 7 2 1 2"                                # answer_icot: the last number would be "2"
    assert score("8 5 6 8 7 2 1 2", gold, "The answer is:", "exact") == (gold, True)
    assert score("1 2 The answer is: 8 5 6 8  7 2 1 2 ", gold, "The answer is:", "exact")[1]
    assert not score("8 5 6 8 7 2 1 3", gold, "The answer is:", "exact")[1]
    assert not score("9 9 2", gold, "The answer is:", "exact")[1]        # numeric match: last number 2 == 2
    assert score("9 9 2", "2", "The answer is:", "numeric")[1]
    assert score("", gold, "The answer is:", "exact") == (None, False)


def test_answer_field_reads_the_named_field(tmp_path):
    import gzip
    import json

    import pytest

    from kava_dist.prompts import load_examples

    p = tmp_path / "m.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"question": "1 2 * 3 4", "cot": "4 8 + 0 3 6", "answer": "408",
                            "answer_icot": "8 0 4"}) + "\n")
    ex, rep = load_examples(p, numeric_answer=False, answer_field="answer_icot")
    assert [e.answer for e in ex] == ["8 0 4"] and rep.kept == 1
    ex, rep = load_examples(p, numeric_answer=True, answer_field="answer_icot")
    assert ex == [] and rep.skipped["non-numeric answer"] == 1
    with pytest.raises(ValueError, match="answer_icot.*data.answer_field|data.answer_field"):
        load_examples(p, answer_field="answer_rev")


def test_answer_without_spaces_is_what_is_learned_and_scored(tmp_path, tiny_paths):
    """data.answer_spaces=false: the training sequence and the gold answer are the digit string, one token per digit
    for tokenizers that split digits (the decoding passes a spaced answer would spend on its spaces are gone)."""
    import gzip
    import json

    from transformers import AutoTokenizer

    from kava_dist.config import load_config
    from kava_dist.prompts import load_examples, load_examples_for, load_training_set

    p = tmp_path / "m.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write(json.dumps({"question": "1 2 * 3 4", "cot": "4 8 + 0 3 6", "answer": "408",
                            "answer_icot": "8 0 4"}) + "\n")
    base = [f"model.name_or_path={tiny_paths['llama']}", f"data.train_path={p}", "data.answer_field=answer_icot",
            "data.numeric_answer=false", "data.answer_match=exact", "data.drop_last_step=false"]
    tok = AutoTokenizer.from_pretrained(tiny_paths["llama"])
    spaced, _ = load_training_set(load_config(None, base).data, tok)
    compact, _ = load_training_set(load_config(None, base + ["data.answer_spaces=false"]).data, tok)
    assert tok.decode(compact[0].answer_ids[:-1]) == "804"
    assert tok.decode(spaced[0].answer_ids[:-1]) == "8 0 4"
    assert compact[0].cot_ids == spaced[0].cot_ids            # the chain (the KV targets' source) is untouched
    ex, _ = load_examples(p, numeric_answer=True, answer_field="answer_icot", answer_spaces=False)
    assert [e.answer for e in ex] == ["804"]                  # a digit string: numeric checks accept it
    data = load_config(None, base + ["data.answer_spaces=false"]).data
    ex, _ = load_examples_for(p, data, numeric=True)          # what validation, evaluation and probes read
    assert [e.answer for e in ex] == ["804"]


def test_latent_decoding_says_whether_the_last_step_was_dropped(tmp_path):
    from kava_dist.figures import write_latent_decoding

    texts = [{"question": "1 2 * 3 4", "cot": "3 6 + 4 0", "answer": "8 0 4"}]
    topk = [[[("3", 0.5), (" ", 0.2), ("4", 0.1)], [(" ", 0.9), ("+", 0.05), ("0", 0.01)]]]
    kept = write_latent_decoding(texts, topk, tmp_path / "a.md", tmp_path / "a.png", last_step_dropped=False)[0]
    assert "last step dropped" not in kept.read_text() and "| 0 | `3` 0.50 |" in kept.read_text()
    dropped = write_latent_decoding(texts, topk, tmp_path / "b.md", tmp_path / "b.png")[0]
    assert "last step dropped" in dropped.read_text()


def test_demo_table_names_the_student_its_loss_weights_make(tmp_path):
    from kava_dist.config import KavaConfig, save_config
    from kava_dist.demo import student_label

    for over, want in (({}, "KaVa student"), ({"alpha_kv": 0.0}, "CODI-style student"),
                       ({"alpha_codi": 0.0}, "PCCoT-style student")):
        cfg = KavaConfig()
        cfg.train.stage = "student"
        for k, v in over.items():
            setattr(cfg.loss, k, v)
        d = tmp_path / want.replace(" ", "_")
        d.mkdir()
        save_config(cfg, d / "config.yaml")
        assert student_label(d) == want
