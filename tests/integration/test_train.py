"""Integration tests of the training job on CPU (gloo), with a tiny random Llama and short synthetic data.

Run: python -m pytest tests/integration/test_train.py -m integration -v      (~4-6 min on 2 cores)

Each job runs as its own process, as in production: jobs.build_cache (Ray), jobs.train (one process, or two
under the `deepspeed` launcher), jobs.sweep. What is checked:
  1. the student loss on a cached batch equals the online loss terms on the same batch (same frozen teacher);
  2. one process with accumulation 2 matches two processes under the launcher (ZeRO-2) on the loss curve;
  3. ZeRO-3 (every parameter partitioned) trains and exports an adapter that load_run reloads to the same logits;
  4. a run SIGKILLed after a checkpoint and resumed reproduces the uninterrupted curve (LoRA dropout on: RNG;
     length-grouped batches: train.group_by_length=2);
  5. a store built for other eviction settings is refused, naming the field;
  6. a 2-point sweep checks the store's fingerprint once, runs both, writes summary.md/json.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kava_testing import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
DS = str(Path(sys.executable).with_name("deepspeed"))


def _env(threads: int = 2) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(ROOT))
    return env


def run(cmd: list[str], log: Path, ok: bool = True, env: dict | None = None, timeout: int = 300):
    with open(log, "w") as f:
        p = subprocess.run(cmd, cwd=str(ROOT), env=env or _env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}; log tail:\n{log.read_text()[-4000:]}")
    return p.returncode, log.read_text()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Workspace: tiny checkpoint, 32 short GSM-style rows, the common overrides, and an fp32 store built from
    the base model (the frozen teacher of the student stage = the online teacher at step 0)."""
    from kava_dist.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("train")
    ckpt = save_tiny_checkpoint(root / "tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                initializer_range=0.5)
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(32):
            a, b, c = rng.randint(1, 20), rng.randint(1, 20), rng.randint(2, 5)
            f.write(json.dumps({"question": f"Tom has {a} apples, gets {b} more, then {c} times. How many?",
                                "cot": f"<<{a}+{b}={a + b}>> <<{a + b}*{c}={(a + b) * c}>> <<{(a + b) * c}+0={(a + b) * c}>>",
                                "answer": str((a + b) * c)}) + "\n")
    common = ["--config", "configs/tiny_cpu.yaml", f"model.name_or_path={ckpt}", f"data.train_path={root / 'data.jsonl'}",
              "latent.num_latents=4", "train.global_batch=8", "train.micro_batch=4", "train.zero_stage=2",
              "store.dtype=fp32", "lora.dropout=0.0"]
    store = root / "store"
    run([PY, "-m", "jobs.build_cache", *common, f"store.path={store}", "build.object_store_mb=200"],
        root / "build.log", timeout=400)
    return {"root": root, "ckpt": ckpt, "common": common, "store": store}


@pytest.fixture(scope="module")
def online_run(ws):
    """online stage, ZeRO-2, one process: micro 4 x accumulation 2 = global 8, 3 steps."""
    out = ws["root"] / "online"
    _, text = run([PY, "-m", "jobs.train", *ws["common"], "train.stage=online", "train.max_steps=3",
                   f"train.out_dir={out}"], ws["root"] / "online.log")
    assert "global batch 8 = micro 4 x accumulation 2 x world 1" in text
    return out


@pytest.fixture(scope="module")
def sweep(ws):
    """A 2-point sweep (kv_loss) of 1-step student runs against the one store."""
    out = ws["root"] / "sweep"
    _, text = run([PY, "-m", "jobs.sweep", *ws["common"], "train.stage=student", f"store.path={ws['store']}",
                   "train.max_steps=1", "--grid", "loss.kv_loss=mse,smooth_l1", "--out", str(out)],
                  ws["root"] / "sweep.log", timeout=400)
    return out, text


@pytest.mark.timeout(900)
def test_student_from_store_equals_online_on_the_same_batch(ws, online_run, sweep):
    out, _ = sweep
    stu = metrics(out / "001_kv_loss-smooth_l1")[0]
    onl = metrics(online_run)[0]
    assert stu["step"] == onl["step"] == 1
    for term in ("ce_student", "kv", "codi"):
        assert stu[term] == pytest.approx(onl[term], rel=1e-4), term
    assert stu["kv"] > 0.05 and stu["codi"] > 0.01          # the targets are not trivially matched
    assert stu["loss"] == pytest.approx(onl["loss"] - onl["ce_teacher"], rel=1e-4)   # teacher_ce weight 1


@pytest.mark.timeout(900)
def test_two_processes_under_the_launcher_match_accumulation(ws, online_run):
    out = ws["root"] / "online_ds2"
    _, text = run([DS, "--num_gpus", "2", "--master_port", str(free_port()), "jobs/train.py", *ws["common"],
                   "train.stage=online", "train.max_steps=3", f"train.out_dir={out}"], ws["root"] / "ds2.log",
                  env=_env(threads=1), timeout=400)
    assert "global batch 8 = micro 4 x accumulation 1 x world 2" in text
    one, two = metrics(online_run), metrics(out)
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for term in ("loss", "ce_student", "ce_teacher", "kv", "codi"):
            assert b[term] == pytest.approx(a[term], rel=2e-3), (a["step"], term)
        assert b["lr"] == pytest.approx(a["lr"])
        assert b["grad_norm"] == b["grad_norm"] and b["grad_norm"] > 0      # not NaN
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-4)


