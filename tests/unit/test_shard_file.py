"""Shard files encoded directly (cache_store.shard_file) are byte-for-byte zarr's, read back through plain zarr,
and arrays the encoder does not reproduce are written through zarr instead."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import GzipCodec

from cache_store import CodecSpec, FieldSpec, StoreSpec, StoreWriter
from cache_store import zarr_io
from cache_store import shard_file
from cache_store.shard_file import Unsupported, encode_shard, shard_plan, write_shard_file
from cache_store.zarr_io import compressors, ensure_arrays, shard_file_key, write_shard_block

S = 4  # examples per shard
SHARD = 1  # the shard written (of 3)

CODECS = {
    "zstd1": CodecSpec("zstd", clevel=1),
    "zstd3": CodecSpec("zstd", clevel=3),
    "zstd3-nocrc": CodecSpec("zstd", clevel=3, chunk_crc32c=False),
    "blosc-zstd": CodecSpec("blosc-zstd", clevel=3),
    "blosc-zstd-bitshuffle": CodecSpec("blosc-zstd", clevel=1, shuffle="bitshuffle"),
    "blosc-lz4-noshuffle": CodecSpec("blosc-lz4", clevel=5, shuffle="noshuffle"),
    "none": CodecSpec("none"),
}


def spec_all(codec: CodecSpec) -> StoreSpec:
    """Every logical dtype, both quantisations and a per-field codec override: all arrays a store creates."""
    fields = [FieldSpec(f"x_{dt}", (2, 3), dt) for dt in (
        "bfloat16", "float16", "float32", "float64", "bool", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64")]
    fields += [
        FieldSpec("k", (2, 3, 5), "bfloat16", quant="int8", quant_reduce_axes=(1,), codec=CodecSpec("none")),
        FieldSpec("v", (2, 3, 5), "float32", quant="int4", quant_reduce_axes=(2,)),
        FieldSpec("example_id", (), "int64"),
        FieldSpec("wide", (3, 40), "float16"),
    ]
    return StoreSpec(fields=tuple(fields), shard_size=S, codec=codec)


def block_for(z: zarr.Array, seed: int, empty_rows: tuple[int, ...] = (1,)) -> np.ndarray:
    """A shard of random values with all-zero rows (empty chunks) and, for floats, a row of -0.0 (data)."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(z.dtype)
    shape = (S, *z.shape[1:])
    if dt.kind == "b":
        b = rng.random(shape) < 0.5
    elif dt.kind == "f":
        b = (rng.standard_normal(shape) * 7).astype(dt)
        b[S - 1] = -0.0
    else:
        info = np.iinfo(dt)
        b = rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True)
    if b[0].nbytes > 64:  # data only past a row's first 64 bytes: still a chunk
        b[0].reshape(-1).view(np.uint8)[:64] = 0
    for r in empty_rows:
        b[r] = 0
    return b


