"""cache_store quantisation and spec: error bounds on KV-like data, packing, spec validation.

Relative error = per example ||x - x_hat||_2 / ||x||_2 (cache_store.quant.relative_error).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_store.quant import (
    bf16_bits_to_float32, dequantize, dequantize_torch, pack_int4, quantize, relative_error, unpack_int4,
)
from cache_store.spec import CodecSpec, FieldSpec, StoreSpec, default_shard_size


def kv_like(n: int, L: int, H: int, M: int, D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys: Gaussian + per-channel offsets, a few outlier channels x10, per-layer scale; values: Gaussian."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.linspace(0.5, 2.0, L).view(1, L, 1, 1, 1)
    k = torch.randn(n, L, H, M, D, generator=g) + 0.5 * torch.randn(1, L, H, 1, D, generator=g)
    outliers = torch.randperm(D, generator=g)[: max(2, D // 32)]
    k[..., outliers] *= 10
    v = torch.randn(n, L, H, M, D, generator=g)
    return (k * layer).bfloat16(), (v * layer).bfloat16()


def _roundtrip(field: FieldSpec, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    bits = x.view(torch.int16).numpy().view(np.uint16)
    parts = quantize(field, bf16_bits_to_float32(bits))
    return dequantize(field, parts), parts


SHAPE = (4, 2, 24, 64)  # L, H, M, D (small, same M and D as Llama-3.2-1B targets)


@pytest.mark.parametrize("scheme,k_max,v_max", [("int8", 0.01, 0.01), ("int4", 0.12, 0.13)])
def test_kivi_error_bounds_on_kv_like_data(scheme: str, k_max: float, v_max: float) -> None:
    k, v = kv_like(16, *SHAPE)
    fk = FieldSpec("k", SHAPE, "bfloat16", quant=scheme, quant_reduce_axes=(2,))  # per channel
    fv = FieldSpec("v", SHAPE, "bfloat16", quant=scheme, quant_reduce_axes=(3,))  # per token
    k_hat, _ = _roundtrip(fk, k)
    v_hat, _ = _roundtrip(fv, v)
    assert k_hat.dtype == torch.bfloat16 and k_hat.shape == k.shape
    ek, ev = relative_error(k, k_hat), relative_error(v, v_hat)
    assert ek.max() < k_max, ek.max()
    assert ev.max() < v_max, ev.max()
    assert ek.min() > 0  # it is lossy: the test would notice a no-op


def test_per_channel_keys_beat_per_token_keys_with_outlier_channels() -> None:
    k, _ = kv_like(8, *SHAPE)
    per_chan, _ = _roundtrip(FieldSpec("k", SHAPE, "bfloat16", quant="int4", quant_reduce_axes=(2,)), k)
    per_tok, _ = _roundtrip(FieldSpec("k", SHAPE, "bfloat16", quant="int4", quant_reduce_axes=(3,)), k)
    assert relative_error(k, per_chan).mean() < 0.6 * relative_error(k, per_tok).mean()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_elementwise_error_within_half_a_step(scheme: str) -> None:
    x = torch.randn(6, 3, 5, 7) * torch.logspace(-2, 2, 7)  # odd last dim exercises int4 padding
    f = FieldSpec("x", (3, 5, 7), "float32", quant=scheme, quant_reduce_axes=(1,))
    parts = quantize(f, x.numpy())
    x_hat = dequantize(f, parts)
    assert x_hat.dtype == torch.float32
    step = torch.from_numpy(parts["scale"].astype(np.float32)).unsqueeze(2)  # reduced axis 1 (+ row axis)
    assert parts["scale"].shape == (6, 3, 7) and parts["scale"].dtype == np.float16
    err = (x - x_hat).abs()
    assert bool((err <= step / 2 * 1.001 + 1e-6).all()), (err / step).max()


def test_int8_symmetric_and_int4_range() -> None:
    f8 = FieldSpec("x", (4, 8), "float32", quant="int8", quant_reduce_axes=(1,))
    x = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    q = quantize(f8, x)["q"]
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127 and np.abs(q).max(axis=2).min() == 127
    f4 = FieldSpec("x", (4, 8), "float32", quant="int4", quant_reduce_axes=(1,))
    p = quantize(f4, x)
    assert p["q"].shape == (3, 4, 4) and p["q"].dtype == np.uint8 and set(p) == {"q", "scale", "zero"}


def test_zero_groups_exact_and_constant_groups_exact_in_int4() -> None:
    x = np.zeros((2, 3, 4), np.float32)
    x[1] = 2.5
    f4 = FieldSpec("x", (3, 4), "float32", quant="int4", quant_reduce_axes=(1,))
    assert torch.equal(dequantize(f4, quantize(f4, x)), torch.from_numpy(x))  # zero point = the constant
    f8 = FieldSpec("x", (3, 4), "float32", quant="int8", quant_reduce_axes=(1,))
    x8 = dequantize(f8, quantize(f8, x))
    assert torch.equal(x8[0], torch.zeros(3, 4))  # all-zero group: scale 0, no NaN
    assert torch.allclose(x8[1], torch.full((3, 4), 2.5), rtol=1e-3)  # fp16 scale rounding only


def test_scale_overflow_names_the_fix() -> None:
    f = FieldSpec("x", (4,), "float32", quant="int8", quant_reduce_axes=(0,))
    with pytest.raises(ValueError, match="scale_dtype='float32'"):
        quantize(f, np.full((1, 4), 1e9, np.float32))
    f32 = FieldSpec("x", (4,), "float32", quant="int8", quant_reduce_axes=(0,), scale_dtype="float32")
    assert torch.allclose(dequantize(f32, quantize(f32, np.full((1, 4), 1e9, np.float32))), torch.full((1, 4), 1e9))


def test_int4_pack_unpack_roundtrip() -> None:
    q = np.random.default_rng(1).integers(0, 16, size=(5, 3, 9), dtype=np.uint8)
    p = pack_int4(q)
    assert p.shape == (5, 3, 5)
    assert np.array_equal(unpack_int4(torch.from_numpy(p), 9), q) and np.array_equal(unpack_int4(p, 9), q)


def test_spec_validation_messages() -> None:
    with pytest.raises(ValueError, match="identifier"):
        FieldSpec("k.q", (2,), "float32")
    with pytest.raises(ValueError, match="float dtype"):
        FieldSpec("ids", (2,), "int32", quant="int8", quant_reduce_axes=(0,))
    with pytest.raises(ValueError, match="per channel"):
        FieldSpec("k", (2, 3), "bfloat16", quant="int8", quant_reduce_axes=(5,))
    with pytest.raises(ValueError, match="without quant"):
        FieldSpec("k", (2, 3), "bfloat16", quant_reduce_axes=(1,))
    with pytest.raises(ValueError, match="duplicate"):
        StoreSpec(fields=(FieldSpec("a", (1,), "int8"), FieldSpec("a", (1,), "int8")))
    with pytest.raises(ValueError, match="codec"):
        CodecSpec(name="gzip")


def test_spec_json_roundtrip_and_stored_arrays() -> None:
    spec = StoreSpec(fields=(
        FieldSpec("k", (2, 2, 24, 8), "bfloat16", quant="int4", quant_reduce_axes=(2,)),
        FieldSpec("v", (2, 2, 24, 8), "bfloat16", quant="int8", quant_reduce_axes=(3,), scale_dtype="float32"),
        FieldSpec("example_id", (), "int64"),
    ), shard_size=16, codec=CodecSpec("zstd", clevel=5))
    assert StoreSpec.from_dict(spec.to_dict()) == spec
    arrays = {a.path: (a.shape, a.dtype.name) for a in spec.stored_arrays()}
    assert arrays == {
        "k.q": ((2, 2, 24, 4), "uint8"), "k.scale": ((2, 2, 8), "float16"), "k.zero": ((2, 2, 8), "float16"),
        "v.q": ((2, 2, 24, 8), "int8"), "v.scale": ((2, 2, 24), "float32"), "example_id": ((), "int64"),
    }


def test_default_shard_size_targets_the_largest_array() -> None:
    def kv(L: int, D: int, quant: str | None = None) -> StoreSpec:
        ax = (2,) if quant else ()
        return StoreSpec(fields=(FieldSpec("k", (L, 8, 24, D), "bfloat16", quant=quant, quant_reduce_axes=ax),
                                 FieldSpec("codi_h", (L, 32 * D), "bfloat16")))

    assert default_shard_size(kv(28, 128)) == (128 << 20) // (28 * 8 * 24 * 128 * 2) == 97  # Llama-3.2-3B
    assert default_shard_size(kv(16, 64)) == 341  # Llama-3.2-1B
    assert default_shard_size(kv(28, 128, "int8")) == 195  # int8 keys are half the bytes
    assert kv(28, 128).resolved().shard_size == 97
    assert default_shard_size(StoreSpec(fields=(FieldSpec("id", (), "int64"),))) == 4096  # clamp



@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype,scale_dtype", [("bfloat16", "float16"), ("float16", "float32"), ("float32", "float16")])
def test_torch_dequantisation_equals_the_host_path_to_the_last_bit(scheme: str, dtype: str, scale_dtype: str) -> None:
    """dequantize_torch (what the trainer runs on the GPU after copying the parts) and dequantize (the host path)
    do the same float32 operations in the same order: identical bits, whatever the row chunking."""
    k, v = kv_like(7, *SHAPE, seed=3)
    for x, axes in ((k, (2,)), (v, (3,))):
        f = FieldSpec("x", SHAPE, dtype, quant=scheme, quant_reduce_axes=axes, scale_dtype=scale_dtype)
        parts = quantize(f, x.float().numpy())
        host = dequantize(f, parts)
        tparts = {n: torch.from_numpy(a) for n, a in parts.items()}
        for chunk in (1 << 25, 1, 3 * int(np.prod(SHAPE))):        # one chunk, one element (-> a row), 3 rows
            dev = dequantize_torch(f, tparts, chunk_elems=chunk)
            assert dev.dtype == host.dtype and dev.shape == host.shape
            bits = {2: torch.int16, 4: torch.int32}[host.element_size()]
            assert torch.equal(dev.view(bits), host.view(bits))
