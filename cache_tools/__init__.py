"""The cache shard format: write, read, verify, inspect (docs/cache-format.md is the spec)."""

from .codecs import known_codecs, register_hidden_codec, register_topk_codec
from .format import FORMAT_VERSION, CacheError, CachedSequence
from .reader import CacheReader
from .writer import CacheWriter

__all__ = ["FORMAT_VERSION", "CacheError", "CachedSequence", "CacheReader", "CacheWriter",
           "register_topk_codec", "register_hidden_codec", "known_codecs"]
