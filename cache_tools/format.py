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
# values this fastkd knows for the manifest's enum-like fields (docs/cache-format.md section 5.1)
MODES = ("topk", "sample")
CAPTURE_BY = ("entropy", "random")              # fastkd.teacher.CAPTURE_BY
CAPTURE_KEYS = ("share", "by", "seed")
TEACHER_DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "float64",
                  "float8_e4m3fn", "float8_e5m2")   # a --dtype choice, or the loaded model's torch dtype
TEACHER_BACKENDS = ("transformers", "vllm")
PROJECTION_KINDS = ("rademacher-splitmix64",)
PAYLOAD_PARTS = ("tokens", "topk", "counts", "hidden")   # + "rows" in a selective-capture cache
COUNT_KEYS = ("shards", "sequences", "loss_positions", "tokens", "bytes", "payload_bytes", "hidden_bytes")
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"     # fastkd.cross_tokenizer.TEACHER_TOKENIZER_DIR
TOKENIZER_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class CacheError(UserError):
    """A cache that cannot be read or written; the message names the cache path, shard, block, field."""


class ManifestWriteError(CacheError, OSError):
    """manifest.json could not be written (disk full, permissions); the previous one is kept. An
    OSError too, so a writer that rolls back on OSError still does."""

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename = errno, filename

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return (type(self), (str(self), self.errno, self.filename))


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
        try:
            os.unlink(tmp)
        except OSError:
            pass
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
    """The manifest from its bytes (read from a folder or object storage): JSON, format, seal, then every
    field (check_manifest_fields); `root` (path or URL) names the cache in the messages."""
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
    _check_seal(manifest, where)
    check_manifest_fields(manifest, where)
    return manifest


def _check_seal(manifest: dict, where: str) -> None:
    """The seal first: a manifest edited by hand without re-sealing is named as such."""
    shards = _Fields(where).need(manifest, "shards", "shards", lambda v: isinstance(v, list)
                                 and all(isinstance(entry, dict) for entry in v), "a list of shard objects")
    sealed = seal_matches(manifest)
    if sealed is None and any("header_sha256" in entry for entry in shards):
        sealed = False  # written by a sealing writer (its shards have header digests): the seal was lost
    if sealed is False:
        raise CacheError(f"{where}: its content does not match its digest (field {SEAL_KEY!r}): the file was "
                         f"corrupted or edited by hand after the writer sealed it. Nothing was read from the shards; "
                         f"restore manifest.json from a copy (the shards themselves are untouched)")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


# --- the manifest's fields (docs/cache-format.md section 5.1 lists every rule) -------------------

def _count(lo: int = 0, hi: int = MAX_COUNT):
    return lambda v: _int(v, lo, hi)


def _or_null(ok):
    return lambda v: v is None or ok(v)


def _one_of(values):
    return lambda v: isinstance(v, str) and v in values


def _seed(v) -> bool:
    return _int(v, -(1 << 63), 1 << 64)


def _is_obj(v) -> bool:
    return isinstance(v, dict)


def _is_text(v) -> bool:
    return isinstance(v, str) and len(v) <= 4096


class _Fields:
    """Required and optional manifest fields checked by name ('shards[3].num_blocks'); a failure is a
    one-line CacheError naming the cache, the field and what it must hold."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, name: str, value, want: str):
        raise CacheError(f"{self.where} field {name!r} is {_short(value)}: expected {want}")

    def need(self, obj: dict, key: str, name: str, ok, want: str):
        """A required field: present, and `ok(value)`."""
        if key not in obj:
            raise CacheError(f"{self.where} field {name!r} is missing: expected {want} (a required field)")
        return self.may(obj, key, name, ok, want)

    def may(self, obj: dict, key: str, name: str, ok, want: str):
        """An optional field: absent, or `ok(value)`."""
        value = obj.get(key)
        if key in obj and not ok(value):
            self.fail(name, value, want)
        return value


def check_manifest_fields(m: dict, where: str) -> None:
    """Every manifest field: required keys present, types and ranges, enum-like values limited to what
    this fastkd knows, paths inside the cache; CacheError naming the field."""
    f = _Fields(where)
    version = f.need(m, "format_version", "format_version", _count(0, 1 << 16), "a non-negative integer")
    f.need(m, "fastkd_version", "fastkd_version", _is_text, "the writer's fastkd version (a string)")
    f.need(m, "complete", "complete", lambda v: isinstance(v, bool), "true or false")
    for key in ("created", "updated"):
        f.need(m, key, key, _is_text, "a UTC time (a string)")
    f.need(m, "summary", "summary", _or_null(_is_obj), "an object or null")
    _check_signal(m, f)
    _check_hidden(m, f)
    _check_codecs(m, f, version)
    _check_teacher(m, f)
    _check_settings(m, f, version)
    _check_entries(m, f)
    _check_numbering(m, f)
    _check_counts(m, f)


def _check_signal(m: dict, f: _Fields) -> None:
    """tokenizer.vocab_size, k and mode: what every row's shape and meaning depend on."""
    tokenizer = f.need(m, "tokenizer", "tokenizer", _is_obj, "an object with the tokenizer identity")
    vocab = f.need(tokenizer, "vocab_size", "tokenizer.vocab_size", _count(1, MAX_VOCAB),
                   f"an integer in [1, {MAX_VOCAB}]")
    f.need(m, "k", "k", _count(1, min(MAX_K, vocab)), f"an integer in [1, min({MAX_K}, tokenizer.vocab_size)]")
    f.need(m, "mode", "mode", _one_of(MODES), " or ".join(map(repr, MODES)))


