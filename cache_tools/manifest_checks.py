"""Every manifest field checked on every open (docs/cache-format.md section 5.1 lists each rule): required keys,
types and ranges, names this fastkd knows, paths inside the cache, counts equal to the sums of the shards."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .codecs import CHOICES, REGISTRY
from .errors import CacheError
from .integrity import SEAL_KEY, is_hex_digest, seal_matches

SHARD_PATH = re.compile(r"^shards/shard-\d{5,9}\.safetensors$")  # nothing outside shards/, no `..`
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
RECORDS_DIGESTS = ("file", "records")           # what records.sha256 is over (docs/cache-format.md section 6)
TEACHER_DTYPES = ("auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16", "float64",
                  "float8_e4m3fn", "float8_e5m2")   # a --dtype choice, or the loaded model's torch dtype
TEACHER_BACKENDS = ("transformers", "vllm")
PROJECTION_KINDS = ("rademacher-splitmix64",)
PAYLOAD_PARTS = ("tokens", "topk", "hidden")     # + "rows" in a selective-capture cache
SUMS = {"sequences": "num_sequences", "loss_positions": "num_loss_positions", "tokens": "num_tokens",
        "bytes": "bytes"}                        # counts[key] = the sum of shards[*][SUMS[key]]
COUNT_KEYS = ("shards", *SUMS, "payload_bytes", "hidden_bytes")
TEACHER_TOKENIZER_DIR = "teacher_tokenizer"     # fastkd.cross_tokenizer.TEACHER_TOKENIZER_DIR
TOKENIZER_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
FORMAT_NAME = "fastkd-teacher-cache"
FORMAT_VERSION = 3              # 1.0; versions 1 and 2 were written by fastkd before 1.0 and are refused
HEX = "64 lowercase hex digits"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(lo: int = 0, hi: int = MAX_COUNT):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


_seed = _count(-(1 << 63), 1 << 64)


def _or_null(ok):
    return lambda v: v is None or ok(v)


def _choice(values) -> tuple:
    """(rule, what it must hold) for a field limited to `values`."""
    return (lambda v: isinstance(v, str) and v in values), f"one of {', '.join(values)}"


def _is_obj(v) -> bool:
    return isinstance(v, dict)


def _is_text(v) -> bool:
    return isinstance(v, str) and len(v) <= 4096


# (key, rule, what it must hold); a key ending in "?" is optional
FIELDS = (("format_version", lambda v: v == FORMAT_VERSION and not isinstance(v, bool),
           f"{FORMAT_VERSION}, the format this fastkd reads"),
          ("fastkd_version", _is_text, "the writer's fastkd version (a string)"),
          ("complete", lambda v: isinstance(v, bool), "true or false"),
          ("created", _is_text, "a UTC time (a string)"),
          ("updated", _is_text, "a UTC time (a string)"),
          ("summary", _or_null(_is_obj), "an object or null"),
          ("work_unit", _count(1), "sequences per work unit (at least 1)"),
          ("template?", _or_null(_is_obj), "an object or null"),
          ("max_length?", _or_null(_count(1)), "a token count or null"),
          ("sample_n?", _or_null(_count(1)), "a number of draws or null"),
          ("seed?", _or_null(_seed), "an integer or null"))
PROJECTION = (("kind", *_choice(PROJECTION_KINDS)), ("d_in", _count(1, MAX_WIDTH), "the teacher's hidden size"),
              ("d_out", _count(1, MAX_WIDTH), "the stored width"), ("seed", _seed, "an integer"))
TEACHER = (("path?", _is_text, "a string"), ("config_sha256?", _or_null(is_hex_digest), HEX),
           ("dtype?", *_choice(TEACHER_DTYPES)), ("backend?", *_choice(TEACHER_BACKENDS)),
           ("num_parameters?", _or_null(_count()), "a count"),
           ("hidden_size?", _or_null(_count(1, MAX_WIDTH)), "a width"),
           ("num_hidden_layers?", _or_null(_count(0, MAX_LAYERS)), "a layer count"))
RECORDS = (("count", _count(), "a count"), ("sha256", is_hex_digest, HEX),
           ("digest?", lambda v: v in RECORDS_DIGESTS,
            f"one of {', '.join(RECORDS_DIGESTS)} (what records.sha256 is taken over)"))
ENTRY = (("file", lambda v: isinstance(v, str) and bool(SHARD_PATH.match(v)),
          "a path shards/shard-NNNNN.safetensors inside the cache"),
         ("sha256", is_hex_digest, HEX), ("header_sha256", is_hex_digest, HEX), ("unit_sha256", is_hex_digest, HEX),
         ("bytes", _count(8), "a file size in bytes"), ("num_tokens", _count(), "a count in [0, 2**48]"),
         ("first_record", _count(), "a record index"), ("last_record", _count(), "a record index"))


@dataclass(frozen=True)
class _Fields:
    """The fields of one manifest object, named from the top ('shards[3].num_blocks'); a failure is a one-line
    CacheError naming the cache, the field and what it must hold."""

    where: str
    prefix: str = ""

    def at(self, name: str) -> _Fields:
        return _Fields(self.where, f"{self.prefix}{name}.")

    def fail(self, key: str, value, want: str):
        raise CacheError(f"{self.where} field {self.prefix + key!r} is {_short(value)}: expected {want}")

    def need(self, obj: dict, key: str, ok, want: str):
        """A field present (optional if its key ends in '?') and `ok(value)`; its value, or None when absent."""
        key, required = key.rstrip("?"), not key.endswith("?")
        if key not in obj and required:
            raise CacheError(f"{self.where} field {self.prefix + key!r} is missing: expected {want} (a required field)")
        if key in obj and not ok(obj[key]):
            self.fail(key, obj[key], want)
        return obj.get(key)

    def table(self, obj: dict, rows) -> dict:
        return {key.rstrip("?"): self.need(obj, key, ok, want) for key, ok, want in rows}

    def obj(self, obj: dict, key: str, rows, want: str) -> dict | None:
        """An object field and its own fields by `rows`: their values, or None when it is absent."""
        value = self.need(obj, key, _is_obj, want)
        return None if value is None else self.at(key.rstrip("?")).table(value, rows)

    def only(self, obj: dict, keys, holds: str) -> None:
        """No key outside `keys`."""
        for key in obj:
            if key not in keys:
                self.fail(key, obj[key], f"no such key ({holds}: {', '.join(keys) or 'none'})")


def check_seal(manifest: dict, where: str) -> None:
    """The seal first: a manifest edited by hand without re-sealing is named as such."""
    _Fields(where).need(manifest, "shards", lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
                        "a list of shard objects")
    sealed = seal_matches(manifest)
    if sealed is None:
        raise CacheError(f"{where} field {SEAL_KEY!r} is missing: expected the digest of the manifest's content "
                         f"(a required field); restore manifest.json from a copy")
    if sealed is False:
        raise CacheError(f"{where}: its content does not match its digest (field {SEAL_KEY!r}): the file was "
                         f"corrupted or edited by hand after the writer sealed it. Nothing was read from the shards; "
                         f"restore manifest.json from a copy (the shards themselves are untouched)")


def check_manifest_fields(m: dict, where: str) -> None:
    """Every manifest field (docs/cache-format.md section 5.1); CacheError naming the field."""
    f = _Fields(where)
    f.table(m, FIELDS)
    f.obj(m, "records?", RECORDS, "an object {count, sha256, digest}")
    for check in (_check_signal, _check_hidden, _check_codecs, _check_teacher, _check_capture,
                  _check_teacher_tokenizer, _check_entries, _check_counts):
        check(m, f)


def _check_signal(m: dict, f: _Fields) -> None:
    """tokenizer.vocab_size, k and mode: what every row's shape and meaning depend on."""
    vocab = f.obj(m, "tokenizer", [("vocab_size", _count(1, MAX_VOCAB), f"an integer in [1, {MAX_VOCAB}]")],
                  "an object with the tokenizer identity")["vocab_size"]
    f.need(m, "k", _count(1, min(MAX_K, vocab)), f"an integer in [1, min({MAX_K}, tokenizer.vocab_size)]")
    f.need(m, "mode", *_choice(MODES))


