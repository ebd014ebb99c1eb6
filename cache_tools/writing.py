"""What every writer of a cache uses: its settings checked and normalised, each sequence checked, one shard
file written atomically (temporary file, fsync, rename), and the settings compared on resume."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import time
from contextlib import suppress
from pathlib import Path

import numpy as np

from .codecs import normalize_codec
from .errors import CacheError, CodecError
from .format import (MANIFEST, RESERVED_KEYS, SHARD_DIR, CachedSequence, fsync_dir, jsonable, read_manifest,
                     settings_differences, settings_of)
from .integrity import digest_bytes, file_digest
from .shard import Layout, assemble_shard, empty_rows, encode_block, plan_blocks

SHARD_NAME = re.compile(r"^shard-(\d{5,})\.safetensors$")
CODEC_SETTINGS = (("logits_codec", "topk"), ("hidden_codec", "hidden"))   # flat spellings of settings["codecs"]


def shard_file(number: int) -> str:
    return f"{SHARD_DIR}/shard-{number:05d}.safetensors"


def existing_manifest(root) -> dict | None:
    """The manifest of the cache at `root` (checked), or None when there is none yet."""
    return read_manifest(Path(root)) if (Path(root) / MANIFEST).exists() else None


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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
    s["layers"], s["hidden_widths"] = _layers_and_widths(s)
    s["codecs"] = _codecs(s)
    return s


def _layers_and_widths(s: dict) -> tuple[list, list]:
    layers = s.get("layers", [])
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
    return layers, widths


def _codecs(s: dict) -> dict:
    """settings["codecs"] (and the flat `logits_codec` / `hidden_codec`, popped) as {topk, hidden} of
    {name, params}, defaults filled in; the logits codec must be the one of the mode."""
    codecs = s.get("codecs") or {}
    if not isinstance(codecs, dict):
        raise CacheError(f"cache settings: field codecs must be a dict with 'topk' and 'hidden' (got {codecs!r})")
    codecs = dict(codecs)
    for flat, part in CODEC_SETTINGS:  # flat spellings: settings["hidden_codec"] = "kh:method=fp8"
        value = s.pop(flat, None)
        if value is None:
            continue
        if codecs.get(part) not in (None, value):
            raise CacheError(f"cache settings: {flat}={value!r} contradicts codecs.{part}={codecs[part]!r}")
        codecs[part] = value
    try:
        out = dict(codecs, topk=normalize_codec(codecs.get("topk"), "topk", s["mode"]),
                   hidden=normalize_codec(codecs.get("hidden"), "hidden"))
    except (KeyError, ValueError, CodecError) as err:
        raise CacheError(f"cache settings: field codecs: {err.args[0]}") from None
    name = out["topk"]["name"]
    if (name == "ks") != (s["mode"] == "sample"):
        raise CacheError(f"cache settings: field codecs: logits codec {name} " + (
            "stores sampled ids with counts: it needs mode 'sample'" if name == "ks"
            else "is for mode 'topk'; mode 'sample' uses ks"))
    return out


def layout_of(settings: dict) -> Layout:
    return Layout(k=settings["k"], vocab_size=settings["tokenizer"]["vocab_size"], mode=settings["mode"],
                  layers=tuple(settings["layers"]), widths=tuple(settings["hidden_widths"]),
                  topk_codec=settings["codecs"]["topk"], hidden_codec=settings["codecs"]["hidden"],
                  captured="capture" in settings)


def check_sequence(root, lay: Layout, seq: CachedSequence, copy: bool = False) -> CachedSequence:
    """Refuse a sequence whose shapes do not fit the layout or whose teacher values are not a distribution
    (a selective-capture cache's topk mode also holds `empty_rows`); returns it `typed`."""
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
    empty = empty_rows(seq.topk_ids, lp, seq.tail) if lay.captured and not lay.sampled else np.zeros(n, bool)
    bad = np.isnan(lp) | (lp > 1e-3)
    if bad.any() or (not lay.sampled and (np.isneginf(lp).all(axis=1) & ~empty).any()):
        raise CacheError(f"{where}: field topk_logprobs holds NaN, positive, or all -inf values (row "
                         f"{_first_bad(bad)}): the teacher's forward overflowed or produced NaN; nothing of this "
                         f"record was written (try --dtype float32)")
    tail = np.asarray(seq.tail, np.float64)
    bad = ~np.isfinite(tail) | (tail < -1e-3) | (tail > 1 + 1e-3)
    if bad.any():
        raise CacheError(f"{where}: field tail holds NaN or values outside [0, 1] (row {_first_bad(bad)}); the "
                         f"teacher's output is not a distribution (try --dtype float32)")
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
    return typed(seq, copy)


def write_shard_file(root: Path, name: str, number: int, seqs: list, layout: Layout, *,
                     block_bytes: int, max_block_sequences: int, blocks: tuple | None = None) -> dict:
    """Write one shard atomically (temp file, fsync, rename, fsync the folder); its manifest entry. `blocks`:
    (starts, payloads) already encoded (an EncodePool's), else `seqs` are encoded here."""
    if blocks is None:
        starts = plan_blocks(layout, [len(s.input_ids) for s in seqs], [s.num_loss_positions for s in seqs],
                             block_bytes, max_block_sequences)
        blocks = starts, [encode_block(layout, seqs[a:z], f"cache {root}: shard {name}")
                          for a, z in zip(starts, starts[1:])]
    final = Path(root) / name
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        info = assemble_shard(tmp, seqs, layout, number, *blocks)
        with open(tmp, "rb+") as fh:
            header_digest = canonical_header(fh)
            os.fsync(fh.fileno())
        digest, size = file_digest(tmp)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as err:
        with suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) or type(err).__name__ == "SafetensorError":  # disk full, permissions
            raise CacheError(f"cache {root}: cannot write shard {name}: {err}; the finished shards are kept: free "
                             f"space and re-run the same command to resume") from None
        raise
    return {"file": name, "sha256": digest, "header_sha256": header_digest, "bytes": size, **info,
            "first_record": int(seqs[0].record_index), "last_record": int(seqs[-1].record_index)}


