"""Shared pieces of the cache format: the record type, the errors, the manifest on disk (read, checked, written)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CacheError, ManifestWriteError
from .integrity import SEAL_KEY, seal
from .manifest_checks import FORMAT_NAME, FORMAT_VERSION, _short, check_manifest_fields, check_seal

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
LOCK = ".lock"
# manifest keys the writer owns; a caller's settings may not use them
RESERVED_KEYS = ("format", "format_version", "fastkd_version", "complete", "shards", "counts", "summary",
                 "created", "updated", SEAL_KEY)


@dataclass
class CachedSequence:
    """One cached sequence: its tokens and the teacher signal at its loss positions only (row j: the j-th
    masked token; n = loss_mask.sum()). Sampled mode: ids -1 / log-prob -inf / count 0 mark unused slots."""

    record_index: int
    task: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail: np.ndarray
    counts: np.ndarray | None = None
    hidden: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def num_loss_positions(self) -> int:
        return int(np.asarray(self.loss_mask).sum())


def jsonable(value):
    """Settings as plain JSON (tuples -> lists, paths -> str, numpy scalars -> python, NaN and infinities -> None)."""
    def default(obj):
        if isinstance(obj, (np.generic, np.ndarray)):
            return obj.tolist()
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(f"value {obj!r} of type {type(obj).__name__} cannot be stored in the manifest")
    return json.loads(json.dumps(value, default=default, sort_keys=True), parse_constant=lambda _: None)  # NaN -> null


def settings_differences(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """(key path, old value, new value) for every place where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            out.extend(settings_differences(old.get(key, "<absent>"), new.get(key, "<absent>"), sub))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out.extend(settings_differences(a, b, f"{path}[{i}]"))
        return out
    if old != new or isinstance(old, bool) != isinstance(new, bool):
        return [(path or "<root>", old, new)]
    return []


def fsync_dir(path: Path) -> None:
    """fsync a folder (its new entries), where the file system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the folder; on
    any failure (disk full) the temporary file is removed, `path` is untouched and the OSError raised."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_manifest(root: Path, manifest: dict) -> None:
    """Atomically write the manifest, sealed with the digest of its own content; a failed write (disk
    full) is a ManifestWriteError naming the cache, with the previous manifest.json left in place."""
    text = json.dumps(seal(manifest), indent=1, sort_keys=False, allow_nan=False)
    try:
        atomic_write_bytes(Path(root) / MANIFEST, (text + "\n").encode())
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise ManifestWriteError(
            f"cache {root}: cannot write {MANIFEST} ({reason}); the previous {MANIFEST} is kept unchanged: free "
            f"space (or fix the folder's permissions) and re-run the same command to resume", err.errno,
            str(Path(root) / MANIFEST)) from None


def read_manifest(root: Path) -> dict:
    """The manifest as a dict, every field checked (check_manifest_fields); CacheError naming the path
    and field when it is missing, corrupt or holds impossible values."""
    root = Path(root)
    path = root / MANIFEST
    if not root.exists():
        raise CacheError(f"cache {root}: folder does not exist")
    if not root.is_dir():
        raise CacheError(f"cache {root}: not a folder (a cache is a folder with manifest.json and shards/)")
    if not path.exists():
        raise CacheError(f"cache {root}: no manifest.json (not a cache, or a run that never finished a shard)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CacheError(f"cache {root}: cannot read manifest.json: {err}") from None
    return parse_manifest(data, root)


def parse_manifest(data: bytes, root) -> dict:
    """The manifest from its bytes (read from a folder or object storage): JSON, format, version, seal, then
    every field (check_manifest_fields); `root` (path or URL) names the cache in the messages."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CacheError(f"cache {root}: manifest.json is not UTF-8 text (byte {err.start}): corrupted") from None
    if not text.strip():
        raise CacheError(f"cache {root}: manifest.json is empty")
    try:
        manifest = json.loads(text, parse_constant=reject_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as err:
        raise CacheError(f"cache {root}: manifest.json is not valid JSON ({err}); it is corrupted") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"cache {root}: manifest.json must hold a JSON object, found {type(manifest).__name__}")
    where = f"cache {root}: manifest.json"
    if manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{where} field 'format' is {_short(manifest.get('format'))}, expected {FORMAT_NAME!r}")
    check_version(manifest.get("format_version"), f"cache {root}")
    check_seal(manifest, where)
    check_manifest_fields(manifest, where)
    return manifest


def check_version(version, where: str) -> None:
    """A cache of another format version is refused in one line: re-create an older one, upgrade for a newer."""
    if not isinstance(version, int) or isinstance(version, bool) or version == FORMAT_VERSION:
        return   # a missing or malformed version is named by the field checks
    if version < FORMAT_VERSION:
        raise CacheError(f"{where}: made by a pre-1.0 fastkd, format {version}; re-create it with this fastkd "
                         f"(`fastkd cache-teacher` into a new folder), which reads format {FORMAT_VERSION} only "
                         f"(manifest.json field 'format_version')")
    raise CacheError(f"{where}: format version {version} is not known to this fastkd (manifest.json field "
                     f"'format_version'; it reads format {FORMAT_VERSION}); upgrade fastkd")


def reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def settings_of(manifest: dict) -> dict:
    """The caller's settings part of a manifest (everything the writer did not add)."""
    return {k: v for k, v in manifest.items() if k not in RESERVED_KEYS}
