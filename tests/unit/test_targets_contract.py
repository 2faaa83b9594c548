"""kava_dist/targets.py owns what the store holds: the StoreSpec, the build's arrays and the student's reads all
come from FIELDS; the fingerprint carries a hash of the target code that ignores comments and formatting."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cache_store.spec import FieldSpec
from kava_dist.config import load_config
from kava_dist.fingerprint import CODE_FIELD, TARGET_CODE, targets_code_version
from kava_dist.targets import FIELDS, READ_FIELDS, Targets, store_spec

PKG = Path(__file__).resolve().parents[2] / "kava_dist"


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "int8", "int4"])
def test_spec_of_the_schema_is_the_spec_stores_were_built_with(dtype):
    """Existing stores keep matching: the spec derived from FIELDS equals the one written out field by field."""
    cfg = load_config(None, [f"store.dtype={dtype}", "latent.num_latents=6"])
    L, H, D, d = 3, 2, 8, 32
    logical = {"bf16": "bfloat16", "fp32": "float32"}.get(dtype, "bfloat16")
    quant = dtype if dtype in ("int8", "int4") else None
    want = (
        FieldSpec("k", (L, H, 6, D), logical, quant=quant, quant_reduce_axes=(2,) if quant else ()),
        FieldSpec("v", (L, H, 6, D), logical, quant=quant, quant_reduce_axes=(3,) if quant else ()),
        FieldSpec("valid", (L, H, 6), "bool"),
        FieldSpec("codi_h", (L, d), "float32" if dtype == "fp32" else "bfloat16"),
        FieldSpec("index", (L, H, 6), "int16"),
        FieldSpec("example_id", (), "int64"),
        FieldSpec("cot_len", (), "int32"),
    )
    assert store_spec(cfg, (L, H, D, d)).fields == want


def test_targets_round_trip_through_the_store_layout():
    t = Targets(torch.randn(2, 3, 2, 6, 8), torch.randn(2, 3, 2, 6, 8), torch.ones(2, 3, 2, 6, dtype=torch.bool),
                torch.randn(2, 3, 32), torch.zeros(2, 3, 2, 6, dtype=torch.int64))
    arrays = t.as_arrays("bf16")
    assert [f.name for f in FIELDS if f.attr] == list(arrays)
    assert arrays["k"].dtype == torch.bfloat16 and arrays["index"].dtype == torch.int16
    arrays["example_id"] = torch.arange(2)
    back = Targets.from_arrays({k: arrays[k] for k in READ_FIELDS})
    assert torch.equal(back.k_BLHMD, arrays["k"]) and back.valid_BLHM.dtype == torch.bool
    assert "index" not in READ_FIELDS and "example_id" in READ_FIELDS


def test_target_code_version_ignores_comments_and_follows_the_rule(tmp_path):
    for module in TARGET_CODE:
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PKG / module, tmp_path / module)
    base = targets_code_version(str(tmp_path))
    assert base == targets_code_version()
    ev = tmp_path / "eviction.py"
    ev.write_text("# a comment\n" + ev.read_text().replace('"""', '"""  ', 1) + "\n\n# trailing\n")
    (tmp_path / "c1").mkdir()
    for module in TARGET_CODE:
        (tmp_path / "c1" / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / module, tmp_path / "c1" / module)
    assert targets_code_version(str(tmp_path / "c1")) == base
    (tmp_path / "c2").mkdir()
    for module in TARGET_CODE:
        (tmp_path / "c2" / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / module, tmp_path / "c2" / module)
    src = (tmp_path / "c2" / "targets.py").read_text()
    (tmp_path / "c2" / "targets.py").write_text(src.replace('"int16", "L,H,M"', '"int32", "L,H,M"', 1))
    assert targets_code_version(str(tmp_path / "c2")) != base
    (tmp_path / "c3").mkdir()                      # the family's RoPE is part of the rule too
    for module in TARGET_CODE:
        (tmp_path / "c3" / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / module, tmp_path / "c3" / module)
    rope = tmp_path / "c3" / "models" / "llama.py"
    body = rope.read_text()
    start = body.index("def apply_rope")
    end = body.index("\ndef ", start + 1)
    rope.write_text(body[:start] + body[start:end].replace("return", "return 0.5 *", 1) + body[end:])
    assert targets_code_version(str(tmp_path / "c3")) != base


def test_fingerprint_carries_the_target_code(tiny_paths, tmp_path):
    from kava_dist.fingerprint import cache_fingerprint

    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "cot": "<<1+1=2>>", "answer": "2"}\n')
    _, fields = cache_fingerprint(load_config(None, [f"model.name_or_path={tiny_paths['llama']}",
                                                     f"data.train_path={data}"]))
    assert fields[CODE_FIELD] == targets_code_version() and CODE_FIELD == "targets.code"


def test_a_store_built_before_the_code_hash_is_refused_with_the_rebuild(tiny_paths, tmp_path):
    """A store whose fingerprint fields lack `targets.code` (built before it existed) or carry another one is
    refused by open_targets with the store's one fingerprint exception, naming the field and the rebuild."""
    import hashlib
    import json

    from cache_store.errors import FingerprintMismatch
    from cache_store.writer import StoreWriter
    from kava_dist.fingerprint import cache_fingerprint
    from kava_dist.targets import open_targets
    from kava_testing import make_cfg

    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "cot": "<<1+1=2>>", "answer": "2"}\n')
    cfg = make_cfg(tiny_paths["llama"], **{"data.train_path": data, "store.path": tmp_path / "store",
                                           "train.stage": "student"})
    _, fields = cache_fingerprint(cfg)
    old = {k: v for k, v in fields.items() if k != CODE_FIELD}
    digest = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:20]
    StoreWriter.create_or_open(str(tmp_path / "store"), store_spec(cfg), digest, old, num_shards=1)
    with pytest.raises(FingerprintMismatch) as err:
        open_targets(cfg)
    text = str(err.value)
    assert f"{CODE_FIELD}: None != '{targets_code_version()}'" in text and "rebuild it with" in text, text
    assert set(err.value.differing) == {CODE_FIELD}
