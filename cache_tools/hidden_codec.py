"""The hidden-state codec (`KH`): bf16, or int8 / fp8 (e4m3) with a float32 scale per block, in zstd byte
planes (docs/codec.md); and the fixed random projection that shrinks their width."""

from __future__ import annotations

import struct
from functools import lru_cache

import numpy as np

from .errors import CodecError
from .planes import (check_params, compress_planes, decompress_plane, decompress_planes, pack_frames, unpack_frames,
                     unpack_header)

HIDDEN_MAGIC = b"KH"
HIDDEN_VERSION = 1
METHODS = {"bf16": 0, "int8": 1, "fp8": 2}
FP8_MAX = 448.0           # largest finite float8_e4m3fn
INT8_MAX = 127.0

_HEADER = struct.Struct("<2sBBIII")   # magic, version, method, n, d, block (0 = one scale per row)


def encode_hidden(x: np.ndarray, method: str = "bf16", *, block: int = 128, level: int = 1, **unused) -> bytes:
    """Encode float32 [n, d] hidden states; int8/fp8 keep one scale per `block` values of a row (0: one per
    row; a last partial block is zero-padded); errors within the bound of docs/codec.md (tests: hidden_error_bound)."""
    check_params(unused, set(), "hidden")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise CodecError(f"hidden codec: expected a 2-D [n, d] array, got shape {x.shape}")
    if method not in METHODS:
        raise CodecError(f"hidden codec: unknown method {method!r}; choose one of {sorted(METHODS)}")
    if not np.isfinite(x).all():
        row = np.argwhere(~np.isfinite(x))[0][0]
        raise CodecError(f"hidden codec: row {row} holds NaN or inf; refusing to store it")
    n, d = x.shape
    if block < 0:
        raise CodecError(f"hidden codec: block must be >= 0 (0 = one scale per row), got {block}")
    block = min(block, d) if method != "bf16" else 0
    header = _HEADER.pack(HIDDEN_MAGIC, HIDDEN_VERSION, METHODS[method], n, d, block)
    if method == "bf16":
        return pack_frames(header, [[], compress_planes(_to_bf16_bits(x), 2, level)])
    per_row, size = _block_shape(d, block)
    if per_row * size != d:   # the last block zero-padded
        x = np.pad(x, ((0, 0), (0, per_row * size - d)))
    blocks = x.reshape(n, per_row, size)
    absmax = np.abs(blocks).max(axis=2, keepdims=True, initial=0)
    top = INT8_MAX if method == "int8" else FP8_MAX
    scale = (absmax / np.float32(top)).astype(np.float32)
    y = blocks / np.where(scale > 0, scale, np.float32(1.0))
    np.clip(y, -top, top, out=y)
    if method == "int8":
        q = np.rint(y).astype(np.int8).view(np.uint8)
    else:
        import torch
        q = torch.from_numpy(np.ascontiguousarray(y)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return pack_frames(header, [compress_planes(scale.view(np.uint32), 4, level),
                                 compress_planes(q.reshape(-1), 1, level)])


def decode_hidden(payload: bytes, n: int, d: int, method: str = "bf16", **unused) -> np.ndarray:
    """Decode a payload from encode_hidden into float32 [n, d].
    Accepts the encoder's parameters (block and level are read from the payload)."""
    check_params(unused, {"block", "level"}, "hidden")
    _, _, method_id, _, _, block = unpack_header(payload, _HEADER, HIDDEN_MAGIC, "hidden-state", HIDDEN_VERSION,
                                                 (3, 4), (n, d))
    stored = {v: k for k, v in METHODS.items()}.get(method_id)
    if stored != method:
        raise CodecError(f"hidden codec payload was written with method {stored!r}, caller expects {method!r}")
    g_scale, g_values = unpack_frames(payload, _HEADER.size, 2)
    if method == "bf16":
        bits = decompress_planes(g_values, n * d) << np.uint32(16)
        return bits.view(np.float32).reshape(n, d)
    per_row, size = _block_shape(d, block)
    scale = decompress_planes(g_scale, n * per_row).view(np.float32).reshape(n, per_row, 1)
    if len(g_values) != 1:
        raise CodecError(f"corrupt hidden codec payload: {len(g_values)} value frames, expected 1")
    q = decompress_plane(g_values[0], n * per_row * size).reshape(n, per_row, size)
    vals = q.view(np.int8).astype(np.float32) if method == "int8" else _fp8_values()[q]
    vals *= scale
    return vals.reshape(n, per_row * size)[:, :d]


@lru_cache(maxsize=1)
def _fp8_values() -> np.ndarray:
    """The float32 value of every e4m3fn byte (a lookup table: far faster than torch's cast on CPU)."""
    import torch
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint32 holding 16 bits), round to nearest even."""
    u = x.view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    if ((rounded & np.uint32(0x7F80)) == np.uint32(0x7F80)).any():
        raise CodecError("hidden codec: a value overflows bf16 (|x| > 3.39e38)")
    return rounded


def _block_shape(d: int, block: int) -> tuple[int, int]:
    """(blocks per row, values per block) of rows of width d: ceil(d / block) blocks, or one per row (block=0)."""
    size = block or d
    return (-(-d // size) if size else 0), size


def random_projection(d_in: int, d_out: int, seed: int) -> np.ndarray:
    """A fixed [d_in, d_out] matrix of +-1/sqrt(d_out) (Rademacher), so E||x R||^2 = ||x||^2.
    Built from a splitmix64 hash of (seed, index): the same on every machine and numpy version."""
    if d_in <= 0 or d_out <= 0:
        raise CodecError(f"random projection: widths must be positive, got {d_in} -> {d_out}")
    idx = np.arange(d_in * d_out, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = idx * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0xD1B54A32D192ED03)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    signs = np.where((z >> np.uint64(63)) == 1, np.float32(1.0), np.float32(-1.0))
    return (signs / np.float32(np.sqrt(d_out))).reshape(d_in, d_out)