def _check_hidden(m: dict, f: _Fields) -> None:
    """layers, hidden_widths and the optional hidden_projection that sets the widths."""
    layers = f.need(m, "layers", "layers", lambda v: isinstance(v, list) and len(v) <= MAX_LAYERS
                    and all(_int(x, -MAX_LAYERS, MAX_LAYERS) for x in v) and len(set(v)) == len(v),
                    "a list of distinct layer indices (may be empty)")
    widths = f.need(m, "hidden_widths", "hidden_widths", lambda v: isinstance(v, list) and len(v) == len(layers)
                    and all(_int(x, 1, MAX_WIDTH) for x in v), f"one width in [1, {MAX_WIDTH}] per layer")
    projection = f.may(m, "hidden_projection", "hidden_projection", _is_obj, "an object {kind, d_in, d_out, seed}")
    if projection is None:
        return
    f.need(projection, "kind", "hidden_projection.kind", _one_of(PROJECTION_KINDS), " or ".join(PROJECTION_KINDS))
    f.need(projection, "d_in", "hidden_projection.d_in", _count(1, MAX_WIDTH), "the teacher's hidden size")
    d_out = f.need(projection, "d_out", "hidden_projection.d_out", _count(1, MAX_WIDTH), "the stored width")
    f.need(projection, "seed", "hidden_projection.seed", _seed, "an integer")
    for j, width in enumerate(widths):
        if width != d_out:
            f.fail(f"hidden_widths[{j}]", width, f"{d_out} (hidden_projection.d_out)")


def _check_codecs(m: dict, f: _Fields, version: int) -> None:
    """codecs.topk / codecs.hidden: registered names, params objects, the mode and version they need."""
    from .codecs import VERSION2_TOPK_CODECS, get_hidden_codec, get_topk_codec

    codecs = f.need(m, "codecs", "codecs", _is_obj, "an object {topk, hidden}")
    for part, lookup in (("topk", get_topk_codec), ("hidden", get_hidden_codec)):
        spec = f.need(codecs, part, f"codecs.{part}", _is_obj, "an object {name, params}")
        name = f.need(spec, "name", f"codecs.{part}.name", lambda v: isinstance(v, str), "a codec name")
        try:
            codec = lookup(name)
        except KeyError as err:
            f.fail(f"codecs.{part}.name", name, f"a codec this fastkd knows ({str(err.args[0]).split('(', 1)[-1]}")
        params = f.need(spec, "params", f"codecs.{part}.params", _is_obj, "an object")
        if part == "hidden":
            _check_hidden_method(name, params, f)
        elif codec.sampled and m["mode"] != "sample" or codec.labels and m["mode"] == "sample":
            f.fail("codecs.topk.name", name, f"a logits codec for mode {m['mode']!r}")
    if codecs["topk"]["name"] in VERSION2_TOPK_CODECS and version < 2:
        f.fail("format_version", version, f"2 or more (codecs.topk {codecs['topk']['name']!r} needs version 2)")


def _check_hidden_method(name: str, params: dict, f: _Fields) -> None:
    """kh-zstd's `method` is the stored dtype of the hidden states: one this fastkd decodes."""
    if name != "kh-zstd" or "method" not in params:
        return
    from .hidden_codec import METHODS

    f.may(params, "method", "codecs.hidden.params.method", _one_of(tuple(METHODS)), " or ".join(sorted(METHODS)))


