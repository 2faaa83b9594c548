"""Unit tests (seconds, no DeepSpeed engine): the global-batch plan and loaders, the LR schedule, the generated
DeepSpeed config, the resume checks of load_checkpoint, and the sweep's argument helpers."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from kava_dist import engine as E
from kava_dist.config import ConfigError, load_config, save_config
from kava_dist.loader import GlobalBatchPlan, StoreLoader, TokenLoader, align_store, padded_length, plan_for
from kava_dist.targets import READ_FIELDS
from kava_dist.prompts import Encoded

CPU = torch.device("cpu")


def enc(n: int) -> list[Encoded]:
    return [Encoded(id=100 + i, question_ids=[1, 5 + i % 7], cot_ids=[9] * (1 + i % 3), prompt_ids=[3, 4],
                    answer_ids=[7, 2]) for i in range(n)]


# ----------------------------------------------------------------------------- GlobalBatchPlan


def test_world_and_accumulation_give_the_same_examples_per_step():
    one = GlobalBatchPlan(40, global_batch=8, micro_batch=4, world_size=1, seed=3)
    two = GlobalBatchPlan(40, global_batch=8, micro_batch=4, world_size=2, seed=3)
    four = GlobalBatchPlan(40, global_batch=8, micro_batch=2, world_size=4, seed=3)
    assert (one.accum, two.accum, four.accum) == (2, 1, 1)
    for step in range(12):
        a = np.concatenate(one.micro_indices(step, 0))
        b = np.concatenate([m for r in range(2) for m in two.micro_indices(step, r)])
        c = np.concatenate([m for r in range(4) for m in four.micro_indices(step, r)])
        assert a.tolist() == b.tolist() == c.tolist()
        assert len(set(a.tolist())) == 8


def test_epochs_cover_every_item_once_and_reshuffle():
    plan = GlobalBatchPlan(43, global_batch=8, micro_batch=4, world_size=1, seed=0)
    assert plan.steps_per_epoch == 5                       # the partial last global batch is dropped
    epochs = [np.concatenate([plan.global_indices(e * 5 + s) for s in range(5)]) for e in range(3)]
    for ep in epochs:
        assert len(set(ep.tolist())) == 40 and ep.max() < 43
    assert epochs[0].tolist() != epochs[1].tolist() != epochs[2].tolist()
    assert plan.permutation(1).tolist() == GlobalBatchPlan(43, 8, 4, 2, seed=0).permutation(1).tolist()
    assert plan.permutation(0).tolist() != GlobalBatchPlan(43, 8, 4, 1, seed=1).permutation(0).tolist()


def test_resume_at_step_gives_the_same_tail():
    items = enc(24)
    plan = GlobalBatchPlan(len(items), global_batch=8, micro_batch=2, world_size=2, seed=5)
    for rank in range(2):
        full = [(s, m, b.ids.tolist()) for s, m, b, _ in TokenLoader(items, plan, rank, 0).iterate(0, 7)]
        tail = [(s, m, b.ids.tolist()) for s, m, b, _ in TokenLoader(items, plan, rank, 0, prefetch=0).iterate(4, 7)]
        assert tail == [x for x in full if x[0] >= 4]
        assert [x[:2] for x in full[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]   # accum 2 micro-batches per step


def _padded_cost(plan: GlobalBatchPlan, lengths: np.ndarray, steps: int) -> int:
    """Tokens computed when every micro-batch is padded to its longest row."""
    return sum(int(lengths[m].max()) * len(m) for s in range(steps) for r in range(plan.world_size)
               for m in plan.micro_indices(s, r))


def test_group_by_length_1_keeps_each_global_batch_and_sorts_its_micro_batches():
    lengths = np.random.default_rng(0).integers(20, 200, size=96)
    plain = GlobalBatchPlan(96, 16, 4, 1, seed=2)
    one = GlobalBatchPlan(96, 16, 4, 1, seed=2, group_by_length=1, lengths=lengths)
    two = GlobalBatchPlan(96, 16, 2, 2, seed=2, group_by_length=1, lengths=lengths)
    for step in range(12):                                        # two epochs
        want = sorted(plain.global_indices(step).tolist())
        assert sorted(one.global_indices(step).tolist()) == want == sorted(two.global_indices(step).tolist())
        micro_max = [lengths[m].max() for m in one.micro_indices(step, 0)]
        assert micro_max == sorted(micro_max, reverse=True)       # 1 rank: longest micro-batch first
        # 2 ranks x accumulation 2: micro-step j of both ranks takes neighbouring sorted micro-batches
        r0, r1 = two.micro_indices(step, 0), two.micro_indices(step, 1)
        assert lengths[r0[0]].min() >= lengths[r1[0]].max() >= lengths[r0[1]].min() >= lengths[r1[1]].max()
    assert _padded_cost(one, lengths, 12) < _padded_cost(plain, lengths, 12)


def test_group_by_length_megabatches_cover_the_epoch_and_cut_padding():
    lengths = np.random.default_rng(1).integers(20, 200, size=203)
    plain = GlobalBatchPlan(203, 8, 4, 1, seed=0)
    grouped = GlobalBatchPlan(203, 8, 4, 1, seed=0, group_by_length=5, lengths=lengths)
    assert grouped.steps_per_epoch == 25
    epochs = [np.concatenate([grouped.global_indices(e * 25 + s) for s in range(25)]) for e in range(2)]
    for ep in epochs:
        assert len(set(ep.tolist())) == 200 and ep.max() < 203   # every kept example once per epoch
    assert epochs[0].tolist() != epochs[1].tolist()
    assert grouped.permutation(0).tolist() == GlobalBatchPlan(203, 8, 4, 1, 0, 5, lengths).permutation(0).tolist()
    assert _padded_cost(grouped, lengths, 25) < 0.8 * _padded_cost(plain, lengths, 25)
    # the GPU count changes only which rank runs which micro-batch, never the examples of a step
    two = GlobalBatchPlan(203, 8, 2, 2, seed=0, group_by_length=5, lengths=lengths)
    for step in range(25):
        a = sorted(np.concatenate(grouped.micro_indices(step, 0)).tolist())
        b = sorted(np.concatenate([m for r in range(2) for m in two.micro_indices(step, r)]).tolist())
        assert a == b
    # batches come from sorted megabatches, in shuffled order: no length curriculum over the epoch
    first_len = [lengths[grouped.global_indices(s)].max() for s in range(25)]
    assert first_len != sorted(first_len, reverse=True) and first_len != sorted(first_len)


def test_plan_for_takes_the_stage_length_and_refuses_missing_lengths():
    items = enc(24)
    student = plan_for(load_config(None, ["train.global_batch=8", "train.micro_batch=4"]).train, items, 1)
    online = plan_for(load_config(None, ["train.global_batch=8", "train.micro_batch=4", "train.stage=online"]).train,
                      items, 1)
    assert student.group_by_length == 1
    assert student.lengths.tolist() == [len(e.question_ids) + 4 for e in items]
    assert online.lengths.tolist() == [e.teacher_len for e in items] == [padded_length(e, "online") for e in items]
    off = plan_for(load_config(None, ["train.global_batch=8", "train.micro_batch=4", "train.group_by_length=0"]).train,
                   items, 1)
    assert off.permutation(0).tolist() == GlobalBatchPlan(24, 8, 4, 1).permutation(0).tolist()
    base = ["train.global_batch=8", "train.micro_batch=4", "train.stage=online"]     # CoT lengths differ
    grouped = plan_for(load_config(None, base + ["train.group_by_length=3"]).train, items, 1)
    plain = plan_for(load_config(None, base + ["train.group_by_length=0"]).train, items, 1)
    assert 0 <= grouped.padding_fraction(0) < plain.padding_fraction(0) < 1
    L = plain.lengths[plain.permutation(0)[:24].reshape(-1, 4)]
    assert plain.padding_fraction(0) == pytest.approx(1 - L.sum() / (L.max(1).sum() * 4))
    with pytest.raises(ValueError, match="plan_for"):
        GlobalBatchPlan(24, 8, 4, 1, group_by_length=2)
    with pytest.raises(Exception, match="train.group_by_length=-1 must be >= 0"):
        load_config(None, ["train.group_by_length=-1"])


def test_bad_divisibility_and_too_little_data_are_refused_naming_the_fields():
    with pytest.raises(ValueError, match="train.micro_batch"):
        GlobalBatchPlan(100, global_batch=10, micro_batch=4, world_size=1)
    with pytest.raises(ValueError, match="micro_batch=4 x world size 2"):
        GlobalBatchPlan(100, global_batch=12, micro_batch=4, world_size=2)
    with pytest.raises(ValueError, match="only 6 training examples"):
        GlobalBatchPlan(6, global_batch=8, micro_batch=4, world_size=1)
    with pytest.raises(ValueError, match="rank 2"):
        GlobalBatchPlan(16, 8, 4, 2).micro_indices(0, 2)
    tc = load_config(None, ["train.global_batch=12", "train.micro_batch=4"]).train
    assert E.accumulation(tc, 1) == 3
    with pytest.raises(ValueError, match="train.global_batch=12 is not divisible by train.micro_batch=4 x 2 ranks"):
        E.accumulation(tc, 2)


# ----------------------------------------------------------------------------- StoreLoader


class FakeReader:
    """Rows in a shuffled order (like a length-sorted shard layout), one row per example id."""

    url = "mem://store"

    def __init__(self, ids: list[int]):
        self.ids = np.array(ids, dtype=np.int64)
        self.reads: list[list[int]] = []
        self.fields: list[tuple[str, ...]] = []

    def __len__(self):
        return len(self.ids)

    def read_field(self, name):
        assert name == "example_id"
        return self.ids

    def get_batch(self, rows, fields=None, pin_memory=False):
        self.reads.append(list(rows))
        self.fields.append(tuple(fields))
        ids = torch.from_numpy(self.ids[rows])
        n = len(rows)
        k = ids.view(n, 1, 1, 1, 1).float().expand(n, 2, 1, 3, 4).clone()
        return {"k": k, "v": -k, "valid": torch.ones(n, 2, 1, 3, dtype=torch.bool),
                "codi_h": ids.view(n, 1).float().expand(n, 2).clone(), "example_id": ids}


def test_store_loader_follows_data_order_and_reads_only_the_fields_a_step_uses():
    items = enc(16)
    rng = np.random.default_rng(0)
    stored = [e.id for e in items[:14]]                    # two examples quarantined by the build
    reader = FakeReader(list(rng.permutation(stored)))
    aligned, rows, info = align_store(reader, items)
    assert [e.id for e in aligned] == stored and info["missing_from_store"] == 2
    plan = GlobalBatchPlan(len(aligned), 4, 2, 1, seed=1)
    loader = StoreLoader(reader, aligned, rows, plan, 0, pad_id=0, prefetch=0)
    tok = TokenLoader(aligned, plan, 0, 0, prefetch=0)
    for (s, m, b, t), (_, _, b2, _) in zip(loader.iterate(0, 3), tok.iterate(0, 3)):
        assert b.ids.tolist() == b2.ids.tolist()            # same examples as the online stage
        assert t.k_BLHMD[:, 0, 0, 0, 0].long().tolist() == b.ids.tolist()
        assert t.codi_BLd[:, 0].long().tolist() == b.ids.tolist()
    assert reader.fields == [READ_FIELDS] * len(reader.reads) and "index" not in READ_FIELDS


def test_store_loader_switch_interval_holds_while_reading_and_is_restored():
    """train.loader_switch_interval_ms: the interval the read threads see while the iterator is open (also after an
    error in the loop), and the interpreter's own afterwards; 0 leaves it alone."""
    items = enc(16)
    reader = FakeReader([e.id for e in items])
    aligned, rows, _ = align_store(reader, items)
    plan = GlobalBatchPlan(len(aligned), 4, 2, 1, seed=1)
    before = sys.getswitchinterval()
    seen = []
    real = reader.get_batch

    def spy(*a, **k):                                      # runs on the prefetch thread
        seen.append(sys.getswitchinterval())
        return real(*a, **k)

    reader.get_batch = spy
    assert len(list(StoreLoader(reader, aligned, rows, plan, 0, 0, prefetch=2, switch_interval_ms=0.5)
                    .iterate(0, 3))) == 6
    assert seen and all(x == pytest.approx(0.0005) for x in seen)
    assert sys.getswitchinterval() == before
    with pytest.raises(RuntimeError):
        for _ in StoreLoader(reader, aligned, rows, plan, 0, 0, prefetch=2, switch_interval_ms=0.25).iterate(0, 3):
            raise RuntimeError("a failing step")
    assert sys.getswitchinterval() == before
    seen.clear()
    list(StoreLoader(reader, aligned, rows, plan, 0, 0, prefetch=2).iterate(0, 1))
    assert seen and all(x == before for x in seen)


