"""The `kava demo` pipeline on CPU: a synthetic task, a tiny Llama, teacher -> Ray cache build -> DeepSpeed
student and No-CoT -> evaluation -> report, each stage timed with an ETA. The entry point is jobs/demo.py
(`kava demo`; its docstring lists the options); this module holds the settings (FULL, QUICK) and the stages.

Usage (from code; `kava demo --quick --out /tmp/demo` is the usual way):
    from argparse import Namespace
    from kava_dist.demo import run_demo
    run_demo(Namespace(out="/tmp/demo", quick=True, model="", gguf="", data="", test="", teacher_steps=0,
                       student_steps=0, seed=0, param=[], overrides=[]))
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("kava.demo")

FULL = dict(task="pointer", hops=3, nodes=6, n_ops=4, ops="+-", cot="results", n_train=12000, n_test=300,
            drop_last=False, teacher_steps=600, student_steps=400, batch=64, latents=4, iterations=4, layers=4,
            hidden=128, teacher_lr=3e-3, student_lr=5e-3, student_lora=False, alpha_kv=30.0, alpha_codi=1.0,
            embed_std=1.0, curriculum=0, log_every=10)
QUICK = dict(FULL, n_train=800, n_test=40, teacher_steps=30, student_steps=6, batch=32, log_every=2)
"""Demo settings; `--param KEY=VALUE` changes one (e.g. `--param hops=4`). task=pointer (hops, nodes) or chain
(n_ops, ops, cot: + and - mod 10; give it latents=7 for its 7 CoT tokens); latents = M, iterations = T."""


# Seconds each stage took in a reference run of the full demo on 2 cores (load average 9 at the start, 1-2 at the
# end, from other jobs), per training step for the training stages and per example for the cache: the demo's ETAs
# scale them by this run's steps and examples and by how much slower than the reference this machine has been so far.
REF_S = dict(data=0.5, base=5.5, teacher_per_step=0.24, cache=10.0, cache_per_example=0.0032, student_per_step=0.33,
             nocot_per_step=0.15, eval=4.3, report=2.1)


class Stages:
    """Times each stage, logs its ETA before it starts and remembers the equivalent command line."""

    def __init__(self, steps: dict[str, int], examples: int):
        self.times: dict[str, float] = {}
        self.steps = steps
        self.examples = examples
        self.spent_ref = 0.0     # reference seconds of the stages done so far

    def expected(self, name: str) -> float:
        """Reference seconds of a stage at this run's step counts."""
        if name in self.steps:
            return REF_S[f"{name}_per_step"] * self.steps[name]
        if name == "cache":
            return REF_S["cache"] + REF_S["cache_per_example"] * self.examples
        return REF_S.get(name, 0.0)

    def speed(self) -> float:
        """How much slower than the reference this machine has been so far (1 before anything ran)."""
        spent = sum(self.times.values())
        return min(max(spent / self.spent_ref, 0.25), 20.0) if self.spent_ref > 10 and spent > 0 else 1.0

    def run(self, name: str, command: str, fn):
        f = self.speed()
        eta = f * self.expected(name)
        left = f * sum(self.expected(k) for k in ORDER[ORDER.index(name):]) if name in ORDER else eta
        what = f"{self.steps[name]} steps, " if name in self.steps else ""
        log.info("== %s ==  (%sexpected ~%.0f s, demo ~%.0f s left; on a cluster: %s)", name, what, eta, left, command)
        t0 = time.time()
        out = fn()
        self.times[name] = time.time() - t0
        self.spent_ref += self.expected(name)
        log.info("== %s done in %.1f s (expected ~%.0f s)", name, self.times[name], eta)
        return out


ORDER = ["data", "base", "teacher", "cache", "student", "nocot", "eval", "report"]


