"""Compact codecs for a teacher's top-k log-probs (+ exact tail mass) and for sampled ids.

Top-k layout ("KT", version 1): each row's log-probs are quantised relative to the row's top-1
on a companded scale (fine near the top, coarser where the mass is tiny), the tail mass is kept
bit-exact in fp32, and the decoder rescales the top-k so that top-k + tail sums to exactly 1.
Ids are either kept in value order (layout "value") or sorted and gap-coded (layout "id");
every integer stream is split into byte planes and each plane is zstd-compressed on its own.
See docs/codec.md for the measured sizes and errors.
"""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np
import zstandard

from fastkd.errors import UserError

TOPK_MAGIC = b"KT"
SAMPLED_MAGIC = b"KS"
TOPK_VERSION = 1
SAMPLED_VERSION = 1
LAYOUTS = {"value": 0, "id": 1}
NEG_INF_CODE = 65535          # code reserved for a log-prob of -inf (zero mass)
MAX_FINITE_CODE = 65534

DEFAULT_TOPK_PARAMS = {"layout": "id", "step": 0.10, "max_step": 1.0, "level": 3}

_TOPK_HEADER = struct.Struct("<2sBBBxIIff")   # magic, version, layout, flags, n, k, step, max_step
_SAMPLED_HEADER = struct.Struct("<2sBBII")     # magic, version, flags, n, s
_FLAG_RANKS = 1


class CodecError(UserError):
    """Input a codec cannot store faithfully, or a payload it cannot read."""


# ---------------------------------------------------------------------------- byte planes

