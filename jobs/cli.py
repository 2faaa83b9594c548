"""The `kava` console script: one word per job.

Every job takes `--config FILE` plus positional `section.key=value` overrides (report: run directories; demo: its
options). Usage:
    kava demo [--quick]                       the whole pipeline on CPU (jobs/demo.py)
    kava train --config CFG [k=v ...]         = python -m jobs.train   (the deepspeed launcher runs jobs/train.py)
    kava build-cache --config CFG [k=v ...]   = python -m jobs.build_cache (ray job submit runs the module)
    kava sweep --config CFG --grid k=a,b ...  = python -m jobs.sweep
    kava evaluate --config CFG [k=v ...]      = python -m jobs.evaluate (the run of CFG's train.out_dir; or --run RUN)
    kava matrix --config PLAN [k=v ...]       = python -m jobs.matrix (plan variables: --var name=value)
    kava report RUN...                        = python -m jobs.report
    kava store info|verify PATH               = python -m cache_store
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"demo": "jobs.demo", "train": "jobs.train", "build-cache": "jobs.build_cache", "sweep": "jobs.sweep",
            "evaluate": "jobs.evaluate", "report": "jobs.report", "matrix": "jobs.matrix",
            "store": "cache_store.cli"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    mod = importlib.import_module(COMMANDS[argv[0]])
    rc = mod.main(argv[1:])
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
