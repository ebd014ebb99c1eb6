"""Where a cache's bytes live, read by byte ranges through one interface: a local folder or an fsspec URL
(read-only: a cache is written locally and copied up); and the bounded read-ahead."""

from __future__ import annotations

import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import CacheError
from .format import MANIFEST, parse_manifest, read_manifest
from .manifest_checks import check_local_paths

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# scheme -> the package that implements it, for the one-line "install X" message
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub",
            "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs", "http": "aiohttp", "https": "aiohttp"}
READ_AHEAD_ENV = "FASTKD_CACHE_READ_AHEAD"
DEFAULT_READ_AHEAD = 16 << 20      # bytes of upcoming blocks a remote reader may hold (per process)
NO_LATENCY = (None, "file", "local", "memory")  # a folder, and schemes with no latency: read-ahead off unless asked
READ_AHEAD_THREADS = 4
RETRIES = (0.5, 2.0)               # seconds to wait before each retry of a failed remote read
_COUNTING = threading.Lock()       # every storage's `requests` / `bytes_read` (read-ahead threads add to them)
os.register_at_fork(after_in_child=lambda: globals().update(_COUNTING=threading.Lock()))  # a forked worker: free


def url_scheme(root) -> str | None:
    """The scheme of a URL (`s3`, `memory`, ...), None for a local path (str or Path)."""
    match = URL.match(root) if isinstance(root, str) else None
    return match.group(1).lower() if match else None


def is_url(root) -> bool:
    return url_scheme(root) is not None


def refuse_url_for_writing(root) -> None:
    """Writers take a local folder only (atomic renames, fsync, a lock file): refuse a URL clearly."""
    if is_url(root):
        raise CacheError(f"cache-teacher --out {root}: a cache is written to a local folder, not a URL; write it "
                         f"locally, then copy the folder up (e.g. `aws s3 sync DIR {root}`) and read it with `fastkd "
                         f"train --cache {root}`")