def test_store_loader_on_a_real_store_gives_each_example_its_own_targets(tmp_path):
    from cache_store import FieldSpec, StoreReader, StoreSpec, StoreWriter

    spec = StoreSpec(fields=(FieldSpec("k", (2, 1, 3, 4), "bfloat16"), FieldSpec("v", (2, 1, 3, 4), "bfloat16"),
                             FieldSpec("valid", (2, 1, 3), "bool"), FieldSpec("codi_h", (2, 8), "bfloat16"),
                             FieldSpec("index", (2, 1, 3), "int16"), FieldSpec("example_id", (), "int64"),
                             FieldSpec("cot_len", (), "int32")), shard_size=4)
    items = enc(14)
    ids = np.random.default_rng(3).permutation([e.id for e in items])           # rows in another order than data
    w = StoreWriter.create_or_open(str(tmp_path / "s"), spec, "fp", {}, num_shards=4)
    for s in range(4):
        part = torch.from_numpy(ids[4 * s:4 * s + 4])
        n = len(part)
        k = part.view(n, 1, 1, 1, 1).float().expand(n, 2, 1, 3, 4).bfloat16()
        w.write_shard(s, {"k": k, "v": -k, "valid": torch.ones(n, 2, 1, 3, dtype=torch.bool),
                          "codi_h": part.view(n, 1, 1).float().expand(n, 2, 8).bfloat16(),
                          "index": torch.zeros(n, 2, 1, 3, dtype=torch.int16), "example_id": part,
                          "cot_len": torch.ones(n, dtype=torch.int32)})
    reader = StoreReader(w.url)
    aligned, rows, _ = align_store(reader, items)
    plan = GlobalBatchPlan(len(aligned), 4, 2, 1, seed=5)
    seen = []
    for prefetch in (0, 3):
        loader = StoreLoader(reader, aligned, rows, plan, 0, pad_id=0, prefetch=prefetch)
        tok = TokenLoader(aligned, plan, 0, 0, prefetch=0)
        got = []
        for (s, m, b, t), (s2, m2, b2, _) in zip(loader.iterate(0, 6), tok.iterate(0, 6)):
            assert (s, m, b.ids.tolist()) == (s2, m2, b2.ids.tolist())           # the online stage's order
            assert t.k_BLHMD[:, 1, 0, 2, 3].float().tolist() == [float(i) for i in b.ids.tolist()]
            assert t.v_BLHMD[:, 0, 0, 0, 0].float().tolist() == [-float(i) for i in b.ids.tolist()]
            assert t.codi_BLd[:, 1, 7].float().tolist() == [float(i) for i in b.ids.tolist()]
            got.append(b.ids.tolist())
        seen.append(got)
    assert seen[0] == seen[1] and len(seen[0]) == 12


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_store_loader_hands_quantised_parts_and_dequantises_after_the_move(tmp_path, scheme):
    """An int8/int4 store: the loader hands over the stored parts (int8/uint8 values + scales, not bf16 K/V), and
    `.to(device)` (what the trainer does) dequantises after the copy, giving the host dequantisation's tensors to
    the last bit."""
    from cache_store import FieldSpec, StoreReader, StoreSpec, StoreWriter
    from kava_dist.loader import QuantizedTargets

    L, H, M, D = 2, 2, 3, 8
    spec = StoreSpec(fields=(FieldSpec("k", (L, H, M, D), "bfloat16", quant=scheme, quant_reduce_axes=(2,)),
                             FieldSpec("v", (L, H, M, D), "bfloat16", quant=scheme, quant_reduce_axes=(3,)),
                             FieldSpec("valid", (L, H, M), "bool"), FieldSpec("codi_h", (L, 8), "bfloat16"),
                             FieldSpec("index", (L, H, M), "int16"), FieldSpec("example_id", (), "int64"),
                             FieldSpec("cot_len", (), "int32")), shard_size=4)
    items = enc(12)
    w = StoreWriter.create_or_open(str(tmp_path / "s"), spec, "fp", {}, num_shards=3)
    g = torch.Generator().manual_seed(0)
    for s in range(3):
        eid = torch.tensor([e.id for e in items[4 * s:4 * s + 4]])
        w.write_shard(s, {"k": torch.randn(4, L, H, M, D, generator=g).bfloat16(),
                          "v": torch.randn(4, L, H, M, D, generator=g).bfloat16(),
                          "valid": torch.rand(4, L, H, M, generator=g) > 0.3,
                          "codi_h": torch.randn(4, L, 8, generator=g).bfloat16(),
                          "index": torch.zeros(4, L, H, M, dtype=torch.int16), "example_id": eid,
                          "cot_len": torch.ones(4, dtype=torch.int32)})
    reader = StoreReader(w.url)
    aligned, rows, _ = align_store(reader, items)
    row_of = dict(zip([e.id for e in aligned], rows.tolist()))
    plan = GlobalBatchPlan(len(aligned), 4, 2, 1, seed=2)
    n = 0
    for dtype in (None, torch.float32):
        loader = StoreLoader(reader, aligned, rows, plan, 0, pad_id=0, prefetch=2, dtype=dtype)
        for _, _, b, qt in loader.iterate(0, plan.steps_per_epoch):
            assert isinstance(qt, QuantizedTargets) and qt.parts["k.q"].dtype in (torch.int8, torch.uint8)
            assert "k" not in qt.parts and qt.parts["k.q"].nbytes <= qt.parts["k.q"].numel()   # 1 byte or less
            t = qt.to(CPU, non_blocking=True)                                    # the trainer's move
            ref = reader.get_batch([row_of[i] for i in b.ids.tolist()], fields=READ_FIELDS)   # host dequantised
            for got, want in ((t.k_BLHMD, ref["k"]), (t.v_BLHMD, ref["v"]), (t.codi_BLd, ref["codi_h"])):
                want = want if dtype is None else want.to(dtype)
                assert got.dtype == want.dtype
                bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
                assert torch.equal(got.view(bits), want.view(bits))
            assert t.valid_BLHM.dtype == torch.bool and torch.equal(t.valid_BLHM, ref["valid"])
            n += len(b)
    assert n == 2 * plan.steps_per_epoch * 4


