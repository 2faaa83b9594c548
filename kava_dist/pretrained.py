"""Load an exported kava student the Hugging Face way: `PeftModel.from_pretrained(base, RUN/adapter)`.

Usage (README, "Loading a trained student"):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from kava_dist.pretrained import answer_questions, kava_base
    A = "runs/demo/student/adapter"
    base = AutoModelForCausalLM.from_pretrained(PeftConfig.from_pretrained(A).base_model_name_or_path)
    student = PeftModel.from_pretrained(kava_base(base, A), A)     # kava_base: + kava's tokens, + kava_prj
    print(answer_questions(student, AutoTokenizer.from_pretrained(A), A, ["Sam has 3 apples ..."]))

A kava adapter holds LoRA, the trained latent projection `kava_prj` (peft `modules_to_save`) and the rows of the
tokens kava adds (peft `trainable_token_indices`). peft can load weights only into modules the base already has,
and a stock base has neither `kava_prj` nor kava's token rows: `kava_base` adds both, exactly as training did
(new rows = the mean of the old ones; a fresh, untrained projection that the adapter's weights then replace).
Without it, a base lacking the token rows fails inside peft, and a base that has them (a kava full fine-tune) would
silently lose `kava_prj`: kava checks that (`kava_dist.backbone.check_loaded`) when the model is loaded by
`load_run` and whenever the student runs, and raises naming this step.

A full fine-tune (`lora.enabled=false`) exports a whole checkpoint instead: load it with
`kava_base(AutoModelForCausalLM.from_pretrained(A), A)`, which also restores its `kava_prj` weights (transformers
does not know that module and skips them).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from kava_dist.backbone import LatentProjection, add_token_rows, parts
from kava_dist.config import KavaConfig, load_config

log = logging.getLogger(__name__)

PRJ = "kava_prj"


def _tensor_shapes(folder: Path, pattern: str) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for f in sorted(folder.glob(pattern)):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    return shapes


def _projection_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k[len(PRJ) + 1:]: sf.get_tensor(k) for k in sf.keys() if k.startswith(PRJ + ".")})
    return out


def kava_base(base, adapter_dir: str | Path):
    """Make a stock causal LM ready for a kava adapter (in place; returns it): grow the embeddings to the adapter's
    tokenizer (kava's tokens) and attach `kava_prj` when the adapter trained one. For a full fine-tune's export
    (a whole checkpoint in `adapter_dir`), also load its `kava_prj` weights."""
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    is_peft = (adapter_dir / "adapter_config.json").exists()
    if not is_peft and not (adapter_dir / "config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} is not a kava export: it holds neither adapter_config.json (LoRA) nor "
                                "config.json (full fine-tune). Point at RUN/adapter of a finished training run.")
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    added = add_token_rows(base, len(tokenizer))
    if added:
        log.info("kava_base: %d token rows added (vocabulary %d)", added, len(tokenizer))
    base.config.pad_token_id = tokenizer.pad_token_id
    d = base.config.hidden_size
    param = next(base.parameters())
    if is_peft:
        acfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        if PRJ not in (acfg.get("modules_to_save") or ()):
            return base
        shapes = {k: v for k, v in _tensor_shapes(adapter_dir, "adapter_model.safetensors").items() if f".{PRJ}." in k}
        bad = {k: v for k, v in shapes.items() if not k.endswith(".gate") and v[-1] != d}
        if bad or not shapes:
            raise ValueError(f"{adapter_dir}: the saved {PRJ} ({sorted(shapes.items())[:2]}) does not fit this base "
                             f"(hidden size {d}). Load the base the adapter was trained on "
                             f"({acfg.get('base_model_name_or_path')!r}).")
        if not hasattr(base, PRJ):   # with its gate when the student was trained with latent.soft_tokens
            gate = any(k.endswith(".gate") for k in shapes)
            base.kava_prj = LatentProjection(d, gate=gate).to(device=param.device, dtype=param.dtype)
        return base
    state = _projection_weights(adapter_dir)
    if state:
        prj = LatentProjection(d, gate="gate" in state).to(device=param.device, dtype=param.dtype)
        prj.load_state_dict(state, strict=True)         # a shape or key mismatch raises here, never silently
        base.kava_prj = prj.requires_grad_(False)
    return base


def _run_config(path: str | Path) -> KavaConfig:
    p = Path(path)
    for cand in (p, p / "config.yaml", p.parent / "config.yaml"):
        if cand.is_file() and cand.suffix in (".yaml", ".yml"):
            return load_config(cand)
    raise FileNotFoundError(f"no kava config.yaml at {p} or {p.parent}: pass the run directory (or its adapter/).")


@torch.no_grad()
def answer_questions(model, tokenizer, run: str | Path | KavaConfig, questions: Sequence[str],
                     max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers, decoded the way the run was trained (student/online: latent reasoning; teacher: CoT;
    nocot: direct). `run` is the run directory, its adapter/ or its config."""
    from kava_dist.evaluate import decode_batch, eval_mode
    from kava_dist.prompts import Example, add_special_tokens, encode_examples

    cfg = run if isinstance(run, KavaConfig) else _run_config(run)
    special = add_special_tokens(tokenizer)
    mode = eval_mode(cfg)
    if max_new_tokens is None:
        max_new_tokens = cfg.eval.cot_max_new_tokens if mode == "cot" else cfg.eval.max_new_tokens
    examples = [Example(id=i, question=q, steps=[], answer="0") for i, q in enumerate(questions)]
    enc, _ = encode_examples(examples, tokenizer, answer_prompt=cfg.data.answer_prompt,
                             drop_last_step=cfg.data.drop_last_step)
    parts(model)        # raises if a trained kava_prj was not loaded
    was_training = model.training
    model.eval()
    try:
        tokens, _ = decode_batch(model, enc, special, mode, cfg.latent, max_new_tokens)
    finally:
        model.train(was_training)
    return [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
