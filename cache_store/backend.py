"""Byte-level access to a store root: local directory or any fsspec URL (s3://, gs://, memory://...).

Everything the ledger, claims and checksums need, with the two primitives publication
relies on:

- `write_atomic(rel, data)`: readers see the old or the new object, never a partial one.
  Local: temp file in the same directory + fsync + os.replace. Object stores: one PUT.
- `create_exclusive(rel, data) -> bool`: create-if-absent with full content, False if it
  exists. Local: temp file + os.link (atomic, fails if the name exists; falls back to
  O_CREAT|O_EXCL where hard links are unsupported). S3 (s3fs): conditional PUT
  (If-None-Match: *), atomic on AWS S3 and moto. Other fsspec backends: best effort
  (exists check + write + read back to verify), with a warning.

Nothing is written outside the root: relative paths with '..' or a leading '/' are refused.

Usage::

    from cache_store.backend import open_backend
    be = open_backend("s3://bucket/store", {"endpoint_url": "http://127.0.0.1:5000", "key": "x", "secret": "x"})
    be.create_exclusive("ledger/shard-000001.json", b"{...}")   # True once, then False
    be.list("ledger")                                             # ["shard-000001.json", "store.json"]
"""

from __future__ import annotations

import errno
import logging
import os
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _check_rel(rel: str) -> str:
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"path {rel!r} must be relative to the store root without '.', '..' or empty parts")
    return rel


class DiskFull(OSError):
    """No space left on the device that holds a store object (ENOSPC), named by path."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.ENOSPC, f"disk full at {path}: free space there (or use another store.path) and rerun "
                                       "the same command; finished shards are kept")
        self.path = path


def name_enospc(e: BaseException, path: str) -> BaseException:
    """`e` as DiskFull(path) when it is ENOSPC, else `e` unchanged."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC and not isinstance(e, DiskFull):
        return DiskFull(str(path))
    return e


# errors that say something definite about the object: never retried
_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
              ValueError, TypeError, KeyError)


