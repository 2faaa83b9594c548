"""Guards every file the project writes: secrets redacted, names confined to their root, full disks named.

Usage:
    from kava_dist.guard import Refusal, confine, redact, write_text, disk_full
    save = redact(to_dict(cfg))                  # storage_options key/secret/token, *password*/*secret*/*token* -> "***"
    path = confine(run / "eval", f"{name}.json", "dataset name")   # Refusal if it would land outside run/eval
    write_text(path, text)                       # temp file + rename; removed on failure; ENOSPC -> Refusal
    raise Refusal("store ... is incomplete ...; finish it with: python -m jobs.build_cache ...")

`Refusal` is the one error type every entry point (jobs/*.py) turns into one line on stderr and exit code 2:
its message names the cause and the fix. Credentials stay usable at run time: only written copies are redacted
(the config in memory, and the environment, still reach fsspec).
"""
from __future__ import annotations

import errno
import os
import re
import uuid
from pathlib import Path
from typing import Any

MASK = "***"
_SECRET_NAME = re.compile(r"password|passwd|secret|credential|(^|_)token$|api_?key|access_?key|private_?key",
                          re.IGNORECASE)
_OPTION_NAME = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)


class Refusal(RuntimeError):
    """A check refused the job; the message names the cause and the fix (entry points: one line, exit code 2)."""


def is_secret(name: str, in_storage_options: bool = False) -> bool:
    """Field names whose values are credentials. Inside storage_options every key/secret/token-like name is;
    elsewhere names such as `password`, `hf_token`, `aws_secret_access_key` (never `max_tokens`)."""
    return bool((_OPTION_NAME if in_storage_options else _SECRET_NAME).search(name))


def redact(obj: Any, _options: bool = False) -> Any:
    """A copy of `obj` (dicts/lists of a config, client_state, summary) with credential values replaced by MASK."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            name = str(k)
            if v not in (None, "", {}, []) and not isinstance(v, (dict, list)) and is_secret(name, _options):
                out[k] = MASK
            else:
                out[k] = redact(v, _options or name == "storage_options")
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, _options) for v in obj)
    return obj


def secret_values(obj: Any, _options: bool = False) -> list[str]:
    """The credential strings inside `obj` (for masking them in free text such as log lines)."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and v and is_secret(str(k), _options):
                out.append(v)
            else:
                out += secret_values(v, _options or str(k) == "storage_options")
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += secret_values(v, _options)
    return out


def confine(root: str | Path, name: str, what: str) -> Path:
    """root/name, refusing a name that is absolute, has '..' parts or otherwise resolves outside `root`."""
    root_r = Path(os.path.abspath(root))
    p = Path(os.path.abspath(root_r / name))
    if Path(name).is_absolute() or ".." in Path(name).parts or not (p == root_r or root_r in p.parents):
        raise Refusal(f"{what} {name!r} would write outside {root_r}; use a plain name (letters, digits, '_', '-', '.').")
    return p


def disk_full(e: BaseException, path: str | Path) -> Refusal | None:
    """A Refusal naming `path` when `e` (or its cause) is ENOSPC, or a C++ stream error on a full disk; else None."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return Refusal(f"disk full at {path}: free space there (or choose another directory) and rerun.")
        seen = seen.__cause__ or seen.__context__
    if "iostream error" in str(e) or "file write failed" in str(e):   # torch.save's C++ writer hides errno
        try:
            st = os.statvfs(Path(path).parent if not Path(path).is_dir() else path)
            if st.f_bavail * st.f_frsize < (64 << 20):
                return Refusal(f"disk full at {path}: free space there (or choose another directory) and rerun "
                               f"({type(e).__name__}: {e}).")
        except OSError:
            pass
    return None


def write_text(path: str | Path, text: str) -> Path:
    """Atomic text write (temp file in the same directory, then rename); the temp file never outlives a failure,
    and a full disk is a Refusal naming the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        full = disk_full(e, path)
        if full is not None:
            raise full from e
        raise
    return path


def redact_override(text: str) -> str:
    """A dotted CLI override ('store.storage_options={key: K, secret: S}', 'x.hf_token=T') with credentials masked,
    for command lines and summaries that are written to disk."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep:
        return text
    parts = key.split(".")
    in_options = "storage_options" in parts[:-1]
    if parts[-1] == "storage_options":
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:
            return f"{key}={MASK}"
        if isinstance(loaded, dict):
            import json

            return f"{key}={json.dumps(redact(loaded, True))}"
        return f"{key}={MASK}" if value else text
    return f"{key}={MASK}" if value and is_secret(parts[-1], in_options) else text


def redact_argv(argv: list[str]) -> list[str]:
    return [redact_override(a) if "=" in a and not a.startswith("-") else a for a in argv]
