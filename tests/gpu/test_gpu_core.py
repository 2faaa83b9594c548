"""Method core on CUDA: hooks match the HF cache in bf16, eviction agrees with CPU, Jacobi == sequential.

Run on a CUDA machine: `python -m pytest tests/gpu -q`.
"""
from __future__ import annotations

import pytest
import torch

from kava_testing import build, make_batch
from kava_dist.backbone import parts
from kava_dist.eviction import evict
from kava_dist.passes import cache_kv
from kava_dist.student import student_forward
from kava_dist.teacher import teacher_forward, teacher_sequence

pytestmark = pytest.mark.gpu


def test_teacher_hooks_bitexact_bf16_cuda(tiny_paths):
    cfg, model, tok, special = build(tiny_paths, "llama", **{"model.dtype": "bfloat16"})
    model = model.cuda().eval()
    batch = make_batch(tok, special)[0].to("cuda")
    with torch.no_grad():
        out = teacher_forward(model, batch)
        ids, mask, pos = teacher_sequence(batch)
        ref = parts(model)[0](input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    Q, C = batch.q_ids.shape[1], batch.cot_ids.shape[1]
    for layer, (k, v) in enumerate(cache_kv(ref.past_key_values)):
        assert torch.equal(out.k_LBHND[layer], k[:, :, Q:Q + C])
        assert torch.equal(out.v_LBHND[layer], v[:, :, Q:Q + C])


def test_evict_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    B, H, G, N, A, D, M = 8, 4, 4, 60, 6, 32, 24
    k, v = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
    q = torch.randn(B, H * G, A, D, generator=g)
    lens = torch.randint(5, N, (B,), generator=g)
    cot = torch.arange(N)[None] < lens[:, None]
    ans = torch.ones(B, A, dtype=torch.bool)
    cpu = evict(k, v, q, cot, ans, M)
    gpu = evict(k.cuda(), v.cuda(), q.cuda(), cot.cuda(), ans.cuda(), M)
    assert torch.equal(cpu.index, gpu.index.cpu()) and torch.equal(cpu.valid, gpu.valid.cpu())


def test_jacobi_equals_sequential_on_cuda(tiny_paths):
    M = 4
    cfg, model, tok, special = build(tiny_paths, "qwen2", **{"latent.num_latents": M, "latent.num_iterations": M})
    model = model.cuda().eval()
    batch = make_batch(tok, special)[0].to("cuda")
    cfg1 = build(tiny_paths, "qwen2", lora=False, **{"latent.num_latents": M, "latent.num_iterations": M + 2})[0]
    with torch.no_grad():
        a = student_forward(model, batch, special, cfg.latent)
        b = student_forward(model, batch, special, cfg1.latent)   # more iterations than M: a fixed point
    torch.testing.assert_close(a.k_BLHMD, b.k_BLHMD, atol=1e-4, rtol=1e-3)


def test_cache_processor_pipelined_on_cuda(tiny_paths, monkeypatch):
    """Shard 2 launched before shard 1 is finished (as a build actor does) gives the same arrays as one shard at
    a time; the arrays land in pinned host memory; a non-finite example is quarantined on the device path."""
    from kava_dist.config import to_dict
    from kava_dist.prompts import Example, encode_examples, split_steps
    from kava_dist.targets import TeacherTargets
    from kava_testing import QUESTIONS, make_cfg

    monkeypatch.setenv("KAVA_BUILD_FAULT", "nan_example:4")
    cfg = make_cfg(tiny_paths["llama"], **{"model.dtype": "bfloat16", "build.batch_size": 2})
    proc = TeacherTargets(to_dict(cfg))
    exs = [Example(id=i, question=q, steps=split_steps(c, "equation"), answer=a) for i, (q, c, a) in enumerate(QUESTIONS)]
    enc, _ = encode_examples(exs, proc.tokenizer, answer_prompt=cfg.data.answer_prompt)
    one, two = enc[:3], enc[3:]
    ref1, ref2 = proc.process(one), proc.process(two)
    l1 = proc.launch(one)
    l2 = proc.launch(two)
    got1, got2 = proc.finish(l1), proc.finish(l2)
    for (a, ia), (b, ib) in ((ref1, got1), (ref2, got2)):
        assert a.keys() == b.keys()
        assert [q["example_id"] for q in ia["quarantined"]] == [q["example_id"] for q in ib["quarantined"]]
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert got1[0]["k"].is_pinned() and not got1[0]["k"].is_cuda
    assert [q["example_id"] for q in got2[1]["quarantined"]] == [4]
    assert 4 not in got2[0]["example_id"].tolist() and len(got2[0]["example_id"]) == len(two) - 1


def test_loader_pins_batches_for_non_blocking_copies(tiny_paths):
    """With CUDA, micro-batches come out of the loader in page-locked memory; a non-blocking copy is exact."""
    from kava_dist.loader import GlobalBatchPlan, TokenLoader
    from kava_dist.targets import Targets

    cfg, model, tok, special = build(tiny_paths, "llama", lora=False)
    _, enc = make_batch(tok, special)
    loader = TokenLoader(enc, GlobalBatchPlan(len(enc), 4, 2, 1, seed=0), 0, special.pad, prefetch=2)
    _, _, batch, _ = next(iter(loader.iterate(0, 1)))
    assert batch.q_ids.is_pinned() and batch.cot_mask.is_pinned()
    on_gpu = batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.q_ids.cpu(), batch.q_ids)
    t = Targets(torch.randn(2, 2, 2, 4, 8), torch.randn(2, 2, 2, 4, 8), torch.ones(2, 2, 2, 4, dtype=torch.bool),
                torch.randn(2, 2, 16)).pin_memory()
    g = t.to("cuda", dtype=torch.bfloat16, non_blocking=True)
    torch.cuda.synchronize()
    assert g.k_BLHMD.dtype == torch.bfloat16 and g.valid_BLHM.dtype == torch.bool
    assert torch.equal(g.k_BLHMD.cpu(), t.k_BLHMD.to(torch.bfloat16))


def test_read_workers_fill_page_locked_tensors(tmp_path):
    """train.loader_read_processes with CUDA: the worker processes' rows land in page-locked tensors, equal to the
    in-process read, and a non-blocking copy of them is exact."""
    import numpy as np

    from cache_store import FieldSpec, StoreReader, StoreSpec, StoreWriter
    from cache_store.read_workers import ReadWorkers

    spec = StoreSpec(fields=(FieldSpec("k", (2, 3, 4, 8), "bfloat16"), FieldSpec("example_id", (), "int64")),
                     shard_size=8)
    w = StoreWriter.create_or_open(str(tmp_path / "s"), spec, "fp", {}, num_shards=2)
    for s in range(2):
        w.write_shard(s, {"k": torch.randn(8, 2, 3, 4, 8).bfloat16(), "example_id": torch.arange(8) + 8 * s})
    reader = StoreReader(w.url)
    rows = np.array([15, 0, 7, 8, 3])
    with ReadWorkers(reader, processes=2) as workers:
        got = workers.get_batch(rows, pin_memory=True)
    want = reader.get_batch(rows)
    assert all(t.is_pinned() for t in got.values())
    on_gpu = got["k"].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), want["k"]) and torch.equal(got["example_id"], want["example_id"])