def _check_teacher(m: dict, f: _Fields) -> None:
    """The teacher identity: dtype and backend this fastkd knows, layer counts, and stored layers within them."""
    teacher = f.may(m, "teacher", "teacher", _is_obj, "an object (path, config_sha256, dtype, ...)")
    if teacher is None:
        return
    f.may(teacher, "path", "teacher.path", _is_text, "a string")
    f.may(teacher, "config_sha256", "teacher.config_sha256", _or_null(is_hex_digest), "64 lowercase hex digits")
    f.may(teacher, "dtype", "teacher.dtype", _one_of(TEACHER_DTYPES), f"one of {', '.join(TEACHER_DTYPES)}")
    f.may(teacher, "backend", "teacher.backend", _one_of(TEACHER_BACKENDS), " or ".join(TEACHER_BACKENDS))
    f.may(teacher, "num_parameters", "teacher.num_parameters", _or_null(_count()), "a count")
    f.may(teacher, "hidden_size", "teacher.hidden_size", _or_null(_count(1, MAX_WIDTH)), "a width")
    depth = f.may(teacher, "num_hidden_layers", "teacher.num_hidden_layers", _or_null(_count(0, MAX_LAYERS)),
                  "a layer count")
    for j, layer in enumerate(m["layers"] if depth is not None else []):
        if not -(depth + 1) <= layer <= depth:
            f.fail(f"layers[{j}]", layer, f"a hidden-state index in [0, {depth}] (or -1 to -{depth + 1}): the teacher "
                   f"has {depth} layers (teacher.num_hidden_layers)")


def _check_settings(m: dict, f: _Fields, version: int) -> None:
    """The optional settings fastkd relies on when they are present."""
    f.may(m, "template", "template", _or_null(_is_obj), "an object or null")
    f.may(m, "max_length", "max_length", _or_null(_count(1)), "a token count or null")
    f.may(m, "sample_n", "sample_n", _or_null(_count(1)), "a number of draws or null")
    f.may(m, "seed", "seed", _or_null(_seed), "an integer or null")
    f.may(m, "work_unit", "work_unit", _count(1), "sequences per work unit (at least 1)")
    records = f.may(m, "records", "records", _is_obj, "an object {count, sha256}")
    if records is not None:
        f.need(records, "count", "records.count", _count(), "a count")
        f.need(records, "sha256", "records.sha256", is_hex_digest, "64 lowercase hex digits")
    _check_capture(m, f, version)
    _check_teacher_tokenizer(m, f)


def _check_capture(m: dict, f: _Fields, version: int) -> None:
    """Selective capture: {share in (0, 1], by entropy|random, seed}; mode topk, format version 2."""
    capture = f.may(m, "capture", "capture", _is_obj, "an object {share, by, seed}")
    if capture is None:
        return
    for key in capture:
        if key not in CAPTURE_KEYS:
            f.fail(f"capture.{key}", capture[key], f"no such key (capture holds {', '.join(CAPTURE_KEYS)})")
    f.need(capture, "share", "capture.share", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
           and 0 < v <= 1, "a share in (0, 1]")
    by = f.need(capture, "by", "capture.by", _one_of(CAPTURE_BY), " or ".join(CAPTURE_BY))
    seed_ok = _seed if by == "random" else _or_null(_seed)
    f.need(capture, "seed", "capture.seed", seed_ok, "an integer" + (" (by random)" if by == "random" else " or null"))
    if m["mode"] != "topk":
        f.fail("mode", m["mode"], "'topk' (selective capture keeps top-k rows only)")
    if version < 2:
        f.fail("format_version", version, "2 or more (a selective-capture cache needs version 2)")


