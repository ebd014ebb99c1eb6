"""CacheWriter: buffers sequences, writes one shard at a time atomically, resumes after a kill."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
from fastkd.integrity import digest_bytes, file_digest

from .codecs import DEFAULT_HIDDEN_CODEC, DEFAULT_TOPK_CODEC, get_hidden_codec, get_topk_codec, normalize_codec
from .format import (FORMAT_NAME, FORMAT_VERSION, LOCK, MANIFEST, RESERVED_KEYS, SHARD_DIR, CacheError,
                     CachedSequence, fsync_dir, jsonable, read_manifest, settings_differences, settings_of,
                     write_manifest)
from .lock import acquire_lock, release_lock
from .storage import refuse_url_for_writing
from .reader import check_shard_matches, open_shard, shard_header
from .shard import EncodeError, Layout, check_codec_mode, write_shard

SHARD_NAME = re.compile(r"^shard-(\d{5,})\.safetensors$")


def shard_file(number: int) -> str:
    return f"{SHARD_DIR}/shard-{number:05d}.safetensors"


CODEC_SETTING_ALIASES = (("logits_codec", "topk"), ("topk_codec", "topk"), ("hidden_codec", "hidden"))


def normalize_settings(settings: dict) -> dict:
    """The caller's settings as JSON, with mode/layers/hidden_widths/codecs filled in and checked."""
    if not isinstance(settings, dict):
        raise CacheError(f"cache settings must be a dict, got {type(settings).__name__}")
    try:
        s = jsonable(settings)
    except TypeError as err:
        raise CacheError(f"cache settings: {err}") from None
    clash = sorted(set(s) & set(RESERVED_KEYS))
    if clash:
        raise CacheError(f"cache settings may not use the reserved key(s) {clash} (the writer sets them)")
    vocab = (s.get("tokenizer") or {}).get("vocab_size") if isinstance(s.get("tokenizer"), dict) else None
    if not isinstance(vocab, int) or vocab <= 0:
        raise CacheError("cache settings: field tokenizer.vocab_size must be a positive integer "
                         f"(got {vocab!r}); the ids' storage type depends on it")
    if not isinstance(s.get("k"), int) or s["k"] <= 0:
        raise CacheError(f"cache settings: field k must be a positive integer (got {s.get('k')!r})")
    s.setdefault("mode", "topk")
    if s["mode"] not in ("topk", "sample"):
        raise CacheError(f"cache settings: field mode must be 'topk' or 'sample' (got {s['mode']!r})")
    layers = s.setdefault("layers", [])
    if not isinstance(layers, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers) \
            or len(set(layers)) != len(layers):
        raise CacheError(f"cache settings: field layers must be a list of distinct integers (got {layers!r})")
    widths = s.get("hidden_widths", [])
    if isinstance(widths, dict):
        try:
            by_layer = {int(key): v for key, v in widths.items()}
        except ValueError:
            raise CacheError(f"cache settings: field hidden_widths has a non-integer layer key: {widths!r}") from None
        if set(by_layer) != set(layers):
            raise CacheError(f"cache settings: field hidden_widths has layers {sorted(by_layer)}, "
                             f"field layers has {layers}")
        widths = [by_layer[l] for l in layers]
    if not isinstance(widths, list) or len(widths) != len(layers) or \
            not all(isinstance(w, int) and w > 0 for w in widths):
        raise CacheError(f"cache settings: field hidden_widths must give one positive width per layer "
                         f"(layers {layers}, widths {s.get('hidden_widths')!r})")
    s["hidden_widths"] = widths
    codecs = s.get("codecs") or {}
    if not isinstance(codecs, dict):
        raise CacheError(f"cache settings: field codecs must be a dict with 'topk' and 'hidden' (got {codecs!r})")
    codecs = dict(codecs)
    for alias, part in CODEC_SETTING_ALIASES:  # flat spellings: settings["hidden_codec"] = "int8"
        if alias in s:
            value = s.pop(alias)
            if value is None:
                continue
            if codecs.get(part) not in (None, value):
                raise CacheError(f"cache settings: {alias}={value!r} contradicts codecs.{part}={codecs[part]!r}")
            codecs[part] = value
    try:
        s["codecs"] = dict(codecs, topk=normalize_codec(codecs.get("topk"), DEFAULT_TOPK_CODEC, "topk"),
                           hidden=normalize_codec(codecs.get("hidden"), DEFAULT_HIDDEN_CODEC, "hidden"))
        get_topk_codec(s["codecs"]["topk"]["name"])
        get_hidden_codec(s["codecs"]["hidden"]["name"])
        check_codec_mode(layout_of(s))
    except (KeyError, ValueError) as err:
        raise CacheError(f"cache settings: field codecs: {err.args[0]}") from None
    return s


