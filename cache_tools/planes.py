"""Byte planes and zstd frames: the bytes every codec payload and block tensor is built from."""

from __future__ import annotations

import struct
from itertools import accumulate

import numpy as np
import zstandard

from .errors import CodecError

ZSTD_LEVEL = 3          # small parts (tokens, row bits); the codecs default to level 1


def check_params(given: dict, allowed: set, codec: str) -> None:
    """Refuse parameters a codec does not know (a typo would otherwise be ignored silently)."""
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise CodecError(f"{codec} codec: unknown parameter(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(allowed))}")


def plane_count(max_value: int) -> int:
    """How many little-endian bytes hold values up to max_value."""
    return max(1, (int(max_value).bit_length() + 7) // 8)


def compress_planes(values: np.ndarray, nbytes: int, level: int) -> list[bytes]:
    """Split unsigned ints into `nbytes` byte planes and zstd-compress each plane on its own."""
    raw = np.ascontiguousarray(values, dtype="<u4").reshape(-1).view(np.uint8).reshape(-1, 4)
    cctx = zstandard.ZstdCompressor(level=level)
    return [cctx.compress(np.ascontiguousarray(raw[:, b])) for b in range(nbytes)]


def decompress_planes(frames: list[bytes], count: int) -> np.ndarray:
    """Inverse of compress_planes: uint32 array of `count` values."""
    dctx = zstandard.ZstdDecompressor()
    out = np.zeros(count, dtype=np.uint32)
    for b, frame in enumerate(frames):
        out |= decompress_plane(frame, count, b, dctx).astype(np.uint32) << np.uint32(8 * b)
    return out


def decompress_plane(frame: bytes, count: int, b: int = 0, dctx=None) -> np.ndarray:
    """Byte plane `b` as `count` uint8 values; CodecError when its frame does not decompress to exactly that."""
    try:
        plane = np.frombuffer((dctx or zstandard.ZstdDecompressor()).decompress(frame, max_output_size=count), np.uint8)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt codec payload: byte plane {b} does not decompress ({exc})") from None
    if plane.size != count:
        raise CodecError(f"corrupt codec payload: byte plane {b} holds {plane.size} values, expected {count}")
    return plane


def pack_frames(header: bytes, groups: list[list[bytes]]) -> bytes:
    """header + per group [plane count u8] + per frame [length u32] + the frames."""
    frames = [f for g in groups for f in g]
    lengths = struct.pack(f"<{len(frames)}I", *map(len, frames))
    return header + bytes(len(g) for g in groups) + lengths + b"".join(frames)


def unpack_frames(payload: bytes, offset: int, n_groups: int) -> list[list[bytes]]:
    """Inverse of pack_frames, starting after the header."""
    counts = list(payload[offset:offset + n_groups])
    try:
        lengths = struct.unpack_from(f"<{sum(counts)}I", payload, offset + n_groups)
    except struct.error as exc:
        raise CodecError(f"corrupt codec payload: truncated frame table ({exc})") from None
    ends = list(accumulate(lengths, initial=offset + n_groups + 4 * len(lengths)))
    if ends[-1] != len(payload):
        raise CodecError(f"corrupt codec payload: {len(payload)} bytes, frame table says {ends[-1]}")
    frames = [payload[a:b] for a, b in zip(ends, ends[1:])]
    cuts = list(accumulate(counts, initial=0))
    return [frames[a:b] for a, b in zip(cuts, cuts[1:])]


def peek(payload: bytes, magic: bytes, what: str) -> int:
    """The version byte of a payload that starts with `magic`; CodecError for anything else."""
    if len(payload) < 3 or payload[:2] != magic:
        raise CodecError(f"not a {what} codec payload (starts with {bytes(payload[:2])!r}, expected {magic!r})")
    return payload[2]


def unpack_header(payload: bytes, header, magic: bytes, what: str, version: int, shape: tuple, expected: tuple):
    """The fields of a payload's `header` (a struct.Struct after magic and version byte), once its magic, version,
    length and stored shape (the fields at `shape`) are those expected; CodecError naming what differs."""
    got = peek(payload, magic, what)
    if got != version:
        raise CodecError(f"{what} codec payload has version {got}; this decoder reads version {version}")
    if len(payload) < header.size:
        raise CodecError(f"corrupt {what} codec payload: shorter than its header")
    fields = header.unpack_from(payload)
    if tuple(fields[i] for i in shape) != tuple(expected):
        raise CodecError(f"{what} codec payload holds {[fields[i] for i in shape]}, caller expects {list(expected)}")
    return fields