def rescale_embeddings(path: Path, std: float, seed: int) -> None:
    """Redraw the tiny model's token embeddings from N(0, std^2) (PyTorch's nn.Embedding default at std 1), with an
    untied output head. A latent input is the LayerNorm output of kava_prj, of norm ~sqrt(d): with embeddings of
    the same norm the teacher's layers see latents on the scale of the tokens they were trained on."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(torch.randn(emb.shape, generator=gen) * std)
    model.save_pretrained(path)


def student_label(run_dir: Path) -> str:
    """The latent student's row name in the demo's table, from its saved config: "KaVa student", or the
    baseline its loss weights make it ("CODI-style student" with loss.alpha_kv=0, "PCCoT-style student")."""
    from kava_dist.config import load_config
    from kava_dist.report import method_label

    label = method_label(load_config(Path(run_dir) / "config.yaml"))
    return f"{label} student" if label in ("CODI-style", "PCCoT-style") else "KaVa student"


def _train(cfg_dict: dict, overrides: list[str]):
    from kava_dist.config import config_from_dict
    from kava_dist.engine import init_distributed
    from kava_dist.trainer import Trainer

    cfg = config_from_dict(cfg_dict, overrides)
    trainer = Trainer(cfg, init_distributed())
    try:
        return trainer.run()
    finally:
        trainer.close()


def run_demo(args) -> int:
    """The whole demo for parsed `kava demo` arguments (jobs/demo.py); prints and writes the table; returns 0."""
    from kava_dist.synthetic import COT_STYLE

    for k, v in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                     RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled").items():
        os.environ.setdefault(k, v)
    p = dict(QUICK if args.quick else FULL)
    p["teacher_steps"] = args.teacher_steps or p["teacher_steps"]
    p["student_steps"] = args.student_steps or p["student_steps"]
    for kv in args.param:
        k, _, v = kv.partition("=")
        if k not in p:
            raise SystemExit(f"--param {kv}: unknown setting {k!r}; settings: {', '.join(p)}")
        p[k] = type(p[k])(v) if not isinstance(p[k], bool) else v.lower() in ("1", "true", "yes")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from_scratch = not args.model
    st = Stages({"teacher": p["teacher_steps"], "student": p["student_steps"], "nocot": p["student_steps"]},
                p["n_train"])
    if from_scratch and "OMP_NUM_THREADS" not in os.environ:
        # One thread per process: the tiny model gains little from a second one, and on a busy machine two
        # spinning OpenMP threads per process ran a teacher step 8x slower than one (docs/PERFORMANCE.md, the demo section). Ray's cache
        # actor inherits the variable.
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)

    def data():
        from kava_dist.synthetic import make_chain_task, make_pointer_task, write_jsonl

        if args.data and args.test:
            return Path(args.data).resolve(), Path(args.test).resolve()

        def make(n, seed, exclude=None):
            if p["task"] == "pointer":
                return make_pointer_task(n, p["hops"], p["nodes"], seed, exclude)
            if p["task"] == "chain":
                return make_chain_task(n, p["n_ops"], seed, exclude, p["cot"], p["ops"])
            raise SystemExit(f"--param task={p['task']}: use pointer or chain")

        test = make(p["n_test"], args.seed + 1000)      # first, so the training set can leave its maps out
        train = make(p["n_train"], args.seed, exclude={r["question"] for r in test})
        return write_jsonl(train, out / "data/train.jsonl"), write_jsonl(test, out / "data/test.jsonl")

    train_path, test_path = st.run("data", "your dataset files", data)

    def base():
        from kava_dist.tiny import save_tiny_checkpoint

        if args.model:
            return Path(args.model).resolve()
        path = save_tiny_checkpoint(out / "base", family="llama", hidden_size=p["hidden"], num_layers=p["layers"],
                                    num_heads=4, num_kv_heads=2, intermediate_size=3 * p["hidden"], seed=args.seed,
                                    initializer_range=0.1, tie_word_embeddings=not p["embed_std"])
        if p["embed_std"]:
            rescale_embeddings(path, p["embed_std"], args.seed)
        return path

    base_path = st.run("base", "a Hugging Face checkpoint", base)
    common = {
        "model": {"name_or_path": str(base_path), "gguf_file": args.gguf, "dtype": "float32"},
        "latent": {"num_latents": p["latents"], "num_iterations": p["iterations"]},
        "data": {"train_path": str(train_path), "answer_prompt": "The answer is:" if args.model else "A:",
                 "max_tokens": 256,
                 "cot_style": "auto" if args.data else COT_STYLE[p["cot"]],
                 "drop_last_step": bool(args.data) or p["drop_last"]},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.0},
        "loss": {"alpha_kv": p["alpha_kv"], "alpha_codi": p["alpha_codi"]},
        "train": {"global_batch": p["batch"], "micro_batch": p["batch"], "precision": "fp32", "zero_stage": 2,
                  "weight_decay": 0.0, "warmup_ratio": 0.05, "log_every": p["log_every"], "seed": args.seed},
        "eval": {"datasets": [str(test_path)], "batch_size": 100, "max_new_tokens": 8, "cot_max_new_tokens": 64},
        "store": {"path": str(out / "store"), "dtype": "bf16", "shard_examples": 2048},
        "build": {"batch_size": 64, "object_store_mb": 300, "cpus_per_actor": 2},
    }
    extra = list(args.overrides)

    teacher_dir = out / "teacher"
    tcfg = json.loads(json.dumps(common))
    tcfg["train"].update(stage="teacher", out_dir=str(teacher_dir), max_steps=p["teacher_steps"],
                         lr=p["teacher_lr"] if from_scratch else 5e-4)
    if from_scratch:
        tcfg["lora"] = {"enabled": False}
    st.run("teacher", "deepspeed jobs/train.py --config CFG train.stage=teacher", lambda: _train(tcfg, extra))

    # The cache, the student and the baseline all see the teacher: from scratch the teacher *is* the model
    # (a full checkpoint); with a pretrained base it is base + teacher adapter.
    post = json.loads(json.dumps(common))
    if from_scratch:
        post["model"]["name_or_path"] = str(teacher_dir / "adapter")
    else:
        post["model"]["teacher_adapter"] = str(teacher_dir / "adapter")

    def cache():
        import ray

        from kava_dist.build import build_targets
        from kava_dist.config import config_from_dict, save_config

        cfg = config_from_dict(post, extra)
        save_config(cfg, out / "build_config.yaml")
        report = build_targets(cfg)
        print(report.summary, flush=True)
        ray.shutdown()
        if report.exit_code:
            raise RuntimeError("cache build failed; see the log above")

    st.run("cache", "ray job submit --working-dir . -- python -m jobs.build_cache --config CFG", cache)

    scfg = json.loads(json.dumps(post))
    if from_scratch and not p["student_lora"]:
        scfg["lora"] = {"enabled": False}
    ncfg = json.loads(json.dumps(scfg))
    scfg["latent"]["cot_curriculum_steps"] = p["curriculum"]
    scfg["train"].update(stage="student", out_dir=str(out / "student"), max_steps=p["student_steps"],
                         lr=p["student_lr"])
    st.run("student", "deepspeed jobs/train.py --config CFG train.stage=student", lambda: _train(scfg, extra))
    ncfg["train"].update(stage="nocot", out_dir=str(out / "nocot"), max_steps=p["student_steps"], lr=p["student_lr"])
    st.run("nocot", "deepspeed jobs/train.py --config CFG train.stage=nocot", lambda: _train(ncfg, extra))

    runs = {"Full-CoT teacher": teacher_dir, student_label(out / "student"): out / "student", "No-CoT": out / "nocot"}

    def evaluate():
        from kava_dist.evaluate import evaluate_run

        res = {}
        for label, rd in runs.items():
            budgets = tuple(sorted({2, 4, p["latents"], 2 * p["latents"]})) if rd == out / "student" else ()
            res[label] = evaluate_run(rd, [str(test_path)], budgets=budgets, progress=False)
        return res

    results = st.run("eval", "python -m jobs.evaluate --run RUN --datasets FILE", evaluate)

    def report():
        from kava_dist.report import report_runs

        print(report_runs([str(r) for r in runs.values()], out=str(out / "report"), figure_data=str(test_path),
                          figure_examples=8)["tables"])

    st.run("report", "python -m jobs.report RUN...", report)
    table = summary_table(results, runs, out, st.times)
    (out / "demo_table.md").write_text(table)
    gather_report(out, runs, table)
    (out / "demo_summary.json").write_text(json.dumps({"results": results, "times_s": st.times, "params": p},
                                                      indent=1, default=str))
    print("\n" + table)
    return 0


def gather_report(out: Path, runs: dict, table: str) -> Path:
    """out/report/: the demo table, jobs.report's tables.md, and every run's figures and report as <run>_<file>."""
    import shutil

    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    (rep / "demo_table.md").write_text(table)
    for rd in runs.values():
        for f in sorted((rd / "report").glob("*")):
            if f.suffix in (".png", ".md"):
                shutil.copyfile(f, rep / f"{rd.name}_{f.name}")
    return rep


def summary_table(results: dict, runs: dict, out: Path, times: dict) -> str:
    from cache_store.reader import StoreReader

    stats = StoreReader(str(out / "store")).stats()
    lines = ["| method | accuracy (95% CI) | forward passes / question | generated tokens / question | latency ms / question |",
             "|---|---|---|---|---|"]
    for label in runs:
        (summary,) = results[label].values()
        lo, hi = summary["ci95"]
        lines.append(f"| {label} | {100 * summary['accuracy']:.1f}% ({100 * lo:.1f}-{100 * hi:.1f}) | "
                     f"{summary['forward_passes']:.1f} | {summary['generated_tokens']:.1f} | "
                     f"{1e3 * summary['latency_s']:.1f} |")
    lines += ["", f"store: {stats['rows']} examples, {stats['bytes_on_disk'] / 2**20:.2f} MiB on disk, "
                  f"{stats['bytes_per_example']:.0f} bytes/example, compression {stats['compression_ratio']:.2f}x vs raw",
              "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in times.items()]
    lines.append(f"| total | {sum(times.values()):.1f} |")
    return "\n".join(lines) + "\n"
