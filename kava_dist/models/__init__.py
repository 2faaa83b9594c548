"""Model families kava supports, one file each: hooks, RoPE, fused decoder layer and tiny test config.

Usage:
    from kava_dist.models import SUPPORTED, family_of, get_family
    fam = family_of(lm)                          # by lm.config.model_type; raises for an unsupported family
    q_proj, k_proj, v_proj = fam.projections(layer)
    cfg = get_family("qwen2").tiny_config(vocab_size=128, hidden_size=64, ...)

Adding a family: write kava_dist/models/<name>.py with `FAMILY = Family(...)` (kava_dist/models/family.py says
what each field is for; llama.py is the reference) and add it to FAMILIES below.
"""
from __future__ import annotations

from kava_dist.models import llama, qwen2
from kava_dist.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, qwen2.FAMILY)}
SUPPORTED = tuple(FAMILIES)


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; use {' or '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of(lm) -> Family:
    """The family of a CausalLM (or of its config)."""
    config = getattr(lm, "config", lm)
    return get_family(config.model_type)