def layout_of(settings: dict) -> Layout:
    return Layout(k=settings["k"], vocab_size=settings["tokenizer"]["vocab_size"], mode=settings["mode"],
                  layers=tuple(settings["layers"]), widths=tuple(settings["hidden_widths"]),
                  topk_codec=settings["codecs"]["topk"], hidden_codec=settings["codecs"]["hidden"],
                  captured="capture" in settings)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def totals(shards: list[dict]) -> dict:
    """The manifest's `counts`: sums over the shard entries."""
    parts = {"tokens": 0, "topk": 0, "counts": 0, "hidden": 0}
    hidden: dict[str, int] = {}
    for e in shards:
        for key, v in e.get("payload_bytes", {}).items():
            parts[key] = parts.get(key, 0) + v
        for key, v in e.get("hidden_bytes", {}).items():
            hidden[key] = hidden.get(key, 0) + v
    return {"shards": len(shards), "sequences": sum(e["num_sequences"] for e in shards),
            "loss_positions": sum(e.get("num_loss_positions", 0) for e in shards),
            "tokens": sum(e.get("num_tokens", 0) for e in shards), "bytes": sum(e["bytes"] for e in shards),
            "payload_bytes": parts, "hidden_bytes": hidden}


def empty_rows(seq: CachedSequence) -> np.ndarray:
    """Rows a selective-capture cache stores without the teacher (bool [n]): every id -1, every
    log-prob -inf, tail exactly 1."""
    ids = np.asarray(seq.topk_ids)
    return ((ids == -1).all(axis=1) & np.isneginf(np.asarray(seq.topk_logprobs, np.float64)).all(axis=1)
            & (np.asarray(seq.tail) == 1.0))


