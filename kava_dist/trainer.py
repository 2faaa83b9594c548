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
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as tdist

from kava_dist import engine as E
from kava_dist.backbone import add_lora, load_adapter, load_backbone
from kava_dist.config import KavaConfig, save_config
from kava_dist.loader import GlobalBatchPlan, StoreLoader, TokenLoader
from kava_dist.prompts import encode_examples, load_examples
from kava_dist.run import RunDir
from kava_dist.step import nocot_step, offline_step, online_step, teacher_step

log = logging.getLogger(__name__)


class FingerprintError(ValueError):
    """The store was built for other targets than this config describes."""


def open_store_checked(cfg: KavaConfig):
    """Open cfg.store.path and refuse it unless its fingerprint equals this config's cache_fingerprint()."""
    from cache_store.reader import StoreReader
    from kava_dist.fingerprint import cache_fingerprint, diff_fields

    if not cfg.store.path:
        raise ValueError("train.stage=student needs store.path: build it first with `python -m jobs.build_cache`.")
    reader = StoreReader(cfg.store.path, storage_options=cfg.store.storage_options or None, verify=cfg.store.verify)
    digest, fields = cache_fingerprint(cfg)
    if reader.fingerprint != digest:
        diff = diff_fields(reader.fingerprint_fields or {}, fields)
        raise FingerprintError(
            f"store {cfg.store.path} holds targets for another config (fingerprint {reader.fingerprint} != {digest}); "
            f"differing fields (store != config): {'; '.join(diff) or 'format'}. Train with the settings the store "
            "was built with, or build a new store for these.")
    if len(reader) == 0:
        raise ValueError(f"store {cfg.store.path} has no published shards yet; wait for the build or rerun it.")
    return reader


class Trainer:
    def __init__(self, cfg: KavaConfig, dist: E.Dist):
        self.cfg, self.dist = cfg, dist
        tc = cfg.train
        self.rd = RunDir(tc.out_dir)
        if dist.is_main:
            self.rd.root.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.rd.config)
        torch.manual_seed(tc.seed)
        self.bf16 = E.use_bf16(tc, dist.device)
        mcfg = replace(cfg.model, dtype="bfloat16" if self.bf16 else "float32")
        model, self.tokenizer, self.special = load_backbone(mcfg, latent=cfg.latent, device=dist.device)
        init = cfg.model.student_init_adapter if tc.stage in ("student", "online") else ""
        model = load_adapter(model, init, trainable=True) if init else add_lora(model, self.special, cfg.lora, cfg.latent)
        examples, report = load_examples(cfg.data.train_path, cfg.data.cot_style, cfg.data.numeric_answer, cfg.data.limit)
        encoded, report = encode_examples(examples, self.tokenizer, cfg.data.answer_prompt, cfg.data.drop_last_step,
                                          cfg.data.max_tokens, report)
        if dist.is_main:
            log.info("data: %s", report.summary())
            (self.rd.root / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        if tc.stage == "student":
            self.reader = open_store_checked(cfg)
            n_items = len(self.reader)
        else:
            self.reader, n_items = None, len(encoded)
        self.plan = GlobalBatchPlan(n_items, tc.global_batch, tc.micro_batch, dist.world_size, tc.seed)
        if self.reader is not None:
            self.loader = StoreLoader(self.reader, {e.id: e for e in encoded}, self.plan, dist.rank, self.special.pad)
        else:
            self.loader = TokenLoader(encoded, self.plan, dist.rank, self.special.pad)
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * self.plan.steps_per_epoch))
        self.engine = E.build_engine(model, tc, self.total_steps, dist)
        self.start_step = 0
        if tc.resume:
            self.start_step, _ = E.load_checkpoint(self.engine, self.rd.root, cfg)
            log.info("resumed at step %d", self.start_step)
        self.tb = None
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.rd.tb))
            log.info("stage=%s global_batch=%d = micro %d x accum %d x world %d; %d steps (%.2f epochs of %d items)",
                     tc.stage, tc.global_batch, tc.micro_batch, self.plan.accum, dist.world_size, self.total_steps,
                     self.total_steps / max(1, self.plan.steps_per_epoch), n_items)

    def _terms(self, batch, targets) -> dict:
        stage, m, sp = self.cfg.train.stage, self.engine, self.special
        if stage == "teacher":
            return teacher_step(m, batch)
        if stage == "nocot":
            return nocot_step(m, batch)
        if stage == "online":
            return online_step(m, batch, sp, self.cfg)
        return offline_step(m, batch, sp, targets, self.cfg)

    def _log(self, step: int, sums: dict, n_micro: int, samples: int, tokens: int, dt: float) -> dict:
        keys = sorted(sums)
        vals = torch.tensor([sums[k] / n_micro for k in keys] + [float(tokens)], dtype=torch.float64)
        if tdist.is_initialized() and self.dist.world_size > 1:
            tdist.all_reduce(vals)
            vals[:-1] /= self.dist.world_size
        rec = {"step": step, "epoch": step / max(1, self.plan.steps_per_epoch), "lr": self.engine.get_lr()[0]}
        gn = self.engine.get_global_grad_norm()
        rec["grad_norm"] = float(gn) if gn is not None else float("nan")
        rec.update({k: float(v) for k, v in zip(keys, vals[:-1])})
        rec.update(samples_per_s=samples / dt, tokens_per_s=float(vals[-1]) / dt, time=time.time())
        if self.dist.is_main:
            with open(self.rd.metrics, "a") as f:
                f.write(json.dumps(rec) + "\n")
            for k, v in rec.items():
                if k not in ("step", "time"):
                    self.tb.add_scalar(f"train/{k}", v, step)
        return rec

    def run(self) -> list[dict]:
        from tqdm.auto import tqdm

        tc = self.cfg.train
        accum = self.plan.accum
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not self.dist.is_main,
                   desc=f"train[{tc.stage}]", unit="step", dynamic_ncols=True)
        history, sums, tokens, t0 = [], {}, 0, time.time()
        if self.dist.is_main and self.start_step == 0 and self.rd.metrics.exists():
            self.rd.metrics.unlink()
        self.engine.train()
        for step, micro, batch, targets in self.loader.iterate(self.start_step, self.total_steps):
            batch = batch.to(self.dist.device)
            terms = self._terms(batch, targets)
            self.engine.backward(terms["loss"])
            self.engine.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            tokens += batch.num_tokens
            if micro < accum - 1:
                continue
            done = step + 1
            if done % tc.log_every == 0 or done == self.total_steps:
                rec = self._log(done, sums, accum, tc.global_batch, tokens, time.time() - t0)
                history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                samples_s=f"{rec['samples_per_s']:.1f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            sums, tokens, t0 = {}, 0, time.time()
            bar.update(1)
            if tc.save_every and done % tc.save_every == 0 and done < self.total_steps:
                E.save_checkpoint(self.engine, self.rd.root, done, self.cfg, {"stage": tc.stage})
        bar.close()
        E.save_checkpoint(self.engine, self.rd.root, self.total_steps, self.cfg, {"stage": tc.stage})
        meta = {"stage": tc.stage, "step": self.total_steps, "base": self.cfg.model.name_or_path}
        E.export_trainable(self.engine, self.tokenizer, self.rd.adapter, meta, tc.zero_stage)
        if self.dist.is_main:
            log.info("done: adapter at %s", self.rd.adapter)
        return history

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
