"""The cache layer's own error types (the app's CLI prints them as one line: fastkd.errors.user_errors)."""

from __future__ import annotations


class CacheError(Exception):
    """A cache that cannot be read or written; the message names the cache path, shard, block, field."""


class CodecError(CacheError):
    """Input a codec cannot store faithfully, or a payload it cannot read."""


class ManifestWriteError(CacheError, OSError):
    """manifest.json could not be written (disk full, permissions); the previous one is kept. An
    OSError too, so a writer that rolls back on OSError still does."""

    def __init__(self, message: str, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno, self.filename = errno, filename

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self):
        return (type(self), (str(self), self.errno, self.filename))


class CorruptCacheError(CacheError):
    """Bytes of a cache that fail their digest (or decode to something impossible): never used."""

    def __init__(self, message: str, shard: str | None = None, block: int | None = None):
        super().__init__(message)
        self.shard = shard   # both kept by the default pickling (across DataLoader workers)
        self.block = block


class CorruptShard(ValueError):
    """Bytes of a shard that fail their digest or describe something impossible (named by the caller)."""