def _plane_count(max_value: int) -> int:
    """How many little-endian bytes hold values up to max_value."""
    return max(1, (int(max_value).bit_length() + 7) // 8)


def _compress_planes(values: np.ndarray, nbytes: int, level: int) -> list[bytes]:
    """Split unsigned ints into `nbytes` byte planes and zstd-compress each plane on its own."""
    raw = np.ascontiguousarray(values, dtype="<u4").reshape(-1).view(np.uint8).reshape(-1, 4)
    cctx = zstandard.ZstdCompressor(level=level)
    return [cctx.compress(np.ascontiguousarray(raw[:, b]).tobytes()) for b in range(nbytes)]


def _decompress_planes(frames: list[bytes], count: int) -> np.ndarray:
    """Inverse of _compress_planes: uint32 array of `count` values."""
    dctx = zstandard.ZstdDecompressor()
    out = np.zeros(count, dtype=np.uint32)
    for b, frame in enumerate(frames):
        plane = np.frombuffer(dctx.decompress(frame, max_output_size=count), dtype=np.uint8)
        if plane.size != count:
            raise CodecError(f"corrupt codec payload: byte plane {b} holds {plane.size} values, expected {count}")
        out |= plane.astype(np.uint32) << np.uint32(8 * b)
    return out


def _pack_frames(header: bytes, groups: list[list[bytes]]) -> bytes:
    """header + per group [plane count u8] + per frame [length u32] + the frames."""
    table = b"".join(struct.pack("<B", len(g)) for g in groups)
    lengths = b"".join(struct.pack("<I", len(f)) for g in groups for f in g)
    return header + table + lengths + b"".join(f for g in groups for f in g)


def _unpack_frames(payload: bytes, offset: int, n_groups: int) -> list[list[bytes]]:
    """Inverse of _pack_frames, starting after the header."""
    try:
        counts = list(payload[offset:offset + n_groups])
        offset += n_groups
        total = sum(counts)
        lengths = struct.unpack_from(f"<{total}I", payload, offset)
        offset += 4 * total
    except struct.error as exc:
        raise CodecError(f"corrupt codec payload: truncated frame table ({exc})") from None
    frames, groups = [], []
    for length in lengths:
        frames.append(payload[offset:offset + length])
        offset += length
    if offset != len(payload):
        raise CodecError(f"corrupt codec payload: {len(payload)} bytes, frame table says {offset}")
    for c in counts:
        groups.append(frames[:c])
        frames = frames[c:]
    return groups


# ---------------------------------------------------------------------------- quantiser

def _companding(step: float, max_step: float) -> tuple[float, float]:
    """Knee of the companded scale: x* (nats below top-1) and t* (code units there)."""
    x_knee = 2.0 * np.log(max_step / step)
    return x_knee, 2.0 / step - 2.0 / max_step


def _to_code(x: np.ndarray, step: float, max_step: float) -> np.ndarray:
    """Nats below the row's top-1 (x >= 0) -> integer code; step(x) = min(step*e^(x/2), max_step),
    so every entry adds about the same KL until its mass is negligible."""
    x_knee, t_knee = _companding(step, max_step)
    with np.errstate(over="ignore", invalid="ignore"):
        t = np.where(x < x_knee, (2.0 / step) * -np.expm1(-0.5 * x), t_knee + (x - x_knee) / max_step)
    return np.minimum(np.rint(t), MAX_FINITE_CODE).astype(np.uint32)


@lru_cache(maxsize=16)
def _code_table(step: float, max_step: float) -> tuple[np.ndarray, np.ndarray]:
    """Per code: nats below top-1 (float64) and the relative weight exp(-x) (0 for -inf)."""
    x_knee, t_knee = _companding(step, max_step)
    c = np.arange(NEG_INF_CODE + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(c <= t_knee, -2.0 * np.log1p(-np.minimum(c, t_knee) * step / 2.0), x_knee + (c - t_knee) * max_step)
    x[NEG_INF_CODE] = np.inf
    return x, np.exp(-x)


def _check_steps(step: float, max_step: float) -> None:
    if not (0 < step <= max_step) or not np.isfinite(max_step):
        raise CodecError(f"top-k codec: need 0 < step <= max_step (finite), got step={step}, max_step={max_step}")


# ---------------------------------------------------------------------------- validation

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


def _check_topk_inputs(ids, logprobs, tail, vocab_size, mass_tol) -> None:
    n, k = ids.shape
    if logprobs.shape != (n, k) or tail.shape != (n,):
        raise CodecError(f"top-k codec: shapes ids {ids.shape}, logprobs {logprobs.shape}, tail {tail.shape} do not match [n, k], [n, k], [n]")
    if k > vocab_size:
        raise CodecError(f"top-k codec: k={k} exceeds the vocabulary size {vocab_size}")
    _check_ids(ids, vocab_size, "top-k codec field 'ids'")
    if np.isnan(logprobs).any() or (logprobs > 1e-4).any():
        row = np.argwhere(np.isnan(logprobs) | (logprobs > 1e-4))[0][0]
        raise CodecError(f"top-k codec field 'logprobs': row {row} holds NaN or a log-prob above 0: {logprobs[row][:8]}")
    if not np.all((tail >= 0) & (tail <= 1)):
        row = np.argwhere(~((tail >= 0) & (tail <= 1)))[0][0]
        raise CodecError(f"top-k codec field 'tail': row {row} has tail mass {tail[row]} outside [0, 1]")
    total = np.exp(logprobs.astype(np.float64)).sum(axis=1) + tail
    off = np.abs(total - 1.0) > mass_tol
    if off.any():
        row = np.argwhere(off)[0][0]
        raise CodecError(f"top-k codec fields 'logprobs'+'tail': row {row} sums to {total[row]:.6g}, not 1 (tolerance {mass_tol})")


def _rank_maps(rank_of_id, vocab_size):
    """The optional global frequency table: rank_of_id (a permutation of the vocabulary) and its inverse."""
    if rank_of_id is None:
        return None, None
    rank_of_id = np.asarray(rank_of_id, dtype=np.int64)
    if rank_of_id.shape != (vocab_size,) or not np.array_equal(np.sort(rank_of_id), np.arange(vocab_size)):
        raise CodecError(f"codec parameter 'rank_of_id' must be a permutation of range({vocab_size})")
    id_of_rank = np.empty_like(rank_of_id)
    id_of_rank[rank_of_id] = np.arange(vocab_size)
    return rank_of_id, id_of_rank


# ---------------------------------------------------------------------------- top-k

def encode_topk(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int, *,
                layout: str = DEFAULT_TOPK_PARAMS["layout"], step: float = DEFAULT_TOPK_PARAMS["step"],
                max_step: float = DEFAULT_TOPK_PARAMS["max_step"], level: int = DEFAULT_TOPK_PARAMS["level"],
                rank_of_id: np.ndarray | None = None, mass_tol: float = 1e-3, **unused) -> bytes:
    """Encode [n, k] top-k ids/log-probs and the [n] tail mass into one payload (see module doc)."""
    ids = np.asarray(ids)
    logprobs = np.asarray(logprobs, dtype=np.float32)
    tail = np.asarray(tail, dtype=np.float32)
    if ids.ndim != 2:
        raise CodecError(f"top-k codec field 'ids': expected a 2-D [n, k] array, got shape {ids.shape}")
    if layout not in LAYOUTS:
        raise CodecError(f"top-k codec: unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    _check_steps(step, max_step)
    _check_topk_inputs(ids, logprobs, tail, vocab_size, mass_tol)
    n, k = ids.shape
    rank_of_id, _ = _rank_maps(rank_of_id, vocab_size)
    keys = (rank_of_id[ids] if rank_of_id is not None else ids).astype(np.int64)

    finite = np.isfinite(logprobs)
    top = np.where(finite, logprobs, -np.inf).max(axis=1, initial=-np.inf, keepdims=True)
    x = np.where(finite, top - logprobs, 0.0).astype(np.float64)
    codes = np.where(finite, _to_code(x, step, max_step), NEG_INF_CODE).astype(np.int64)

    id_bits = max(1, int(vocab_size - 1).bit_length())
    if layout == "value":
        packed = np.sort((codes << id_bits) | keys, axis=1)
        keys, codes = packed & ((1 << id_bits) - 1), packed >> id_bits
        _check_distinct(np.sort(keys, axis=1), "top-k codec field 'ids'")
        code_stream = np.diff(codes, axis=1)             # non-decreasing codes: gaps >= 0; first code is 0
        key_stream = keys
    else:
        packed = np.sort((keys << 16) | codes, axis=1)
        keys, codes = packed >> 16, packed & 0xFFFF
        _check_distinct(keys, "top-k codec field 'ids'")
        gaps = np.diff(keys, axis=1) - 1
        key_stream = np.concatenate([keys[:, :1], gaps], axis=1)
        code_stream = codes
    first_nonzero = layout == "value"
    # value layout drops each row's first code (always 0 unless the whole row is -inf: flagged per row)
    all_neg_inf = ~finite.any(axis=1) if k else np.zeros(n, dtype=bool)
    flags = _FLAG_RANKS if rank_of_id is not None else 0
    header = _TOPK_HEADER.pack(TOPK_MAGIC, TOPK_VERSION, LAYOUTS[layout], flags, n, k, step, max_step)
    groups = [
        _compress_planes(key_stream, _plane_count(max(int(key_stream.max(initial=0)), 1)), level),
        _compress_planes(code_stream, _plane_count(int(code_stream.max(initial=0))), level),
        _compress_planes(tail.view(np.uint32), 4, level),
        _compress_planes(np.packbits(all_neg_inf) if first_nonzero else np.zeros(0, np.uint8), 1, level),
    ]
    return _pack_frames(header, groups)


def decode_topk(payload: bytes, n: int, k: int, vocab_size: int, *, rank_of_id: np.ndarray | None = None,
                **unused) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a payload from encode_topk into ids int64 [n, k], log-probs float32 [n, k], tail float32 [n].
    Dispatches on the version byte so payloads of older versions stay readable."""
    magic, version = _peek(payload, TOPK_MAGIC, "top-k")
    decoders = {1: _decode_topk_v1}
    if version not in decoders:
        raise CodecError(f"top-k codec payload has version {version}; this fastkd reads versions {sorted(decoders)}")
    return decoders[version](payload, n, k, vocab_size, rank_of_id)


def _peek(payload: bytes, magic: bytes, what: str) -> tuple[bytes, int]:
    if len(payload) < 3 or payload[:2] != magic:
        raise CodecError(f"not a {what} codec payload (starts with {bytes(payload[:2])!r}, expected {magic!r})")
    return payload[:2], payload[2]


def _decode_topk_v1(payload, n, k, vocab_size, rank_of_id):
    _, _, layout, flags, n_stored, k_stored, step, max_step = _TOPK_HEADER.unpack_from(payload)
    if (n_stored, k_stored) != (n, k):
        raise CodecError(f"top-k codec payload holds [{n_stored}, {k_stored}], caller expects [{n}, {k}]")
    if bool(flags & _FLAG_RANKS) != (rank_of_id is not None):
        raise CodecError("top-k codec payload was written " + ("with" if flags & _FLAG_RANKS else "without")
                         + " a rank table ('rank_of_id'); pass the same table to decode it")
    _, id_of_rank = _rank_maps(rank_of_id, vocab_size)
    g_keys, g_codes, g_tail, g_flags = _unpack_frames(payload, _TOPK_HEADER.size, 4)
    tail = _decompress_planes(g_tail, n).view(np.float32)
    key_stream = _decompress_planes(g_keys, n * k).reshape(n, k).astype(np.int64)
    if layout == LAYOUTS["value"]:
        gaps = _decompress_planes(g_codes, n * max(k - 1, 0)).reshape(n, max(k - 1, 0)).astype(np.int64)
        all_neg_inf = np.unpackbits(_decompress_planes(g_flags, (n + 7) // 8).astype(np.uint8))[:n].astype(bool)
        codes = np.zeros((n, k), dtype=np.int64)
        codes[all_neg_inf] = NEG_INF_CODE
        if k > 1:
            np.cumsum(gaps, axis=1, out=codes[:, 1:])
            codes[:, 1:] += codes[:, :1]
        keys = key_stream
    else:
        codes = _decompress_planes(g_codes, n * k).reshape(n, k).astype(np.int64)
        keys = np.cumsum(key_stream, axis=1)
        keys[:, 1:] += np.arange(1, k)
    if (codes > NEG_INF_CODE).any() or (keys >= vocab_size).any():
        raise CodecError("corrupt top-k codec payload: code or id out of range")
    ids = id_of_rank[keys] if id_of_rank is not None else keys
    x, weight = _code_table(float(step), float(max_step))
    w = weight[codes]
    row_sum = w.sum(axis=1)
    mass = np.maximum(1.0 - tail.astype(np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where((row_sum > 0) & (mass > 0), np.log(mass) - np.log(row_sum), -np.inf)
        logprobs = (shift[:, None] - x[codes]).astype(np.float32)
    logprobs[np.isnan(logprobs)] = -np.inf
    return ids, logprobs, tail


def topk_error_bound(step: float = DEFAULT_TOPK_PARAMS["step"], max_step: float = DEFAULT_TOPK_PARAMS["max_step"]) -> float:
    """Worst-case |log q_i - log p_i| before renormalisation, for entries within the companded
    (fine) region; entries further than the knee below top-1 err by up to max_step/2 nats."""
    return step / 2.0


# ---------------------------------------------------------------------------- sampled

def encode_sampled(ids: np.ndarray, counts: np.ndarray, vocab_size: int, *, level: int = 3,
                   rank_of_id: np.ndarray | None = None, **unused) -> bytes:
    """Encode sampled-mode rows (ids [n, s], -1 = unused slot; counts [n, s], 0 = unused), lossless
    as a multiset: decoding returns each row's (id, count) pairs sorted by id, unused slots last."""
    ids = np.asarray(ids)
    counts = np.asarray(counts)
    if ids.ndim != 2 or counts.shape != ids.shape:
        raise CodecError(f"sampled codec: ids {ids.shape} and counts {counts.shape} must be equal 2-D shapes [n, s]")
    n, s = ids.shape
    valid = ids >= 0
    if ((ids < -1)).any() or (counts[valid] <= 0).any() or (counts[~valid] != 0).any():
        raise CodecError("sampled codec fields 'ids'/'counts': a used slot needs id >= 0 and count > 0, an unused one id -1 and count 0")
    _check_ids(np.where(valid, ids, 0), vocab_size, "sampled codec field 'ids'")
    rank_of_id, _ = _rank_maps(rank_of_id, vocab_size)
    keys = np.where(valid, rank_of_id[np.where(valid, ids, 0)] if rank_of_id is not None else ids, -1).astype(np.int64)
    big = np.int64(1) << 40
    order = np.argsort(np.where(valid, keys, big), axis=1, kind="stable")
    keys = np.take_along_axis(keys, order, axis=1)
    counts = np.take_along_axis(counts.astype(np.int64), order, axis=1)
    valid = keys >= 0
    _check_distinct(keys, "sampled codec field 'ids'", valid)
    used = valid.sum(axis=1)
    gaps = np.diff(keys, axis=1) - 1
    stream = np.concatenate([keys[:, :1], gaps], axis=1)[valid]
    flags = _FLAG_RANKS if rank_of_id is not None else 0
    header = _SAMPLED_HEADER.pack(SAMPLED_MAGIC, SAMPLED_VERSION, flags, n, s)
    cnt = counts[valid] - 1
    groups = [
        _compress_planes(used, _plane_count(s), level),
        _compress_planes(stream, _plane_count(max(int(stream.max(initial=0)), 1)), level),
        _compress_planes(cnt, _plane_count(max(int(cnt.max(initial=0)), 1)), level),
    ]
    return _pack_frames(header, groups)


def decode_sampled(payload: bytes, n: int, s: int, vocab_size: int, *, rank_of_id: np.ndarray | None = None,
                   **unused) -> tuple[np.ndarray, np.ndarray]:
    """Decode a payload from encode_sampled into ids int64 [n, s] (-1 padded) and counts int32 [n, s]."""
    _, version = _peek(payload, SAMPLED_MAGIC, "sampled")
    if version != 1:
        raise CodecError(f"sampled codec payload has version {version}; this fastkd reads versions [1]")
    _, _, flags, n_stored, s_stored = _SAMPLED_HEADER.unpack_from(payload)
    if (n_stored, s_stored) != (n, s):
        raise CodecError(f"sampled codec payload holds [{n_stored}, {s_stored}], caller expects [{n}, {s}]")
    if bool(flags & _FLAG_RANKS) != (rank_of_id is not None):
        raise CodecError("sampled codec payload and caller disagree on the rank table ('rank_of_id')")
    _, id_of_rank = _rank_maps(rank_of_id, vocab_size)
    g_used, g_ids, g_counts = _unpack_frames(payload, _SAMPLED_HEADER.size, 3)
    used = _decompress_planes(g_used, n).astype(np.int64)
    if (used > s).any():
        raise CodecError("corrupt sampled codec payload: more used slots than s")
    total = int(used.sum())
    stream = _decompress_planes(g_ids, total).astype(np.int64) + 1
    starts = np.cumsum(used) - used
    stream[starts[used > 0]] -= 1                 # row-first entries are absolute, the rest are gap + 1
    flat = np.cumsum(stream)
    before = np.concatenate([[0], flat])[starts]  # running sum before each row
    flat -= np.repeat(before, used)
    if total and flat.max() >= vocab_size:
        raise CodecError("corrupt sampled codec payload: id out of range")
    mask = np.arange(s)[None, :] < used[:, None]
    ids = np.full((n, s), -1, dtype=np.int64)
    ids[mask] = id_of_rank[flat] if id_of_rank is not None else flat
    counts = np.zeros((n, s), dtype=np.int32)
    counts[mask] = _decompress_planes(g_counts, total).astype(np.int32) + 1
    return ids, counts
