"""[7] The training loop for every stage: teacher (CoT SFT), student (KaVa from a store), online (paper), nocot.

Usage (the entry point is jobs/train.py; this is its body):
    trainer = Trainer(cfg, dist)      # model + LoRA, data, store check, DeepSpeed engine, resume
    trainer.run()                     # loop, logging, checkpoints, final adapter export
    trainer.close()

Stages:
    teacher  CE on CoT + answer                                  -> adapter/ = the teacher the cache build loads
    student  student_ce*CE + alpha_codi*CODI + alpha_kv*KV, targets streamed from cfg.store.path
             (the store's fingerprint must equal cache_fingerprint(cfg); CODI-/PCCoT-style = alpha_kv/alpha_codi 0)
    online   the paper's joint step: teacher pass with grad every step, targets evicted on the fly
    nocot    CE on the answer right after the question

Rank 0 logs each loss term (mean over the micro-batches of the steps since the last log, averaged over ranks),
lr (the one the step used), grad norm (before clipping), samples/s, tokens/s (real teacher-sequence tokens) to
out_dir/metrics.jsonl and TensorBoard (out_dir/tb), with a progress bar (steps/s, ETA). Checkpoints every
`train.save_every` steps and at the end; `train.stop_at_step` ends early with a checkpoint (resume later).
Testing hook: env KAVA_FAULT_KILL_AT_STEP=N makes every rank SIGKILL itself after step N is logged/saved
(cache_store/faults.py holds every fault hook).
"""
from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist

from cache_store import faults
from cache_store.read_workers import ReadWorkers
from kava_dist import engine as E
from kava_dist.backbone import add_lora, load_adapter, load_backbone
from kava_dist.config import KavaConfig, save_config
from kava_dist.example_map import ExampleMap
from kava_dist.guard import Refusal
from kava_dist.fused import apply_fused
from kava_dist.loader import StoreLoader, TokenLoader, align_store, plan_for, read_processes
from kava_dist.prompts import check_data_file, collate, encode_examples, load_examples_for, load_training_set
from kava_dist.run import RunDir
from kava_dist.student import cot_removed_at
from kava_dist.targets import open_targets

log = logging.getLogger(__name__)