def test_store_rows_unknown_to_the_data_are_an_error():
    with pytest.raises(KeyError, match="training data does not have"):
        align_store(FakeReader([100, 101, 999]), enc(4))


# ----------------------------------------------------------------------------- schedule and DeepSpeed config


def lrs(total: int, ratio: float, peak: float = 1.0, **schedule) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=peak)
    sched = E.cosine_with_warmup(opt, total, ratio, **schedule)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_with_warmup_values():
    got = lrs(10, 0.2, peak=2.0)                          # warmup = round(0.2 * 10) = 2 steps
    want = [1.0, 2.0] + [1.0 + math.cos(math.pi * k / 8) for k in range(8)]
    assert got == pytest.approx(want)
    assert got[1] == got[2] == max(got) and all(a > b for a, b in zip(got[2:], got[3:]))   # peak, then decay
    assert lrs(4, 0.0) == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_steps():
    got = lrs(10, 0.0, peak=2.0, schedule="wsd", warmup=2, decay=4)
    assert got == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.5, 1.0, 0.5])
    assert lrs(10, 0.0, schedule="wsd")[-3:] == pytest.approx([1.0, 1.0, 0.5])   # default: the last fifth (2 steps)
    with pytest.raises(ValueError, match="train.lr_decay_steps=9.*raise train.max_steps"):
        lrs(10, 0.0, schedule="wsd", warmup=2, decay=9)


