"""The top-k codec at precisions fine and exact (`KT` version byte 1: companded log-prob codes or float32 bits,
ids gap-coded, the tail exact) and the sampled codec (`KS`: draws as id multisets); docs/codec.md."""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

from .errors import CodecError
from .planes import (check_params, compress_planes, decompress_planes, pack_frames, plane_count, unpack_frames,
                     unpack_header)

TOPK_MAGIC = b"KT"
SAMPLED_MAGIC = b"KS"
TOPK_VERSION = 1
SAMPLED_VERSION = 1
NEG_INF_CODE = 65535          # code reserved for a log-prob of -inf (zero mass)
MAX_FINITE_CODE = 65534

DEFAULT_TOPK_PARAMS = {"step": 0.08, "max_step": 5.0, "growth": 0.25, "level": 1}

_TOPK_HEADER = struct.Struct("<2sBBBxIIfff")   # magic, version, layout, flags, n, k, step, max_step, growth
_SAMPLED_HEADER = struct.Struct("<2sBBII")     # magic, version, flags, n, s
_LAYOUT_ID = 1         # rows sorted by id (0, rows by value, is no longer written or read)
_FLAG_RANKS = 1        # ids as ranks of a table passed beside the payload: no longer written or read
_FLAG_EXACT = 4        # (bit 1, reference "absolute", is no longer written; decoding does not depend on it)

TOPK_PARAMS = {"step", "max_step", "growth", "level", "mass_tol", "exact"}


def _companding(step: float, max_step: float, growth: float) -> tuple[float, float]:
    """Knee of the companded scale: x* (nats below the reference) and t* (code units there)."""
    x_knee = np.log(max_step / step) / growth
    return x_knee, (1.0 - step / max_step) / (growth * step)


def _to_code(x: np.ndarray, step: float, max_step: float, growth: float) -> np.ndarray:
    """Nats below the reference (x >= 0, float32, overwritten) -> integer code; the step grows as
    step * e^(growth * x) up to max_step: fine where the mass is, coarse where its KL share is negligible."""
    x_knee, _ = _companding(step, max_step, growth)
    np.minimum(x, np.float32(1e9), out=x)          # far below any code: saturates at MAX_FINITE_CODE
    x_fine = np.minimum(x, np.float32(x_knee))
    t = np.exp(x_fine * np.float32(-growth))
    t -= np.float32(1.0)
    t *= np.float32(-1.0 / (growth * step))
    x -= x_fine
    x *= np.float32(1.0 / max_step)
    t += x
    np.rint(t, out=t)
    return np.minimum(t, np.float32(MAX_FINITE_CODE)).astype(np.int64)