def _check_hidden(m: dict, f: _Fields) -> None:
    """layers, hidden_widths and the optional hidden_projection that sets the widths."""
    layers = f.need(m, "layers", lambda v: isinstance(v, list) and len(v) <= MAX_LAYERS
                    and all(map(_count(-MAX_LAYERS, MAX_LAYERS), v)) and len(set(v)) == len(v),
                    "a list of distinct layer indices (may be empty)")
    widths = f.need(m, "hidden_widths", lambda v: isinstance(v, list) and len(v) == len(layers)
                    and all(map(_count(1, MAX_WIDTH), v)), f"one width in [1, {MAX_WIDTH}] per layer")
    projection = f.obj(m, "hidden_projection?", PROJECTION, "an object {kind, d_in, d_out, seed}")
    for j, width in enumerate(widths if projection else []):
        if width != projection["d_out"]:
            f.fail(f"hidden_widths[{j}]", width, f"{projection['d_out']} (hidden_projection.d_out)")


def _check_codecs(m: dict, f: _Fields) -> None:
    """codecs.topk / codecs.hidden: names of the registry, params objects with known values, the mode they need."""
    codecs = f.need(m, "codecs", _is_obj, "an object {topk, hidden}")
    for part in ("topk", "hidden"):
        spec = f.at("codecs").need(codecs, part, _is_obj, "an object {name, params}")
        c = f.at(f"codecs.{part}")
        name = c.need(spec, "name", lambda v: isinstance(v, str), "a codec name")
        if name not in REGISTRY[part]:
            c.fail("name", name, f"a codec this fastkd knows (known: {', '.join(sorted(REGISTRY[part]))})")
        codec = REGISTRY[part][name]
        params = c.need(spec, "params", _is_obj, "an object")
        for key in sorted(set(params) - codec.params):
            known = ", ".join(sorted(codec.params))
            c.at("params").fail(key, params[key], f"a parameter of {name} this fastkd reads ({known}); a cache made "
                                f"with an option no longer read must be re-created")
        if name in CHOICES:
            key, values = CHOICES[name]
            c.at("params").need(params, key + "?", *_choice(values))
        if part == "topk" and codec.sampled != (m["mode"] == "sample"):
            c.fail("name", name, f"the logits codec of mode {m['mode']!r} ({'ks' if codec.sampled else 'kt'} "
                                 f"is for mode {'sample' if codec.sampled else 'topk'})")


