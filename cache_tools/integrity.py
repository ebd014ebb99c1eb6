"""Digests for everything fastkd reads back: sha256 for files, headers and JSON documents (one canonical form,
sealed), xxh3-128 for cache block tensors on the hot path (~15 GB/s: checking costs next to nothing)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import xxhash

DIGEST = "sha256"
BLOCK_DIGEST = "xxh3-128"
SEAL_KEY = "self_sha256"   # a sealed JSON document's digest of everything but this key
_HEX_LENGTH = {"sha256": 64, "xxh3-128": 32}


def digest_bytes(data, algorithm: str = DIGEST) -> str:
    """Hex digest of `data` with one of the known algorithms (sha256, xxh3-128)."""
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    if algorithm == "xxh3-128":
        return xxhash.xxh3_128_hexdigest(data)
    raise ValueError(f"unknown digest algorithm {algorithm!r} (known: {', '.join(_HEX_LENGTH)})")


def chunks_digest(chunks) -> tuple[str, int]:
    """(sha256 hex, size) of the bytes of an iterable of chunks (a file's, or ranges of a remote one)."""
    h = hashlib.sha256()
    size = 0
    for chunk in chunks:
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in 4 MiB chunks."""
    with open(path, "rb") as fh:
        return chunks_digest(iter(lambda: fh.read(1 << 22), b""))


def is_hex_digest(value, algorithm: str = DIGEST) -> bool:
    return isinstance(value, str) and len(value) == _HEX_LENGTH.get(algorithm, -1) \
        and all(c in "0123456789abcdef" for c in value)


def canonical_json(obj) -> bytes:
    """The bytes a JSON document is digested as: sorted keys, no spaces, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def seal(document: dict) -> dict:
    """`document` plus SEAL_KEY: the digest of its canonical JSON without that key."""
    body = {k: v for k, v in document.items() if k != SEAL_KEY}
    return {**body, SEAL_KEY: digest_bytes(canonical_json(body))}


def seal_matches(document: dict) -> bool | None:
    """True/False when the document carries a seal (it matches or not); None when it has none."""
    if document.get(SEAL_KEY) is None:
        return None
    try:
        return document[SEAL_KEY] == seal(document)[SEAL_KEY]
    except ValueError:  # NaN/Infinity cannot be in a sealed document
        return False
