"""An exported student loads the Hugging Face way (README "Loading a trained student", run verbatim), with its
trained latent projection; a reload that would drop it fails loudly; full fine-tunes and load_run still load."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if "PeftModel.from_pretrained" in b]
    assert len(found) == 1, "README must hold exactly one python block that loads the adapter"
    return found[0]


def export_run(tiny_paths, run: Path, lora: bool = True, **over):
    """A run directory whose every trained tensor differs from its initial value (LoRA B, kava_prj, token rows)."""
    from kava_dist.backbone import add_lora, load_backbone
    from kava_dist.config import to_dict
    from kava_dist.run import export_adapter
    from kava_testing import make_cfg

    cfg = make_cfg(tiny_paths["llama"], **{"train.stage": "student", "lora.enabled": str(lora).lower(), **over})
    torch.manual_seed(0)
    model, tok, special = load_backbone(cfg.model, latent=cfg.latent)
    model = add_lora(model, special, cfg.lora, cfg.latent)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in n or "kava_prj" in n or "trainable_tokens" in n or not lora):
                p.add_(torch.randn_like(p) * 0.3)
    model.eval()
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    export_adapter(model, tok, run / "adapter", meta={"stage": "student"})
    return cfg, model, tok, special


def latents(model, tok, special, cfg) -> torch.Tensor:
    from kava_dist.evaluate import left_pad
    from kava_dist.student import generate_answers
    from kava_testing import make_batch

    _, enc = make_batch(tok, special)
    q, m = left_pad([e.question_ids for e in enc], special.pad)
    with torch.no_grad():
        return generate_answers(model, q, m, list(enc[0].prompt_ids), special, cfg.latent, 3).latents_BMd


def test_readme_snippet_loads_the_whole_student(tiny_paths, tmp_path, monkeypatch, capsys):
    """The base lacks kava's tokens (a LoRA run on a stock checkpoint): the README's lines give the student back,
    projection and token rows included, and it answers through latent reasoning."""
    from transformers import AutoTokenizer

    from kava_dist.pretrained import answer_questions

    cfg, model, tok, special = export_run(tiny_paths, tmp_path / "runs/demo/student")
    base_vocab = AutoTokenizer.from_pretrained(str(tiny_paths["llama"])).__len__()
    assert len(tok) > base_vocab                     # the stock base really lacks rows the adapter trained
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(readme_snippet(), ns)                       # verbatim
    student = ns["student"]
    printed = capsys.readouterr().out
    assert printed.strip().startswith("[") and printed.strip().endswith("]")
    torch.testing.assert_close(latents(student, tok, special, cfg), latents(model, tok, special, cfg))
    prj_saved = {k: v for k, v in model.state_dict().items() if "kava_prj.modules_to_save" in k}
    prj_loaded = {k: v for k, v in student.state_dict().items() if "kava_prj.modules_to_save" in k}
    assert prj_saved and prj_saved.keys() == prj_loaded.keys()
    assert all(torch.equal(prj_saved[k], prj_loaded[k]) for k in prj_saved)
    q = ["Tom has 3 apples and buys 4 more. How many?"]
    assert answer_questions(student, tok, cfg, q) == answer_questions(model, tok, cfg, q)


def test_a_reload_that_drops_the_projection_fails_loudly(tiny_paths, tmp_path):
    """A base that already has kava's token rows (e.g. a kava full fine-tune) but no kava_prj: peft loads the
    adapter without a word and would run the identity instead of the trained projection. kava refuses."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kava_dist.backbone import add_token_rows, load_adapter
    from kava_dist.pretrained import answer_questions

    cfg, _, tok, special = export_run(tiny_paths, tmp_path / "run")
    adapter = tmp_path / "run/adapter"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_paths["llama"]))
    add_token_rows(base, len(tok))
    plain = PeftModel.from_pretrained(base, str(adapter))             # peft: no error, kava_prj skipped
    with pytest.raises(ValueError, match=r"kava_prj.*kava_base"):
        answer_questions(plain, tok, cfg, ["What is 9 times 9 minus 1?"])
    base2 = AutoModelForCausalLM.from_pretrained(str(tiny_paths["llama"]))
    add_token_rows(base2, len(tok))
    with pytest.raises(ValueError, match=r"kava_prj.*kava_base"):
        load_adapter(base2, adapter, trainable=False)


