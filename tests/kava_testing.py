"""Test helpers shared by every tier (import as `from kava_testing import build, make_batch, ...`).

Kept out of conftest.py: pytest loads several conftest modules (tests/, tests/integration/) under the one name
`conftest`, so `from conftest import ...` would pick whichever was imported last.
"""
from __future__ import annotations

import socket
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many?", "<<3+4=7>> <<7*2=14>>", "14"),
    ("A box holds 12 pens; 5 are red. How many are not red?", "<<12-5=7>>", "7"),
    ("Sam runs 2 km a day for 6 days, then 3 km. Total?", "<<2*6=12>> <<12+3=15>> <<15*1=15>>", "15"),
    ("What is 9 times 9 minus 1?", "<<9*9=81>> <<81-1=80>>", "80"),
    ("Ann had 20 coins, gave away 7 and found 2. How many now?", "<<20-7=13>> <<13+2=15>>", "15"),
    ("Half of 18 plus 4?", "<<18/2=9>> <<9+4=13>>", "13"),
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (for Ray, gloo rendezvous, moto)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cfg(path, **over):
    from kava_dist.config import load_config

    base = [f"model.name_or_path={path}", "model.dtype=float32", "latent.num_latents=4", "latent.num_iterations=2",
            "lora.r=8", "lora.alpha=16", "lora.dropout=0.0", "train.micro_batch=2", "train.global_batch=4"]
    return load_config(None, base + [f"{k}={v}" for k, v in over.items()])


def build(tiny_paths, family, lora=True, **over):
    from kava_dist.backbone import add_lora, load_backbone

    cfg = make_cfg(tiny_paths[family], **over)
    torch.manual_seed(0)
    model, tok, special = load_backbone(cfg.model, latent=cfg.latent)
    if lora:
        model = add_lora(model, special, cfg.lora, cfg.latent)
        # LoRA B starts at zero; give it values so adapters change the function in tests.
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    return cfg, model, tok, special


def make_batch(tok, special, rows=QUESTIONS, drop_last_step=True, prompt="The answer is:"):
    from kava_dist.prompts import Example, collate, encode_examples, split_steps

    exs = [Example(id=i, question=q, steps=split_steps(c, "equation"), answer=a) for i, (q, c, a) in enumerate(rows)]
    enc, _ = encode_examples(exs, tok, answer_prompt=prompt, drop_last_step=drop_last_step)
    return collate(enc, special.pad), enc
