"""One error style for every entry point: a refused job prints one line `error: ... <the fix>` on stderr and
exits 2, before any model or cluster starts where the check allows, and leaves nothing behind.

Usage (in a job's main):
    from jobs._cli import REFUSED, refuse
    try:
        cfg = load_config(args.config, args.overrides)
        ...
    except REFUSED as e:
        return refuse(e)
"""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from cache_store.backend import DiskFull
from cache_store.errors import CorruptShard, FingerprintMismatch, SpecMismatch, StoreNotFound
from kava_dist.config import ConfigError
from kava_dist.guard import Refusal, redact_argv

EXIT_REFUSED = 2

# errors whose message names the cause and the fix (the codebase raises these for user-fixable conditions)
REFUSED = (Refusal, ConfigError, FingerprintMismatch, SpecMismatch, StoreNotFound, CorruptShard, DiskFull,
           FileNotFoundError, FileExistsError, NotADirectoryError, ValueError, KeyError)


def one_line(e: BaseException) -> str:
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def refuse(e: BaseException | str, hint: str = "") -> int:
    """Print `error: MESSAGE[ HINT]` as one line on stderr; return exit code 2."""
    msg = e if isinstance(e, str) else one_line(e)
    print(f"error: {msg}{' ' + hint if hint else ''}", file=sys.stderr, flush=True)
    logging.getLogger("jobs").debug("refused", exc_info=not isinstance(e, str))
    return EXIT_REFUSED


def build_command(config: str | None, overrides: list[str]) -> str:
    """The cache-build command for a training config (train.* overrides dropped, credentials masked)."""
    keep = [o for o in redact_argv(list(overrides)) if not o.startswith("train.")]
    return " ".join(["python -m jobs.build_cache"] + (["--config", config] if config else []) + keep)


def remove_if_new(path: Path, existed: bool) -> None:
    """Remove a directory a refused job created (it held nothing before the job)."""
    if not existed and path.exists():
        shutil.rmtree(path, ignore_errors=True)