def test_full_finetune_export_and_load_run(tiny_paths, tmp_path):
    """lora.enabled=false exports a whole checkpoint: transformers loads it, kava_base restores kava_prj; load_run
    (the evaluation's loader) gives the same student for both export kinds."""
    from transformers import AutoModelForCausalLM

    from kava_dist.pretrained import kava_base
    from kava_dist.run import load_run

    cfg, model, tok, special = export_run(tiny_paths, tmp_path / "full", lora=False)
    adapter = tmp_path / "full/adapter"
    assert (adapter / "config.json").exists() and not (adapter / "adapter_config.json").exists()
    student = kava_base(AutoModelForCausalLM.from_pretrained(str(adapter)), adapter)
    want = latents(model, tok, special, cfg)
    torch.testing.assert_close(latents(student, tok, special, cfg), want)
    _, reloaded, _, _ = load_run(tmp_path / "full")
    torch.testing.assert_close(latents(reloaded, tok, special, cfg), want)

    cfg, model, tok, special = export_run(tiny_paths, tmp_path / "lora")
    _, merged, _, _ = load_run(tmp_path / "lora")
    torch.testing.assert_close(latents(merged, tok, special, cfg), latents(model, tok, special, cfg),
                               atol=1e-4, rtol=1e-4)


def test_soft_token_students_reload_with_their_trained_gate(tiny_paths, tmp_path):
    """latent.soft_tokens adds a scalar gate to kava_prj: both export kinds give back the same student through
    load_run, and kava_base rebuilds the projection with its gate (whole checkpoint: loaded strictly)."""
    from transformers import AutoModelForCausalLM

    from kava_dist.pretrained import kava_base
    from kava_dist.run import load_run

    soft = {"latent.soft_tokens": "true"}
    cfg, model, tok, special = export_run(tiny_paths, tmp_path / "full", lora=False, **soft)
    gate = float(model.kava_prj.gate.detach())
    assert gate != 0.0
    adapter = tmp_path / "full/adapter"
    student = kava_base(AutoModelForCausalLM.from_pretrained(str(adapter)), adapter)
    assert float(student.kava_prj.gate) == gate
    want = latents(model, tok, special, cfg)
    torch.testing.assert_close(latents(student, tok, special, cfg), want)
    _, reloaded, _, _ = load_run(tmp_path / "full")
    torch.testing.assert_close(latents(reloaded, tok, special, cfg), want)

    cfg, model, tok, special = export_run(tiny_paths, tmp_path / "lora", **soft)
    _, merged, _, _ = load_run(tmp_path / "lora")
    torch.testing.assert_close(latents(merged, tok, special, cfg), latents(model, tok, special, cfg),
                               atol=1e-4, rtol=1e-4)
    base = kava_base(AutoModelForCausalLM.from_pretrained(str(tiny_paths["llama"])), tmp_path / "lora/adapter")
    assert hasattr(base.kava_prj, "gate")


def test_kava_base_refuses_a_base_of_another_width(tiny_paths, tmp_path):
    from transformers import AutoModelForCausalLM

    from kava_dist.pretrained import kava_base

    export_run(tiny_paths, tmp_path / "run")
    other = AutoModelForCausalLM.from_pretrained(str(tiny_paths["qwen2"]))
    other.config.hidden_size = 32     # a different model width than the adapter's projection
    with pytest.raises(ValueError, match="does not fit this base"):
        kava_base(other, tmp_path / "run/adapter")
    assert json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())["modules_to_save"] == ["kava_prj"]


def test_demo_shape_lora_student_on_a_full_finetune_base(tiny_paths, tmp_path, monkeypatch):
    """`kava demo`: the teacher is a full fine-tune (its export holds kava's token rows and a kava_prj that
    transformers skips); the student is LoRA on that export. README's lines load the student with its own
    trained projection."""
    from kava_testing import make_cfg

    export_run(tiny_paths, tmp_path / "runs/demo/teacher", lora=False)
    teacher_export = tmp_path / "runs/demo/teacher/adapter"
    cfg_paths = {"llama": teacher_export}
    cfg, model, tok, special = export_run(cfg_paths, tmp_path / "runs/demo/student")
    assert make_cfg(teacher_export).model.name_or_path == str(teacher_export)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(readme_snippet(), ns)
    torch.testing.assert_close(latents(ns["student"], tok, special, cfg), latents(model, tok, special, cfg))