def check_sequence(root, lay: Layout, seq: CachedSequence, *, captured: bool = False) -> None:
    """Refuse a sequence whose shapes do not fit the layout or whose teacher values are not a distribution.
    `captured`: a selective-capture cache, whose topk mode also holds empty rows (see `empty_rows`)."""
    where = f"cache {root}: record {seq.record_index}"
    ids = np.asarray(seq.input_ids)
    mask = np.asarray(seq.loss_mask)
    if ids.ndim != 1 or mask.shape != ids.shape:
        raise CacheError(f"{where}: input_ids {ids.shape} and loss_mask {mask.shape} must be 1-D, same length")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise CacheError(f"{where}: field input_ids has values outside int32 range")
    if mask.size and not np.isin(mask, (0, 1)).all():
        raise CacheError(f"{where}: field loss_mask must hold only 0 and 1")
    n = int(mask.sum())
    k = lay.k
    for name, arr, shape in (("topk_ids", seq.topk_ids, (n, k)), ("topk_logprobs", seq.topk_logprobs, (n, k)),
                             ("tail", seq.tail, (n,))):
        if np.shape(arr) != shape:
            raise CacheError(f"{where}: field {name} has shape {np.shape(arr)}, expected {shape} "
                             f"({n} loss positions, k={k})")
    lp = np.asarray(seq.topk_logprobs, np.float64)
    empty = empty_rows(seq) if captured and not lay.sampled else np.zeros(n, bool)
    if np.isnan(lp).any() or (lp > 1e-3).any() or (not lay.sampled and (np.isneginf(lp).all(axis=1) & ~empty).any()):
        raise CacheError(f"{where}: field topk_logprobs holds NaN, positive, or all -inf values (row "
                         f"{_first_bad(np.isnan(lp) | (lp > 1e-3))}): the teacher's forward overflowed or "
                         f"produced NaN; nothing of this record was written (try --dtype float32)")
    tail = np.asarray(seq.tail, np.float64)
    if not np.isfinite(tail).all() or (tail < -1e-3).any() or (tail > 1 + 1e-3).any():
        raise CacheError(f"{where}: field tail holds NaN or values outside [0, 1] (row "
                         f"{_first_bad(~np.isfinite(tail) | (tail < -1e-3) | (tail > 1 + 1e-3))}); the teacher's "
                         f"output is not a distribution (try --dtype float32)")
    tids = np.asarray(seq.topk_ids)
    low = -1 if lay.sampled else 0
    if tids[~empty].size and (tids[~empty].min() < low or tids.max() >= lay.vocab_size):
        raise CacheError(f"{where}: field topk_ids has ids outside [{low}, {lay.vocab_size}) "
                         f"(tokenizer.vocab_size {lay.vocab_size})")
    if lay.sampled:
        if seq.counts is None or np.shape(seq.counts) != (n, k):
            raise CacheError(f"{where}: field counts must have shape {(n, k)} in sampled mode, "
                             f"got {None if seq.counts is None else np.shape(seq.counts)}")
        c = np.asarray(seq.counts)
        if c.size and (c.min() < 0 or c.max() > 65535):
            raise CacheError(f"{where}: field counts must lie in [0, 65535]")
    elif seq.counts is not None:
        raise CacheError(f"{where}: field counts must be None in topk mode")
    if set(seq.hidden) != set(lay.layers):
        raise CacheError(f"{where}: field hidden has layers {sorted(seq.hidden)}, the cache stores {list(lay.layers)}")
    for layer, width in zip(lay.layers, lay.widths):
        if np.shape(seq.hidden[layer]) != (n, width):
            raise CacheError(f"{where}: field hidden[{layer}] has shape {np.shape(seq.hidden[layer])}, "
                             f"expected {(n, width)}")
        if not np.isfinite(np.asarray(seq.hidden[layer], np.float32)).all():
            raise CacheError(f"{where}: field hidden[{layer}] holds NaN or infinite values: the teacher's "
                             f"forward overflowed; nothing of this record was written (try --dtype float32)")


def write_shard_file(root: Path, name: str, number: int, seqs: list, layout: Layout, settings: dict, *,
                     block_bytes: int, max_block_sequences: int, kept: int | None = None) -> dict:
    """Write one shard atomically (temp file, fsync, rename, fsync the folder); its manifest entry.
    `kept` is how many finished shards the error message says are kept (None: unknown)."""
    final = Path(root) / name
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        info = write_shard(tmp, seqs, layout, number, block_bytes=block_bytes, max_block_sequences=max_block_sequences)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        digest, size = file_digest(tmp)
        header_digest = digest_bytes(shard_header(tmp))
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(err, EncodeError):
            raise CacheError(f"cache {root}: shard {name}: cannot encode {err} (codecs {settings['codecs']})") from None
        if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":  # disk full, permissions
            what = "the finished shards are" if kept is None else f"the {kept} finished shard(s) are"
            raise CacheError(f"cache {root}: cannot write shard {name}: {err}; {what} kept: free space and re-run "
                             f"the same command to resume") from None
        raise
    return {"file": name, "sha256": digest, "header_sha256": header_digest, "bytes": size, **info,
            "first_record": int(seqs[0].record_index), "last_record": int(seqs[-1].record_index)}


