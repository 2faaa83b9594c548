"""Backbone: load a causal LM of a family in kava_dist/models/, add KaVa's tokens, attach the projection, wrap in LoRA.

Usage:
    from kava_dist.backbone import load_backbone, add_lora, parts
    model, tokenizer, special = load_backbone(cfg.model, latent=cfg.latent, device="cuda")
    model = add_lora(model, special, cfg.lora, cfg.latent)       # peft model: only LoRA, projection, new tokens train
    lm, decoder, prj = parts(model)                             # CausalLM, its decoder stack, the projection
    teacher = load_teacher(cfg.model, device="cuda")            # base + teacher adapter merged, eval, frozen

The projection lives on the CausalLM as `kava_prj` and is listed in peft's `modules_to_save`, so it trains and
is saved with the adapter; the new-token embeddings go through peft's `trainable_token_indices`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from kava_dist.config import LatentConfig, LoraSettings, ModelConfig
from kava_dist.models import SUPPORTED
from kava_dist.prompts import SpecialIds, add_special_tokens

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class LatentProjection(nn.Module):
    """Hidden state -> next latent input: [Dropout] -> Linear -> GELU -> Linear -> LayerNorm (PCCoT `prj`).
    `gate` (latent.soft_tokens): the output is scaled by a trained scalar that starts at 0, and the student adds it to
    the soft token (kava_dist.student.latent_inputs)."""

    def __init__(self, d_model: int, dropout: float = 0.0, gate: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(d_model, d_model), nn.GELU(),
                                 nn.Linear(d_model, d_model), nn.LayerNorm(d_model))
        if gate:
            self.gate = nn.Parameter(torch.zeros(1))     # 1-D: DeepSpeed broadcasts parameters as byte views

    def forward(self, h_BMd: torch.Tensor) -> torch.Tensor:
        out_BMd = self.net(h_BMd)
        return out_BMd * self.gate if hasattr(self, "gate") else out_BMd


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    dtype = DTYPES[name]
    if torch.device(device).type == "cpu" and dtype == torch.float16:
        raise ValueError("model.dtype=float16 is not supported on CPU; use bfloat16 or float32.")
    return dtype


def set_sdpa_backends(names: list[str]) -> None:
    """Enable exactly these PyTorch SDPA kernels for this process (empty: leave torch's defaults).

    Process-wide on purpose: the flags are global in torch, and every model a kava process loads wants the same
    choice (see ModelConfig.sdpa_backends for why cuDNN is off by default)."""
    if not names:
        return
    b = torch.backends.cuda
    b.enable_flash_sdp("flash" in names)
    b.enable_mem_efficient_sdp("efficient" in names)
    b.enable_cudnn_sdp("cudnn" in names)
    b.enable_math_sdp("math" in names)


def load_tokenizer(mcfg: ModelConfig):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": mcfg.gguf_file} if mcfg.gguf_file else {}
    if mcfg.revision:
        kwargs["revision"] = mcfg.revision
    return AutoTokenizer.from_pretrained(_checked_path(mcfg), **kwargs)


def _checked_path(mcfg: ModelConfig) -> str:
    if not mcfg.name_or_path:
        raise ValueError("model.name_or_path is empty. Set it to a local checkpoint dir or a hub name.")
    p = Path(mcfg.name_or_path)
    if (p.is_absolute() or mcfg.name_or_path.startswith(".")) and not p.exists():
        raise FileNotFoundError(f"model.name_or_path={p} does not exist. Point it at a checkpoint dir.")
    if mcfg.gguf_file and not (p / mcfg.gguf_file).exists():
        raise FileNotFoundError(f"model.gguf_file={mcfg.gguf_file} not found in {p}.")
    return mcfg.name_or_path


def load_backbone(mcfg: ModelConfig, latent: LatentConfig | None = None, device: str | torch.device = "cpu"):
    """Frozen base model + tokenizer with KaVa tokens (embeddings resized) and, if `latent`, the projection."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(mcfg)
    special = add_special_tokens(tokenizer)
    dtype = resolve_dtype(mcfg.dtype, device)
    set_sdpa_backends(mcfg.sdpa_backends)
    kwargs = {"gguf_file": mcfg.gguf_file} if mcfg.gguf_file else {}
    if mcfg.revision:
        kwargs["revision"] = mcfg.revision
    model = AutoModelForCausalLM.from_pretrained(_checked_path(mcfg), dtype=dtype,
                                                 attn_implementation=mcfg.attn_implementation, **kwargs)
    if model.config.model_type not in SUPPORTED:
        raise ValueError(f"model_type {model.config.model_type!r} is not supported; kava handles {SUPPORTED} "
                         "(their attention has no q/k norm, which the teacher hooks rely on).")
    add_token_rows(model, len(tokenizer))
    model.config.pad_token_id = special.pad
    model.kava_prj = LatentProjection(model.config.hidden_size, latent.projection_dropout, latent.soft_tokens) if (
        latent is not None and latent.use_projection) else nn.Identity()
    model.kava_prj.to(device=device, dtype=dtype)
    model.to(device)
    model.requires_grad_(False)
    return model, tokenizer, special


def add_token_rows(model, vocab: int) -> int:
    """Grow the embeddings (and an untied LM head) to `vocab` rows; returns the number of rows added.
    Deterministic new rows (the mean of the old ones), identical in every process that loads the base: the
    adapter then only stores the trained rows of kava's tokens, not the whole embedding matrix."""
    old = model.get_input_embeddings().weight.shape[0]
    if vocab <= old:
        return 0
    model.resize_token_embeddings(vocab, mean_resizing=False)
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb.weight[old:] = emb.weight[:old].mean(0, keepdim=True)
    return vocab - old


def new_token_ids(special: SpecialIds, base_vocab: int | None = None) -> list[int]:
    ids = [special.bot, special.eot, special.latent]
    if base_vocab is None or special.pad >= base_vocab:
        ids.append(special.pad)
    return sorted(set(ids))


def add_lora(model, special: SpecialIds, lcfg: LoraSettings, latent: LatentConfig):
    """Wrap in peft LoRA; train LoRA, the projection (modules_to_save) and the new-token embeddings.
    With `lora.enabled=false` every weight trains instead (full fine-tuning; the demo trains from scratch)."""
    from peft import LoraConfig, get_peft_model

    if not lcfg.enabled:
        model.requires_grad_(True)
        log.info("full fine-tuning: %d trainable parameters", sum(p.numel() for p in model.parameters()))
        return model
    save = ["kava_prj"] if latent.use_projection else []
    tokens = {"embed_tokens": new_token_ids(special)} if lcfg.train_new_tokens else None
    pcfg = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=lcfg.target_modules,
                      modules_to_save=save or None, trainable_token_indices=tokens, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, pcfg)
    cache_token_indices(peft_model)
    n_train = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in peft_model.parameters())
    log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))
    return peft_model


