"""Shared pieces of the cache format: the record type, the error type, the manifest on disk."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastkd.errors import UserError
from fastkd.integrity import SEAL_KEY, is_hex_digest, seal, seal_matches

FORMAT_VERSION = 1
FORMAT_NAME = "fastkd-teacher-cache"
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
LOCK = ".lock"
# manifest keys the writer owns; a caller's settings may not use them
RESERVED_KEYS = ("format", "format_version", "fastkd_version", "complete", "shards", "counts", "summary",
                 "created", "updated", SEAL_KEY)
# the only shard paths a manifest may name (no `..`, no absolute paths, nothing outside shards/)
SHARD_PATH = re.compile(r"^shards/shard-\d{5,9}\.safetensors$")
# sanity bounds on numbers a manifest or shard index may hold (far above any real cache)
MAX_VOCAB = 1 << 31
MAX_K = 1 << 20
MAX_WIDTH = 1 << 20
MAX_LAYERS = 4096
MAX_COUNT = 1 << 48


class CacheError(UserError):
    """A cache that cannot be read or written; the message names the cache path, shard, block, field."""


class CorruptCacheError(CacheError):
    """Bytes of a cache that fail their digest (or decode to something impossible): never used."""

    def __init__(self, message: str, shard: str | None = None, block: int | None = None):
        super().__init__(message)
        self.shard = shard
        self.block = block

    def __reduce__(self):  # crosses DataLoader worker boundaries whole
        return (type(self), (str(self), self.shard, self.block))


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
    def finite(obj):
        if isinstance(obj, float) and not np.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: finite(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [finite(v) for v in obj]
        return obj
    return finite(json.loads(json.dumps(value, default=default, sort_keys=True)))


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
    """Atomically write the manifest, sealed with the digest of its own content."""
    text = json.dumps(seal(manifest), indent=1, sort_keys=False, allow_nan=False)
    atomic_write_bytes(Path(root) / MANIFEST, (text + "\n").encode())


def read_manifest(root: Path) -> dict:
    """The manifest as a dict, every field the readers use checked; CacheError naming the path and
    field when it is missing, corrupt or holds impossible values."""
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
    """The manifest from its bytes (read from a folder or object storage), checked as read_manifest
    says; `root` (path or URL) names the cache in the messages."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CacheError(f"cache {root}: manifest.json is not UTF-8 text (byte {err.start}): corrupted") from None
    if not text.strip():
        raise CacheError(f"cache {root}: manifest.json is empty")
    try:
        manifest = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as err:
        raise CacheError(f"cache {root}: manifest.json is not valid JSON ({err}); it is corrupted") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"cache {root}: manifest.json must hold a JSON object, found {type(manifest).__name__}")
    where = f"cache {root}: manifest.json"
    if manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{where} field 'format' is {_short(manifest.get('format'))}, expected {FORMAT_NAME!r}")
    check_manifest_fields(manifest, where)
    sealed = seal_matches(manifest)
    if sealed is None and any("header_sha256" in entry for entry in manifest["shards"]):
        sealed = False  # written by a sealing writer (its shards have header digests): the seal was lost
    if sealed is False:
        raise CacheError(f"{where}: its content does not match its digest (field {SEAL_KEY!r}): the file was "
                         f"corrupted or edited by hand after the writer sealed it. Nothing was read from the shards; "
                         f"restore manifest.json from a copy (the shards themselves are untouched)")
    return manifest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_manifest_fields(m: dict, where: str) -> None:
    """Types and ranges of every manifest field a reader relies on; CacheError naming the field."""
    def bad(field_name: str, want: str):
        value = m
        for part in field_name.replace("]", "").replace("[", ".").split("."):
            value = value[int(part)] if isinstance(value, list) else value.get(part) if isinstance(value, dict) else None
        raise CacheError(f"{where} field {field_name!r} is {_short(value)}: expected {want}")

    if not _int(m.get("format_version"), 0, 1 << 16):
        bad("format_version", "a non-negative integer")
    if "complete" in m and not isinstance(m["complete"], bool):
        bad("complete", "true or false")
    if not isinstance(m.get("tokenizer"), dict):
        bad("tokenizer", "an object with the tokenizer identity")
    if not _int(m["tokenizer"].get("vocab_size"), 1, MAX_VOCAB):
        bad("tokenizer.vocab_size", f"an integer in [1, {MAX_VOCAB}]")
    if m.get("mode", "topk") not in ("topk", "sample"):
        bad("mode", "'topk' or 'sample'")
    if not _int(m.get("k"), 1, min(MAX_K, m["tokenizer"]["vocab_size"])):
        bad("k", f"an integer in [1, min({MAX_K}, tokenizer.vocab_size)]")
    layers, widths = m.get("layers", []), m.get("hidden_widths", [])
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS or not all(_int(x, 0, MAX_LAYERS) for x in layers) \
            or len(set(layers)) != len(layers):
        bad("layers", "a list of distinct layer indices")
    if not isinstance(widths, list) or len(widths) != len(layers) or not all(_int(x, 1, MAX_WIDTH) for x in widths):
        bad("hidden_widths", f"one width in [1, {MAX_WIDTH}] per layer")
    teacher = m.get("teacher")
    if teacher is not None and not isinstance(teacher, dict):
        bad("teacher", "an object")
    if isinstance(teacher, dict) and teacher.get("num_hidden_layers") is not None \
            and not _int(teacher["num_hidden_layers"], 0, MAX_LAYERS):
        bad("teacher.num_hidden_layers", "a layer count")
    if "codecs" in m and not isinstance(m["codecs"], dict):
        bad("codecs", "an object")
    if "counts" in m and not isinstance(m["counts"], dict):
        bad("counts", "an object")
    shards = m.get("shards")
    if not isinstance(shards, list):
        bad("shards", "a list")
    files = set()
    for j, entry in enumerate(shards):
        if not isinstance(entry, dict):
            bad(f"shards[{j}]", "an object")
        for key in ("file", "sha256", "bytes", "num_sequences"):
            if key not in entry:
                raise CacheError(f"{where} shards[{j}] lacks field {key!r}")
        if not isinstance(entry["file"], str) or not SHARD_PATH.match(entry["file"]):
            bad(f"shards[{j}].file", "a path shards/shard-NNNNN.safetensors inside the cache")
        if entry["file"] in files:
            bad(f"shards[{j}].file", "a shard not listed twice")
        files.add(entry["file"])
        if not is_hex_digest(entry["sha256"]):
            bad(f"shards[{j}].sha256", "64 lowercase hex digits")
        if "header_sha256" in entry and not is_hex_digest(entry["header_sha256"]):
            bad(f"shards[{j}].header_sha256", "64 lowercase hex digits")
        if not _int(entry["bytes"], 8, MAX_COUNT):
            bad(f"shards[{j}].bytes", "a file size in bytes")
        if not _int(entry["num_sequences"], 0, MAX_COUNT):
            bad(f"shards[{j}].num_sequences", "a count")
        for key in ("num_loss_positions", "num_tokens", "num_blocks"):
            if key in entry and not _int(entry[key], 0, MAX_COUNT):
                bad(f"shards[{j}].{key}", "a count")


def settings_of(manifest: dict) -> dict:
    """The caller's settings part of a manifest (everything the writer did not add)."""
    return {k: v for k, v in manifest.items() if k not in RESERVED_KEYS}