def resume_settings(root: Path, existing: dict, settings: dict) -> dict:
    """The run's settings checked against a cache's manifest (CacheError naming what differs); an
    old tokenizer identity is compared on what it holds and kept. Returns the settings to keep."""
    old_tokenizer = existing.get("tokenizer") or {}
    if "identity_version" not in old_tokenizer and isinstance(settings.get("tokenizer"), dict):
        # a cache begun before the tokenizer identity covered merges, normaliser etc.: compare what it holds
        # and keep its identity, so upgrading fastkd mid-cache does not strand a partial cache
        settings = dict(settings, tokenizer={k: settings["tokenizer"].get(k, "<absent>") for k in old_tokenizer})
    diffs = settings_differences(settings_of(existing), settings)
    if diffs and all(path.startswith("records") for path, _, _ in diffs):
        old, new = existing.get("records") or {}, settings.get("records") or {}
        raise CacheError(f"cache {root}: cannot resume on other data: the records differ from those the cache was "
                         f"begun on ({old.get('count')} records, sha256 {str(old.get('sha256'))[:12]}...; this run: "
                         f"{new.get('count')} records, sha256 {str(new.get('sha256'))[:12]}...); resume with the "
                         f"same --data file contents, or write to a new cache folder")
    if diffs:
        lines = "; ".join(f"{path}: cache has {old!r}, this run has {new!r}" for path, old, new in diffs[:5])
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise CacheError(f"cache {root}: cannot resume, settings differ from manifest.json: {lines}{more}; "
                         f"use the same settings or a new cache folder")
    return settings


