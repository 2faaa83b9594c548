"""The three places where kava replaces a piece of DeepSpeed, each small and checked against the installed version.

Usage:
    from kava_dist import ds_patches
    ds_patches.skip_shm_build()                    # CPU only, before deepspeed.init_distributed
    ds_patches.no_scalar_uploads()                 # process-wide, idempotent (after deepspeed.initialize)
    ds_patches.clip_on_device(engine.optimizer)    # on the engine's ZeRO-1/2 optimizer instance
    ds_patches.check()                             # [] when every patched attribute is where we expect it

`PATCHED` names each patched attribute, the parameters DeepSpeed's own version takes, and the call DeepSpeed
makes to it; `check()` compares them with the installed DeepSpeed, and tests/unit/test_ds_patches.py fails
when an upgrade renames, moves or re-signs one, or stops calling it (a patch that silently no longer applies
would only show up as a slower step).

1. `skip_shm_build`: on CPU, DeepSpeed builds its shared-memory all-reduce op with a ~90 s JIT compile at
   init; kava uses gloo there, so `deepspeed.comm.torch.build_shm_op` returns None instead.
2. `no_scalar_uploads`: ZeRO-1/2's grad norm masks inf/NaN with `torch.tensor(-1.0, device=...)`, a
   host-to-device copy of a pageable scalar that waits for the device queue (twice per step); replaced by the
   same in-place fill with a Python scalar.
3. `clip_on_device`: ZeRO-1/2's `unscale_and_clip_grads` checks the norm with `bool(tensor)`, a host sync every
   step; replaced on the instance by the same arithmetic kept on the device (tests/unit/test_loader_engine.py
   compares the two on the same gradients).
"""
from __future__ import annotations

import importlib
import inspect
import logging

import torch

log = logging.getLogger(__name__)

# (module, attribute (dotted inside the module), DeepSpeed's parameters, a call DeepSpeed makes to it)
PATCHED = (
    ("deepspeed.comm.torch", "build_shm_op", (), "build_shm_op()"),
    ("deepspeed.runtime.zero.stage_1_and_2", "mask_nan_or_inf_with_val_inplace", ("input", "device", "val"),
     "mask_nan_or_inf_with_val_inplace("),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer.unscale_and_clip_grads",
     ("self", "grad_groups_flat", "total_norm"), "self.unscale_and_clip_grads("),
)


def _resolve(module: str, attr: str):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check() -> list[str]:
    """What no longer matches the installed DeepSpeed (empty when every patch applies as written)."""
    problems = []
    for module, attr, params, call in PATCHED:
        try:
            obj = _resolve(module, attr)
        except (ImportError, AttributeError) as e:
            problems.append(f"{module}.{attr} is gone ({e}): update kava_dist/ds_patches.py for this DeepSpeed")
            continue
        if getattr(obj, "_kava", False):
            continue                     # already patched in this process: ours has the same parameters
        got = tuple(inspect.signature(obj).parameters)
        if got != params:
            problems.append(f"{module}.{attr} takes {got}, the patch expects {params}: update "
                            "kava_dist/ds_patches.py for this DeepSpeed")
        if call not in inspect.getsource(importlib.import_module(module)):
            problems.append(f"{module} no longer calls {call!r}: the patch of {attr} has no effect; update or drop "
                            "it in kava_dist/ds_patches.py")
    return problems


def skip_shm_build() -> None:
    """Skip DeepSpeed's ~90 s JIT build of its CPU shared-memory all-reduce (gloo is used instead)."""
    noop = lambda: None  # noqa: E731
    noop._kava = True
    importlib.import_module("deepspeed.comm.torch").build_shm_op = noop


def no_scalar_uploads() -> None:
    """Replace ZeRO-1/2's inf/NaN masking of the grad norm by an in-place fill with a Python scalar (no
    host-to-device copy). Process-wide on the module DeepSpeed calls it from; idempotent."""
    from deepspeed.runtime.zero import stage_1_and_2 as z

    if getattr(z.mask_nan_or_inf_with_val_inplace, "_kava", False):
        return

    def mask_nan_or_inf_with_val_inplace(input, device=None, val=-1.0):
        input.masked_fill_(input.isinf() | input.isnan(), -1.0)   # DeepSpeed's marker is -1 whatever `val` says

    mask_nan_or_inf_with_val_inplace._kava = True
    z.mask_nan_or_inf_with_val_inplace = mask_nan_or_inf_with_val_inplace


def clip_on_device(opt) -> bool:
    """Replace `opt.unscale_and_clip_grads` (a DeepSpeedZeroOptimizer instance) with the same arithmetic on the
    device: a non-finite or negative (DeepSpeed's invalid marker) norm scales the gradients by 1/inf as
    DeepSpeed's does, a finite one by 1 / max(1, norm / clip). Returns whether it was patched (other optimizers
    are left alone)."""
    if type(opt).__name__ != "DeepSpeedZeroOptimizer" or not all(
            hasattr(opt, a) for a in ("unscale_and_clip_grads", "clip_grad", "loss_scale")):
        return False

    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        if opt.clip_grad == 0.0 and opt.loss_scale == 1.0:
            return
        combined = opt.loss_scale
        if opt.clip_grad > 0.0:
            ref = grad_groups_flat[0][0] if isinstance(grad_groups_flat[0], list) else grad_groups_flat[0]
            norm = torch.as_tensor(total_norm, dtype=torch.float32, device=ref.device)
            norm = torch.where(torch.isfinite(norm) & (norm >= 0), norm, torch.full_like(norm, float("inf")))
            combined = torch.clamp((norm / opt.loss_scale + 1e-6) / opt.clip_grad, min=1.0) * opt.loss_scale
        for grad in grad_groups_flat:
            for g in grad if isinstance(grad, list) else [grad]:
                g.data.mul_(1.0 / combined)

    opt.unscale_and_clip_grads = unscale_and_clip_grads
    return True
