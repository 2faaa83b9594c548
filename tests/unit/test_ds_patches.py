"""kava_dist/ds_patches.py: every DeepSpeed attribute kava patches is still where the patch expects it, with
DeepSpeed's parameters, and still called by DeepSpeed; a DeepSpeed upgrade that breaks one fails here."""
from __future__ import annotations

import importlib

import pytest

from kava_dist import ds_patches


def test_every_patched_deepspeed_attribute_is_where_the_patch_expects_it():
    assert ds_patches.check() == []


def test_check_names_a_patch_that_no_longer_applies(monkeypatch):
    z = importlib.import_module("deepspeed.runtime.zero.stage_1_and_2")
    monkeypatch.setattr(z, "mask_nan_or_inf_with_val_inplace", lambda x, y: None)
    problems = ds_patches.check()
    assert len(problems) == 1 and "mask_nan_or_inf_with_val_inplace takes ('x', 'y')" in problems[0]
    monkeypatch.delattr(z, "mask_nan_or_inf_with_val_inplace")
    assert "is gone" in ds_patches.check()[0]


def test_patches_apply_and_stay_checkable(monkeypatch):
    ct = importlib.import_module("deepspeed.comm.torch")
    z = importlib.import_module("deepspeed.runtime.zero.stage_1_and_2")
    monkeypatch.setattr(ct, "build_shm_op", ct.build_shm_op)              # undone after the test
    monkeypatch.setattr(z, "mask_nan_or_inf_with_val_inplace", z.mask_nan_or_inf_with_val_inplace)
    ds_patches.skip_shm_build()
    ds_patches.no_scalar_uploads()
    ds_patches.no_scalar_uploads()                                         # idempotent
    assert ct.build_shm_op() is None and z.mask_nan_or_inf_with_val_inplace._kava
    torch = pytest.importorskip("torch")
    t = torch.tensor([1.0, float("inf"), float("nan")])
    z.mask_nan_or_inf_with_val_inplace(t, device=t.device)
    assert t.tolist() == [1.0, -1.0, -1.0]
    assert ds_patches.check() == []
    assert ds_patches.clip_on_device(object()) is False                    # other optimizers are left alone