def canonical_header(fh) -> str:
    """Rewrite a safetensors file's JSON header in place with its keys sorted, so the same shard has the same bytes
    in every run (safetensors writes the metadata in a hash map's random order); returns the header's digest."""
    fh.seek(0)
    prefix = fh.read(8)
    size = int.from_bytes(prefix, "little")
    text = fh.read(size)
    data = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) <= size:   # the same characters in another order: the length and every offset stay
        text = data + b" " * (size - len(data))
        fh.seek(8)
        fh.write(text)
    return digest_bytes(prefix + text)


def resume_settings(root: Path, existing: dict, settings: dict) -> None:
    """The run's settings checked against a cache's manifest (CacheError naming what differs)."""
    diffs = settings_differences(settings_of(existing), settings)
    if "digest" in (settings.get("records") or {}):
        refuse_token_cut(root, existing)
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


def refuse_token_cut(root, existing: dict) -> None:
    """A cache begun before work units were cut on the raw records (its `records` has no `digest`) cannot be resumed
    by a cut on the raw records: its units hold other records."""
    if isinstance(existing.get("records"), dict) and "digest" not in existing["records"]:
        raise CacheError(f"cache {root}: cannot resume: it was begun by an earlier fastkd, which identified the "
                         f"records by their token ids and cut work units after skipped records; finish it with that "
                         f"fastkd, or write to a new cache folder")


def _first_bad(mask: np.ndarray) -> int:
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1)) if mask.size else []
    return int(rows[0]) if len(rows) else -1


def typed(seq: CachedSequence, copy: bool = False) -> CachedSequence:
    """The sequence with the dtypes a shard stores: arrays shared where they already have them, or (copy=True)
    copies the caller may not change under us."""
    arr = np.array if copy else np.asarray
    return CachedSequence(
        record_index=int(seq.record_index), task=str(seq.task), input_ids=arr(seq.input_ids, np.int32),
        loss_mask=arr(seq.loss_mask, np.uint8), topk_ids=arr(seq.topk_ids, np.int64),
        topk_logprobs=arr(seq.topk_logprobs, np.float32), tail=arr(seq.tail, np.float32),
        counts=None if seq.counts is None else arr(seq.counts, np.int32),
        hidden={int(layer): arr(x, np.float32) for layer, x in seq.hidden.items()})


def fastkd_version() -> str:
    """The installed fastkd's version (read from its package metadata: this layer imports nothing of the app)."""
    try:
        return importlib.metadata.version("fastkd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