ZERO3_DRIVER = r"""
import sys, torch
from jobs.train import setup_logging
from kava_dist import engine as E
from kava_dist.backbone import parts
from kava_dist.config import load_config
from kava_dist.prompts import collate
from kava_dist.teacher import teacher_sequence
from kava_dist.trainer import Trainer
cfg = load_config(sys.argv[1], sys.argv[3:])
dist = E.init_distributed(); setup_logging(dist.rank)
tr = Trainer(cfg, dist); tr.run()
tr.engine.eval()
ids, mask, pos = teacher_sequence(collate(tr.loader.encoded[:4], tr.special.pad))
with torch.no_grad():   # ZeRO-3 gathers each partitioned module's parameters as it runs
    logits = parts(E.unwrap(tr.engine))[0](input_ids=ids, attention_mask=mask, position_ids=pos).logits
torch.save({"logits": logits, "ids": ids, "mask": mask, "pos": pos}, sys.argv[2])
"""


@pytest.mark.timeout(600)
def test_zero3_trains_and_exports_a_reloadable_adapter(ws):
    from safetensors.torch import load_file

    from kava_dist.backbone import load_backbone, parts
    from kava_dist.run import load_run

    overlay = ws["root"] / "zero3_all.json"       # partition every parameter, however small
    overlay.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    out, ref = ws["root"] / "zero3", ws["root"] / "zero3_logits.pt"
    args = [a for a in ws["common"][2:] if not a.startswith("train.zero_stage")]
    _, text = run([PY, "-c", ZERO3_DRIVER, ws["common"][1], str(ref), *args, "train.stage=online", "train.max_steps=2",
                   "train.zero_stage=3", f"train.deepspeed_config={overlay}", f"train.out_dir={out}"],
                  ws["root"] / "zero3.log")
    assert "ZeRO-3" in text
    rec = metrics(out)
    assert len(rec) == 2 and all(r["grad_norm"] == r["grad_norm"] and r["grad_norm"] > 0 for r in rec)
    saved = torch.load(ref)
    cfg, model, _, _ = load_run(out)
    with torch.no_grad():
        got = parts(model)[0](input_ids=saved["ids"], attention_mask=saved["mask"], position_ids=saved["pos"]).logits
    # merged (load_run) vs unmerged LoRA arithmetic: equal up to float rounding
    assert torch.allclose(got, saved["logits"], atol=2e-3, rtol=1e-3), float((got - saved["logits"]).abs().max())
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.numel() > 0 for v in weights.values()) and sum(float(v.norm()) for v in lora_b) > 0
    assert any("trainable_tokens" in k for k in weights) and any("kava_prj" in k for k in weights)
    base, _, _ = load_backbone(cfg.model, latent=cfg.latent)
    with torch.no_grad():
        untrained = base(input_ids=saved["ids"], attention_mask=saved["mask"], position_ids=saved["pos"]).logits
    assert (untrained - saved["logits"]).abs().max() > 5e-2      # the adapter changes the function


