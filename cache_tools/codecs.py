"""Codec registry: name -> encode/decode functions for the logits part and the hidden part.

A shard names its codecs (name + params) in its metadata, so a reader looks them up here.
Logits codecs: `encode(ids, logprobs, tail, vocab_size, **params) -> bytes` and
`decode(payload, n, k, vocab_size, **params) -> (ids int64, logprobs float32, tail float32)`.
Hidden codecs: `encode(x float32 [n, d], **params) -> bytes` and
`decode(payload, n, d, **params) -> float32 [n, d]`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import zstandard

ZSTD_LEVEL = 3          # small parts (tokens, logits)
HIDDEN_ZSTD_LEVEL = 1   # hidden states: near-random low bytes; level 1 is ~2.4x faster than 3 and no larger
DEFAULT_TOPK_CODEC = {"name": "kt-zstd", "params": {}}   # chosen in docs/codec.md (kt2-zstd misses its 64 B bound)
# codecs that need format version 2 (cache_tools/shard.py: format_version_for)
VERSION2_TOPK_CODECS = ("kt2-zstd", "ks-zstd")
DEFAULT_HIDDEN_CODEC = {"name": "kh-zstd", "params": {"method": "int8", "block": 128}}
# modules that may register more codecs when first needed (written separately)
PLUGIN_MODULES = ("fastkd.cache_tools.topk_codec", "fastkd.cache_tools.hidden_codec")


@dataclass(frozen=True)
class Codec:
    """One registered codec: its name and its two functions. `labels`: the shard passes the
    block's next-token ids (`labels=`) to both; `sampled`: a sampled-mode codec of ids + counts
    (`encode(ids, counts, vocab_size)`, `decode(payload, n, k, vocab_size) -> (ids, counts)`)."""

    name: str
    encode: Callable
    decode: Callable
    labels: bool = False
    sampled: bool = False


_TOPK: dict[str, Codec] = {}
_HIDDEN: dict[str, Codec] = {}
_plugins_loaded = False


def register_topk_codec(name: str, encode: Callable, decode: Callable, *, labels: bool = False,
                        sampled: bool = False) -> None:
    """Make a logits codec available under `name` (shards store the name, so never reuse one)."""
    _TOPK[name] = Codec(name, encode, decode, labels, sampled)


def register_hidden_codec(name: str, encode: Callable, decode: Callable) -> None:
    """Make a hidden-state codec available under `name`."""
    _HIDDEN[name] = Codec(name, encode, decode)


def _load_plugins() -> None:
    """Import the optional codec modules once; they register themselves (see register_codecs)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in PLUGIN_MODULES:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        hook = getattr(mod, "register_codecs", None)
        if callable(hook):
            hook(register_topk_codec, register_hidden_codec)
            continue
        # no hook: register the module's functions under fixed names (their payloads carry
        # their own magic and version, so the names only pick the functions)
        if callable(getattr(mod, "encode_topk", None)) and callable(getattr(mod, "decode_topk", None)):
            _TOPK.setdefault("kt-zstd", Codec("kt-zstd", mod.encode_topk, mod.decode_topk))
        if callable(getattr(mod, "encode_topk2", None)) and callable(getattr(mod, "decode_topk2", None)):
            _TOPK.setdefault("kt2-zstd", Codec("kt2-zstd", mod.encode_topk2, mod.decode_topk2, labels=True))
        if callable(getattr(mod, "encode_sampled", None)) and callable(getattr(mod, "decode_sampled", None)):
            _TOPK.setdefault("ks-zstd", Codec("ks-zstd", mod.encode_sampled, mod.decode_sampled, sampled=True))
        if callable(getattr(mod, "encode_hidden", None)) and callable(getattr(mod, "decode_hidden", None)):
            _HIDDEN.setdefault("kh-zstd", Codec("kh-zstd", mod.encode_hidden, mod.decode_hidden))


def get_topk_codec(name: str) -> Codec:
    if name not in _TOPK:
        _load_plugins()
    if name not in _TOPK:
        raise KeyError(f"unknown logits codec {name!r} (known: {', '.join(sorted(_TOPK))})")
    return _TOPK[name]


def get_hidden_codec(name: str) -> Codec:
    if name not in _HIDDEN:
        _load_plugins()
    if name not in _HIDDEN:
        raise KeyError(f"unknown hidden codec {name!r} (known: {', '.join(sorted(_HIDDEN))})")
    return _HIDDEN[name]


def known_codecs() -> dict[str, list[str]]:
    _load_plugins()
    return {"topk": sorted(_TOPK), "hidden": sorted(_HIDDEN)}


# --- byte helpers --------------------------------------------------------------------------

