"""The cache shard format: write, read, verify, inspect (docs/cache-format.md is the spec). Imports nothing
from the app; its errors (CacheError and subclasses) are its own."""

from .codecs import normalize_codec
from .errors import CacheError, CorruptCacheError
from .format import FORMAT_VERSION, CachedSequence
from .reader import CacheReader
from .writer import CacheWriter

__all__ = ["FORMAT_VERSION", "CacheError", "CorruptCacheError", "CachedSequence", "CacheReader", "CacheWriter",
           "normalize_codec"]