class CacheWriter:
    """Writes a cache folder. `done` holds the record indices already stored, so a resumed run
    skips them; a shard is written (temp file, fsync, rename) every `sequences_per_shard`."""

    def __init__(self, root, settings: dict, *, sequences_per_shard: int = 256, resume: bool = True,
                 block_bytes: int = 1 << 20, max_block_sequences: int = 16):
        if sequences_per_shard < 1:
            raise CacheError(f"sequences_per_shard must be >= 1, got {sequences_per_shard}")
        refuse_url_for_writing(root)
        self.root = Path(root)
        self.sequences_per_shard = sequences_per_shard
        self.block_bytes = block_bytes
        self.max_block_sequences = max_block_sequences
        self.settings = normalize_settings(settings)
        self.layout = layout_of(self.settings)
        self._buffer: list[CachedSequence] = []
        self._buffered: set[int] = set()
        self._closed = True  # until the lock is ours: nothing to release
        self.done: set[int] = set()
        try:
            (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"cache {self.root}: cannot create the folder: {err}") from None
        self._lock = self.root / LOCK
        acquire_lock(self._lock)
        try:
            self._open_manifest(resume)
        except BaseException:
            release_lock(self._lock)
            raise
        self._closed = False

    # --- opening / resuming --------------------------------------------------------------
    def _open_manifest(self, resume: bool) -> None:
        existing = None
        if not (self.root / MANIFEST).exists():
            strays = [p.name for p in (self.root / SHARD_DIR).iterdir() if SHARD_NAME.match(p.name)]
            if strays:  # never delete data that no manifest accounts for
                raise CacheError(f"cache {self.root}: {SHARD_DIR}/ holds {len(strays)} shard file(s) "
                                 f"({sorted(strays)[0]}, ...) but there is no manifest.json; restore it, "
                                 f"or move the shards away to start a new cache")
        else:
            existing = read_manifest(self.root)
            if existing["shards"] and not resume:
                raise CacheError(f"cache {self.root}: already holds {len(existing['shards'])} shard(s); "
                                 f"resume it or write to a new folder")
            if not existing["shards"]:
                existing = None
        if existing is None:
            self.manifest = {"format": FORMAT_NAME, "format_version": self.layout.format_version, "fastkd_version": _version(),
                             "complete": False, "created": _now(), "updated": _now(), **self.settings,
                             "shards": [], "counts": totals([]), "summary": None}
            self._cleanup(0)
            write_manifest(self.root, self.manifest)
            return
        if existing["format_version"] != self.layout.format_version:
            raise CacheError(f"cache {self.root}: written with format version {existing['format_version']}, this "
                             f"fastkd writes version {self.layout.format_version} with these settings; it can be read but "
                             f"not extended")
        self.settings = resume_settings(self.root, existing, self.settings)
        self.manifest = existing
        for j, entry in enumerate(existing["shards"]):  # every finished shard is checked before it counts as done
            shard = open_shard(self.root, entry, j, self.layout.format_version)
            check_shard_matches(self.root, existing, entry, shard)
            self.done.update(int(r) for r in shard.record_index)
        self._cleanup(len(existing["shards"]))

    def _cleanup(self, next_number: int) -> None:
        """Remove temp files and shard files the manifest does not list (a kill between rename
        and manifest update): their sequences are not in `done`, so they are written again."""
        for path in (self.root / SHARD_DIR).iterdir():
            m = SHARD_NAME.match(path.name)
            if path.name.endswith(".tmp") or (m and int(m.group(1)) >= next_number):
                try:
                    path.unlink()
                except OSError:
                    pass
        for path in self.root.glob(f".{MANIFEST}.*.tmp"):  # a kill while the manifest was written
            try:
                path.unlink()
            except OSError:
                pass

    # --- writing -------------------------------------------------------------------------
    def add(self, seq: CachedSequence) -> None:
        """Buffer one sequence (checked against the settings); writes a shard when the buffer is full."""
        if self._closed:
            raise CacheError(f"cache {self.root}: writer already closed")
        self._check(seq)
        seq = _owned_copy(seq)  # the caller may reuse its arrays before the shard is written
        self._buffer.append(seq)
        self._buffered.add(int(seq.record_index))
        if len(self._buffer) >= self.sequences_per_shard:
            self._flush()

    def _check(self, seq: CachedSequence) -> None:
        r = int(seq.record_index)
        if r in self.done or r in self._buffered:
            raise CacheError(f"cache {self.root}: record {seq.record_index}: already in the cache (skip the indices in "
                             f"writer.done when resuming)")
        check_sequence(self.root, self.layout, seq, captured="capture" in self.settings)

    def _flush(self) -> None:
        if not self._buffer:
            return
        number = len(self.manifest["shards"])
        entry = write_shard_file(self.root, shard_file(number), number, self._buffer, self.layout, self.settings,
                                 block_bytes=self.block_bytes, max_block_sequences=self.max_block_sequences,
                                 kept=len(self.manifest["shards"]))
        self.manifest["shards"].append(entry)
        self.manifest["counts"] = totals(self.manifest["shards"])
        self.manifest["complete"] = False
        self.manifest["updated"] = _now()
        try:
            write_manifest(self.root, self.manifest)
        except OSError:  # the new shard file stays unlisted: a resumed run removes and rewrites it
            self.manifest["shards"].pop()
            self.manifest["counts"] = totals(self.manifest["shards"])
            raise            # write_manifest's error names the cache and the file, and says to re-run
        self.done.update(self._buffered)
        self._buffer, self._buffered = [], set()

    def close(self, summary: dict | None = None) -> None:
        """Write the partial shard, store `summary`, mark the cache complete, release the lock."""
        if self._closed:
            return
        try:
            self._flush()
            if summary is not None:
                try:
                    self.manifest["summary"] = jsonable(summary)
                except TypeError as err:
                    raise CacheError(f"cache {self.root}: summary: {err}") from None
            self.manifest["complete"] = True
            self.manifest["updated"] = _now()
            write_manifest(self.root, self.manifest)
        finally:
            self._closed = True
            release_lock(self._lock)

    def abort(self) -> None:
        """Release the lock without writing the buffered (unfinished) shard; finished shards stay."""
        if not getattr(self, "_closed", True):
            self._closed = True
            release_lock(self._lock)

    def __del__(self):
        try:  # a writer dropped without close() must not keep the cache locked
            self.abort()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def num_buffered(self) -> int:
        return len(self._buffer)


def _first_bad(mask: np.ndarray) -> int:
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)) if mask.size else []
    return int(rows[0]) if len(rows) else -1


def _owned_copy(seq: CachedSequence) -> CachedSequence:
    return CachedSequence(
        record_index=int(seq.record_index), task=str(seq.task), input_ids=np.array(seq.input_ids, np.int32),
        loss_mask=np.array(seq.loss_mask, np.uint8), topk_ids=np.array(seq.topk_ids, np.int64),
        topk_logprobs=np.array(seq.topk_logprobs, np.float32), tail=np.array(seq.tail, np.float32),
        counts=None if seq.counts is None else np.array(seq.counts, np.int32),
        hidden={int(layer): np.array(x, np.float32) for layer, x in seq.hidden.items()})


def _version() -> str:
    try:
        from fastkd import __version__
        return __version__
    except ImportError:
        return "unknown"
