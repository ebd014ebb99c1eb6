"""Every manifest field checked on every open (docs/cache-format.md section 5.1 lists each rule): required keys,
types and ranges, names this fastkd knows, paths inside the cache, counts equal to the sums of the shards."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .codecs import PRECISIONS, get_codec
from .errors import CacheError
from .hidden_codec import METHODS
from .integrity import SEAL_KEY, is_hex_digest, seal_matches

# the only shard paths a manifest may name (no `..`, no absolute paths, nothing outside shards/)
SHARD_PATH = re.compile(r"^shards/shard-\d{5,9}\.safetensors$")
# sanity bounds on numbers a manifest or shard index may hold (far above any real cache)
MAX_VOCAB = 1 << 31
MAX_K = 1 << 20
MAX_WIDTH = 1 << 20
MAX_LAYERS = 4096
MAX_COUNT = 1 << 48
# values this fastkd knows for the manifest's enum-like fields
MODES = ("topk", "sample")
CAPTURE_BY = ("entropy", "random")              # how selective capture chose its rows (cache-teacher --capture-by)
CAPTURE_KEYS = ("share", "by", "seed")
# records.sha256 is over: the --data file's bytes, or a hub dataset's records as canonical JSON (absent: the unit
# digests of a cache begun before work units were cut on the raw records; such a cache is read, not resumed)
RECORDS_DIGESTS = ("file", "records")
TEACHER_DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "float64",
                  "float8_e4m3fn", "float8_e5m2")   # a --dtype choice, or the loaded model's torch dtype
TEACHER_BACKENDS = ("transformers", "vllm")
PROJECTION_KINDS = ("rademacher-splitmix64",)
PAYLOAD_PARTS = ("tokens", "topk", "hidden")     # + "rows" in a selective-capture cache
COUNT_KEYS = ("shards", "sequences", "loss_positions", "tokens", "bytes", "payload_bytes", "hidden_bytes")
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"     # fastkd.cross_tokenizer.TEACHER_TOKENIZER_DIR
TOKENIZER_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
FORMAT_NAME = "fastkd-teacher-cache"
FORMAT_VERSION = 3              # 1.0; versions 1 and 2 were written by fastkd before 1.0 and are refused


def check_seal(manifest: dict, where: str) -> None:
    """The seal first: a manifest edited by hand without re-sealing is named as such."""
    _Fields(where).need(manifest, "shards", "shards", lambda v: isinstance(v, list)
                        and all(isinstance(entry, dict) for entry in v), "a list of shard objects")
    sealed = seal_matches(manifest)
    if sealed is None:
        raise CacheError(f"{where} field {SEAL_KEY!r} is missing: expected the digest of the manifest's content "
                         f"(a required field); restore manifest.json from a copy")
    if sealed is False:
        raise CacheError(f"{where}: its content does not match its digest (field {SEAL_KEY!r}): the file was "
                         f"corrupted or edited by hand after the writer sealed it. Nothing was read from the shards; "
                         f"restore manifest.json from a copy (the shards themselves are untouched)")


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
    f.need(m, "format_version", "format_version", lambda v: v == FORMAT_VERSION and not isinstance(v, bool),
           f"{FORMAT_VERSION}, the format this fastkd reads")
    f.need(m, "fastkd_version", "fastkd_version", _is_text, "the writer's fastkd version (a string)")
    f.need(m, "complete", "complete", lambda v: isinstance(v, bool), "true or false")
    for key in ("created", "updated"):
        f.need(m, key, key, _is_text, "a UTC time (a string)")
    f.need(m, "summary", "summary", _or_null(_is_obj), "an object or null")
    _check_signal(m, f)
    _check_hidden(m, f)
    _check_codecs(m, f)
    _check_teacher(m, f)
    _check_settings(m, f)
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


def _check_codecs(m: dict, f: _Fields) -> None:
    """codecs.topk / codecs.hidden: names of the registry, params objects with known values, the mode they need."""
    codecs = f.need(m, "codecs", "codecs", _is_obj, "an object {topk, hidden}")
    for part in ("topk", "hidden"):
        spec = f.need(codecs, part, f"codecs.{part}", _is_obj, "an object {name, params}")
        name = f.need(spec, "name", f"codecs.{part}.name", lambda v: isinstance(v, str), "a codec name")
        try:
            codec = get_codec(part, name)
        except KeyError as err:
            f.fail(f"codecs.{part}.name", name, f"a codec this fastkd knows ({str(err.args[0]).split('(', 1)[-1]}")
        params = f.need(spec, "params", f"codecs.{part}.params", _is_obj, "an object")
        if name == "kh":
            f.may(params, "method", "codecs.hidden.params.method", _one_of(tuple(METHODS)), " or ".join(METHODS))
        elif name == "kt":
            f.may(params, "precision", "codecs.topk.params.precision", _one_of(PRECISIONS), " or ".join(PRECISIONS))
        if part == "topk" and codec.sampled != (m["mode"] == "sample"):
            f.fail("codecs.topk.name", name, f"the logits codec of mode {m['mode']!r} ("
                   f"{'ks' if codec.sampled else 'kt'} "
                   f"is for mode {'sample' if codec.sampled else 'topk'})")


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


def _check_settings(m: dict, f: _Fields) -> None:
    """The optional settings fastkd relies on when they are present."""
    f.may(m, "template", "template", _or_null(_is_obj), "an object or null")
    f.may(m, "max_length", "max_length", _or_null(_count(1)), "a token count or null")
    f.may(m, "sample_n", "sample_n", _or_null(_count(1)), "a number of draws or null")
    f.may(m, "seed", "seed", _or_null(_seed), "an integer or null")
    f.need(m, "work_unit", "work_unit", _count(1), "sequences per work unit (at least 1)")
    records = f.may(m, "records", "records", _is_obj, "an object {count, sha256, digest}")
    if records is not None:
        f.need(records, "count", "records.count", _count(), "a count")
        f.need(records, "sha256", "records.sha256", is_hex_digest, "64 lowercase hex digits")
        f.may(records, "digest", "records.digest", lambda v: v in RECORDS_DIGESTS,
              f"one of {', '.join(RECORDS_DIGESTS)} (what records.sha256 is taken over)")
    _check_capture(m, f)
    _check_teacher_tokenizer(m, f)


def _check_capture(m: dict, f: _Fields) -> None:
    """Selective capture: {share in (0, 1], by entropy|random, seed}; mode topk."""
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
        f.need(entry, "header_sha256", f"{name}.header_sha256", is_hex_digest, "64 lowercase hex digits")
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
    """Each shards[j] is work unit `unit` (increasing), in the file shards/shard-<unit>, listed once."""
    work_unit = m["work_unit"]
    last = -1
    for j, entry in enumerate(m["shards"]):
        name = f"shards[{j}]"
        unit = f.need(entry, "unit", f"{name}.unit", _count(last + 1),
                      f"a work-unit number above {last} (units in order)")
        f.need(entry, "unit_sha256", f"{name}.unit_sha256", is_hex_digest, "64 lowercase hex digits")
        if int(entry["file"].rsplit("-", 1)[1].split(".")[0]) != unit:
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
            f.fail(f"counts.{key}", m["counts"][key],
                   f"{want[key]}, the sum of {source} (one of them is corrupt or edited)")
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