def _check_teacher_tokenizer(m: dict, f: _Fields) -> None:
    """The teacher tokenizer saved in the cache: the folder teacher_tokenizer/ (never an absolute path or
    `..`) and its files by plain name -> sha256."""
    entry = f.may(m, "teacher_tokenizer", "teacher_tokenizer", _is_obj, "an object {dir, files}")
    if entry is None:
        return
    folder = f.need(entry, "dir", "teacher_tokenizer.dir", lambda v: isinstance(v, str), "a folder name")
    if folder != TEACHER_TOKENIZER_DIR:
        outside = folder.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", folder) or ":" in folder
        f.fail("teacher_tokenizer.dir", folder, f"{TEACHER_TOKENIZER_DIR!r}, the folder inside the cache"
               + (" (an absolute path or '..' points outside the cache)" if outside else ""))
    files = f.need(entry, "files", "teacher_tokenizer.files", lambda v: isinstance(v, dict) and bool(v),
                   "an object: file name -> sha256")
    for name, digest in files.items():
        if not TOKENIZER_FILE.match(name):
            f.fail("teacher_tokenizer.files", name, "plain file names inside teacher_tokenizer/ (no '/', no '..')")
        if not is_hex_digest(digest):
            f.fail(f"teacher_tokenizer.files.{name}", digest, "64 lowercase hex digits")


def _check_entries(m: dict, f: _Fields) -> None:
    """Each shards[j]: file, digests, sizes and counts, within their ranges and each other."""
    for j, entry in enumerate(m["shards"]):
        name = f"shards[{j}]"
        f.need(entry, "file", f"{name}.file", lambda v: isinstance(v, str) and bool(SHARD_PATH.match(v)),
               "a path shards/shard-NNNNN.safetensors inside the cache")
        f.need(entry, "sha256", f"{name}.sha256", is_hex_digest, "64 lowercase hex digits")
        f.may(entry, "header_sha256", f"{name}.header_sha256", is_hex_digest, "64 lowercase hex digits")
        size = f.need(entry, "bytes", f"{name}.bytes", _count(8), "a file size in bytes")
        n = f.need(entry, "num_sequences", f"{name}.num_sequences", _count(1), "a count in [1, 2**48]")
        f.need(entry, "num_blocks", f"{name}.num_blocks", _count(1, n), f"a block count in [1, {n}] (num_sequences)")
        tokens = f.need(entry, "num_tokens", f"{name}.num_tokens", _count(), "a count in [0, 2**48]")
        f.need(entry, "num_loss_positions", f"{name}.num_loss_positions", _count(0, tokens),
               f"a count in [0, {tokens}] (num_tokens)")
        for key in ("first_record", "last_record"):
            f.need(entry, key, f"{name}.{key}", _count(), "a record index")
        payload = _check_sizes(entry, name, m, f)
        if payload > size:
            f.fail(f"{name}.payload_bytes", entry["payload_bytes"], f"at most {size} bytes in all (the file size)")


def _check_sizes(entry: dict, name: str, m: dict, f: _Fields) -> int:
    """payload_bytes (one count per part) and hidden_bytes (one per stored layer, summing to the hidden
    part) of a shard entry or of `counts`; returns the payload total."""
    parts = PAYLOAD_PARTS + (("rows",) if "capture" in m else ())
    layers = [str(layer) for layer in m["layers"]]
    payload = f.need(entry, "payload_bytes", f"{name}.payload_bytes", _is_obj,
                     f"an object: {', '.join(parts)} -> bytes")
    hidden = f.need(entry, "hidden_bytes", f"{name}.hidden_bytes", _is_obj, "an object: layer -> bytes")
    for label, table, keys in (("payload_bytes", payload, parts), ("hidden_bytes", hidden, layers)):
        for key in table:
            if key not in keys:
                what = "one of the stored layers (field 'layers')" if label == "hidden_bytes" else "a block part"
                f.fail(f"{name}.{label}.{key}", table[key], f"no such entry: {label} has one per {what}: "
                       f"{', '.join(keys) or 'none'}")
        for key in keys:
            if name != "counts" or key in table:   # counts of a cache with no shard yet may lack a zero
                f.need(table, key, f"{name}.{label}.{key}", _count(), "a byte count in [0, 2**48]")
    if sum(hidden.values()) != payload.get("hidden", 0):
        f.fail(f"{name}.payload_bytes.hidden", payload.get("hidden", 0),
               f"{sum(hidden.values())}, the sum of {name}.hidden_bytes")
    return sum(payload.values())