@pytest.fixture(scope="module")
def world_of_one():
    """One DeepSpeed/torch.distributed world for this module's engine tests (DeepSpeed keeps its groups across a
    re-init, so the world is made once); the rendezvous variables are undone after (subprocess tests inherit them)."""
    import torch.distributed as tdist

    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(E._free_port())).items():
            mp.setenv(k, v)
        yield E.init_distributed()
        tdist.destroy_process_group()


def test_warmup_steps_replace_the_ratio_in_the_built_engine(world_of_one):
    """train.warmup_steps counts the warm-up in optimizer steps, whatever max_steps is: a run cut by
    train.time_limit_min long before max_steps still reaches its peak lr. Built through E.build_engine, as a run is."""
    from kava_dist.config import TrainConfig

    assert E.warmup_steps(6000, 0.1) == 600 and E.warmup_steps(6000, 0.1, 100) == 100
    tc = TrainConfig(global_batch=2, micro_batch=2, zero_stage=2, precision="fp32", lr=1.0, warmup_ratio=0.1,
                     warmup_steps=4, lr_schedule="constant")
    engine = E.build_engine(torch.nn.Linear(4, 3), tc, total_steps=6000, dist=world_of_one)
    assert engine.get_lr()[0] == pytest.approx(0.25)
    got = [engine.lr_scheduler.lr_lambdas[0](k) for k in range(6)]     # the factor each optimizer step applies
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])     # a ratio of 6000 steps would be 600


