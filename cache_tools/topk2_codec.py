"""The top-k codec at precision "small" (`KT` version byte 2): ids against a per-block frequency table and the
row's next token, values as at precision fine with coarser steps, the tail exact (docs/codec.md)."""

from __future__ import annotations

import struct

import numpy as np
import zstandard

from .errors import CodecError
from .planes import (check_params, compress_planes, decompress_planes, pack_frames, peek, plane_count, unpack_frames,
                     unpack_header)
from .topk_codec import (_TOPK_HEADER, NEG_INF_CODE, TOPK_MAGIC, _check_ids, _decoded_logprobs, _sorted_gaps,
                         _value_codes, prepared)

TOPK2_VERSION = 2
DEFAULT_TOPK2_PARAMS = {"step": 0.09, "max_step": 8.0, "growth": 0.35, "level": 1}
TOPK2_PARAMS = {"step", "max_step", "growth", "level", "mass_tol"}
_TOPK2_HEADER = struct.Struct("<2sBBIIIfff")   # magic, version, flags, n, k, vocab_size, step, max_step, growth
_FLAG2_LABELS = 1
_FLAG2_ABSOLUTE = 2    # reference "absolute": no longer written; decoding does not depend on it


def _table_order(counts: np.ndarray) -> np.ndarray:
    """Table entries by falling count, ties by id (the entries are sorted by id): key 1 is the most
    frequent id. A stable sort of uint16 keys (radix) when the counts allow it."""
    top = int(counts.max(initial=0))
    key = (top - counts).astype(np.uint16 if top < 65536 else np.int64)
    return np.argsort(key, kind="stable")


def _checked_labels(labels, n: int, vocab_size: int) -> np.ndarray:
    """The rows' next-token ids as int64 [n], each inside the vocabulary."""
    labels = np.asarray(labels).astype(np.int64, copy=False).reshape(-1)
    if labels.shape != (n,):
        raise CodecError(f"top-k codec field 'labels': expected {n} next-token ids, got shape {labels.shape}")
    _check_ids(labels[None, :], vocab_size, "top-k codec field 'labels'")
    return labels


def encode_topk2(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int, *,
                 labels: np.ndarray | None = None,
                 step: float = DEFAULT_TOPK2_PARAMS["step"], max_step: float = DEFAULT_TOPK2_PARAMS["max_step"],
                 growth: float = DEFAULT_TOPK2_PARAMS["growth"], level: int = DEFAULT_TOPK2_PARAMS["level"],
                 mass_tol: float = 1e-3, **unused) -> bytes:
    """KT version 2: ids ranked by a per-block frequency table stored in the payload, the row's
    label (next token, when given) as key 0, sorted keys gap-coded; values as in version 1; exact tail."""
    check_params(unused, set(), "top-k v2")
    ids, logprobs, tail, (step, max_step, growth), unused_slots = prepared(ids, logprobs, tail, vocab_size,
                                                                           (step, max_step, growth), mass_tol)
    n, k = ids.shape
    counts = np.bincount(ids.reshape(-1) if unused_slots is None else ids[~unused_slots], minlength=vocab_size)
    is_label = None
    if labels is not None:
        labels = _checked_labels(labels, n, vocab_size)
        is_label = ids == labels[:, None]
        if unused_slots is not None:
            is_label &= ~unused_slots
        counts -= np.bincount(labels[is_label.any(axis=1)], minlength=vocab_size)  # a label hit is key 0, no entry
    table_ids = np.flatnonzero(counts)
    table_counts = counts[table_ids]
    order = _table_order(table_counts)
    key_of_id = np.empty(vocab_size, np.int64)            # only the table's entries are ever read
    key_of_id[table_ids[order]] = np.arange(1, len(table_ids) + 1)
    keys = key_of_id[ids]
    if is_label is not None:
        keys *= ~is_label
    if unused_slots is not None:   # unused slots (sampled mode) sort last with keys d+1, d+2, ...
        keys = np.where(unused_slots, len(table_ids) + np.cumsum(unused_slots, axis=1), keys)
    codes = _value_codes(logprobs, step, max_step, growth)
    gaps, codes = _sorted_gaps(keys, codes, 16)
    flags = _FLAG2_LABELS if labels is not None else 0
    header = _TOPK2_HEADER.pack(TOPK_MAGIC, TOPK2_VERSION, flags, n, k, vocab_size, step, max_step, growth)
    table_gaps = np.diff(table_ids, prepend=-1) - 1
    groups = [
        compress_planes(table_gaps, plane_count(vocab_size), level),
        compress_planes(table_counts - 1, plane_count(table_counts.max(initial=1) - 1), level),
        compress_planes(np.ascontiguousarray(gaps.T).reshape(-1), plane_count(gaps.max(initial=0)), level),
        compress_planes(codes, plane_count(codes.max(initial=0)), level),
        compress_planes(tail.view(np.uint32), 4, level),
    ]
    return pack_frames(header, groups)