def field_rows(f: FieldSpec, rows: int, seed: int) -> np.ndarray:
    """`rows` examples of field `f` as StoreWriter takes them (bfloat16 as the uint16 bits of finite values)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, *f.shape)).astype(np.float32) * 5
    if f.dtype == "bfloat16":
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    if f.dtype == "bool":
        return x > 0
    return x.astype(f.dtype)


def shard_bytes(root: Path, key: str) -> bytes | None:
    p = root / key
    return p.read_bytes() if p.exists() else None


@pytest.mark.parametrize("name", sorted(CODECS))
def test_direct_shard_file_is_zarrs_file(tmp_path: Path, name: str) -> None:
    spec = spec_all(CODECS[name])
    via_zarr = ensure_arrays(zarr.storage.LocalStore(tmp_path / "zarr"), spec, 3)
    direct = ensure_arrays(zarr.storage.LocalStore(tmp_path / "direct"), spec, 3)
    # first write, a rewrite with other rows empty (zarr reads and merges the old file), an all-fill shard (deleted)
    rounds = [(0, (1,)), (1, (0, 2)), (2, tuple(range(S)))]
    for arr in spec.stored_arrays():
        key = shard_file_key(arr, SHARD)
        for seed, empty in rounds:
            block = block_for(direct[arr.path], seed, empty)
            via_zarr[arr.path][SHARD * S:(SHARD + 1) * S] = block
            write_shard_file(direct[arr.path], SHARD, block)
            want, got = shard_bytes(tmp_path / "zarr", key), shard_bytes(tmp_path / "direct", key)
            assert got == want, f"{arr.path} ({arr.dtype}, codec {name}, round {seed}): shard files differ"
            assert (want is None) == (len(empty) == S)


@pytest.mark.parametrize("shards", [{"shape": (S, 3), "index_location": "start"}, (S, 3)])
@pytest.mark.parametrize("write_empty", [False, True])
def test_index_location_and_empty_chunks(tmp_path: Path, shards, write_empty: bool) -> None:
    files = []
    for name in ("zarr", "direct"):
        z = zarr.create_array(zarr.storage.LocalStore(tmp_path / name), name="a", shape=(3 * S, 3), dtype="float16",
                              chunks=(1, 3), shards=shards, compressors=compressors(CodecSpec("zstd", 1)),
                              fill_value=0, config={"write_empty_chunks": write_empty})
        block = block_for(z, 5, (0, 2))
        if name == "zarr":
            z[SHARD * S:(SHARD + 1) * S] = block
        else:
            write_shard_file(z, SHARD, block)
        files.append(shard_bytes(tmp_path / name, f"a/c/{SHARD}/0"))
    assert files[0] is not None and files[1] == files[0]


def test_pooled_and_sequential_encodes_agree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    z = ensure_arrays(zarr.storage.LocalStore(tmp_path), spec_all(CODECS["blosc-zstd"]), 3)["x_float32"]
    block, plan = block_for(z, 9, (2,)), shard_plan(z)
    with ThreadPoolExecutor(3) as pool:
        monkeypatch.setattr(shard_file, "_encode_pool", lambda: pool)
        pooled = encode_shard(plan, block)
    monkeypatch.setattr(shard_file, "_encode_pool", lambda: None)
    assert pooled is not None and encode_shard(plan, block) == pooled


def test_zarr_reads_direct_file_back(tmp_path: Path) -> None:
    spec = spec_all(CODECS["blosc-zstd"])
    arrays = ensure_arrays(zarr.storage.LocalStore(tmp_path), spec, 3)
    blocks = {p: block_for(z, 7, (0,)) for p, z in arrays.items()}
    for p, z in arrays.items():
        write_shard_file(z, SHARD, blocks[p])
    reopened = ensure_arrays(zarr.storage.LocalStore(tmp_path, read_only=True), spec, 3, create=False)
    for p, z in reopened.items():
        np.testing.assert_array_equal(z[SHARD * S:(SHARD + 1) * S], blocks[p], err_msg=p)
        np.testing.assert_array_equal(z[0:S], np.zeros_like(blocks[p]), err_msg=p)  # other shards: fill
        assert z[SHARD * S:(SHARD + 1) * S].tobytes() == blocks[p].tobytes(), p  # -0.0 kept


def test_ledger_checksums_same_on_both_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = spec_all(CODECS["zstd3"])
    records = []
    for direct in (True, False):
        monkeypatch.setattr(zarr_io, "DIRECT_SHARD_WRITES", direct)
        w = StoreWriter.create_or_open(str(tmp_path / f"s{direct}"), spec, fingerprint="t", fingerprint_fields={},
                                       num_shards=3)
        data = {f.name: field_rows(f, 3, seed=3) for f in spec.fields}
        records.append(w.write_shard(SHARD, data))
    assert records[0].checksum == records[1].checksum and records[0].arrays == records[1].arrays


def _unsupported_arrays(root: Path) -> list[tuple[zarr.Array, np.ndarray]]:
    store = zarr.storage.LocalStore(root)
    mk = dict(shape=(3 * S, 3), chunks=(1, 3), shards=(S, 3), dtype="int16")
    out = [
        (zarr.create_array(store, name="gzip", compressors=[GzipCodec()], fill_value=0, **mk), None),
        (zarr.create_array(store, name="fill", fill_value=7, **mk), None),
        (zarr.create_array(store, name="unsharded", shape=(3 * S, 3), chunks=(1, 3), dtype="int16", fill_value=0), None),
        (zarr.create_array(store, name="two_rows", shape=(3 * S, 3), chunks=(2, 3), shards=(S, 3), dtype="int16",
                           fill_value=0), None),
        (zarr.create_array(store, name="cast", fill_value=0, **mk), np.arange(S * 3, dtype=np.float64).reshape(S, 3)),
    ]
    return [(z, np.arange(S * 3, dtype=np.int16).reshape(S, 3) + 1 if b is None else b) for z, b in out]


def test_unsupported_arrays_fall_back_to_zarr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    setitem = zarr.Array.__setitem__
    monkeypatch.setattr(zarr.Array, "__setitem__", lambda self, k, v: (calls.append(self.path), setitem(self, k, v)))
    for z, block in _unsupported_arrays(tmp_path):
        with pytest.raises(Unsupported):
            write_shard_file(z, SHARD, block)
        assert not (tmp_path / z.path / "c" / str(SHARD)).exists(), f"{z.path}: written before refusing"
        write_shard_block(z, SHARD, S, block)
        assert calls[-1:] == [z.path], f"{z.path}: zarr's write was not used"
        np.testing.assert_array_equal(z[SHARD * S:(SHARD + 1) * S], block.astype(z.dtype), err_msg=z.path)
    # the last shard of an array whose rows are not a whole number of shards: refused (zarr would pad it)
    z = zarr.create_array(zarr.storage.LocalStore(tmp_path), name="partial", shape=(2 * S - 1, 3), chunks=(1, 3),
                          shards=(S, 3), dtype="int16", fill_value=0)
    with pytest.raises(Unsupported):
        write_shard_file(z, 1, np.ones((S, 3), dtype=np.int16))
    assert not (tmp_path / "partial" / "c").exists()
    z = ensure_arrays(zarr.storage.LocalStore(tmp_path / "ok"), spec_all(CODECS["zstd1"]), 3)["x_int16"]
    shard_plan(z)
    write_shard_block(z, SHARD, S, block_for(z, 1))
    assert calls[-1] != z.path  # a supported array does not go through zarr's write


def test_ensure_arrays_takes_a_root_group_another_writer_created_meanwhile(tmp_path: Path, monkeypatch) -> None:
    """Writers creating one store at once: zarr checks for the root group, another process creates it, and zarr's
    create then reports ContainsGroupError. The group is there, so opening the store goes on (seen as 1 in 90 of
    six processes opening a new store at once, before this was handled)."""
    from zarr.errors import ContainsGroupError

    store = zarr.storage.LocalStore(tmp_path)
    real = zarr.open_group

    def raced(st, mode="a", **kw):
        if mode == "a" and not (tmp_path / "zarr.json").exists():
            real(st, mode="w-", **kw)                      # the other writer wins the race
            raise ContainsGroupError(f"A group exists in store {st!r} at path ''.")
        return real(st, mode=mode, **kw)

    monkeypatch.setattr(zarr_io.zarr, "open_group", raced)
    spec = StoreSpec(fields=(FieldSpec("x", (4,), "float32"),), shard_size=2)
    arrays = ensure_arrays(store, spec, 3)
    assert set(arrays) == {a.path for a in spec.stored_arrays()}
