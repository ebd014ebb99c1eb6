"""Shared pieces of the cache format: the record type, the error type, the manifest on disk."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastkd.errors import UserError

FORMAT_VERSION = 1
FORMAT_NAME = "fastkd-teacher-cache"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
LOCK = ".lock"
# manifest keys the writer owns; a caller's settings may not use them
RESERVED_KEYS = ("format", "format_version", "fastkd_version", "complete", "shards", "counts", "summary",
                 "created", "updated")


class CacheError(UserError):
    """A cache that cannot be read or written; the message names the cache path, shard, block, field."""


@dataclass
class CachedSequence:
    """One cached sequence: its tokens and the teacher signal at its loss positions only.

    Row j of the [n, ...] arrays is the teacher's distribution for predicting the j-th masked
    token (n = loss_mask.sum()). Sampled mode: ids -1 / log-prob -inf / count 0 mark unused slots.
    """

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
    """Settings as plain JSON (tuples -> lists, paths -> str, numpy scalars -> python)."""
    def default(obj):
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, (Path, os.PathLike)):
            return os.fspath(obj)
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(f"value {obj!r} of type {type(obj).__name__} cannot be stored in the manifest")
    return json.loads(json.dumps(value, default=default, sort_keys=True))


def settings_differences(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """(key path, old value, new value) for every place where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append((sub, "<absent>", new[key]))
            elif key not in new:
                out.append((sub, old[key], "<absent>"))
            else:
                out.extend(settings_differences(old[key], new[key], sub))
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
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_bytes(Path(root) / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=False) + "\n").encode())


def read_manifest(root: Path) -> dict:
    """The manifest as a dict; CacheError naming the path when it is missing or not valid."""
    root = Path(root)
    path = root / MANIFEST
    if not root.exists():
        raise CacheError(f"cache {root}: folder does not exist")
    if not root.is_dir():
        raise CacheError(f"cache {root}: not a folder (a cache is a folder with manifest.json and shards/)")
    if not path.exists():
        raise CacheError(f"cache {root}: no manifest.json (not a cache, or a run that never finished a shard)")
    try:
        text = path.read_text()
    except OSError as err:
        raise CacheError(f"cache {root}: cannot read manifest.json: {err}") from None
    if not text.strip():
        raise CacheError(f"cache {root}: manifest.json is empty")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise CacheError(f"cache {root}: manifest.json is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"cache {root}: manifest.json must hold a JSON object, found {type(manifest).__name__}")
    if manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"cache {root}: manifest.json field 'format' is {manifest.get('format')!r}, "
                         f"expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CacheError(f"cache {root}: manifest.json field 'format_version' is missing or not an integer")
    if not isinstance(manifest.get("shards"), list):
        raise CacheError(f"cache {root}: manifest.json field 'shards' is missing or not a list")
    for j, entry in enumerate(manifest["shards"]):
        for key in ("file", "sha256", "bytes", "num_sequences"):
            if not isinstance(entry, dict) or key not in entry:
                raise CacheError(f"cache {root}: manifest.json shards[{j}] lacks field {key!r}")
    return manifest


def settings_of(manifest: dict) -> dict:
    """The caller's settings part of a manifest (everything the writer did not add)."""
    return {k: v for k, v in manifest.items() if k not in RESERVED_KEYS}
