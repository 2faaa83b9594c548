"""Run directories: what a training run leaves on disk, and how later jobs load it back.

Usage:
    from kava_dist.run import RunDir, export_adapter, load_run
    rd = RunDir("runs/llama1b_aug")          # rd.config, rd.adapter, rd.checkpoints, rd.metrics, rd.eval, rd.report
    export_adapter(model, tokenizer, rd.adapter, meta={"stage": "student", "step": 1000})
    cfg, model, tokenizer, special = load_run("runs/llama1b_aug", device="cuda")   # eval-ready, adapter merged

Layout of a run directory:
    config.yaml            resolved config (also copied into every checkpoint)
    adapter/               peft adapter (LoRA + kava_prj + new-token deltas) + tokenizer + kava.json
    checkpoints/           DeepSpeed checkpoints (global_stepN/, latest) with client_state
    metrics.jsonl          one JSON object per logged step: step, loss terms, lr, grad_norm, samples/s, ...
    tb/                    TensorBoard scalars
    eval/                  evaluation JSONs and Markdown tables
    report/                report.md and its figures
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from kava_dist.backbone import load_adapter, load_backbone
from kava_dist.config import KavaConfig, load_config


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    adapter = property(lambda self: self.root / "adapter")
    checkpoints = property(lambda self: self.root / "checkpoints")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tb = property(lambda self: self.root / "tb")
    eval = property(lambda self: self.root / "eval")
    report = property(lambda self: self.root / "report")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "deepspeed", "ray", "zarr", "numcodecs", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    out["cuda"] = torch.version.cuda or "none"
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    out["host"] = platform.node()
    return out


def export_adapter(model, tokenizer, out_dir: str | Path, meta: dict | None = None,
                   state_dict: dict | None = None) -> Path:
    """Save the peft adapter (ZeRO-3: pass the gathered `state_dict`, see kava_dist.engine) + tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "peft_config"):  # full fine-tune: a whole checkpoint (kava_prj included in its weights)
        state = state_dict if state_dict is not None else model.state_dict()
        model.save_pretrained(str(out_dir), state_dict={k: v for k, v in state.items()})
    else:
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        model.save_pretrained(str(out_dir), save_embedding_layers=False, **kwargs)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "kava.json").write_text(json.dumps({**(meta or {}), "versions": versions()}, indent=2))
    return out_dir


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", adapter: str | Path | None = None,
             overrides: list[str] | tuple[str, ...] = ()) -> tuple[KavaConfig, torch.nn.Module, object, object]:
    """Load config + base + adapter of a finished run, merged and in eval mode."""
    rd = RunDir(run_dir)
    if not rd.config.exists():
        raise FileNotFoundError(f"{rd.config} not found: {run_dir} is not a kava run directory (it has no config.yaml).")
    cfg = load_config(rd.config, overrides)
    model, tokenizer, special = load_backbone(cfg.model, latent=cfg.latent, device=device)
    adapter = Path(adapter) if adapter else rd.adapter
    if adapter.exists():
        model = load_adapter(model, adapter, trainable=False)
        model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    elif cfg.train.stage != "nocot" or adapter != rd.adapter:
        raise FileNotFoundError(f"{adapter} not found: train the run first (its adapter is exported at the end).")
    model.eval().requires_grad_(False)
    return cfg, model, tokenizer, special