def fmt_eta(seconds: float) -> str:
    """12s, 3m05s, 2h07m."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: KavaConfig, dist: E.Dist):
        self.cfg, self.dist = cfg, dist
        tc = cfg.train
        if tc.stop_at_step < 0 or tc.keep_checkpoints < 0 or tc.save_every < 0 or tc.log_every < 1:
            raise ValueError("train.stop_at_step, train.keep_checkpoints and train.save_every must be >= 0 and "
                             "train.log_every >= 1.")
        self.rd = RunDir(tc.out_dir)
        E.check_shared_out_dir(self.rd.root)   # before any rank reads the run: one view of out_dir on every node
        ckpt_latest = self.rd.checkpoints / "latest"
        if not tc.resume and ckpt_latest.exists():
            raise FileExistsError(f"{self.rd.root} already holds a run (checkpoint {ckpt_latest.read_text().strip()}). "
                                  "Pass --resume to continue it, or choose a new train.out_dir.")
        check_data_file(cfg.data.train_path)                                       # fail fast, before the model
        self.reader = open_targets(cfg) if tc.stage == "student" else None    # fail fast, before the model
        if dist.is_main:
            self.rd.root.mkdir(parents=True, exist_ok=True)
        seed_everything(tc.seed)
        self.bf16 = E.use_bf16(tc, dist.device)
        mcfg = replace(cfg.model, dtype="bfloat16" if self.bf16 else "float32")
        model, self.tokenizer, self.special = load_backbone(mcfg, latent=cfg.latent, device=dist.device)
        init = cfg.model.student_init_adapter if tc.stage in ("student", "online", "nocot") else ""
        model = load_adapter(model, init, trainable=True) if init else add_lora(model, self.special, cfg.lora, cfg.latent)
        fused = apply_fused(model, cfg.model.fused_kernels, dist.device, tc.zero_stage)
        if dist.is_main:
            log.info("student passes: model.fused_kernels=%s -> %s", cfg.model.fused_kernels, fused)
        encoded, report = load_training_set(cfg.data, self.tokenizer)
        self.cot_tokens = max((len(e.cot_ids) for e in encoded), default=0)   # the CoT curriculum removes these
        if dist.is_main:
            log.info("data: %s", report.summary())
            (self.rd.root / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        if self.reader is not None:
            items, rows, info = align_store(self.reader, encoded)
            if dist.is_main:
                log.info("store %s (fingerprint %s): %s", cfg.store.path, self.reader.fingerprint, info)
            self.plan = plan_for(tc, items, dist.world_size)
            procs = read_processes(tc.loader_read_processes, dist.device)
            source = ReadWorkers(self.reader, procs) if procs else self.reader
            if dist.is_main:
                log.info("store reads: %s (train.loader_read_processes=%d)",
                         f"{procs} worker processes per rank" if procs else "threads of the training process",
                         tc.loader_read_processes)
            self.loader = StoreLoader(source, items, rows, self.plan, dist.rank, self.special.pad,
                                      switch_interval_ms=tc.loader_switch_interval_ms)
            self.example_map = ExampleMap.of([e.id for e in items], rows)
        else:
            self.example_map = ExampleMap.of([e.id for e in encoded])
            self.plan = plan_for(tc, encoded, dist.world_size)
            self.loader = TokenLoader(encoded, self.plan, dist.rank, self.special.pad)
        if dist.is_main:
            log.info("batches: train.group_by_length=%d; padding is %.1f%% of the padded %s length (epoch 0)%s",
                     tc.group_by_length, 100 * self.plan.padding_fraction(0),
                     "teacher" if tc.stage in ("teacher", "online") else "question + answer",
                     "" if tc.group_by_length > 1 else "; train.group_by_length=N > 1 groups global batches by length")
        accum = E.accumulation(tc, dist.world_size)
        assert accum == self.plan.accum and tc.micro_batch * accum * dist.world_size == tc.global_batch
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * self.plan.steps_per_epoch))
        if tc.resume:   # before the engine: a run whose examples changed is refused cheaply
            self.example_map.check_resume(self.rd.root)
        self.module = E.StageModule(model, tc.stage, self.special, cfg)
        # at another world size: a universal checkpoint, which the engine must be built for
        resume = E.plan_resume(self.rd.root, cfg) if tc.resume else None
        self.engine = E.build_engine(self.module, tc, self.total_steps, dist,
                                     load_universal=bool(resume and resume.universal))
        self.start_step = 0
        if resume is not None:
            self.start_step, _ = E.load_checkpoint(self.engine, self.rd.root, cfg, resume)
            log.info("resumed %s at step %d of %d%s", self.rd.root, self.start_step, self.total_steps,
                     f" from {resume.load_tag} (written by {resume.saved_world} processes, resharded to "
                     f"{dist.world_size})" if resume.universal else "")
        if dist.is_main:   # only now: a refused resume must not overwrite the run's config
            save_config(cfg, self.rd.config)
        self.valid_acc = None
        self.valid = self._valid_batches() if tc.eval_every else []
        self.tb = None
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.rd.tb), purge_step=self.start_step + 1 if self.start_step else None)
            log.info("stage=%s global batch %d = micro %d x accumulation %d x world %d; %d steps (%.2f epochs of %d "
                     "examples), ZeRO-%d, %s", tc.stage, tc.global_batch, tc.micro_batch, accum, dist.world_size,
                     self.total_steps, self.total_steps / max(1, self.plan.steps_per_epoch), self.plan.n_items,
                     tc.zero_stage, "bf16" if self.bf16 else "fp32")

    # ----------------------------------------------------------------------------- steps

    def _valid_batches(self) -> list:
        """This rank's share of the validation micro-batches (data.valid_path, at most eval.limit or 256 rows)."""
        d = self.cfg.data
        if not d.valid_path:
            log.warning("train.eval_every=%d but data.valid_path is empty: no validation loss is logged.",
                        self.cfg.train.eval_every)
            return []
        n_acc = self.cfg.eval.valid_questions
        examples, _ = load_examples_for(d.valid_path, d, max(self.cfg.eval.limit or 256, n_acc))
        enc, _ = encode_examples(examples, self.tokenizer, d.answer_prompt, d.drop_last_step, d.max_tokens)
        if n_acc:   # decoded for the accuracy curve: this rank's share of the first n_acc questions
            if self.cfg.train.zero_stage == 3:
                raise ValueError("eval.valid_questions decodes with the full weights on every rank, which ZeRO-3 "
                                 "partitions: set eval.valid_questions=0 or train.zero_stage=2.")
            by_id = {e.id: e for e in examples}
            share = enc[:n_acc][self.dist.rank::self.dist.world_size]
            self.valid_acc = ([by_id[e.id] for e in share], share)
        enc = enc[:self.cfg.eval.limit or 256]
        mb, world = self.cfg.train.micro_batch, self.dist.world_size
        chunks = [enc[i:i + mb] for i in range(0, len(enc), mb)]
        mine = [(collate(c, self.special.pad), 1.0) for c in chunks[self.dist.rank::world]]
        # equal batch counts on every rank (ZeRO-3 gathers parameters collectively): pad with weight-0 repeats
        while len(mine) < math.ceil(len(chunks) / world):
            mine.append((collate(chunks[0], self.special.pad), 0.0))
        return mine

    @torch.no_grad()
    def _validate(self, step: int) -> dict:
        """Mean loss terms on the validation set (student stage: the answer CE, no targets for it)."""
        self.engine.eval()
        sums: dict[str, float] = {}
        for batch, w in self.valid:
            terms = self.engine(batch.to(self.dist.device), None)   # student: the answer CE only (no targets)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(batch) * w
            sums["_n"] = sums.get("_n", 0.0) + len(batch) * w
        if self.valid_acc is not None:
            from kava_dist.evaluate import MODES, correct_flags

            exs, enc = self.valid_acc
            flags = correct_flags(E.unwrap(self.engine), self.tokenizer, self.special, self.cfg, exs, enc,
                                  MODES[self.cfg.train.stage], self.cfg.eval.batch_size) if enc else []
            sums["accuracy"], sums["_acc_n"] = float(sum(flags)), float(len(flags))
        self.engine.train()
        acc = (sums.pop("accuracy", None), sums.pop("_acc_n", None))
        keys = sorted(k for k in sums if k != "_n")
        if tdist.is_initialized() and self.dist.world_size > 1:
            # every rank needs the same key list: the first rank's terms decide (all run the same stage)
            obj = [keys]
            tdist.broadcast_object_list(obj, src=0)
            keys = obj[0]
        vals = torch.tensor([sums.get(k, 0.0) for k in keys] + [acc[0] or 0.0, acc[1] or 0.0, sums.get("_n", 0.0)],
                            dtype=torch.float64, device=self.dist.device)
        if tdist.is_initialized() and self.dist.world_size > 1:
            tdist.all_reduce(vals)
        n = max(1.0, float(vals[-1]))
        rec = {f"valid/{k}": float(v) / n for k, v in zip(keys, vals[:-3])}
        if acc[1] is not None:
            rec["valid/accuracy"], rec["valid/questions"] = float(vals[-3]) / max(1.0, float(vals[-2])), int(vals[-2])
        if self.dist.is_main and rec:
            log.info("step %d validation: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in rec.items()))
        return rec

    # ----------------------------------------------------------------------------- logging

    def _prepare_metrics(self) -> None:
        """Fresh run: start metrics.jsonl anew. Resumed run: drop lines past the checkpoint's step."""
        if not self.dist.is_main or not self.rd.metrics.exists():
            return
        if not self.start_step:
            self.rd.metrics.unlink()
            return
        keep = [ln for ln in self.rd.metrics.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= self.start_step]
        self.rd.metrics.write_text("".join(ln + "\n" for ln in keep))

    def _log(self, step: int, sums: dict, n_micro: int, n_steps: int, tokens: int, dt: float, lr: float,
             gn: float, extra: dict) -> dict:
        keys = sorted(sums)
        dev = self.dist.device
        vals = torch.stack([sums[k].to(dev, torch.float64) / n_micro for k in keys]
                           + [torch.tensor(float(tokens), dtype=torch.float64, device=dev)])
        if tdist.is_initialized() and self.dist.world_size > 1:
            tdist.all_reduce(vals)
            vals[:-1] /= self.dist.world_size
        vals = vals.tolist()
        rec = {"step": step, "examples_seen": step * self.cfg.train.global_batch,
               "epoch": step / max(1, self.plan.steps_per_epoch), "lr": lr, "grad_norm": gn}
        rec.update({k: float(v) for k, v in zip(keys, vals[:-1])})
        if self.cfg.latent.cot_curriculum_steps and self.cfg.train.stage in ("student", "online"):
            rec["cot_removed"] = self.module.cot_removed if self.module.cot_removed is not None else self.cot_tokens
        rec.update(samples_per_s=n_steps * self.cfg.train.global_batch / dt, tokens_per_s=vals[-1] / dt,
                   steps_per_s=n_steps / dt, time=time.time(), **extra)
        if self.dist.is_main:
            with open(self.rd.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k if "/" in k else f"train/{k}", v, step)
        return rec

    # ----------------------------------------------------------------------------- loop

    def run(self) -> list[dict]:
        from tqdm.auto import tqdm

        tc = self.cfg.train
        accum = self.plan.accum
        end = min(self.total_steps, tc.stop_at_step) if tc.stop_at_step else self.total_steps
        tty = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not self.dist.is_main or not tty,
                   desc=f"train[{tc.stage}]", unit="step", dynamic_ncols=True)
        fault = faults.kill_at_step()
        self._prepare_metrics()
        history: list[dict] = []
        sums: dict[str, torch.Tensor] = {}
        tokens, n_steps, t0 = 0, 0, time.perf_counter()
        lr, gn, saved = float("nan"), float("nan"), self.start_step
        limit_s, t_start, final = 60.0 * tc.time_limit_min, time.perf_counter(), self.total_steps
        self.engine.train()
        curriculum = tc.stage in ("student", "online") and self.cfg.latent.cot_curriculum_steps > 0
        for step, micro, batch, targets in self.loader.iterate(self.start_step, end):
            if curriculum:   # a function of the step alone, so a resumed run continues the schedule
                self.module.cot_removed = cot_removed_at(step, self.cfg.latent.cot_curriculum_steps, self.cot_tokens)
            tokens += batch.num_tokens
            batch = batch.to(self.dist.device, non_blocking=True)     # pinned by the loader: no host stall
            if targets is not None:   # int8/int4 store: the quantised parts move, dequantised on the device
                targets = targets.to(self.dist.device, non_blocking=True)
            terms = self.engine(batch, targets)
            self.engine.backward(terms["loss"])
            for k, v in terms.items():
                v = v.detach().float()
                sums[k] = sums[k] + v if k in sums else v
            if micro == accum - 1:
                lr = float(self.engine.get_lr()[0])              # the lr this step applies
                gn = E.grad_norm(self.engine, tc.zero_stage)
            self.engine.step()
            if micro < accum - 1:
                continue
            gn_step = gn if not math.isnan(gn) else self.engine.get_global_grad_norm()   # a device tensor: no sync
            done, n_steps = step + 1, n_steps + 1
            time_up = bool(limit_s) and done < end and done % tc.log_every == 0 and self._agree(
                time.perf_counter() - t_start > limit_s)
            evaluate = bool(tc.eval_every and self.valid and (done % tc.eval_every == 0 or done == self.total_steps
                                                              or time_up))
            if done % tc.log_every == 0 or done == end or evaluate or time_up:
                gn = float(gn_step) if gn_step is not None else float("nan")       # read only when logged
                rec = self._log(done, sums, accum * n_steps, n_steps, tokens, time.perf_counter() - t0, lr, gn,
                                self._validate(done) if evaluate else {})
                history.append(rec)
                bad_norm = gn_step is not None and not (math.isfinite(gn) and gn >= 0)   # DeepSpeed marks -1
                if not tc.skip_nonfinite_steps and (not math.isfinite(rec["loss"]) or bad_norm):
                    raise FloatingPointError(
                        f"step {done}: loss {rec['loss']} / grad norm {gn} is not finite. Resume from the last "
                        f"checkpoint in {self.rd.root} with a lower train.lr, or set train.skip_nonfinite_steps=true "
                        "to have such steps skipped.")
                post = dict(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", gnorm=f"{gn:.3g}",
                            samples_s=f"{rec['samples_per_s']:.1f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.set_postfix(post)
                if self.dist.is_main and not tty:        # what the bar shows on a terminal: rate and ETA too
                    rate = (done - self.start_step) / max(time.perf_counter() - t_start, 1e-9)
                    log.info("step %d/%d %s steps_s=%.3g eta=%s", done, self.total_steps,
                             " ".join(f"{k}={v}" for k, v in post.items()), rate, fmt_eta((end - done) / rate))
                sums, tokens, n_steps, t0 = {}, 0, 0, time.perf_counter()
            bar.update(1)
            if tc.save_every and done % tc.save_every == 0 and done < self.total_steps:
                self._save(done)
                saved = done
            faults.maybe_kill_after_step(done, fault)
            if time_up:
                final = done
                if self.dist.is_main:
                    log.info("train.time_limit_min=%g reached at step %d of %d (%d examples seen): finishing the run "
                             "here", tc.time_limit_min, done, self.total_steps, done * tc.global_batch)
                    warm = E.warmup_steps(self.total_steps, tc.warmup_ratio, tc.warmup_steps)
                    if done < warm:
                        log.warning("the run stopped inside its %d-step warm-up: the lr reached %.3g of train.lr=%g. "
                                    "Set train.warmup_steps to fewer steps than the time limit allows (or lower "
                                    "train.max_steps, from which train.warmup_ratio counts).", warm, lr, tc.lr)
                    elif tc.lr_schedule == "wsd":
                        log.warning("the run stopped before its wsd decay ended: the lr was still %.3g (train.lr=%g). Set "
                                    "train.max_steps to the steps the time limit allows (this run: %d).", lr, tc.lr,
                                    done)
                break
        bar.close()
        if final < self.total_steps:   # ended by train.time_limit_min: a finished run at step `final`
            if saved != final and tc.final_checkpoint:
                self._save(final)
            self._export(final)
            return history
        if end < self.total_steps:
            if saved != end:
                self._save(end)
            if self.dist.is_main:
                log.info("stopped at step %d of %d (train.stop_at_step); continue with --resume", end, self.total_steps)
            return history
        if tc.final_checkpoint and (saved != self.total_steps
                                    or not (self.rd.checkpoints / f"global_step{self.total_steps}").exists()):
            self._save(self.total_steps)
        self._export(self.total_steps)
        return history

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (ranks' clocks differ; all must stop at the same step)."""
        if not (tdist.is_initialized() and self.dist.world_size > 1):
            return flag
        t = torch.tensor([float(flag)], device=self.dist.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def _export(self, step: int) -> None:
        tc = self.cfg.train
        meta = {"stage": tc.stage, "step": step, "examples_seen": step * tc.global_batch,
                "planned_steps": self.total_steps, "base": self.cfg.model.name_or_path,
                "global_batch": tc.global_batch, "world_size": self.dist.world_size, "zero_stage": tc.zero_stage}
        E.export_trainable(self.engine, self.tokenizer, self.rd.adapter, meta, tc.zero_stage)
        if self.dist.is_main:
            log.info("done: adapter at %s", self.rd.adapter)

    def _save(self, step: int) -> None:
        tc = self.cfg.train
        if self.dist.is_main:   # the map goes in before DeepSpeed writes `latest`
            self.example_map.save(self.rd.checkpoints / f"global_step{step}")
        E.save_checkpoint(self.engine, self.rd.root, step, self.cfg,
                          {"stage": tc.stage, "example_map": self.example_map.summary()}, keep=tc.keep_checkpoints)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