@pytest.mark.timeout(900)
def test_killed_and_resumed_run_reproduces_the_curve(ws):
    args = [PY, "-m", "jobs.train", *ws["common"], "train.stage=student", f"store.path={ws['store']}",
            "train.max_steps=4", "train.save_every=2", "lora.dropout=0.1", "train.group_by_length=2"]
    full, cut = ws["root"] / "full", ws["root"] / "cut"
    run(args + [f"train.out_dir={full}"], ws["root"] / "full.log")
    env = _env()
    env["KAVA_FAULT_KILL_AT_STEP"] = "3"                        # SIGKILL after step 3 (checkpoint at 2)
    rc, _ = run(args + [f"train.out_dir={cut}"], ws["root"] / "cut.log", ok=False, env=env)
    assert rc == -9 and (cut / "checkpoints" / "latest").read_text().strip() == "global_step2"
    assert [r["step"] for r in metrics(cut)] == [1, 2, 3]
    rc, text = run(args + [f"train.out_dir={cut}"], ws["root"] / "cut_again.log", ok=False)
    assert rc == 2 and "--resume" in text                       # no silent restart over an existing run
    _, text = run(args + [f"train.out_dir={cut}", "--resume"], ws["root"] / "resume.log")
    assert "resumed" in text and "at step 2 of 4" in text
    a, b = metrics(full), metrics(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for term in ("loss", "ce_student", "kv", "codi", "grad_norm", "lr"):
            assert y[term] == pytest.approx(x[term], rel=1e-6, abs=1e-9), (x["step"], term)
    assert sorted(p.name for p in (cut / "checkpoints").glob("global_step*")) == ["global_step2", "global_step4"]
    assert (cut / "adapter" / "adapter_config.json").exists()
    # the same run with the store read in two worker processes and a shorter switch interval: the same curve
    procs = ws["root"] / "procs"
    run(args + [f"train.out_dir={procs}", "train.loader_read_processes=2", "train.loader_switch_interval_ms=0.5"],
        ws["root"] / "procs.log")
    c = metrics(procs)
    assert [r["step"] for r in c] == [1, 2, 3, 4]
    for x, y in zip(a, c):
        for term in ("loss", "ce_student", "kv", "codi", "grad_norm"):
            assert y[term] == pytest.approx(x[term], rel=1e-6, abs=1e-9), (x["step"], term)


@pytest.mark.timeout(300)
def test_store_with_other_fingerprint_is_refused_naming_the_field(ws):
    from cache_store.errors import FingerprintMismatch
    from kava_dist.config import load_config
    from kava_dist.targets import open_targets

    over = [a for a in ws["common"][2:]] + ["train.stage=student", f"store.path={ws['store']}"]
    assert len(open_targets(load_config("configs/tiny_cpu.yaml", over))) == 32
    with pytest.raises(FingerprintMismatch, match="eviction.lam: 0.1 != 0.5"):
        open_targets(load_config("configs/tiny_cpu.yaml", over + ["eviction.lam=0.5"]))
    rc, text = run([PY, "-m", "jobs.train", *ws["common"], "train.stage=student", f"store.path={ws['store']}",
                    "latent.num_latents=5", f"train.out_dir={ws['root'] / 'refused'}"], ws["root"] / "refused.log",
                   ok=False)
    assert rc == 2 and "latent.num_latents: 4 != 5" in text and "build a new store" in text


@pytest.mark.timeout(900)
def test_sweep_reuses_one_store(ws, sweep):
    out, text = sweep
    assert text.count("matches every grid point") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["store"]["fingerprint"] and summary["grid"] == [["loss.kv_loss", ["mse", "smooth_l1"]]]
    runs = summary["runs"]
    assert [r["grid"]["loss.kv_loss"] for r in runs] == ["mse", "smooth_l1"]
    assert all(r["status"] == "ok" and r["final"]["step"] == 1 and r["final"]["kv"] > 0 for r in runs)
    assert runs[0]["final"]["kv"] != pytest.approx(runs[1]["final"]["kv"])
    table = (out / "summary.md").read_text()
    assert "| 000_kv_loss-mse | mse | ok | 1 |" in table and "smooth_l1" in table
    for r in runs:
        assert summary["store"]["fingerprint"] in (Path(r["run_dir"]) / "train.log").read_text()
    # a grid over a fingerprint field is refused before any run starts
    bad = ws["root"] / "sweep_bad"
    rc, text = run([PY, "-m", "jobs.sweep", *ws["common"], "train.stage=student", f"store.path={ws['store']}",
                    "--grid", "eviction.method=rkv,crop", "--out", str(bad)], ws["root"] / "sweep_bad.log", ok=False)
    assert rc == 2 and "eviction.method: 'rkv' != 'crop'" in text and not bad.exists()


@pytest.mark.timeout(900)
def test_non_finite_loss_stops_the_run_naming_the_fix(ws):
    """train.skip_nonfinite_steps=false (default): a diverged run stops at the next log line, naming what to do."""
    out = ws["root"] / "diverged"
    rc, text = run([PY, "-m", "jobs.train", *ws["common"], "train.stage=student", f"store.path={ws['store']}",
                    "train.lr=1e30", "train.warmup_ratio=0", "train.max_steps=4", "train.log_every=1",
                    f"train.out_dir={out}"], ws["root"] / "diverged.log", ok=False)
    assert rc != 0 and "is not finite" in text and "train.skip_nonfinite_steps=true" in text, text[-3000:]


def test_full_finetune_through_every_stage_with_curves_and_time_limit(ws):
    """lora.enabled=false: a teacher, then student (from the store), online and nocot runs that start from its
    exported weights; each logs the validation accuracy curve (examples seen), and one is cut by
    train.time_limit_min yet exports a run that load_run reloads."""
    from kava_dist.run import load_run

    data = next(a.split("=", 1)[1] for a in ws["common"] if a.startswith("data.train_path="))
    full = ["lora.enabled=false", f"data.valid_path={data}", "train.eval_every=1", "eval.valid_questions=4",
            "train.lr_schedule=constant"]
    teacher = ws["root"] / "full_teacher"
    run([PY, "-m", "jobs.train", *ws["common"], *full, "train.stage=teacher", "train.max_steps=2",
         f"train.out_dir={teacher}"], ws["root"] / "full_teacher.log")
    assert (teacher / "adapter" / "config.json").exists() and not (teacher / "adapter" / "adapter_config.json").exists()
    init = f"model.student_init_adapter={teacher / 'adapter'}"
    for stage, extra in (("student", [f"store.path={ws['store']}", "train.time_limit_min=1e-6", "train.max_steps=50",
                                      "train.final_checkpoint=false", "train.warmup_steps=5",
                                      "latent.soft_tokens=true"]),
                         ("online", ["train.max_steps=2", "latent.cot_curriculum_steps=2"]),
                         ("nocot", ["train.max_steps=2"])):
        out = ws["root"] / f"full_{stage}"
        _, text = run([PY, "-m", "jobs.train", *ws["common"], *full, f"train.stage={stage}", init, *extra,
                       f"train.out_dir={out}"], ws["root"] / f"full_{stage}.log")
        m = metrics(out)
        curve = [r for r in m if "valid/accuracy" in r]
        assert curve and all(0.0 <= r["valid/accuracy"] <= 1.0 and r["valid/questions"] == 4 for r in curve)
        assert [r["examples_seen"] for r in m] == [r["step"] * 8 for r in m]
        meta = json.loads((out / "adapter" / "kava.json").read_text())
        if stage == "online":    # the CoT curriculum: 0 tokens removed at step 0, half of the longest CoT at step 1
            n = max(len(json.loads(ln)["cot"].split()) for ln in open(data))
            assert [r["cot_removed"] for r in m] == [0, m[1]["cot_removed"]] and 0 < m[1]["cot_removed"] < 8 * n
        if stage == "student":   # the time limit ended it at the first step, as a finished run
            assert "train.time_limit_min=1e-06 reached at step 1 of 50" in text
            assert "stopped inside its 5-step warm-up" in text and "Set train.warmup_steps" in text
            assert meta["step"] == 1 and meta["examples_seen"] == 8 and meta["planned_steps"] == 50
            assert not (out / "checkpoints").exists()          # train.final_checkpoint=false
        else:
            assert (out / "checkpoints" / "latest").exists()
        cfg, model, _, _ = load_run(out)
        assert not cfg.lora.enabled and not hasattr(model, "peft_config")
        trained = dict(model.named_parameters())
        from safetensors.torch import load_file
        saved = {}
        for f in sorted((out / "adapter").glob("*.safetensors")):
            saved.update(load_file(str(f)))
        prj = [k for k in saved if k.startswith("kava_prj")]
        assert prj and all(torch.equal(saved[k], trained[k].detach()) for k in prj)
        if stage == "student":   # latent.soft_tokens: the projection's gate (0 at the start) trained and kept
            assert cfg.latent.soft_tokens and float(saved["kava_prj.gate"].abs()) > 0
        assert torch.equal(saved["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])