def zstd_compress(data: bytes, level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame with the content size and a content checksum (so corruption is caught)."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(data)


def zstd_decompress(payload: bytes, expected_size: int) -> bytes:
    """Decompress one frame and check it holds exactly `expected_size` bytes."""
    out = zstandard.ZstdDecompressor().decompress(bytes(payload), max_output_size=max(expected_size, 1))
    if len(out) != expected_size:
        raise ValueError(f"decoded {len(out)} bytes, expected {expected_size}")
    return out


def split_planes(a: np.ndarray) -> bytes:
    """Little-endian bytes of `a` regrouped by byte position (all byte 0s, then all byte 1s...),
    which lets zstd find the redundancy in the high bytes."""
    a = np.ascontiguousarray(a)
    width = a.dtype.itemsize
    raw = a.astype(a.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(-1, width)
    return raw.T.tobytes()


def join_planes(data: bytes, dtype, count: int) -> np.ndarray:
    """Inverse of split_planes: `count` elements of little-endian `dtype`."""
    dtype = np.dtype(dtype).newbyteorder("<")
    width = dtype.itemsize
    planes = np.frombuffer(data, dtype=np.uint8, count=count * width).reshape(width, count)
    out = np.empty((count, width), np.uint8)
    for b in range(width):  # one strided copy per plane: far faster than a transposed copy
        out[:, b] = planes[b]
    return out.view(dtype).reshape(count).astype(dtype.newbyteorder("="), copy=False)


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned type holding ids 0..vocab_size-1 plus the all-ones 'unused' marker."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"vocab_size {vocab_size} too large")


# --- raw-zstd: the default logits codec ----------------------------------------------------

def encode_topk_raw(ids: np.ndarray, logprobs: np.ndarray, tail: np.ndarray, vocab_size: int, level: int = ZSTD_LEVEL) -> bytes:
    """ids as the smallest unsigned type (-1 -> all ones), log-probs fp16, tail fp32; each
    byte-plane split, concatenated, one zstd frame."""
    dt = id_dtype(vocab_size)
    ids = np.asarray(ids)
    stored = np.where(ids < 0, np.iinfo(dt).max, ids).astype(dt)
    body = split_planes(stored) + split_planes(np.asarray(logprobs, np.float16)) + split_planes(np.asarray(tail, np.float32))
    return zstd_compress(body, level)


def decode_topk_raw(payload: bytes, n: int, k: int, vocab_size: int, **_params):
    dt = id_dtype(vocab_size)
    sizes = [n * k * dt.itemsize, n * k * 2, n * 4]
    body = zstd_decompress(payload, sum(sizes))
    stored = join_planes(body[: sizes[0]], dt, n * k).reshape(n, k)
    ids = stored.astype(np.int64)
    ids[stored == np.iinfo(dt).max] = -1
    lp = join_planes(body[sizes[0]: sizes[0] + sizes[1]], np.float16, n * k).reshape(n, k).astype(np.float32)
    tail = join_planes(body[sizes[0] + sizes[1]:], np.float32, n)
    return ids, lp, tail


# --- hidden codecs -------------------------------------------------------------------------

def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round to nearest even) and return the 16 bits as uint16."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # keep NaN a NaN (rounding could carry it into infinity)
        rounded[nan] = ((u[nan] >> np.uint32(16)).astype(np.uint16) | np.uint16(0x0040))
    return rounded


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode_hidden_bf16(x: np.ndarray, level: int = HIDDEN_ZSTD_LEVEL) -> bytes:
    return zstd_compress(split_planes(float32_to_bf16_bits(np.asarray(x, np.float32))), level)


def decode_hidden_bf16(payload: bytes, n: int, d: int, **_params) -> np.ndarray:
    bits = join_planes(zstd_decompress(payload, n * d * 2), np.uint16, n * d)
    return bf16_bits_to_float32(bits).reshape(n, d)


def encode_hidden_fp32(x: np.ndarray, level: int = HIDDEN_ZSTD_LEVEL) -> bytes:
    return zstd_compress(split_planes(np.asarray(x, np.float32)), level)


def decode_hidden_fp32(payload: bytes, n: int, d: int, **_params) -> np.ndarray:
    return join_planes(zstd_decompress(payload, n * d * 4), np.float32, n * d).reshape(n, d)


def encode_hidden_fp16(x: np.ndarray, level: int = HIDDEN_ZSTD_LEVEL) -> bytes:
    return zstd_compress(split_planes(np.asarray(x, np.float32).astype(np.float16)), level)


def decode_hidden_fp16(payload: bytes, n: int, d: int, **_params) -> np.ndarray:
    return join_planes(zstd_decompress(payload, n * d * 2), np.float16, n * d).reshape(n, d).astype(np.float32)


register_topk_codec("raw-zstd", encode_topk_raw, decode_topk_raw)
register_hidden_codec("bf16-zstd", encode_hidden_bf16, decode_hidden_bf16)
register_hidden_codec("fp16-zstd", encode_hidden_fp16, decode_hidden_fp16)
register_hidden_codec("fp32-zstd", encode_hidden_fp32, decode_hidden_fp32)


# short names a user may type (e.g. `--hidden-codec int8`) -> registered name + params
ALIASES = {
    "topk": {"raw": {"name": "raw-zstd", "params": {}}, "kt": {"name": "kt-zstd", "params": {}},
             "kt2": {"name": "kt2-zstd", "params": {}}, "ks": {"name": "ks-zstd", "params": {}},
             "compact": {"name": "kt-zstd", "params": {}}},
    "hidden": {"bf16": {"name": "bf16-zstd", "params": {}}, "fp16": {"name": "fp16-zstd", "params": {}},
               "fp32": {"name": "fp32-zstd", "params": {}},
               "int8": {"name": "kh-zstd", "params": {"method": "int8"}},
               "fp8": {"name": "kh-zstd", "params": {"method": "fp8"}}},
}


def _param_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def normalize_codec(spec, default: dict, part: str = "topk") -> dict:
    """None, 'name', 'name:key=value,key=value', an alias ('int8') or {'name', 'params'}
    -> {'name': str, 'params': dict}."""
    if spec is None:
        return {"name": default["name"], "params": dict(default["params"])}
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        params = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"codec {spec!r}: expected name:key=value,key=value")
            params[key.strip()] = _param_value(value.strip())
        base = ALIASES.get(part, {}).get(name.strip(), {"name": name.strip(), "params": {}})
        return {"name": base["name"], "params": {**base["params"], **params}}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        return {"name": spec["name"], "params": dict(spec.get("params") or {})}
    raise ValueError(f"codec must be a name or {{'name': ..., 'params': {{...}}}}, got {spec!r}")