def cache_token_indices(model) -> int:
    """peft's TrainableTokensLayer rebuilds its token-index tensor from a Python list on every forward
    (`torch.tensor(list).to(device)`): a host-to-device copy that waits for the device queue, three times per
    student micro-step (embeddings of two passes, the tied LM head). Same arithmetic with the index tensor kept
    per device. Returns the number of layers patched."""
    n = 0
    for mod in model.modules():
        if not (hasattr(mod, "token_indices") and hasattr(mod, "trainable_tokens_delta")
                and hasattr(mod, "get_merged_weights")):
            continue
        cache: dict = {}

        def get_merged_weights(active_adapters, mod=mod, cache=cache):
            W = mod.base_layer.weight
            for name in active_adapters:
                key = (name, W.device)
                if key not in cache:
                    cache[key] = torch.tensor(mod.token_indices[name], device=W.device)
                W = W.index_copy(dim=0, index=cache[key], source=mod.trainable_tokens_delta[name].to(W))
            return W

        mod.get_merged_weights = get_merged_weights
        n += 1
    return n


def load_adapter(model, adapter_dir: str | Path, trainable: bool):
    """Load a saved kava adapter (LoRA + projection + token deltas) onto a base from `load_backbone`.
    A full fine-tune's export (config.json + weights, see kava_dist.run) replaces the weights instead."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / "config.json").exists() and not (adapter_dir / "adapter_config.json").exists():
        return load_full(model, adapter_dir, trainable)
    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir} holds no adapter_config.json. Point at the `adapter/` dir that "
                                "train.stage=teacher (or student) exported.")
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    check_loaded(peft_model, adapter_dir)
    cache_token_indices(peft_model)
    return peft_model


def check_loaded(peft_model, adapter_dir: str | Path = "the adapter") -> None:
    """Raise unless every module the adapter saves whole (`modules_to_save`, e.g. the trained `kava_prj`) found
    its target in the base. peft skips a missing target without a word, and the student would then run without
    its trained projection."""
    from peft.utils import ModulesToSaveWrapper

    wrapped = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    for adapter, pcfg in getattr(peft_model, "peft_config", {}).items():
        missing = sorted(set(getattr(pcfg, "modules_to_save", None) or ()) - wrapped)
        if missing:
            raise ValueError(
                f"{adapter_dir} (adapter {adapter!r}) holds trained weights for {missing}, which the base model lacks, "
                "so PeftModel.from_pretrained dropped them. Prepare the base first: "
                "`base = kava_dist.pretrained.kava_base(base, ADAPTER_DIR)` (adds kava's tokens and kava_prj), then "
                "`PeftModel.from_pretrained(base, ADAPTER_DIR)`; or load the run with kava_dist.run.load_run.")


def load_full(model, model_dir: str | Path, trainable: bool):
    """Load a full fine-tune's weights (and its projection, if saved) into `model` in place."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("kava_prj") and k != "lm_head.weight"]
    unexpected = [k for k in unexpected if not k.startswith("kava_prj")]
    if missing or unexpected:
        raise ValueError(f"{model_dir} does not fit the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    model.requires_grad_(trainable)
    return model


def load_teacher(mcfg: ModelConfig, device: str | torch.device = "cpu"):
    """The frozen teacher: base (+ teacher adapter, merged) in eval mode. Returns (model, tokenizer, special)."""
    model, tokenizer, special = load_backbone(mcfg, latent=None, device=device)
    if mcfg.teacher_adapter:
        model = load_adapter(model, mcfg.teacher_adapter, trainable=False)
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model.eval().requires_grad_(False)
    return model, tokenizer, special


def parts(model) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(CausalLM, decoder stack, projection) of a plain, peft-wrapped or DeepSpeed-wrapped model."""
    if type(model).__name__ == "DeepSpeedEngine":
        model = model.module
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    prj = getattr(lm, "kava_prj", None)
    if hasattr(model, "peft_config") and type(prj).__name__ != "ModulesToSaveWrapper" and any(
            "kava_prj" in (getattr(c, "modules_to_save", None) or ()) for c in model.peft_config.values()):
        check_loaded(model)         # a trained projection that never arrived must not turn into the identity
    return lm, lm.model, prj if prj is not None else nn.Identity()


def decoder_layers(model) -> list[nn.Module]:
    return list(parts(model)[1].layers)