def _decoded_logprobs(codes: np.ndarray, tail: np.ndarray, step, max_step, growth) -> np.ndarray:
    """Codes -> log-probs, the row's top-k mass rescaled to exactly 1 - tail (the tail is stored exact)."""
    x, weight = _code_table(float(step), float(max_step), float(growth))
    row_sum = weight[codes].sum(axis=1, dtype=np.float64)
    mass = np.maximum(1.0 - tail.astype(np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where((row_sum > 0) & (mass > 0), np.log(mass) - np.log(row_sum), -np.inf).astype(np.float32)
        return shift[:, None] - x[codes]


def _value_codes(logprobs: np.ndarray, step, max_step, growth) -> np.ndarray:
    """Quantised distances below the row's top-1, -inf as NEG_INF_CODE."""
    finite = np.isfinite(logprobs)
    if finite.all():       # the common case: one subtraction
        return _to_code(logprobs.max(axis=1, keepdims=True) - logprobs, step, max_step, growth)
    ref = np.where(finite, logprobs, -np.inf).max(axis=1, initial=-np.inf, keepdims=True)
    with np.errstate(invalid="ignore"):
        x = np.maximum(np.where(finite, ref - logprobs, np.float32(0)), np.float32(0))
    codes = _to_code(x, step, max_step, growth)
    codes[~finite] = NEG_INF_CODE
    return codes


@lru_cache(maxsize=16)
def _code_table(step: float, max_step: float, growth: float) -> tuple[np.ndarray, np.ndarray]:
    """Per code: nats below the reference and the relative weight exp(-x) (0 for -inf), float32."""
    x_knee, t_knee = _companding(step, max_step, growth)
    c = np.arange(NEG_INF_CODE + 1, dtype=np.float64)
    fine = -np.log1p(-np.minimum(c, t_knee) * growth * step) / growth
    x = np.where(c <= t_knee, fine, x_knee + (c - t_knee) * max_step)
    x[NEG_INF_CODE] = np.inf
    return x.astype(np.float32), np.exp(-x).astype(np.float32)


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = np.argwhere((ids < 0) | (ids >= vocab_size))[0]
        raise CodecError(f"{what}: id {ids[tuple(bad)]} at row {bad[0]} is outside the vocabulary [0, {vocab_size})")


def _check_distinct(sorted_ids: np.ndarray, what: str, valid: np.ndarray | None = None) -> None:
    same = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    if valid is not None:
        same &= valid[:, 1:]
    if same.any():
        row, col = np.argwhere(same)[0]
        raise CodecError(f"{what}: id {sorted_ids[row, col]} appears twice in row {row}")


def _sorted_gaps(keys: np.ndarray, codes: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (key, code) pairs sorted by key: the keys as gaps (the first key, then each step - 1: ids
    ascend, so gaps >= 0) and the codes in that order; a key repeated in a row is refused."""
    packed = np.sort((keys << bits) | codes, axis=1)
    keys = packed >> bits
    _check_distinct(keys, "top-k codec field 'ids'")
    return np.diff(keys, axis=1, prepend=-1) - 1, packed & ((1 << bits) - 1)


def prepared(ids, logprobs, tail, vocab_size: int, steps: tuple, mass_tol: float):
    """A top-k encoder's inputs as checked arrays (rows the codec cannot store faithfully are refused; ids int64,
    unused slots as 0), its steps as the header stores them (float32), and the unused-slot mask (None if none)."""
    ids, logprobs, tail = np.asarray(ids), np.asarray(logprobs, dtype=np.float32), np.asarray(tail, dtype=np.float32)
    if ids.ndim != 2:
        raise CodecError(f"top-k codec field 'ids': expected a 2-D [n, k] array, got shape {ids.shape}")
    step, max_step, growth = steps
    if not (0 < step <= max_step) or not np.isfinite(max_step) or not (0 < growth <= 4):
        raise CodecError(f"top-k codec: need 0 < step <= max_step (finite) and 0 < growth <= 4, "
                         f"got step={step}, max_step={max_step}, growth={growth}")
    n, k = ids.shape
    if logprobs.shape != (n, k) or tail.shape != (n,):
        raise CodecError(f"top-k codec: shapes ids {ids.shape}, logprobs {logprobs.shape}, tail {tail.shape} do not "
                         f"match [n, k], [n, k], [n]")
    if k > vocab_size:
        raise CodecError(f"top-k codec: k={k} exceeds the vocabulary size {vocab_size}")
    unused = None
    if ids.min(initial=0) < 0:
        unused = ids == -1
        if not np.isneginf(logprobs[unused]).all():
            row = np.argwhere(unused & ~np.isneginf(logprobs))[0][0]
            raise CodecError(f"top-k codec fields 'ids'/'logprobs': row {row} has an unused slot (id -1) with a "
                             f"finite log-prob")
        ids = np.where(unused, 0, ids)
    _check_ids(ids, vocab_size, "top-k codec field 'ids'")
    if not logprobs.max(initial=-np.inf) <= 1e-4:      # also true when a NaN is present
        row = np.argwhere(np.isnan(logprobs) | (logprobs > 1e-4))[0][0]
        raise CodecError(f"top-k codec field 'logprobs': row {row} holds NaN or a log-prob above 0: "
                         f"{logprobs[row][:8]}")
    if not np.all((tail >= 0) & (tail <= 1)):
        row = np.argwhere(~((tail >= 0) & (tail <= 1)))[0][0]
        raise CodecError(f"top-k codec field 'tail': row {row} has tail mass {tail[row]} outside [0, 1]")
    total = np.exp(logprobs).sum(axis=1, dtype=np.float64) + tail
    off = np.abs(total - 1.0) > mass_tol
    if off.any():
        row = np.argwhere(off)[0][0]
        raise CodecError(f"top-k codec fields 'logprobs'+'tail': row {row} sums to {total[row]:.6g}, not 1 "
                         f"(tolerance {mass_tol})")
    return ids.astype(np.int64, copy=False), logprobs, tail, tuple(float(np.float32(v)) for v in steps), unused


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int, *,
                step: float = DEFAULT_TOPK_PARAMS["step"], max_step: float = DEFAULT_TOPK_PARAMS["max_step"],
                growth: float = DEFAULT_TOPK_PARAMS["growth"], level: int = DEFAULT_TOPK_PARAMS["level"],
                mass_tol: float = 1e-3, exact: bool = False, **unused) -> bytes:
    """Encode [n, k] top-k ids/log-probs and the [n] tail mass into one payload (see module doc); `exact`
    keeps the log-probs' float32 bits. An id of -1 with log-prob -inf is an unused slot, decoded last in its row."""
    check_params(unused, set(), "top-k")
    ids, logprobs, tail, (step, max_step, growth), unused = prepared(ids, logprobs, tail, vocab_size,
                                                                     (step, max_step, growth), mass_tol)
    n, k = ids.shape
    keys = ids
    if unused is not None:   # unused slots (sampled mode) get keys V, V+1, ... so they sort last and cost ~nothing
        keys = np.where(unused, vocab_size + np.cumsum(unused, axis=1) - 1, ids)
    bits = 32 if exact else 16   # exact: the float32 bits as they are
    codes = logprobs.view(np.uint32).astype(np.int64) if exact else _value_codes(logprobs, step, max_step, growth)
    gaps, codes = _sorted_gaps(keys, codes, bits)
    flags = _FLAG_EXACT if exact else 0
    header = _TOPK_HEADER.pack(TOPK_MAGIC, TOPK_VERSION, _LAYOUT_ID, flags, n, k, step, max_step, growth)
    groups = [
        compress_planes(gaps, plane_count(vocab_size + k), level),
        compress_planes(codes, 4 if exact else plane_count(codes.max(initial=0)), level),
        compress_planes(tail.view(np.uint32), 4, level),
    ]
    return pack_frames(header, groups)


def decode_topk(payload: bytes, n: int, k: int, vocab_size: int, **unused) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a payload from encode_topk into ids int64 [n, k], log-probs float32 [n, k], tail float32 [n].
    Accepts the encoder's parameters (they are stored in the header)."""
    check_params(unused, TOPK_PARAMS, "top-k")
    _, _, layout, flags, _, _, step, max_step, growth = unpack_header(payload, _TOPK_HEADER, TOPK_MAGIC, "top-k",
                                                                      TOPK_VERSION, (4, 5), (n, k))
    if layout != _LAYOUT_ID or flags & _FLAG_RANKS:
        raise CodecError("top-k codec payload was written with rows sorted by value or a rank table "
                         "('layout'/'rank_of_id'), experimental options this fastkd no longer reads")
    g_keys, g_codes, g_tail = unpack_frames(payload, _TOPK_HEADER.size, 3)
    tail = decompress_planes(g_tail, n).view(np.float32)
    keys = decompress_planes(g_keys, n * k).reshape(n, k).astype(np.int64)
    codes = decompress_planes(g_codes, n * k).reshape(n, k)
    np.cumsum(keys, axis=1, out=keys)     # (in place on int64: ~15x faster than cumsum(dtype=...))
    keys += np.arange(k)
    exact = bool(flags & _FLAG_EXACT)
    top = keys.max(initial=0)
    if (not exact and codes.max(initial=0) > NEG_INF_CODE) or top >= vocab_size + k:
        raise CodecError("corrupt top-k codec payload: code or id out of range")
    ids = np.where(keys >= vocab_size, -1, keys) if top >= vocab_size else keys
    logprobs = codes.view(np.float32) if exact else _decoded_logprobs(codes, tail, step, max_step, growth)
    return ids, logprobs, tail


def topk_exact(payload: bytes) -> bool:
    """Whether a KT version-1 payload holds its log-probs exactly (precision "exact")."""
    return len(payload) >= _TOPK_HEADER.size and bool(_TOPK_HEADER.unpack_from(payload)[3] & _FLAG_EXACT)


def encode_sampled(ids: np.ndarray, counts: np.ndarray, vocab_size: int, *, level: int = 3, **unused) -> bytes:
    """Encode sampled-mode rows (ids [n, s], -1 = unused slot; counts [n, s], 0 = unused), lossless
    as a multiset: decoding returns each row's (id, count) pairs sorted by id, unused slots last."""
    check_params(unused, set(), "sampled")
    ids = np.asarray(ids)
    counts = np.asarray(counts)
    if ids.ndim != 2 or counts.shape != ids.shape:
        raise CodecError(f"sampled codec: ids {ids.shape} and counts {counts.shape} must be equal 2-D shapes [n, s]")
    n, s = ids.shape
    valid = ids >= 0
    if ((ids < -1)).any() or (counts[valid] <= 0).any() or (counts[~valid] != 0).any():
        raise CodecError("sampled codec fields 'ids'/'counts': a used slot needs id >= 0 and count > 0, an unused "
                         "one id -1 and count 0")
    _check_ids(np.where(valid, ids, 0), vocab_size, "sampled codec field 'ids'")
    keys = ids.astype(np.int64)
    order = np.argsort(np.where(valid, keys, vocab_size), axis=1, kind="stable")   # unused slots last
    keys = np.take_along_axis(keys, order, axis=1)
    counts = np.take_along_axis(counts.astype(np.int64), order, axis=1)
    valid = keys >= 0
    _check_distinct(keys, "sampled codec field 'ids'", valid)
    used = valid.sum(axis=1)
    stream = (np.diff(keys, axis=1, prepend=-1) - 1)[valid]
    header = _SAMPLED_HEADER.pack(SAMPLED_MAGIC, SAMPLED_VERSION, 0, n, s)
    cnt = counts[valid] - 1
    groups = [
        compress_planes(used, plane_count(s), level),
        compress_planes(stream, plane_count(stream.max(initial=0)), level),
        compress_planes(cnt, plane_count(cnt.max(initial=0)), level),
    ]
    return pack_frames(header, groups)


def decode_sampled(payload: bytes, n: int, s: int, vocab_size: int, **unused) -> tuple[np.ndarray, np.ndarray]:
    """Decode a payload from encode_sampled into ids int64 [n, s] (-1 padded) and counts int32 [n, s]."""
    check_params(unused, {"level"}, "sampled")
    flags = unpack_header(payload, _SAMPLED_HEADER, SAMPLED_MAGIC, "sampled", SAMPLED_VERSION, (3, 4), (n, s))[2]
    if flags & _FLAG_RANKS:
        raise CodecError("sampled codec payload was written with a rank table ('rank_of_id'), an experimental "
                         "option this fastkd no longer reads")
    g_used, g_ids, g_counts = unpack_frames(payload, _SAMPLED_HEADER.size, 3)
    used = decompress_planes(g_used, n).astype(np.int64)
    if (used > s).any():
        raise CodecError("corrupt sampled codec payload: more used slots than s")
    total = int(used.sum())
    stream = decompress_planes(g_ids, total).astype(np.int64) + 1
    starts = np.cumsum(used) - used
    stream[starts[used > 0]] -= 1                 # row-first entries are absolute, the rest are gap + 1
    flat = np.cumsum(stream)
    before = np.concatenate([[0], flat])[starts]  # running sum before each row
    flat -= np.repeat(before, used)
    if total and flat.max() >= vocab_size:
        raise CodecError("corrupt sampled codec payload: id out of range")
    mask = np.arange(s)[None, :] < used[:, None]
    ids = np.full((n, s), -1, dtype=np.int64)
    ids[mask] = flat
    counts = np.zeros((n, s), dtype=np.int32)
    counts[mask] = decompress_planes(g_counts, total).astype(np.int32) + 1
    return ids, counts
