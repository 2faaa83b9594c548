"""Cache build: teacher forward + R-KV eviction of every training example into a Zarr store, on Ray
(kava_dist.build.build_targets; docs/CACHE_BUILD.md).

Usage:
    # one machine, a local Ray started by the job:
    python -m jobs.build_cache --config configs/paper/llama1b_aug.yaml model.teacher_adapter=runs/t/adapter
    # a Ray cluster (`ray start --head` + `ray start --address` on the workers), store on S3 or a shared FS:
    ray job submit --address http://HEAD:8265 --working-dir . -- /path/to/venv/bin/python -m jobs.build_cache \
        --config configs/paper/llama1b_aug.yaml store.path=s3://bucket/kava/llama1b_aug

Plans shards from the data (contiguous chunks, sorted by length inside), skips the shards the store's ledger
already has (so a rerun resumes), and runs one teacher actor per GPU (`build.num_actors`, `build.gpus_per_actor`;
one CPU actor when the cluster has no GPU). The driver shows a progress bar (examples/s with ETA, teacher
tokens/s, shards done/total) and ends with a summary (examples, tokens, bytes, compression, wall time, examples
skipped and why). Reports go to the store's meta/: data_report, build_report, quarantine.

Exit codes: 0 = store complete; 1 = some shard failed after its retries (the others are written; rerun the same
command after fixing the cause); 2 = nothing could be built: the store at store.path belongs to another config
(fingerprint or spec differs; the message names the fields), no example passed the data check, or no actor
could start (the message says why).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("jobs.build_cache")

EXIT_OK, EXIT_SHARDS_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from jobs._cli import REFUSED, refuse
    from kava_dist.build import build_targets
    from kava_dist.config import load_config

    try:
        report = build_targets(load_config(args.config, args.overrides))
    except REFUSED as e:
        return refuse(e)
    print(report.summary, flush=True)
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
