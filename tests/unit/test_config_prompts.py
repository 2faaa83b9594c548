"""Config loading/validation, the cache fingerprint, the paper configs, and data loading/encoding."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from kava_testing import SHARED_DATA
from kava_dist.config import ConfigError, describe, load_config, save_config
from kava_dist.fingerprint import cache_fingerprint
from kava_dist.prompts import collate, encode_examples, load_examples, split_steps

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_dotted_overrides():
    cfg = load_config(None, ["loss.alpha_kv=2", "lora.target_modules=q_proj,v_proj", "train.lr=5e-4",
                             "eviction.method=crop", "data.drop_last_step=false"])
    assert cfg.loss.alpha_kv == 2.0 and isinstance(cfg.loss.alpha_kv, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == 5e-4 and cfg.eviction.method == "crop" and cfg.data.drop_last_step is False
    assert cfg.latent.num_latents == 24 and cfg.latent.num_iterations == 3 and cfg.eviction.lam == 0.1


@pytest.mark.parametrize("override, words", [
    ("loss.alpha_kvv=2", ["loss.alpha_kvv", "Did you mean loss.alpha_kv"]),
    ("eviction.method=rkvv", ["eviction.method", "Did you mean rkv"]),
    ("train.micro_batch=7", ["train.global_batch=128", "micro_batch"]),
    ("eviction.lam=1.5", ["eviction.lam", "[0, 1]"]),
    ("latent.num_latents=abc", ["latent.num_latents", "int"]),
    ("lora.r=0", ["lora.r", ">= 1"]),
    ("loss.alpha_kv", ["section.key=value"]),
    ("model.sdpa_backends=[flash,cudn]", ["model.sdpa_backends", "['cudn']", "flash, efficient, cudnn, math"]),
    ("build.writers_per_actor=-1", ["build.writers_per_actor", ">= 0"]),
])
def test_errors_name_field_and_fix(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_yaml_inherit_and_save_roundtrip(tmp_path):
    (tmp_path / "base.yaml").write_text("loss:\n  alpha_kv: 3\nlatent:\n  num_latents: 8\n")
    (tmp_path / "exp.yaml").write_text("inherit: base.yaml\nloss:\n  kv_loss: mse\n")
    cfg = load_config(tmp_path / "exp.yaml", ["latent.num_latents=12"])
    assert (cfg.loss.alpha_kv, cfg.loss.kv_loss, cfg.latent.num_latents) == (3.0, "mse", 12)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert "alpha_kv" in describe() and "R-KV mix" in describe()


@pytest.mark.parametrize("name", ["llama1b_aug", "llama1b_aug_nl", "qwen05b_aug", "qwen05b_aug_nl", "llama3b_aug", "llama3b_aug_nl"])
def test_paper_configs_load(name):
    cfg = load_config(ROOT / "configs" / "paper" / f"{name}.yaml")
    assert cfg.latent.num_latents == 24 and cfg.latent.num_iterations == 3 and cfg.lora.r == 128
    assert cfg.train.global_batch == 128 and cfg.train.grad_clip == 2.0


def test_table6_values():
    l3nl = load_config(ROOT / "configs/paper/llama3b_aug_nl.yaml")
    assert (l3nl.eviction.lam, l3nl.latent.use_projection, l3nl.loss.alpha_codi, l3nl.loss.alpha_kv) == (0.0, False, 20.0, 2.0)
    q = load_config(ROOT / "configs/paper/qwen05b_aug.yaml")
    assert (q.train.lr, q.train.weight_decay, q.loss.kv_loss, q.loss.kv_std) == (5e-4, 0.01, "mse", "global")


def test_ablation_configs_load():
    files = sorted((ROOT / "configs" / "ablations").glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        load_config(f)


def test_fingerprint_covers_targets_not_losses(tiny_paths, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "cot": "<<1+1=2>>", "answer": "2"}) + "\n")
    base = [f"model.name_or_path={tiny_paths['llama']}", f"data.train_path={data}"]
    ref, fields = cache_fingerprint(load_config(None, base))
    for same in ["loss.alpha_kv=5", "loss.kv_loss=mse", "train.lr=1", "latent.num_iterations=1", "lora.r=4",
                 "train.seed=3", "latent.use_projection=false", "eviction.seed=5"]:
        assert cache_fingerprint(load_config(None, base + [same]))[0] == ref, same
    for diff in ["eviction.lam=0.2", "eviction.method=crop", "latent.num_latents=8", "eviction.order=score",
                 "eviction.rope=pre", "store.dtype=int8", "data.drop_last_step=false", "model.dtype=float32",
                 "data.answer_prompt=Answer:", "data.answer_spaces=false"]:
        assert cache_fingerprint(load_config(None, base + [diff]))[0] != ref, diff
    data.write_text(json.dumps({"question": "q", "cot": "<<1+1=2>>", "answer": "3"}) + "\n")
    from kava_dist.fingerprint import _file_digest
    _file_digest.cache_clear()
    assert cache_fingerprint(load_config(None, base))[1]["data.train_sha"] != fields["data.train_sha"]


def test_split_steps_styles():
    assert split_steps("<<16-3-4=9>> <<9*2=18>>", "equation") == ["<<16-3-4=9>>", "<<9*2=18>>"]
    assert split_steps("He has 3. Then 4 more. So 7", "nl") == ["He has 3.", "Then 4 more.", "So 7"]
    assert split_steps("He cuts 4-2=2 inches So he pays 100*3=$300 per year", "nl") == [
        "He cuts 4-2=2 inches", "So he pays 100*3=$300 per year"]
    assert split_steps("1 2 + 3 4 ( 5 ) + 6", "plus") == ["1 2", "3 4 ( 5 )", "6"]


def test_load_examples_reports_malformed_rows(tmp_path):
    rows = [
        {"question": "ok 1", "cot": "<<1+1=2>> <<2+1=3>>", "answer": "3"},
        {"question": "", "cot": "<<1+1=2>>", "answer": "2"},
        {"cot": "<<1+1=2>>", "answer": "2"},
        {"question": "no answer", "cot": "x"},
        {"question": "text answer", "cot": "<<1=1>>", "answer": "Sally"},
        {"question": "steps form", "steps": ["<<2*3=6>>", "<<6+1=7>>"], "answer": "1,007"},
        {"question": "bad cot", "cot": 5, "answer": "1"},
    ]
    p = tmp_path / "rows.jsonl.gz"
    with gzip.open(p, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    exs, rep = load_examples(p)
    assert [e.id for e in exs] == [0, 5]
    assert exs[1].steps == ["<<2*3=6>>", "<<6+1=7>>"] and exs[1].answer == "1007"
    assert rep.rows == 7 and rep.kept == 2 and sum(rep.skipped.values()) == 5
    assert rep.skipped["non-numeric answer"] == 1


def test_missing_file_error_names_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="by path"):
        load_examples(tmp_path / "nope.jsonl")


def test_encoding_layout_and_length_filter(tiny_paths):
    from kava_dist.backbone import load_tokenizer
    from kava_dist.prompts import Example, add_special_tokens

    cfg = load_config(None, [f"model.name_or_path={tiny_paths['llama']}"])
    tok = load_tokenizer(cfg.model)
    sp = add_special_tokens(tok)
    ex = Example(id=3, question="Q?", steps=["<<1+1=2>>", "<<2*3=6>>"], answer="6")
    (enc,), _ = encode_examples([ex], tok)
    assert enc.question_ids[0] == tok.bos_token_id
    assert tok.decode(enc.cot_ids) == "<<1+1=2>>"           # last step dropped
    assert tok.decode(enc.prompt_ids) == "The answer is:" and enc.answer_ids[-1] == tok.eos_token_id
    (full,), _ = encode_examples([ex], tok, drop_last_step=False)
    assert tok.decode(full.cot_ids) == "<<1+1=2>> <<2*3=6>>"
    kept, rep = encode_examples([ex], tok, max_tokens=5)
    assert kept == [] and sum(rep.skipped.values()) == 1
    b = collate([enc, full], sp.pad)
    assert b.q_mask[:, -1].all() and b.cot_mask[:, 0].all() and b.ans_mask[:, 0].all()   # aligned segments


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_shared_data_files_load():
    exs, rep = load_examples(SHARED_DATA / "gsm8k_aug.valid.jsonl.gz")
    assert rep.kept >= 495 and exs[0].steps[0].startswith("<<") and exs[0].cot_style == "equation"
    nl, _ = load_examples(SHARED_DATA / "gsm8k_aug_nl.valid.jsonl.gz", limit=20)
    assert nl[0].cot_style == "nl" and len(nl[0].steps) >= 2
    mult, _ = load_examples(SHARED_DATA / "mult4x4.valid.jsonl.gz", limit=5)
    assert mult[0].cot_style == "plus" and len(mult[0].steps) == 4