def with_retries(fn: Any, what: str, attempts: int = 4, base_delay: float = 0.2) -> Any:
    """Call fn(); a transient error (anything but a definite answer such as FileNotFoundError) is retried with
    exponential backoff (base_delay x 2^i); after `attempts` tries the last error is raised, naming `what`."""
    for i in range(attempts):
        try:
            return fn()
        except _PERMANENT:
            raise
        except Exception as e:  # noqa: BLE001 - transient object-store/network errors
            if i == attempts - 1:
                raise OSError(f"{what} failed {attempts} times ({type(e).__name__}: {e}); the object store is "
                              "unreachable or failing: check it and rerun") from e
            delay = base_delay * 2 ** i
            logger.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(e).__name__, e, i + 1,
                           attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def is_local_url(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class Backend(ABC):
    """Byte access relative to a store root."""

    url: str

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """Whole object; FileNotFoundError if absent."""

    def try_read(self, rel: str) -> bytes | None:
        try:
            return self.read_bytes(rel)
        except FileNotFoundError:
            return None

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Objects that exist among `rels` (missing ones omitted)."""
        out = {}
        for r in rels:
            b = self.try_read(r)
            if b is not None:
                out[r] = b
        return out

    @abstractmethod
    def read_ranges(self, reqs: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        """Byte ranges [start, end) of objects, None where the object is missing.
        start < 0 with end None reads the last -start bytes (a suffix)."""

    @abstractmethod
    def write_atomic(self, rel: str, data: bytes) -> None: ...

    @abstractmethod
    def create_exclusive(self, rel: str, data: bytes) -> bool: ...

    @abstractmethod
    def list(self, rel: str) -> list[str]:
        """Sorted base names directly under `rel` (hidden '.'-names skipped); [] if absent."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def zarr_store(self, read_only: bool = False) -> Any: ...

    def describe(self, rel: str = "") -> str:
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def prepare_rewrite(self, rel_dir: str, name_prefix: str) -> None:
        """Drop leftovers of an interrupted write of one shard file (local temp files). Default: nothing."""

    def sync_file(self, rel: str) -> None:
        """Make a written data file durable before it is published. Default: nothing (object stores)."""


class LocalBackend(Backend):
    def __init__(self, url: str) -> None:
        path = url[len("file://"):] if url.startswith("file://") else url
        self.root = Path(os.path.abspath(os.path.expanduser(path)))
        self.url = str(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / _check_rel(rel)

    def read_bytes(self, rel: str) -> bytes:
        return self._p(rel).read_bytes()

    def read_ranges(self, reqs: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(reqs)
        by_file: dict[str, list[int]] = {}
        for i, (rel, _, _) in enumerate(reqs):
            by_file.setdefault(rel, []).append(i)
        for rel, idxs in by_file.items():
            try:
                fd = os.open(self._p(rel), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                size = os.fstat(fd).st_size
                for i in idxs:
                    _, start, end = reqs[i]
                    if start < 0 and end is None:
                        start, end = max(0, size + start), size
                    elif end is None:
                        end = size
                    out[i] = os.pread(fd, end - start, start)
            finally:
                os.close(fd)
        return out

    def _write_tmp(self, path: Path, data: bytes) -> Path:
        """Write `data` to a temp file beside `path`; on any failure the temp file is removed (ENOSPC -> DiskFull)."""
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            raise name_enospc(e, str(path)) from e
        return tmp

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self._p(rel)
        tmp = self._write_tmp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        path = self._p(rel)
        tmp = self._write_tmp(path, data)
        try:
            os.link(tmp, path)  # atomic; EEXIST if the name is taken
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            logger.warning("hard links unsupported under %s; using O_CREAT|O_EXCL", self.root)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def list(self, rel: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self._p(rel)) if not n.startswith("."))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, rel: str) -> bool:
        return self._p(rel).exists()

    def zarr_store(self, read_only: bool = False) -> Any:
        from zarr.storage import LocalStore

        return LocalStore(self.root, read_only=read_only)

    def prepare_rewrite(self, rel_dir: str, name_prefix: str) -> None:
        # zarr's LocalStore writes "<name>.<uuid>.partial" and _write_tmp ".<name>.<uuid>.tmp", then rename;
        # a writer killed in between leaves them. Only the shard's claim holder calls this.
        d = self._p(rel_dir)
        if not d.is_dir():
            return
        for n in os.listdir(d):
            if (n.startswith(name_prefix + ".") and n.endswith(".partial")) or (
                    n.startswith(f".{name_prefix}.") and n.endswith(".tmp")):
                (d / n).unlink(missing_ok=True)

    def sync_file(self, rel: str) -> None:
        """fsync the file and its directory (so the rename zarr did is durable before we publish)."""
        path = self._p(rel)
        for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))):
            try:
                fd = os.open(target, flags)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class FsspecBackend(Backend):
    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.atomic_create = any(p in ("s3", "s3a") for p in protocols)
        if not self.atomic_create:
            logger.warning(
                "%s: backend %s has no known atomic create-if-absent; claims and records use a best-effort "
                "exists-check + read-back. Use one writer per shard explicitly for this backend.", url, protocols,
            )

    def _p(self, rel: str) -> str:
        return f"{self.root}/{_check_rel(rel)}"

    def read_bytes(self, rel: str) -> bytes:
        return with_retries(lambda: self.fs.cat_file(self._p(rel)), f"read of {self.describe(rel)}")

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Objects that exist among `rels`: missing ones omitted; any other error is retried (with_retries),
        then raised -- a transient failure never reads as "absent"."""
        if not rels:
            return {}
        paths = {self._p(r): r for r in rels}
        out: dict[str, bytes] = {}

        def attempt() -> None:
            todo = [p for p, r in paths.items() if r not in out]
            got = self.fs.cat(todo, on_error="return")  # concurrent on async backends (s3fs)
            failed = None
            for k, v in got.items():
                k = k.split("://", 1)[-1]  # fsspec may return keys with or without the protocol
                if k not in paths or isinstance(v, FileNotFoundError):
                    continue
                if isinstance(v, BaseException):
                    failed = v
                else:
                    out[paths[k]] = v
            if failed is not None:
                raise failed

        with_retries(attempt, f"read of {len(rels)} objects under {self.url}")
        return out

    def read_ranges(self, reqs: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        if not reqs:
            return []
        def attempt() -> list[bytes | None]:
            got = self.fs.cat_ranges([self._p(r) for r, _, _ in reqs], [s for _, s, _ in reqs],
                                     [e for _, _, e in reqs], on_error="return")  # concurrent on async backends
            out: list[bytes | None] = []
            for g in got:
                if isinstance(g, FileNotFoundError):
                    out.append(None)
                elif isinstance(g, BaseException):
                    raise g
                else:
                    out.append(bytes(g))
            return out

        return with_retries(attempt, f"ranged read of {len(reqs)} chunks under {self.url}")

    def write_atomic(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._p(rel), data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        path = self._p(rel)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        if self.atomic_create:
            return True
        try:  # best effort: a racing writer may have replaced our bytes
            return self.fs.cat_file(path) == data
        except FileNotFoundError:
            return False

    def list(self, rel: str) -> list[str]:
        path = self._p(rel)
        self.fs.invalidate_cache(path)
        try:
            names = with_retries(lambda: self.fs.ls(path, detail=False), f"listing of {self.describe(rel)}")
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = sorted({n.rstrip("/").rsplit("/", 1)[-1] for n in names})
        return [n for n in out if not n.startswith(".")]

    def exists(self, rel: str) -> bool:
        path = self._p(rel)
        self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    def zarr_store(self, read_only: bool = False) -> Any:
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self.storage_options, read_only=read_only)


def open_backend(url: str, storage_options: dict[str, Any] | None = None) -> Backend:
    """LocalBackend for plain paths / file://, FsspecBackend otherwise."""
    if is_local_url(url):
        if storage_options:
            logger.warning("storage_options ignored for local path %s", url)
        return LocalBackend(url)
    return FsspecBackend(url, storage_options)
