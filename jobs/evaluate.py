"""Evaluate a finished run: accuracy (95% Wilson CI), forward passes, tokens, latency and peak memory.

Usage:
    python -m jobs.evaluate --config configs/paper/llama1b_aug.yaml train.out_dir=runs/llama1b_aug --datasets gsm8k
    python -m jobs.evaluate --run runs/llama1b_aug --datasets gsm8k,gsm_hard,svamp --data-dir data --device cuda
    python -m jobs.evaluate --run runs/x --datasets path/to/set.jsonl.gz,mult4x4 --limit 200 --batch-size 32
    python -m jobs.evaluate --run runs/x --datasets gsm8k --budgets 8,16,24,32      # + latent-budget sweep
    python -m jobs.evaluate --run runs/teacher --datasets mult4x4 --cache-probe 24,48   # + teacher from evicted cache

Writes RUN/eval/{dataset}.json (summary + per-question records) and RUN/eval/summary.md; with --budgets also
RUN/eval/budget/M{m}/{dataset}.json and RUN/eval/budget.json (drawn as a heatmap by `python -m jobs.report`);
with --cache-probe (a teacher run) RUN/eval/cache_probe/{dataset}.{eviction}.json and .md (e.g.
mult4x4.rkv-lam0.1-share_none.json): the teacher's accuracy when it answers from its CoT cache evicted to M entries
per head (kava_dist.cache_probe).
The run is `--run DIR`, or, as for every job, `--config FILE` plus `section.key=value` overrides: the run of that
training command (its train.out_dir). Overrides are applied to the run's config.yaml on load (e.g.
model.dtype=float32, eval.max_new_tokens=64; `--set KEY=VALUE` is the same).
The decoding mode follows the run's train.stage: teacher -> Full CoT, student/online -> latent, nocot -> No-CoT.
Names map to `{data-dir}/{name}.test.jsonl.gz`; any path to a file in the shared schema works as well.
The decode loops live in kava_dist.evaluate.
"""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 8,16,24,32), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="run directory (config.yaml + adapter/)")
    ap.add_argument("--config", default="", help="the training config: evaluates its train.out_dir (with the overrides)")
    ap.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides applied to the run's config.yaml on load (same as --set)")
    ap.add_argument("--datasets", default="",
                    help="comma-separated names (gsm8k, gsm_hard, svamp, mult4x4, ...) or file paths; "
                         "default: the config's eval.datasets")
    ap.add_argument("--data-dir", default="data", help="where {name}.test.jsonl.gz files live (default: data/)")
    ap.add_argument("--limit", type=int, default=None, help="first N questions per set (default: eval.limit; 0 = all)")
    ap.add_argument("--batch-size", type=int, default=None, help="questions per batch (default: eval.batch_size)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="tokens to generate (default: eval.max_new_tokens; eval.cot_max_new_tokens for "
                         "teacher runs)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (dtype comes from model.dtype)")
    ap.add_argument("--budgets", type=_ints, default=[],
                    help="also sweep M (latent.num_latents at inference), e.g. 8,16,24,32 (student/online runs)")
    ap.add_argument("--cache-probe", type=_ints, default=[], metavar="M,M",
                    help="teacher runs: also answer from the CoT cache evicted to each M (e.g. 24,48), in the "
                         "teacher's and the student's layouts (kava_dist.cache_probe)")
    ap.add_argument("--cache-probe-only", action="store_true",
                    help="run only the cache probe (e.g. again under --set eviction.method=attention)")
    ap.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied on load, e.g. --set model.dtype=float32 (repeatable)")
    ap.add_argument("--out-dir", default="",
                    help="where the results go (default RUN/eval); give one when --set changes the method, e.g. "
                         "--set latent.num_iterations=3 --out-dir RUN/eval_t3, so the run's own results stay")
    ap.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return ap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and resolve the run: `--run DIR`, or `--config FILE [k=v ...]` -> that config's train.out_dir."""
    ap = build_parser()
    args = ap.parse_intermixed_args(argv)
    args.overrides = list(args.overrides) + list(args.set_overrides)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        ap.error(f"overrides are section.key=value, got {bad}")
    if bool(args.run) == bool(args.config):
        ap.error("give the run to evaluate: --run RUN_DIR, or --config FILE [section.key=value ...] "
                 "(the run of that training command, its train.out_dir)")
    if args.config:
        from kava_dist.config import ConfigError, load_config

        try:
            args.run = load_config(args.config, args.overrides).train.out_dir
        except (ConfigError, OSError) as e:
            ap.error(str(e))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    from kava_dist.evaluate import evaluate_run      # after parsing: --help stays fast (no torch import)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    from jobs._cli import REFUSED, refuse

    try:
        if args.cache_probe_only and not args.cache_probe:
            raise ValueError("--cache-probe-only needs --cache-probe M,M (e.g. --cache-probe 24,48).")
        summaries = {} if args.cache_probe_only else evaluate_run(
            args.run, datasets, data_dir=args.data_dir, device=args.device, batch_size=args.batch_size,
            limit=args.limit, max_new_tokens=args.max_new_tokens, budgets=args.budgets, overrides=args.overrides,
            progress=not args.no_progress, out_dir=args.out_dir or None)
        if args.cache_probe:
            from kava_dist.cache_probe import probe_run

            for name, probe in probe_run(args.run, datasets, args.cache_probe, data_dir=args.data_dir,
                                         device=args.device, batch_size=args.batch_size, limit=args.limit,
                                         overrides=args.overrides, progress=not args.no_progress).items():
                summaries.setdefault(name, {})["cache_probe"] = probe
    except REFUSED as e:   # one line naming the fix, exit code 2
        raise SystemExit(refuse(e)) from None
    for name, s in summaries.items():
        if "ci95" in s:              # absent with --cache-probe-only
            lo, hi = s["ci95"]
            print(f"{name}: {100 * s['accuracy']:.2f}% [{100 * lo:.1f}, {100 * hi:.1f}] of {s['n']}, "
                  f"{s['forward_passes']:.2f} passes/q (prefill {s['prefill_passes']:.0f}), "
                  f"{1000 * s['latency_s']:.1f} ms/q")
        for layout, by_m in s.get("cache_probe", {}).items():
            print(f"{name} cache probe {layout}: " + ", ".join(f"M={m} {100 * r['accuracy']:.1f}%"
                                                             for m, r in by_m.items()))
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