def test_read_processes_auto_uses_workers_on_a_cuda_node_only():
    """train.loader_read_processes=-1 (the default): 4 store-read worker processes per rank on a CUDA device with
    >= 8 CPU cores per local rank, threads (0) on CPU or on a node short of cores; N >= 0 is used as given."""
    from kava_dist.loader import read_processes

    assert load_config(None, []).train.loader_read_processes == -1
    assert read_processes(-1, "cuda", cpus=16, local_ranks=1) == 4
    assert read_processes(-1, "cuda", cpus=16, local_ranks=4) == 0
    assert read_processes(-1, "cuda:1", cpus=128, local_ranks=8) == 4
    assert read_processes(-1, "cpu", cpus=128, local_ranks=1) == 0
    assert read_processes(0, "cuda", cpus=128) == 0 and read_processes(2, "cpu") == 2
    with pytest.raises(ConfigError, match="-1 \\(auto\\)"):
        load_config(None, ["train.loader_read_processes=-2"])


def test_deepspeed_config_derives_accumulation_and_precision(tmp_path):
    tc = load_config(None, ["train.global_batch=32", "train.micro_batch=4", "train.zero_stage=3",
                            "train.grad_clip=1.5"]).train
    cfg = E.deepspeed_config(tc, 2, CPU)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (32, 4, 4)
    assert cfg["gradient_clipping"] == 1.5 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] is False                                   # auto on CPU = fp32
    assert E.deepspeed_config(tc, 1, torch.device("cuda"))["bf16"]["enabled"] is True
    tc_bf16 = load_config(None, ["train.precision=bf16"]).train
    assert E.deepspeed_config(tc_bf16, 1, CPU)["bf16"]["enabled"] is True
    tc_fp32 = load_config(None, ["train.precision=fp32"]).train
    assert E.deepspeed_config(tc_fp32, 1, torch.device("cuda"))["bf16"]["enabled"] is False
    assert "zero_force_ds_cpu_optimizer" not in cfg


