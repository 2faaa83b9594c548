"""Small helpers shared by the cache_store modules, and by kava_dist and jobs (JSON, dict flattening and diffs,
byte sizes, process identity). Nothing here knows about models.

Usage::

    from cache_store._util import diff_fields, canonical_json, flatten, format_bytes
    diff_fields({"a": {"b": 1}}, {"a": {"b": 2}})   # {"a.b": (1, 2)}
    flatten({"a": {"b": 1}, "c": 2})                # {"a.b": 1, "c": 2}
    format_bytes(1536)                              # '1.5 KiB'; format_bytes(1536, base=1000) -> '1.5 KB'
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, fixed separators, trailing newline)."""
    return (json.dumps(obj, sort_keys=True, indent=1, separators=(",", ": ")) + "\n").encode()


def json_roundtrip(obj: Any, what: str) -> Any:
    """Normalise `obj` the way it will read back from JSON (tuples -> lists); fail if not JSON."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable (str/int/float/bool/None/list/dict): {e}") from e


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": 2} -> {"a.b": 1, "c": 2}; non-dict leaves (lists too) kept whole."""
    if not isinstance(d, dict):
        return {prefix or "<value>": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def format_bytes(n: float, base: int = 1024, digits: int = 1) -> str:
    """A byte count in the largest unit below it (KiB, MiB, ... for base 1024; KB, MB, ... for base 1000), with
    `digits` decimals; counts under one kilo print as whole bytes."""
    units = ("B", "KiB", "MiB", "GiB", "TiB") if base == 1024 else ("B", "KB", "MB", "GB", "TB")
    i = 0
    while abs(n) >= base and i < len(units) - 1:
        n, i = n / base, i + 1
    return f"{int(n)} B" if i == 0 else f"{n:.{digits}f} {units[i]}"


_MISSING = "<missing>"


def diff_fields(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between `old` and `new` -> (old value, new value)."""
    a, b = flatten(old), flatten(new)
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _MISSING), b.get(key, _MISSING)
        if va != vb:
            out[key] = (va, vb)
    return out


def format_diff(diff: dict[str, tuple[Any, Any]], left: str = "store", right: str = "config") -> str:
    """'eviction.lam (store 0.1 != config 0.0), ...'"""
    return ", ".join(f"{k} ({left} {va!r} != {right} {vb!r})" for k, (va, vb) in diff.items())


def hostname() -> str:
    return socket.gethostname()


def _proc_stat(pid: int) -> list[bytes] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command name, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :].split()
    except (OSError, ValueError):
        return None


def pid_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None  # field 22 overall
    except (ValueError, IndexError):
        return None


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True if `pid` runs on this host (and, if given, started at `start_time`)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat(pid)
    if fields and fields[0] in (b"Z", b"X"):
        return False  # killed, not yet reaped by its parent
    if start_time is not None:
        now = pid_start_time(pid)
        if now is not None and now != start_time:
            return False  # pid was reused by another process
    return True