def read_ahead_bytes(value=None, scheme: str | None = None) -> int:
    """The read-ahead budget: `value`, else $FASTKD_CACHE_READ_AHEAD (bytes, or with K/M/G/KiB/MiB/GiB),
    else 16 MiB (0 for a folder, file:// and memory://, where fetching ahead only competes with decoding)."""
    if value is None:
        value = os.environ.get(READ_AHEAD_ENV)
        if value is None or not value.strip():
            return 0 if scheme in NO_LATENCY else DEFAULT_READ_AHEAD
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        number = int(value)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(i?b)?\s*", str(value), re.IGNORECASE)
        if not match:
            raise CacheError(f"{READ_AHEAD_ENV}={value!r}: expected a byte count such as 67108864 or 64MiB")
        number = int(match.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    if number < 0:
        raise CacheError(f"read-ahead budget {value!r}: must be >= 0 bytes")
    return number


def count_read(storage, nbytes: int, requests: int = 1) -> None:
    """Add `requests` reads of `nbytes` in all to a storage's counts (from any thread)."""
    with _COUNTING:
        storage.requests += requests
        storage.bytes_read += nbytes


def open_storage(root, storage_options: dict | None = None):
    """LocalStorage for a path, RemoteStorage for a URL (CacheError naming the package a scheme needs)."""
    return RemoteStorage(root, storage_options) if is_url(root) else LocalStorage(root)


class LocalStorage:
    """A cache folder on a local (or mounted) file system, read by byte ranges like RemoteStorage."""

    scheme = None

    def __init__(self, root):
        self.root = Path(root)
        self.label = str(self.root)
        self.requests = self.bytes_read = 0   # what was read, per process (as RemoteStorage counts it)

    def manifest(self) -> dict:
        """manifest.json, read and checked (format.read_manifest: the folder's own messages); a folder it names
        may not be a symlink leading outside the cache (object storage has no symlinks)."""
        manifest = read_manifest(self.root)
        check_local_paths(self.root, manifest, f"cache {self.label}: manifest.json")
        return manifest

    def list(self, folder: str) -> dict[str, int]:
        """File name -> size of the files in `folder` (empty when there is none)."""
        path = self.root / folder
        return {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()} if path.is_dir() else {}

    def size(self, name: str) -> int:
        return (self.root / name).stat().st_size

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        return self.read_ranges(name, [(offset, length)])[0]

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges of one file, through one open file."""
        with open(self.root / name, "rb") as fh:
            out = []
            for offset, length in ranges:
                fh.seek(offset)
                out.append(fh.read(max(length, 0)))
        count_read(self, sum(map(len, out)), len(ranges))
        return out


class RemoteStorage:
    """A cache under an fsspec URL, read by byte ranges; `requests` / `bytes_read` count what was
    fetched (per process), so tests and benchmarks can see a resume seek instead of re-reading."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.label = url.rstrip("/")
        self.scheme = url_scheme(url)
        self.storage_options = dict(storage_options or {})
        self.requests = self.bytes_read = 0
        self._sizes: dict[str, dict[str, int]] = {}   # folder -> {file name: size}, one listing per folder
        self._fs = self._base = None
        self._connect()

    def _connect(self) -> None:
        import fsspec   # a dependency of fastkd, imported when a URL is read
        try:
            fsspec.get_filesystem_class(self.scheme)
        except ImportError:
            package = PACKAGES.get(self.scheme, f"the fsspec implementation of {self.scheme}://")
            raise CacheError(f"cache {self.label}: {self.scheme}:// needs the package {package}: pip install {package} "
                             f"(or pip install 'fastkd[remote]')") from None
        except ValueError:
            raise CacheError(f"cache {self.label}: fsspec knows no file system for {self.scheme}://; give a local "
                             f"folder or a URL such as s3://bucket/cache") from None
        try:
            self._fs, self._base = fsspec.core.url_to_fs(self.label, **self.storage_options)
        except ImportError as err:
            raise CacheError(f"cache {self.label}: {self.scheme}:// needs a package that is missing ({err}): "
                             f"pip install {PACKAGES.get(self.scheme, 'it')}") from None
        except Exception as err:  # noqa: BLE001 - bad options, credentials, endpoint
            raise CacheError(f"cache {self.label}: cannot open the file system ({type(err).__name__}: {err}); "
                             f"check the URL and its credentials") from None
        self._base = self._base.rstrip("/")

    @property
    def fs(self):
        if self._fs is None:
            self._connect()
        return self._fs

    def __getstate__(self):
        """Picklable (DataLoader workers): the file system is reopened from the URL in the child."""
        state = dict(self.__dict__)
        state["_fs"] = None
        state["requests"] = state["bytes_read"] = 0
        return state

    def full_path(self, name: str) -> str:
        return f"{self._base}/{name}"

    def _call(self, name: str, what: str, fn):
        """Run one file-system call, retried on transient errors; CacheError naming the file otherwise."""
        for attempt in range(len(RETRIES) + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as err:  # noqa: BLE001 - network, credentials, throttling
                if attempt < len(RETRIES) and not isinstance(err, (PermissionError, IsADirectoryError)):
                    time.sleep(RETRIES[attempt])
                    continue
                raise CacheError(f"cache {self.label}: cannot read {name} ({what}; {type(err).__name__}: {err}); "
                                 f"check the URL, credentials and network, then run again (train: --resume)") from None

    def list(self, folder: str) -> dict[str, int]:
        """File name -> size of the files in `folder` (one listing per folder, kept: read it, do not change it)."""
        if folder not in self._sizes:
            path = self.full_path(folder) if folder else self._base
            try:
                entries = self._call(folder or ".", "listing", lambda: self.fs.ls(path, detail=True))
            except FileNotFoundError:
                entries = []
            count_read(self, 0)
            self._sizes[folder] = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                                   for e in entries if e.get("type") == "file"}
        return self._sizes[folder]

    def manifest(self) -> dict:
        """manifest.json, read and checked (format.parse_manifest)."""
        try:
            data = self.read_bytes(MANIFEST)
        except FileNotFoundError:
            raise CacheError(f"cache {self.label}: no manifest.json (not a cache, a mistyped URL, or a copy still "
                             f"being uploaded: upload manifest.json last)") from None
        return parse_manifest(data, self.label)

    def size(self, name: str) -> int:
        """File size from one listing of its folder (one request for all shards); FileNotFoundError if absent."""
        folder, _, base = name.rpartition("/")
        sizes = self.list(folder)
        if base not in sizes:
            raise FileNotFoundError(self.full_path(name))
        return sizes[base]

    def read_bytes(self, name: str) -> bytes:
        data = self._call(name, "whole file", lambda: self.fs.cat_file(self.full_path(name)))
        count_read(self, len(data))
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a file (fewer when the file is shorter)."""
        if length <= 0:
            return b""
        data = self._call(name, f"bytes {offset}..{offset + length}",
                          lambda: self.fs.cat_file(self.full_path(name), start=offset, end=offset + length))
        count_read(self, len(data))
        return data

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges of one file; an async file system (s3, gs) fetches them concurrently."""
        if len(ranges) == 1:
            return [self.read_range(name, *ranges[0])]
        path = self.full_path(name)
        out = self._call(name, f"{len(ranges)} ranges", lambda: self.fs.cat_ranges(
            [path] * len(ranges), [o for o, _ in ranges], [o + n for o, n in ranges], on_error="raise"))
        count_read(self, sum(len(d) for d in out), len(ranges))
        return list(out)


class ReadAhead:
    """Fetches the items `want(items)` names next in background threads, never holding more than `budget`
    bytes; `take(key, load)` returns one (waiting for its fetch, or loading it here) and drops it."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._lock = threading.RLock()   # a done-callback may run in the thread holding it
        self._items: dict[object, tuple[int, Future]] = {}   # key -> (size, future), in wanted order
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self.held = 0          # bytes fetched or being fetched
        self.peak = 0          # the most `held` ever was
        self.hits = 0          # takes served by a fetch started ahead
        self.misses = 0        # takes that had to load on the spot

    def _executor(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():  # a forked child: the parent's threads do not exist here
            self._items, self._pool, self.held, self._pid = {}, None, 0, os.getpid()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=READ_AHEAD_THREADS, thread_name_prefix="fastkd-read-ahead")
        return self._pool

    def take(self, key, load):
        with self._lock:
            entry = self._items.pop(key, None) if self._pid == os.getpid() else None
        if entry is None:
            self.misses += 1
            return load()
        size, future = entry
        try:
            return future.result()
        finally:
            self._release(size)
            self.hits += 1

    def want(self, items) -> None:
        """`items`: (key, size, load) in the order they will be taken; the first ones within the budget are kept."""
        if self.budget <= 0:
            return
        pool = self._executor()
        wanted, total = [], 0
        for item in items:
            total += item[1]
            if total > self.budget:
                break
            wanted.append(item)
        keep = {key for key, _, _ in wanted}
        with self._lock:
            for key in [k for k in self._items if k not in keep]:
                size, future = self._items.pop(key)
                future.cancel()   # released now if done (or cancelled), else when the running fetch ends
                future.add_done_callback(lambda _f, s=size: self._release(s))
            for key, size, load in wanted:
                if key in self._items:
                    continue
                if self.held + size > self.budget:
                    break
                self.held += size
                self.peak = max(self.peak, self.held)
                self._items[key] = (size, pool.submit(load))

    def _release(self, size: int) -> None:
        with self._lock:
            self.held -= size

    def __reduce__(self):   # a copy (a DataLoader worker's) starts with nothing fetched
        return ReadAhead, (self.budget,)