def test_deepspeed_overlay_merges_and_refuses_owned_keys(tmp_path):
    ov = tmp_path / "ov.json"
    ov.write_text(json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "steps_per_print": 5}))
    tc = load_config(None, ["train.zero_stage=2", f"train.deepspeed_config={ov}"]).train
    cfg = E.deepspeed_config(tc, 1, CPU)
    zo = cfg["zero_optimization"]
    assert zo["stage"] == 2 and zo["offload_optimizer"] == {"device": "cpu"} and zo["contiguous_gradients"] is True
    assert cfg["steps_per_print"] == 5 and cfg["zero_force_ds_cpu_optimizer"] is False
    for bad, msg in [({"train_batch_size": 64}, "train.global_batch"), ({"optimizer": {"type": "Adam"}}, "torch AdamW"),
                     ({"zero_optimization": {"stage": 3}}, "train.zero_stage=3"),
                     ({"zero_optimization": {"offload_param": {"device": "cpu"}}}, "needs ZeRO-3")]:
        ov.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=msg):
            E.deepspeed_config(tc, 1, CPU)
    shipped = load_config(None, ["train.zero_stage=3", "train.deepspeed_config=configs/deepspeed/zero3_offload.json"])
    assert E.deepspeed_config(shipped.train, 1, CPU)["zero_optimization"]["offload_param"]["device"] == "cpu"
    missing = load_config(None, ["train.deepspeed_config=nope.json"]).train
    with pytest.raises(FileNotFoundError, match="configs/deepspeed"):
        E.deepspeed_config(missing, 1, CPU)