def _check_teacher(m: dict, f: _Fields) -> None:
    """The teacher identity: dtype and backend this fastkd knows, layer counts, and stored layers within them."""
    teacher = f.obj(m, "teacher?", TEACHER, "an object (path, config_sha256, dtype, ...)")
    depth = teacher and teacher["num_hidden_layers"]
    for j, layer in enumerate(m["layers"] if depth is not None else []):
        if not -(depth + 1) <= layer <= depth:
            f.fail(f"layers[{j}]", layer, f"a hidden-state index in [0, {depth}] (or -1 to -{depth + 1}): the teacher "
                   f"has {depth} layers (teacher.num_hidden_layers)")


def _check_capture(m: dict, f: _Fields) -> None:
    """Selective capture: {share in (0, 1], by entropy|random, seed}; mode topk."""
    capture = f.need(m, "capture?", _is_obj, "an object {share, by, seed}")
    if capture is None:
        return
    c = f.at("capture")
    c.only(capture, CAPTURE_KEYS, "capture holds")
    c.need(capture, "share", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
           "a share in (0, 1]")
    by = c.need(capture, "by", *_choice(CAPTURE_BY))
    c.need(capture, "seed", _seed if by == "random" else _or_null(_seed),
           "an integer" + (" (by random)" if by == "random" else " or null"))
    if m["mode"] != "topk":
        f.fail("mode", m["mode"], "'topk' (selective capture keeps top-k rows only)")


def _check_teacher_tokenizer(m: dict, f: _Fields) -> None:
    """The teacher tokenizer saved in the cache: the folder teacher_tokenizer/ and its files by plain name -> sha256."""
    entry = f.need(m, "teacher_tokenizer?", _is_obj, "an object {dir, files}")
    if entry is None:
        return
    t = f.at("teacher_tokenizer")
    folder = t.need(entry, "dir", lambda v: isinstance(v, str), "a folder name")
    if folder != TEACHER_TOKENIZER_DIR:
        outside = folder.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", folder) or ":" in folder
        t.fail("dir", folder, f"{TEACHER_TOKENIZER_DIR!r}, the folder inside the cache"
               + (" (an absolute path or '..' points outside the cache)" if outside else ""))
    files = t.need(entry, "files", lambda v: isinstance(v, dict) and bool(v), "an object: file name -> sha256")
    for name, digest in files.items():
        if not TOKENIZER_FILE.match(name):
            t.fail("files", name, "plain file names inside teacher_tokenizer/ (no '/', no '..')")
        if not is_hex_digest(digest):
            t.at("files").fail(name, digest, HEX)