def decode_topk2(payload: bytes, n: int, k: int, vocab_size: int, *, labels: np.ndarray | None = None,
                 **unused) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a payload of encode_topk2 into ids int64 [n, k], log-probs float32 [n, k], tail float32 [n];
    `labels` must be the encoder's when it had them."""
    check_params(unused, TOPK2_PARAMS, "top-k v2")
    _, _, flags, _, _, _, step, max_step, growth = unpack_header(payload, _TOPK2_HEADER, TOPK_MAGIC, "top-k",
                                                                 TOPK2_VERSION, (3, 4, 5), (n, k, vocab_size))
    if flags & ~(_FLAG2_LABELS | _FLAG2_ABSOLUTE) or not (0 < step <= max_step < np.inf) or not (0 < growth <= 4):
        raise CodecError("corrupt top-k codec payload: header flags or steps out of range")
    if flags & _FLAG2_LABELS:
        if labels is None:
            raise CodecError("top-k codec payload was written with the next-token labels; pass them to decode it")
        labels = _checked_labels(labels, n, vocab_size)
    g_tab, g_cnt, g_gaps, g_codes, g_tail = unpack_frames(payload, _TOPK2_HEADER.size, 5)
    table_gaps = _decompress_frames_any(g_tab, vocab_size)
    d = len(table_gaps)
    table_ids = np.cumsum(table_gaps.astype(np.int64) + 1) - 1   # first id, then gap - 1
    if d and (table_ids[-1] >= vocab_size):
        raise CodecError("corrupt top-k codec payload: table id out of range")
    table_counts = decompress_planes(g_cnt, d).astype(np.int64)
    tail = decompress_planes(g_tail, n).view(np.float32)
    keys = decompress_planes(g_gaps, n * k).reshape(k, n).astype(np.int64)   # column-major: slot by slot
    codes = decompress_planes(g_codes, n * k).reshape(n, k)
    for j in range(1, k):                                   # (a loop over slots beats cumsum(axis=0) ~10x)
        np.add(keys[j], keys[j - 1], out=keys[j])
    keys += np.arange(k)[:, None]
    if codes.max(initial=0) > NEG_INF_CODE or keys[-1].max(initial=0) > d + k:
        raise CodecError("corrupt top-k codec payload: code or id out of range")
    id_of_key = np.empty(d + k + 1, np.int64)
    id_of_key[0] = -2                                       # key 0: the row's label (only ever first in a row)
    id_of_key[1:d + 1] = table_ids[_table_order(table_counts)]
    id_of_key[d + 1:] = -1                                  # unused slots
    ids_cm = id_of_key[keys]
    first = keys[0] == 0
    if first.any():
        if not flags & _FLAG2_LABELS:
            raise CodecError("corrupt top-k codec payload: a label key without labels")
        ids_cm[0] = np.where(first, labels, ids_cm[0])
    ids = np.ascontiguousarray(ids_cm.T)
    return ids, _decoded_logprobs(codes, tail, step, max_step, growth), tail


def _decompress_frames_any(frames: list[bytes], limit: int) -> np.ndarray:
    """Byte planes whose value count is not stored (the table): taken from the first plane, at most `limit`."""
    if not frames:
        raise CodecError("corrupt top-k codec payload: empty table")
    try:
        count = len(zstandard.ZstdDecompressor().decompress(frames[0], max_output_size=max(limit, 1)))
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt codec payload: table plane does not decompress ({exc})") from None
    return decompress_planes(frames, count)


def topk_section_sizes(payload: bytes) -> dict[str, int]:
    """Bytes spent on each part of a KT payload (version 1 or 2) and on its header, for reports."""
    names = ("ids", "values", "tail")
    header = _TOPK_HEADER
    if peek(payload, TOPK_MAGIC, "top-k") == TOPK2_VERSION:
        names, header = ("table_ids", "table_counts") + names, _TOPK2_HEADER
    parts = {name: sum(map(len, group)) for name, group in zip(names, unpack_frames(payload, header.size, len(names)))}
    return dict(parts, header=len(payload) - sum(parts.values()))
