"""CacheWriter: one process adding sequences one at a time, on the work-unit protocol (units.py) every cache is
written with: the sequences are buffered into units, each full unit written (shard + receipt) and merged."""

from __future__ import annotations

from .errors import CacheError
from .format import CachedSequence
from .units import UnitWriter, unit_of
from .writing import check_sequence, existing_manifest


class CacheWriter(UnitWriter):
    """Writes a cache from sequences given one at a time: a unit every `sequences_per_shard` (a resumed cache's
    own); `done` holds the record indices already stored, so a resumed run skips them."""

    def __init__(self, root, settings: dict, *, sequences_per_shard: int = 256, resume: bool = True,
                 block_bytes: int = 1 << 20, max_block_sequences: int = 16):
        if sequences_per_shard < 1:
            raise CacheError(f"sequences_per_shard must be >= 1, got {sequences_per_shard}")
        existing = existing_manifest(root)   # None for a URL, which UnitWriter refuses
        listed = existing["shards"] if existing is not None else []
        if listed and not resume:
            raise CacheError(f"cache {root}: already holds {len(listed)} shard(s); resume it or write to a new folder")
        work_unit = existing["work_unit"] if listed else sequences_per_shard
        super().__init__(root, dict(settings, work_unit=work_unit), None, block_bytes=block_bytes,
                         max_block_sequences=max_block_sequences)
        self._coordinate()
        self.done: set[int] = set(self.listed_records)
        self._next = max(self.done_units, default=-1) + 1
        self._buffer: list[CachedSequence] = []
        self._buffered: set[int] = set()

    def add(self, seq: CachedSequence) -> None:
        """Buffer one sequence (checked against the settings); writes a unit when the buffer is full."""
        if self._lock is None:
            raise CacheError(f"cache {self.root}: writer already closed")
        r = int(seq.record_index)
        if r in self.done or r in self._buffered:
            raise CacheError(f"cache {self.root}: record {seq.record_index}: already in the cache (skip the indices in "
                             f"writer.done when resuming)")
        self._buffer.append(check_sequence(self.root, self.layout, seq, copy=True))  # the caller may reuse its arrays
        self._buffered.add(r)
        if len(self._buffer) >= self.settings["work_unit"]:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        unit = self.units[self._next] = unit_of(self._next, self._buffer)
        self.write_unit(unit.number, self._buffer, checked=True)
        self.merge(clean=False)
        self._next += 1
        self.done |= self._buffered
        self._buffer, self._buffered = [], set()

    def close(self, summary: dict | None = None) -> None:
        """Write the partial unit, store `summary`, mark the cache complete, release the lock."""
        if self._lock is None:
            return
        try:
            self._flush()
        except BaseException:
            self.abort()
            raise
        self.finish(summary)

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()   # the buffered (unfinished) unit is dropped; finished units stay