# ----------------------------------------------------------------------------- resume checks


class FakeEngine:
    global_rank = 0

    def __init__(self, client):
        self.client, self.loaded = client, []

    def load_checkpoint(self, path, tag, load_module_strict=True):
        self.loaded.append((path, tag, load_module_strict))
        return path, self.client


def fake_checkpoint(run, cfg, step=2, world=1):
    tag = run / "checkpoints" / f"global_step{step}"
    tag.mkdir(parents=True)
    save_config(cfg, tag / "config.yaml")
    (run / "checkpoints" / "latest").write_text(f"global_step{step}")
    torch.manual_seed(123)
    torch.save(E.rng_state(), tag / "rng_rank0.pt")
    return {"step": step, "world_size": world, "rng": E.rng_state()}


def test_load_checkpoint_checks_the_config_and_restores_rng(tmp_path):
    base = ["train.max_steps=8", "train.out_dir=/a", "loss.alpha_kv=1"]
    saved = load_config(None, base)
    client = fake_checkpoint(tmp_path, saved)
    expect = torch.rand(3)                                    # the draw right after the saved RNG state
    # fields in RESUMABLE may change
    ok = load_config(None, base[:1] + ["train.out_dir=/b", "train.save_every=3", "train.resume=true",
                                       "eval.limit=5", "store.verify=true", "train.stop_at_step=4"])
    eng = FakeEngine(client)
    torch.manual_seed(0)
    step, _ = E.load_checkpoint(eng, tmp_path, ok)
    assert step == 2 and eng.loaded[0][1] == "global_step2" and eng.loaded[0][2] is False
    assert torch.equal(torch.rand(3), expect)
    # anything else may not
    for over, field in [("loss.alpha_kv=2", "loss.alpha_kv: 1.0 -> 2.0"), ("train.max_steps=9", "train.max_steps"),
                        ("lora.target_modules=[q_proj]", "lora.target_modules"), ("train.lr=1e-3", "train.lr")]:
        bad = load_config(None, base + [over])
        with pytest.raises(ValueError, match=f"config differs in .*{field.split(':')[0]}"):
            E.load_checkpoint(FakeEngine(client), tmp_path, bad)
    assert E.config_diff(saved, load_config(None, base + ["loss.alpha_kv=2"])) == ["loss.alpha_kv: 1.0 -> 2.0"]


