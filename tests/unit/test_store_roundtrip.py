"""cache_store write/read round trips, validation before writing, idempotency, fingerprints, visibility."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_store import (
    CodecSpec, FieldSpec, FingerprintMismatch, LedgerConflict, SpecMismatch, StoreNotFound, StoreReader, StoreSpec,
    StoreWriter, relative_error,
)
from cache_store.ledger import Ledger, ShardRecord

S = 8  # examples per shard


def spec_exact(codec: CodecSpec | None = None) -> StoreSpec:
    return StoreSpec(fields=(
        FieldSpec("k", (2, 2, 6, 8), "bfloat16"),
        FieldSpec("h16", (3, 5), "float16"),
        FieldSpec("h32", (7,), "float32"),
        FieldSpec("valid", (2, 2, 6), "bool"),
        FieldSpec("example_id", (), "int64"),
        FieldSpec("cot_len", (), "int32"),
    ), shard_size=S, codec=codec or CodecSpec())


def data_exact(n: int, seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    k = (torch.randn(n, 2, 2, 6, 8, generator=g) * 3).bfloat16()
    if n:
        k.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-40, -3e38]).bfloat16()  # signed zero, subnormal, huge
    rng = np.random.default_rng(seed)
    return {
        "k": k,
        "h16": rng.normal(size=(n, 3, 5)).astype(np.float16),
        "h32": torch.randn(n, 7, generator=g),
        "valid": rng.random((n, 2, 2, 6)) > 0.3,
        "example_id": np.arange(n, dtype=np.int64) + 1000 * seed,
        "cot_len": rng.integers(0, 500, size=n, dtype=np.int32),
    }


def assert_rows_equal(batch: dict[str, torch.Tensor], data: dict[str, object], rows: list[int], at: list[int]) -> None:
    for name, got in batch.items():
        want = data[name]
        want = want if isinstance(want, torch.Tensor) else torch.from_numpy(np.asarray(want))
        for g_i, d_i in zip(at, rows):
            a, b = got[g_i], want[d_i]
            assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
            if a.dtype == torch.bfloat16:  # bit-exact, including -0.0
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), name
            else:
                assert torch.equal(a, b), name


def make(tmp_path: Path, spec: StoreSpec | None = None, num_shards: int = 4, fp: str = "fp-a",
         fields: dict | None = None) -> StoreWriter:
    return StoreWriter.create_or_open(str(tmp_path / "store"), spec or spec_exact(), fp,
                                      fields if fields is not None else {"teacher": "t", "eviction": {"lam": 0.1}},
                                      num_shards=num_shards)


@pytest.mark.parametrize("codec", [CodecSpec(), CodecSpec("zstd", clevel=3), CodecSpec("none", chunk_crc32c=False),
                                   CodecSpec("blosc-lz4", clevel=5, shuffle="bitshuffle")])
def test_bit_exact_roundtrip_all_dtypes(tmp_path: Path, codec: CodecSpec) -> None:
    w = make(tmp_path, spec_exact(codec))
    d0, d2 = data_exact(S, 1), data_exact(5, 2)  # shard 2 is partial (filtered examples)
    w.write_shard(0, d0)
    w.write_shard(2, d2)
    assert w.done_shards() == [0, 2] and w.missing_shards() == [1, 3]
    for fast in (True, False):  # direct chunk reads and zarr's own reader agree
        r = StoreReader(w.url, fast_read=fast)
        assert len(r) == S + 5
        order = [12, 0, 3, 8, 3, 7]  # any order, with a repeat, across shards
        b = r.get_batch(order)
        assert b["k"].dtype == torch.bfloat16 and b["k"].shape == (6, 2, 2, 6, 8)
        assert_rows_equal(b, d0, [0, 3, 3, 7], [1, 2, 4, 5])
        assert_rows_equal(b, d2, [4, 0], [0, 3])
        full = r.get_batch(range(len(r)))
        assert_rows_equal(full, d2, list(range(5)), list(range(S, S + 5)))
        assert r.get_batch([])["k"].shape == (0, 2, 2, 6, 8)


def test_numpy_bits_and_torch_bf16_inputs_are_the_same(tmp_path: Path) -> None:
    w = make(tmp_path)
    d = data_exact(S, 3)
    rec_t = w.write_shard(0, d)
    d_np = dict(d, k=d["k"].view(torch.int16).numpy().view(np.uint16), h32=d["h32"].numpy())
    assert w.write_shard(0, d_np) == rec_t  # same content -> idempotent, same record
    assert w.shards_written == [0]


def test_quantised_store_roundtrip(tmp_path: Path) -> None:
    spec = StoreSpec(fields=(
        FieldSpec("k", (2, 2, 24, 16), "bfloat16", quant="int8", quant_reduce_axes=(2,)),
        FieldSpec("v", (2, 2, 24, 16), "bfloat16", quant="int4", quant_reduce_axes=(3,)),
        FieldSpec("h", (2, 9), "float32", quant="int4", quant_reduce_axes=(1,), scale_dtype="float32"),
        FieldSpec("example_id", (), "int64"),
    ), shard_size=S)
    w = make(tmp_path, spec)
    g = torch.Generator().manual_seed(0)
    d = {"k": torch.randn(S, 2, 2, 24, 16, generator=g).bfloat16(), "v": torch.randn(S, 2, 2, 24, 16, generator=g).bfloat16(),
         "h": torch.randn(S, 2, 9, generator=g), "example_id": np.arange(S)}
    w.write_shard(1, d)
    r = StoreReader(w.url)
    b = r.get_batch(range(S))
    assert b["k"].dtype == torch.bfloat16 and b["h"].dtype == torch.float32 and b["h"].shape == (S, 2, 9)
    assert relative_error(d["k"], b["k"]).max() < 0.01
    assert relative_error(d["v"], b["v"]).max() < 0.15
    assert relative_error(d["h"], b["h"]).max() < 0.15
    assert torch.equal(b["example_id"], torch.arange(S))
    zb = StoreReader(w.url, fast_read=False).get_batch(range(S))
    assert all(torch.equal(b[n], zb[n]) for n in b)
    st = r.stats()
    assert st["fields"]["k"]["disk_over_raw"] < 0.6 and st["fields"]["v"]["disk_over_raw"] < 0.45  # D=16: scale+zero per 16 values


def _array_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not str(p.relative_to(root)).startswith(("ledger", "claims", "meta"))}


def test_validation_happens_before_anything_is_written(tmp_path: Path) -> None:
    w = make(tmp_path)
    root = tmp_path / "store"
    before = _array_files(root)
    good = data_exact(S, 4)
    bad_cases = [
        (dict(good, extra=np.zeros(S)), KeyError, "unexpected"),
        ({k: v for k, v in good.items() if k != "cot_len"}, KeyError, "missing"),
        (dict(good, k=good["k"][:, :1]), ValueError, r"expected shape \[n, 2, 2, 6, 8\]"),
        (dict(good, k=good["k"].float()), TypeError, "torch.bfloat16"),
        (dict(good, h16=good["h16"].astype(np.float32)), TypeError, "not a safe cast"),
        (dict(good, cot_len=good["cot_len"][:3]), ValueError, "same n"),
        (data_exact(S + 1, 4), ValueError, "shard_size"),
        (dict(good, h32=torch.full((S, 7), float("nan"))), ValueError, "NaN/Inf in rows"),
    ]
    for arrays, exc, msg in bad_cases:
        with pytest.raises(exc, match=msg):
            w.write_shard(0, arrays)
    with pytest.raises(IndexError, match="out of range"):
        w.write_shard(4, good)
    assert _array_files(root) == before and w.done_shards() == [] and not (root / "claims").exists()
    w.write_shard(0, dict(good, cot_len=good["cot_len"].astype(np.int16)))  # safe casts are fine


def test_rewrite_with_different_content_is_refused(tmp_path: Path) -> None:
    w = make(tmp_path)
    w.write_shard(1, data_exact(S, 5))
    with pytest.raises(LedgerConflict, match="shard 1"):
        w.write_shard(1, data_exact(S, 6))
    assert StoreReader(w.url).get_batch([0])["example_id"].item() == 5000


def test_ledger_records_are_monotonic(tmp_path: Path) -> None:
    w = make(tmp_path)
    rec = w.write_shard(0, data_exact(S, 7))
    led = Ledger(w.backend)
    assert led.publish_shard(rec) == rec  # same content: fine
    forged = ShardRecord(**{**rec.to_dict(), "rows": 3})
    with pytest.raises(LedgerConflict, match="shard 0"):
        Ledger(w.backend).publish_shard(forged)
    assert Ledger(w.backend).read_shard(0) == rec
    store_json = (tmp_path / "store" / "ledger" / "store.json").read_bytes()
    make(tmp_path)  # reopening never rewrites store.json
    assert (tmp_path / "store" / "ledger" / "store.json").read_bytes() == store_json


def test_fingerprint_mismatch_names_the_fields(tmp_path: Path) -> None:
    make(tmp_path)
    with pytest.raises(FingerprintMismatch) as ei:
        make(tmp_path, fp="fp-b", fields={"teacher": "t", "eviction": {"lam": 0.0}})
    msg = str(ei.value)
    assert "eviction.lam (store 0.1 != config 0.0)" in msg and "fp-a" in msg and "fp-b" in msg
    assert "new store path" in msg and ei.value.differing == {"eviction.lam": (0.1, 0.0)}
    assert isinstance(ei.value, ValueError)
    with pytest.raises(FingerprintMismatch, match="teacher"):
        make(tmp_path, fp="fp-a", fields={"eviction": {"lam": 0.1}})  # same string, fields differ
    with pytest.raises(SpecMismatch, match="num_shards=4, given 5"):
        make(tmp_path, num_shards=5)
    other = StoreSpec(fields=spec_exact().fields, shard_size=S, codec=CodecSpec(clevel=5))
    with pytest.raises(SpecMismatch, match="codec.clevel"):
        make(tmp_path, spec=other)
    make(tmp_path, spec=StoreSpec(fields=spec_exact().fields))  # shard_size=None adopts the store's
    with pytest.raises(FingerprintMismatch, match="expects fp-z"):
        StoreReader(str(tmp_path / "store"), expected_fingerprint="fp-z")
    with pytest.raises(FingerprintMismatch, match=r"eviction.lam \(store 0.1 != reader 0.5\)"):
        StoreReader(str(tmp_path / "store"), expected_fingerprint="fp-z",
                    expected_fingerprint_fields={"teacher": "t", "eviction": {"lam": 0.5}})
    assert StoreReader(str(tmp_path / "store"), expected_fingerprint="fp-a").fingerprint_fields["eviction"] == {"lam": 0.1}
    with pytest.raises(StoreNotFound, match="store.json"):
        StoreReader(str(tmp_path / "nothing"))


def test_unpublished_shard_is_invisible_and_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = make(tmp_path)
    d0, d1 = data_exact(S, 8), data_exact(6, 9)
    w.write_shard(0, d0)

    def crash(record: ShardRecord) -> ShardRecord:
        raise RuntimeError("simulated crash before publish")

    monkeypatch.setattr(w.ledger, "publish_shard", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        w.write_shard(1, d1)  # all data files of shard 1 written, record not
    assert (tmp_path / "store" / "k" / "c" / "1" / "0" / "0" / "0" / "0").exists()
    r = StoreReader(w.url)
    assert len(r) == S and r.published_shards() == [0]
    with pytest.raises(IndexError, match="out of range"):
        r.get_batch([S])
    monkeypatch.undo()
    w2 = make(tmp_path)
    assert w2.missing_shards() == [1, 2, 3]
    w2.write_shard(1, d1)  # claim was released by the crashed call; rewritten whole
    assert r.refresh() == S + 6
    assert_rows_equal(r.get_batch(range(S, S + 6)), d1, list(range(6)), list(range(6)))


def test_meta_side_files(tmp_path: Path) -> None:
    w = make(tmp_path)
    assert w.get_meta("build_report") is None
    w.put_meta("build_report", {"quarantined": [3, 17], "why": "nan"})
    w.put_meta("build_report", {"quarantined": [3]})
    assert StoreReader(w.url).get_meta("build_report") == {"quarantined": [3]}
    with pytest.raises(ValueError, match="meta name"):
        w.put_meta("../evil", {})
    assert json.loads((tmp_path / "store" / "meta" / "build_report.json").read_text()) == {"quarantined": [3]}


def test_nothing_outside_the_root_and_stats(tmp_path: Path) -> None:
    w = make(tmp_path)
    w.write_shard(3, data_exact(S, 10))
    assert sorted(os.listdir(tmp_path)) == ["store"]
    assert not [p for p in (tmp_path / "store").rglob("*") if p.name.endswith((".tmp", ".partial"))]
    st = StoreReader(w.url).stats()
    assert st["shards_done"] == 1 and st["shards_total"] == 4 and st["rows"] == S
    assert st["raw_bytes"] == S * spec_exact().logical_nbytes and 0 < st["disk_over_raw"] < 2


def test_quantised_parts_dequantised_elsewhere_match(tmp_path: Path) -> None:
    spec = StoreSpec(fields=(
        FieldSpec("k", (2, 3, 24, 10), "bfloat16", quant="int8", quant_reduce_axes=(2,)),
        FieldSpec("v", (2, 3, 24, 9), "bfloat16", quant="int4", quant_reduce_axes=(3,)),
        FieldSpec("h", (5,), "float16", quant="int4", quant_reduce_axes=(0,)),
        FieldSpec("example_id", (), "int64"),
    ), shard_size=S)
    w = make(tmp_path, spec)
    g = torch.Generator().manual_seed(1)
    w.write_shard(0, {"k": torch.randn(S, 2, 3, 24, 10, generator=g).bfloat16(),
                      "v": torch.randn(S, 2, 3, 24, 9, generator=g).bfloat16(),
                      "h": torch.randn(S, 5, generator=g).half(), "example_id": np.arange(S)})
    r = StoreReader(w.url)
    rows = [5, 1, 1, 7]
    raw = r.get_batch(rows, dequantize=False)
    assert sorted(raw) == ["example_id", "h.q", "h.scale", "h.zero", "k.q", "k.scale", "v.q", "v.scale", "v.zero"]
    assert raw["k.q"].dtype == torch.int8 and raw["v.q"].shape == (4, 2, 3, 24, 5)
    full = r.get_batch(rows)
    expanded = r.expand_quantized(raw)
    assert sorted(expanded) == sorted(full)
    for name in full:  # torch path (any device) == numpy path, bit for bit
        assert full[name].dtype == expanded[name].dtype and torch.equal(full[name], expanded[name]), name
    b = r.get_batch([3, 0, 2, 1], dequantize=False)
    assert "k.q" in b and "k" not in b


def test_spec_mismatch_names_the_field_and_empty_shard(tmp_path: Path) -> None:
    w = make(tmp_path)
    fields = list(spec_exact().fields)
    fields[0] = FieldSpec("k", (2, 2, 6, 8), "bfloat16", quant="int8", quant_reduce_axes=(2,))
    with pytest.raises(SpecMismatch, match=r"fields\.k\.quant \(store None != given 'int8'\)"):
        make(tmp_path, spec=StoreSpec(fields=tuple(fields), shard_size=S))
    rec = w.write_shard(2, data_exact(0, 11))  # every example of the shard was filtered out
    assert rec.rows == 0 and rec.bytes == 0
    r = StoreReader(w.url)
    assert len(r) == 0 and r.published_shards() == [2] and w.missing_shards() == [0, 1, 3]
    w.write_shard(3, data_exact(2, 12))
    r.refresh()
    assert r.get_batch([0, 1])["example_id"].tolist() == [12000, 12001]


def test_per_field_codec_override(tmp_path: Path) -> None:
    raw = CodecSpec("none", chunk_crc32c=True)
    spec = StoreSpec(fields=(
        FieldSpec("k", (2, 2, 24, 16), "bfloat16", quant="int8", quant_reduce_axes=(2,), codec=raw),
        FieldSpec("h", (2, 16), "bfloat16"),
    ), shard_size=S)
    assert StoreSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    w = make(tmp_path, spec)
    g = torch.Generator().manual_seed(2)
    d = {"k": torch.randn(S, 2, 2, 24, 16, generator=g).bfloat16(), "h": torch.randn(S, 2, 16, generator=g).bfloat16()}
    rec = w.write_shard(0, d)
    assert rec.arrays["k.q"]["bytes"] == S * (2 * 2 * 24 * 16 + 4) + S * 16 + 4  # stored raw: data + crc, index
    meta = json.loads((tmp_path / "store" / "k.q" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"][0]["configuration"]["codecs"]] == ["bytes", "crc32c"]
    a, b = StoreReader(w.url).get_batch(range(S)), StoreReader(w.url, fast_read=False).get_batch(range(S))
    assert torch.equal(a["k"], b["k"]) and torch.equal(a["h"].view(torch.int16), d["h"].view(torch.int16))
    with pytest.raises(SpecMismatch, match=r"fields\.k\.codec"):
        make(tmp_path, spec=StoreSpec(fields=(FieldSpec("k", (2, 2, 24, 16), "bfloat16", quant="int8",
                                                        quant_reduce_axes=(2,)), spec.fields[1]), shard_size=S))


def test_killed_publisher_temp_files_are_removed(tmp_path: Path) -> None:
    """A writer killed while publishing a record leaves `.shard-N.json.<uuid>.tmp`; the next writer of that shard
    removes it, whether the kill came before the record was linked (rewrite) or after (already published)."""
    w = make(tmp_path)
    ledger = tmp_path / "store" / "ledger"
    ledger.mkdir(parents=True, exist_ok=True)
    before = ledger / ".shard-000001.json.deadbeef.tmp"  # killed before the link: shard 1 is rewritten
    before.write_bytes(b"{}")
    w.write_shard(1, data_exact(S, 1))
    assert not before.exists()
    after = ledger / ".shard-000001.json.cafef00d.tmp"  # killed after the link: shard 1 is already published
    after.write_bytes(b"{}")
    other = ledger / ".shard-000002.json.0123.tmp"  # another shard's temp file belongs to that shard's writer
    other.write_bytes(b"{}")
    make(tmp_path).write_shard(1, data_exact(S, 1))
    assert not after.exists() and other.exists()
