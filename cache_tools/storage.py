"""Where a cache's bytes live: a local folder (read through mmap, as always) or an fsspec URL
(s3://, gs://, hf://, file://, memory://, ...) read by byte ranges, with a bounded read-ahead.

Object storage is read-only here: a cache is written to a local folder and copied up. Every
integrity check of the reader applies unchanged to remote bytes (the reader verifies them, not
the storage), so this module only moves bytes and counts them.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .format import CacheError

URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# scheme -> the package that implements it, for the one-line "install X" message
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub",
            "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "adl": "adlfs", "http": "aiohttp", "https": "aiohttp"}
READ_AHEAD_ENV = "FASTKD_CACHE_READ_AHEAD"
DEFAULT_READ_AHEAD = 16 << 20      # bytes of upcoming blocks a remote reader may hold (per process)
NO_LATENCY = ("file", "local", "memory")  # schemes with no latency to hide: read-ahead off unless asked
FIRST_READ = 64 << 10              # first range read of a shard: its header and usually its index
MAX_HEADER_BYTES = 100 << 20       # safetensors' own limit on the JSON header
RETRIES = (0.5, 2.0)               # seconds to wait before each retry of a failed remote read


def url_scheme(root) -> str | None:
    """The scheme of a URL (`s3`, `memory`, ...), None for a local path (str or Path)."""
    if not isinstance(root, str):
        return None
    match = URL.match(root)
    return match.group(1).lower() if match else None


def is_url(root) -> bool:
    return url_scheme(root) is not None


def refuse_url_for_writing(root, what: str = "cache-teacher --out") -> None:
    """Writers take a local folder only (atomic renames, fsync, a lock file): refuse a URL clearly."""
    if is_url(root):
        raise CacheError(f"{what} {root}: a cache is written to a local folder, not a URL; write it locally, then "
                         f"copy the folder up (e.g. `aws s3 sync DIR {root}`) and read it with `fastkd train --cache {root}`")


def read_ahead_bytes(value=None, scheme: str | None = None) -> int:
    """The read-ahead budget: `value`, else $FASTKD_CACHE_READ_AHEAD (bytes, or with K/M/G/KiB/MiB/GiB),
    else 16 MiB (0 for file:// and memory://, where fetching ahead only competes with decoding)."""
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


def open_storage(root, storage_options: dict | None = None):
    """LocalStorage for a path, RemoteStorage for a URL (CacheError naming the package a scheme needs)."""
    return RemoteStorage(root, storage_options) if is_url(root) else LocalStorage(root)


class LocalStorage:
    """A cache folder on a local (or mounted) file system; the reader mmaps its shards."""

    local = True

    def __init__(self, root):
        self.root = Path(root)
        self.label = str(self.root)
        self.requests = 0
        self.bytes_read = 0

    def path(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def size(self, name: str) -> int:
        return self.path(name).stat().st_size

    def read_bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        with open(self.path(name), "rb") as fh:
            fh.seek(offset)
            return fh.read(length)


class RemoteStorage:
    """A cache under an fsspec URL, read by byte ranges; `requests` / `bytes_read` count what was
    fetched (per process), so tests and benchmarks can see a resume seek instead of re-reading."""

    local = False

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.label = self.url
        self.scheme = url_scheme(url)
        self.storage_options = dict(storage_options or {})
        self.requests = 0
        self.bytes_read = 0
        self._count_lock = threading.Lock()
        self._sizes: dict[str, dict[str, int]] = {}   # folder -> {file name: size}, one listing per folder
        self._fs = self._base = None
        self._connect()

    def _connect(self) -> None:
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with fastkd's dependencies
            raise CacheError(f"cache {self.label}: reading a URL needs fsspec: pip install fsspec") from None
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
            self._fs, self._base = fsspec.core.url_to_fs(self.url, **self.storage_options)
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
        state["_fs"], state["_count_lock"] = None, None
        state["requests"] = state["bytes_read"] = 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._count_lock = threading.Lock()

    def full_path(self, name: str) -> str:
        return f"{self._base}/{name}"

    def _count(self, nbytes: int, requests: int = 1) -> None:
        with self._count_lock:
            self.requests += requests
            self.bytes_read += nbytes

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

    def _listing(self, folder: str) -> dict[str, int]:
        if folder not in self._sizes:
            path = self.full_path(folder) if folder else self._base
            try:
                entries = self._call(folder or ".", "listing", lambda: self.fs.ls(path, detail=True))
            except FileNotFoundError:
                entries = []
            self._count(0)
            self._sizes[folder] = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                                   for e in entries if e.get("type") == "file"}
        return self._sizes[folder]

    def exists(self, name: str) -> bool:
        folder, _, base = name.rpartition("/")
        return base in self._listing(folder)

    def size(self, name: str) -> int:
        """File size from one listing of its folder (one request for all shards); FileNotFoundError if absent."""
        folder, _, base = name.rpartition("/")
        sizes = self._listing(folder)
        if base not in sizes:
            raise FileNotFoundError(self.full_path(name))
        return sizes[base]

    def read_bytes(self, name: str) -> bytes:
        data = self._call(name, "whole file", lambda: self.fs.cat_file(self.full_path(name)))
        self._count(len(data))
        return data

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a file (fewer when the file is shorter)."""
        if length <= 0:
            return b""
        data = self._call(name, f"bytes {offset}..{offset + length}",
                          lambda: self.fs.cat_file(self.full_path(name), start=offset, end=offset + length))
        self._count(len(data))
        return data

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges of one file; an async file system (s3, gs) fetches them concurrently."""
        if len(ranges) == 1:
            return [self.read_range(name, *ranges[0])]
        path = self.full_path(name)
        out = self._call(name, f"{len(ranges)} ranges", lambda: self.fs.cat_ranges(
            [path] * len(ranges), [o for o, _ in ranges], [o + n for o, n in ranges], on_error="raise"))
        self._count(sum(len(d) for d in out), len(ranges))
        return list(out)


# ----------------------------------------------------------------------------- safetensors by ranges

DTYPES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4",
          "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}


class RangeShardFile:
    """A safetensors file read by byte ranges: the handle interface ShardV1 uses (metadata(),
    keys(), get_tensor()), with a block's tensors staged by one fetch before ShardV1 checks them.

    `head` is the file's first bytes (length prefix + JSON header, often the index too); the header
    is parsed and checked here for impossible offsets, whatever the digests say.
    """

    def __init__(self, storage, name: str, size: int, head: bytes):
        from .shard import CorruptShard

        self.storage, self.name, self.size = storage, name, size
        header_len = int.from_bytes(head[:8], "little")
        self.data_start = 8 + header_len
        try:
            header = json.loads(head[8:self.data_start])
        except (ValueError, RecursionError) as err:
            raise CorruptShard(f"header is not valid JSON ({err})") from None
        if not isinstance(header, dict):
            raise CorruptShard("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise CorruptShard("header __metadata__ is not a map of strings")
        self._meta = meta
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}  # name -> dtype, shape, begin, end
        for key, info in header.items():
            try:
                dtype = np.dtype(DTYPES[info["dtype"]])
                shape = tuple(int(x) for x in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
                if any(x < 0 for x in shape) or not all(isinstance(x, int) for x in info["shape"]):
                    raise ValueError("shape")
            except (KeyError, TypeError, ValueError):
                raise CorruptShard(f"header entry for tensor {key!r} is not valid (dtype, shape, data_offsets)") from None
            if not 0 <= begin <= end or end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise CorruptShard(f"tensor {key} has data_offsets {[begin, end]} that do not fit its shape {list(shape)}")
            self.tensors[key] = (dtype, shape, begin, end)
        spans = sorted((b, e) for _, _, b, e in self.tensors.values())
        position = 0
        for begin, end in spans:  # the tensors tile the data section exactly, as safetensors requires
            if begin != position:
                raise CorruptShard("tensor data_offsets overlap or leave a hole")
            position = end
        if self.data_start + position != size:
            raise CorruptShard(f"header describes {self.data_start + position} bytes, the file has {size}")
        index_end = self.data_start + max([e for k, (_, _, _, e) in self.tensors.items() if not k.startswith("block.")],
                                          default=0)
        if index_end > len(head):  # the index tensors (first in the file) did not fit the first read
            more = storage.read_range(name, len(head), index_end - len(head))
            if len(more) != index_end - len(head):
                raise CorruptShard(f"file ended after {len(head) + len(more)} of {size} bytes (truncated)")
            head += more
        self._head = head
        self._staged: dict[str, bytes] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_staged"] = {}  # memoryviews do not pickle; a worker fetches its own blocks
        return state

    def metadata(self) -> dict:
        return self._meta

    def keys(self) -> list[str]:
        return list(self.tensors)

    def ranges(self, names) -> list[tuple[int, int, list[str]]]:
        """(file offset, length, tensor names) of the contiguous runs covering `names`."""
        runs: list[list] = []
        for name in sorted(names, key=lambda n: self.tensors[n][2]):
            _, _, begin, end = self.tensors[name]
            if runs and runs[-1][1] == begin:
                runs[-1][1] = end
                runs[-1][2].append(name)
            else:
                runs.append([begin, end, [name]])
        return [(self.data_start + b, e - b, names) for b, e, names in runs]

    def fetch(self, names) -> dict[str, bytes]:
        """The bytes of `names` (tensors), one range request per contiguous run (one per block)."""
        runs = self.ranges(names)
        out = {}
        blobs = self.storage.read_ranges(self.name, [(o, n) for o, n, _ in runs]) if runs else []
        for (offset, length, group), blob in zip(runs, blobs):
            if len(blob) != length:
                from .shard import CorruptShard

                raise CorruptShard(f"file ended after {offset + len(blob)} of {self.size} bytes (truncated)")
            view = memoryview(blob)
            for name in group:
                _, _, begin, end = self.tensors[name]
                start = self.data_start + begin - offset
                out[name] = view[start: start + end - begin]
        return out

    def stage(self, parts: dict) -> None:
        """Bytes fetched ahead (a block's tensors): get_tensor takes them instead of reading again."""
        self._staged = dict(parts)

    def get_tensor(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"no tensor {name}")
        dtype, shape, begin, end = self.tensors[name]
        data = self._staged.pop(name, None)
        if data is None:
            start = self.data_start + begin
            if start + (end - begin) <= len(self._head):
                data = memoryview(self._head)[start: start + end - begin]
            else:
                data = self.fetch([name])[name]
        return np.frombuffer(data, dtype).reshape(shape)


def remote_shard_head(storage, name: str, size: int) -> bytes:
    """The first bytes of a remote shard, at least its length prefix and JSON header (one request
    when they fit in FIRST_READ, which for a typical shard also holds its index tensors)."""
    from .shard import CorruptShard

    head = storage.read_range(name, 0, min(size, FIRST_READ))
    if len(head) < 8:
        raise CorruptShard("file is shorter than a safetensors header")
    header_len = int.from_bytes(head[:8], "little")
    if header_len > min(MAX_HEADER_BYTES, size - 8):
        raise CorruptShard(f"header length {header_len} is impossible for this file")
    if len(head) < 8 + header_len:
        head += storage.read_range(name, len(head), 8 + header_len - len(head))
        if len(head) < 8 + header_len:
            raise CorruptShard("file ends inside its header (truncated)")
    return head


def remote_file_digest(storage, name: str, size: int, chunk: int = 8 << 20) -> str:
    """sha256 of a whole remote file, streamed by ranges (shards written before header digests)."""
    import hashlib

    h = hashlib.sha256()
    for offset in range(0, size, chunk):
        h.update(storage.read_range(name, offset, min(chunk, size - offset)))
    return h.hexdigest()


# ----------------------------------------------------------------------------- bounded read-ahead

class ReadAhead:
    """Fetches upcoming items (a block's bytes) in background threads, never holding more than
    `budget` bytes (fetched and in flight together); an item is dropped once taken.

    `take(key, size, load)` returns an item, waiting for its fetch if one is running, loading it
    here otherwise; `want(items)` says which items come next, in order: items no longer wanted are
    dropped and as many of the new ones as the budget allows start fetching.
    """

    def __init__(self, budget: int, threads: int = 4):
        self.budget = int(budget)
        self.threads = threads
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
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fastkd-read-ahead")
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
            with self._lock:
                self.held -= size
            self.hits += 1

    def want(self, items) -> None:
        """`items`: (key, size, load) in the order they will be taken."""
        if self.budget <= 0:
            return
        pool = self._executor()
        items = list(items)
        keep = {key for key, _, _ in items}
        with self._lock:
            for key in [k for k in self._items if k not in keep]:
                size, future = self._items.pop(key)
                future.cancel()
                if future.done():
                    self.held -= size
                else:  # a running fetch still holds its bytes until it ends
                    future.add_done_callback(lambda _f, s=size: self._release(s))
            for key, size, load in items:
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

    def clear(self) -> None:
        self.want([])

    def __getstate__(self):
        return {"budget": self.budget, "threads": self.threads}

    def __setstate__(self, state):
        self.__init__(state["budget"], state["threads"])