def test_load_checkpoint_errors_name_the_fix(tmp_path):
    cfg = load_config(None, [])
    with pytest.raises(FileNotFoundError, match="no 'latest'"):
        E.load_checkpoint(FakeEngine({}), tmp_path, cfg)
    client = fake_checkpoint(tmp_path, cfg, world=4)
    with pytest.raises(ValueError, match="resume with 4 processes"):
        E.load_checkpoint(FakeEngine(client), tmp_path, cfg)
    (tmp_path / "checkpoints" / "latest").write_text("global_step7")
    with pytest.raises(FileNotFoundError, match="checkpoints present: global_step2"):
        E.load_checkpoint(FakeEngine(client), tmp_path, cfg)


# ----------------------------------------------------------------------------- sweep helpers


def test_sweep_grid_parsing():
    from kava_dist.sweep import parse_grid, run_name, split_values

    assert split_values("0.5,1,2") == ["0.5", "1", "2"]
    assert split_values("[q_proj,v_proj],[q_proj]") == ["[q_proj,v_proj]", "[q_proj]"]
    grid = parse_grid(["loss.alpha_kv=0.5,1,2", "loss.kv_loss=mse,smooth_l1"])
    assert grid == [("loss.alpha_kv", ["0.5", "1", "2"]), ("loss.kv_loss", ["mse", "smooth_l1"])]
    assert run_name(3, [("loss.alpha_kv", "0.5"), ("lora.target_modules", "[q_proj,v_proj]")]) == \
        "003_alpha_kv-0.5_target_modules-q_proj+v_proj"
    from kava_dist.guard import Refusal

    with pytest.raises(Refusal, match="section.key=v1,v2"):
        parse_grid(["loss.alpha_kv"])


def test_zero2_clip_runs_on_device_with_deepspeeds_arithmetic(world_of_one):
    """engine._clip_on_device replaces DeepSpeed's ZeRO-1/2 unscale_and_clip_grads (which syncs the host on
    `bool(norm)`) with the same arithmetic on the device: compared with DeepSpeed's own method on the same grads."""
    from kava_dist.config import TrainConfig

    dist = world_of_one
    model = torch.nn.Linear(4, 3)
    tc = TrainConfig(global_batch=2, micro_batch=2, zero_stage=2, precision="fp32", grad_clip=1.5)
    engine = E.build_engine(model, tc, total_steps=4, dist=dist)
    opt = engine.optimizer
    assert "unscale_and_clip_grads" in vars(opt)                       # patched on the instance
    original = type(opt).unscale_and_clip_grads.__get__(opt)
    g = torch.randn(15)
    for norm in (10.0, 0.5, float("inf"), float("nan"), -1.0):
        a, b = g.clone(), g.clone()
        original([a], torch.tensor(norm))
        opt.unscale_and_clip_grads([b], torch.tensor(norm))
        torch.testing.assert_close(b, a, equal_nan=True)
    assert torch.allclose(b, torch.zeros_like(b)) and not torch.allclose(g, torch.zeros_like(g))  # invalid -> 0


def test_prefetcher_keeps_order_surfaces_errors_and_stops_when_closed():
    """The loader's background reader: items in order, a producer's exception raised in the consumer, and close()
    ends the thread even while it waits on a full queue."""
    import time

    from kava_dist.loader import Prefetcher

    assert list(Prefetcher(lambda i: i * i, range(6), depth=2)) == [0, 1, 4, 9, 16, 25]

    def boom(i):
        if i == 2:
            raise RuntimeError("bad shard 2")
        return i
    it = iter(Prefetcher(boom, range(5), depth=1))
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(RuntimeError, match="bad shard 2"):
        next(it)

    pf = Prefetcher(lambda i: i, range(1000), depth=2)
    assert next(iter(pf)) == 0
    t0 = time.perf_counter()
    pf.close()                                       # the producer is blocked on a full queue
    assert not pf._thread.is_alive() and time.perf_counter() - t0 < 5