def _check_numbering(m: dict, f: _Fields) -> None:
    """Shard files are listed once each: shards[j] is shard j, or in a work-unit cache, shard <unit>
    with the units in increasing order."""
    shards = m["shards"]
    units = any("unit" in entry for entry in shards)
    work_unit = f.need(m, "work_unit", "work_unit", _count(1), "sequences per work unit") if units else None
    files, last = set(), -1
    for j, entry in enumerate(shards):
        name = f"shards[{j}]"
        if entry["file"] in files:
            f.fail(f"{name}.file", entry["file"], "a shard not listed twice")
        files.add(entry["file"])
        number = int(entry["file"].rsplit("-", 1)[1].split(".")[0])
        if not units:
            if number != j:
                f.fail(f"{name}.file", entry["file"], f"shards/shard-{j:05d}.safetensors (the shard's position)")
            continue
        unit = f.need(entry, "unit", f"{name}.unit", _count(last + 1),
                      f"a work-unit number above {last} (units in order)")
        f.need(entry, "unit_sha256", f"{name}.unit_sha256", is_hex_digest, "64 lowercase hex digits")
        if number != unit:
            f.fail(f"{name}.file", entry["file"], f"shards/shard-{unit:05d}.safetensors (its unit)")
        f.need(entry, "num_sequences", f"{name}.num_sequences", _count(1, work_unit),
               f"at most {work_unit} (work_unit)")
        last = unit


def _check_counts(m: dict, f: _Fields) -> None:
    """`counts`: the writer's totals, each a count (their sums are checked by check_manifest_totals)."""
    counts = f.need(m, "counts", "counts", _is_obj, f"an object: {', '.join(COUNT_KEYS)}")
    for key in counts:
        if key not in COUNT_KEYS:
            f.fail(f"counts.{key}", counts[key], f"no such key (counts holds {', '.join(COUNT_KEYS)})")
    for key in COUNT_KEYS[:5]:
        f.need(counts, key, f"counts.{key}", _count(), "a count in [0, 2**48]")
    _check_sizes(counts, "counts", m, f)


def manifest_totals(shards: list[dict]) -> dict:
    """What `counts` must hold: the sums over the shard entries (the writer's `totals`)."""
    payload = {part: 0 for part in PAYLOAD_PARTS}
    hidden: dict[str, int] = {}
    for entry in shards:
        for key, value in entry.get("payload_bytes", {}).items():
            payload[key] = payload.get(key, 0) + value
        for key, value in entry.get("hidden_bytes", {}).items():
            hidden[key] = hidden.get(key, 0) + value
    return {"shards": len(shards), "sequences": sum(e["num_sequences"] for e in shards),
            "loss_positions": sum(e.get("num_loss_positions", 0) for e in shards),
            "tokens": sum(e.get("num_tokens", 0) for e in shards), "bytes": sum(e["bytes"] for e in shards),
            "payload_bytes": payload, "hidden_bytes": hidden}


def check_manifest_totals(m: dict, where: str) -> None:
    """Every `counts` total equals the sum over the shard entries (a reader checks it on every open; a
    resuming writer recomputes them instead)."""
    f = _Fields(where)
    sources = {"shards": "len(shards)", "sequences": "shards[*].num_sequences",
               "loss_positions": "shards[*].num_loss_positions", "tokens": "shards[*].num_tokens",
               "bytes": "shards[*].bytes"}
    want = manifest_totals(m["shards"])
    for key, source in sources.items():
        if m["counts"][key] != want[key]:
            f.fail(f"counts.{key}", m["counts"][key], f"{want[key]}, the sum of {source} (one of them is corrupt or edited)")
    for table in ("payload_bytes", "hidden_bytes"):
        have = m["counts"][table]
        for key in sorted(set(have) | set(want[table])):
            if have.get(key, 0) != want[table].get(key, 0):
                f.fail(f"counts.{table}.{key}", have.get(key),
                       f"{want[table].get(key, 0)}, the sum of shards[*].{table}.{key}")


def check_local_paths(root: Path, m: dict, where: str) -> None:
    """A folder the manifest names must stay inside the cache folder once symlinks are resolved."""
    entry = m.get("teacher_tokenizer")
    if not isinstance(entry, dict):
        return
    folder = Path(root) / entry["dir"]
    if not os.path.lexists(folder):
        return   # not saved (yet): only a cross-tokenizer run needs it, and says so
    real, base = os.path.realpath(folder), os.path.realpath(root)
    if os.path.commonpath([real, base]) != base or real == base:
        raise CacheError(f"{where} field 'teacher_tokenizer.dir' is {entry['dir']!r}: expected a folder inside the "
                         f"cache, but {folder} is a symlink to {real}, not inside the cache; copy the folder in")


def settings_of(manifest: dict) -> dict:
    """The caller's settings part of a manifest (everything the writer did not add)."""
    return {k: v for k, v in manifest.items() if k not in RESERVED_KEYS}
