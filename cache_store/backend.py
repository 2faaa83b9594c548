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
        paths = {rel: str(self._p(rel)) for rel in {r for r, _, _ in reqs}}   # one path check per file
        return _pread_ranges([(paths[rel], s, e) for rel, s, e in reqs])

    def advise_willneed(self, rel: str, ranges: list[tuple[int, int]], gap: int = 64 << 10) -> int:
        """Ask the kernel to start reading these (offset, length) ranges of a file into the page cache
        (posix_fadvise WILLNEED: it returns at once, the reads run in the background). Ranges closer than `gap`
        bytes are merged into one. Returns the calls made (0 where the platform has no posix_fadvise or the file
        is missing)."""
        if not ranges or not hasattr(os, "posix_fadvise"):
            return 0
        merged: list[list[int]] = []
        for off, n in sorted(ranges):
            if merged and off <= merged[-1][1] + gap:
                merged[-1][1] = max(merged[-1][1], off + n)
            else:
                merged.append([off, off + n])
        try:
            fd = os.open(self._p(rel), os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            for a, b in merged:
                os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        return len(merged)

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

    merge_gap = 256 << 10
    """Ranges of one object at most this many bytes apart are fetched by one GET (then sliced): a request costs
    far more than a few hundred KiB of transfer."""

    def read_ranges(self, reqs: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        if not reqs:
            return []
        # coalesce: sorted by (object, start), a range that starts within merge_gap of the open one's end joins it
        spans: list[list] = []      # [rel, start, end, [(req index, start, end)]]
        for i in sorted(range(len(reqs)), key=lambda j: (reqs[j][0], reqs[j][1])):
            rel, s, e = reqs[i]
            last = spans[-1] if spans else None
            if (e is not None and s >= 0 and last is not None and last[0] == rel and last[2] is not None
                    and s <= last[2] + self.merge_gap):
                last[2] = max(last[2], e)
                last[3].append((i, s, e))
            else:
                spans.append([rel, s, e, [(i, s, e)]])

        def attempt() -> list[bytes | None]:
            got = self.fs.cat_ranges([self._p(sp[0]) for sp in spans], [sp[1] for sp in spans],
                                     [sp[2] for sp in spans], on_error="return")  # concurrent on async backends
            out: list[bytes | None] = [None] * len(reqs)
            for sp, g in zip(spans, got):
                if isinstance(g, FileNotFoundError):
                    continue
                if isinstance(g, BaseException):
                    raise g
                for i, s, e in sp[3]:
                    out[i] = bytes(g) if len(sp[3]) == 1 else bytes(g[s - sp[1]:e - sp[1]])
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


class ShardFileCache:
    """Whole data files of a remote store on local disk: one GET per file, then local reads.

    A file is named by the sha256 the store's ledger records for it (content-addressed: a store rebuilt at the same
    URL never reads a stale copy), checked against it on download, written to a temp file and renamed, and
    downloaded by one process of the host at a time (an flock per file), so the ranks of a node share one copy.
    `max_bytes` > 0 bounds the cache: past it, the least recently used files this process knows are deleted
    (a cache smaller than the store re-downloads evicted files: give it the store's size, or leave it off).

    Usage::

        cache = ShardFileCache(remote_backend, "/nvme/kava_cache", max_bytes=400 << 30)
        path = cache.path("k/c/12/0/0/0/0", sha256_hex, nbytes)     # downloads on first use
        cache.prefetch([(rel, sha, nbytes), ...])                   # background downloads (readahead)
    """

    def __init__(self, remote: Backend, cache_dir: str, max_bytes: int = 0, threads: int = 8) -> None:
        from collections import OrderedDict
        from concurrent.futures import ThreadPoolExecutor
        import threading

        self.remote, self.root, self.max_bytes = remote, Path(os.path.expanduser(cache_dir)), int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._disk = LocalBackend(str(self.root))
        self._lock = threading.Lock()
        self._known: OrderedDict[Path, int] = OrderedDict()   # LRU of files this process has used or found
        for p in sorted(self.root.glob("??/*"), key=lambda q: q.stat().st_mtime):
            if not p.name.startswith("."):
                self._known[p] = p.stat().st_size
        self._pending: dict[Path, Any] = {}
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="cache_store-readahead")
        self.downloads = 0
        self.downloaded_bytes = 0

    def _local(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def path(self, rel: str, sha: str, nbytes: int) -> Path:
        """Local copy of `rel` (downloading it whole if this host has none), checked against sha256 `sha`."""
        local = self._local(sha)
        with self._lock:
            fut = self._pending.get(local)
        if fut is not None:
            fut.result()
        if not local.exists():
            self._download(rel, sha, nbytes, local)
        with self._lock:
            self._known[local] = nbytes
            self._known.move_to_end(local)
        return local

    def prefetch(self, items: list[tuple[str, str, int]]) -> None:
        """Start downloading files not on disk yet, in the background (at most `threads` at a time)."""
        for rel, sha, nbytes in items:
            local = self._local(sha)
            with self._lock:
                if local in self._pending or local.exists():
                    continue
                fut = self._pool.submit(self._download, rel, sha, nbytes, local)
                self._pending[local] = fut
                fut.add_done_callback(lambda _f, p=local: self._done(p))

    def _done(self, local: Path) -> None:
        with self._lock:
            self._pending.pop(local, None)

    def _download(self, rel: str, sha: str, nbytes: int, local: Path) -> None:
        import fcntl
        import hashlib

        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local.parent / f".{local.name}.lock", "a+b") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)      # another rank of this host may be fetching it: wait for it
            if local.exists():
                return
            data = self.remote.read_ranges([(rel, 0, nbytes)])[0]  # one GET (a whole-object read may HEAD first)
            if data is None:
                raise FileNotFoundError(f"shard file {self.remote.describe(rel)} is missing; check the store "
                                        "(python -m cache_store verify URL)")
            if len(data) != nbytes or hashlib.sha256(data).hexdigest() != sha:
                raise OSError(f"shard file {self.remote.describe(rel)} does not match its ledger record ({len(data)} "
                              f"bytes, expected {nbytes}); check the store (python -m cache_store verify URL)")
            self._disk.write_atomic(f"{sha[:2]}/{sha}", data)   # temp file + rename; a full disk is DiskFull
        with self._lock:
            self.downloads += 1
            self.downloaded_bytes += nbytes
            self._known[local] = nbytes
            self._known.move_to_end(local)
        self._evict(keep=local)

    def _evict(self, keep: Path) -> None:
        if self.max_bytes <= 0:
            return
        with self._lock:
            total = sum(self._known.values())
            for p in list(self._known):
                if total <= self.max_bytes:
                    break
                if p == keep or p in self._pending:
                    continue
                total -= self._known.pop(p)
                p.unlink(missing_ok=True)

    def read_ranges(self, reqs: list[tuple[Path, int, int | None]]) -> list[bytes | None]:
        """Byte ranges of local copies (paths from `path`), as Backend.read_ranges."""
        return _pread_ranges([(str(p), s, e) for p, s, e in reqs])


def _pread_ranges(reqs: list[tuple[str, int, int | None]]) -> list[bytes | None]:
    """Byte ranges [start, end) of local files (start < 0 with end None: a suffix), one open per file."""
    out: list[bytes | None] = [None] * len(reqs)
    by_file: dict[str, list[int]] = {}
    for i, (path, _, _) in enumerate(reqs):
        by_file.setdefault(path, []).append(i)
    for path, idxs in by_file.items():
        try:
            fd = os.open(path, os.O_RDONLY)
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