def _check_entries(m: dict, f: _Fields) -> None:
    """Each shards[j]: file, digests, sizes and counts within their ranges and each other; work unit `unit`
    (increasing, each listed once) in the file shards/shard-<unit>."""
    last = -1
    work_unit = m["work_unit"]
    for j, entry in enumerate(m["shards"]):
        e = f.at(f"shards[{j}]")
        known = e.table(entry, ENTRY)
        n = e.need(entry, "num_sequences", _count(1, work_unit), f"a count in [1, {work_unit}] (work_unit)")
        e.need(entry, "num_blocks", _count(1, n), f"a block count in [1, {n}] (num_sequences)")
        tokens = known["num_tokens"]
        e.need(entry, "num_loss_positions", _count(0, tokens), f"a count in [0, {tokens}] (num_tokens)")
        unit = e.need(entry, "unit", _count(last + 1), f"a work-unit number above {last} (units in order)")
        if int(known["file"].rsplit("-", 1)[1].split(".")[0]) != unit:
            e.fail("file", known["file"], f"shards/shard-{unit:05d}.safetensors (its unit)")
        last = unit
        if _check_sizes(entry, e, m) > known["bytes"]:
            e.fail("payload_bytes", entry["payload_bytes"], f"at most {known['bytes']} bytes in all (the file size)")


def _check_sizes(obj: dict, f: _Fields, m: dict) -> int:
    """payload_bytes (one count per part) and hidden_bytes (one per stored layer, summing to the hidden part) of a
    shard entry or of `counts`; returns the payload total."""
    parts = PAYLOAD_PARTS + (("rows",) if "capture" in m else ())
    payload = f.need(obj, "payload_bytes", _is_obj, f"an object: {', '.join(parts)} -> bytes")
    hidden = f.need(obj, "hidden_bytes", _is_obj, "an object: layer -> bytes")
    layers = [str(layer) for layer in m["layers"]]
    for label, table, keys, per in (("payload_bytes", payload, parts, "block part"),
                                    ("hidden_bytes", hidden, layers, "stored layer (field 'layers')")):
        f.at(label).only(table, keys, f"{label} has one per {per}")
        for key in keys:   # counts of a cache with no shard yet may lack a zero
            f.at(label).need(table, key + "?" * (f.prefix == "counts."), _count(), "a byte count in [0, 2**48]")
    if sum(hidden.values()) != payload.get("hidden", 0):
        f.at("payload_bytes").fail("hidden", payload.get("hidden", 0),
                                   f"{sum(hidden.values())}, the sum of {f.prefix}hidden_bytes")
    return sum(payload.values())


def _check_counts(m: dict, f: _Fields) -> None:
    """`counts`: the writer's totals, each a count (their sums are checked by check_manifest_totals)."""
    counts = f.need(m, "counts", _is_obj, f"an object: {', '.join(COUNT_KEYS)}")
    c = f.at("counts")
    c.only(counts, COUNT_KEYS, "counts holds")
    c.table(counts, [(key, _count(), "a count in [0, 2**48]") for key in COUNT_KEYS[:5]])
    _check_sizes(counts, c, m)


def manifest_totals(shards: list[dict]) -> dict:
    """What `counts` must hold: the sums over the shard entries (the writer's `totals`)."""
    payload = Counter(dict.fromkeys(PAYLOAD_PARTS, 0))
    hidden = Counter()
    for entry in shards:
        payload.update(entry.get("payload_bytes", {}))
        hidden.update(entry.get("hidden_bytes", {}))
    return {"shards": len(shards), **{key: sum(e.get(field, 0) for e in shards) for key, field in SUMS.items()},
            "payload_bytes": dict(payload), "hidden_bytes": dict(hidden)}


def check_manifest_totals(m: dict, where: str) -> None:
    """Every `counts` total equals the sum over the shard entries (a reader checks it on every open; a
    resuming writer recomputes them instead)."""
    f = _Fields(where).at("counts")
    have = m["counts"]
    want = manifest_totals(m["shards"])
    for key, source in {"shards": "len(shards)", **{k: f"shards[*].{v}" for k, v in SUMS.items()}}.items():
        if have[key] != want[key]:
            f.fail(key, have[key], f"{want[key]}, the sum of {source} (one of them is corrupt or edited)")
    for table in ("payload_bytes", "hidden_bytes"):
        for key in sorted(set(have[table]) | set(want[table])):
            if have[table].get(key, 0) != want[table].get(key, 0):
                f.fail(f"{table}.{key}", have[table].get(key),
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
