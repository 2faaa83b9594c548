"""Tiny random checkpoints for tests and the demo: a character tokenizer and a model of any family in
kava_dist/models/ built from small dimensions.

Usage:
    from kava_dist.tiny import save_tiny_checkpoint
    path = save_tiny_checkpoint("/tmp/tiny-llama", family="llama", hidden_size=64, num_layers=2)
    cfg.model.name_or_path = str(path)        # every stage then loads it like any HF checkpoint

Nothing is downloaded: the tokenizer is a `tokenizers` WordLevel model over printable ASCII (one token per
character, so digits are single tokens), the weights are random from a fixed seed.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

from kava_dist.models import get_family


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.printable[:95]:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(family: str = "llama", vocab_size: int = 128, hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                tie_word_embeddings: bool = True, initializer_range: float = 0.02):
    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=1024, tie_word_embeddings=tie_word_embeddings, bos_token_id=1,
                  eos_token_id=2, rope_theta=10000.0, initializer_range=initializer_range)
    return get_family(family).tiny_config(**common)


def save_tiny_checkpoint(out_dir: str | Path, family: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a random-init checkpoint + char tokenizer loadable with `from_pretrained(out_dir)`."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = char_tokenizer()
    config_kwargs.setdefault("vocab_size", len(tokenizer))
    cfg = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
