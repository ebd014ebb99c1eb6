"""CacheReader: random access by cache position and streaming iteration over a cache folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import safe_open

from .format import CacheError, CachedSequence, read_manifest, settings_of
from .shard import SHARD_READERS


def open_shard(root: Path, entry: dict, number: int, version: int):
    """Open one shard with the reader class for `version`; CacheError naming the shard."""
    path = Path(root) / entry["file"]
    where = f"cache {root}: shard {entry['file']}"
    if not path.exists():
        raise CacheError(f"{where} (shards[{number}] in manifest.json) is missing")
    reader_class = SHARD_READERS.get(version)
    if reader_class is None:
        raise CacheError(f"cache {root}: format version {version} is not known to this fastkd "
                         f"(knows {sorted(SHARD_READERS)}); upgrade fastkd")
    try:
        handle = safe_open(str(path), "numpy")
        return reader_class(handle, where)
    except CacheError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable shard
        raise CacheError(f"{where}: cannot read the shard header or index ({err}); run `fastkd cache verify`") from None


class CacheReader:
    """Reads a finished (or partially written) cache: `reader[i]` decodes only the block that
    holds sequence i; iteration streams shard by shard, block by block."""

    def __init__(self, root, *, layers=None):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.format_version = self.manifest["format_version"]
        if self.format_version not in SHARD_READERS:
            raise CacheError(f"cache {self.root}: format version {self.format_version} is not known to this fastkd "
                             f"(knows {sorted(SHARD_READERS)}); upgrade fastkd")
        self.layers = None if layers is None else list(layers)
        shards = self.manifest["shards"]
        if not shards:
            raise CacheError(f"cache {self.root}: holds no finished shard yet (manifest.json lists none)")
        record, length, nloss, per_shard, self._block_starts = [], [], [], [], []
        for j, entry in enumerate(shards):
            shard = open_shard(self.root, entry, j, self.format_version)
            if len(shard.record_index) != entry["num_sequences"]:
                raise CacheError(f"cache {self.root}: shard {entry['file']} holds {len(shard.record_index)} "
                                 f"sequences, manifest.json says {entry['num_sequences']}")
            record.append(shard.record_index)
            length.append(shard.length)
            nloss.append(shard.num_loss)
            per_shard.append(len(shard.record_index))
            self._block_starts.append(shard.block_start)
        self.record_indices = np.concatenate(record)
        self.lengths = np.concatenate(length)
        self.num_loss_positions = np.concatenate(nloss)
        self._starts = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        self._open: tuple[int, int, object] | None = None  # (pid, shard number, shard)
        self._block: tuple[int, int, list[CachedSequence]] | None = None  # (shard, block, sequences)
        if self.layers is not None:
            missing = sorted(set(self.layers) - set(self.manifest.get("layers", [])))
            if missing:
                raise CacheError(f"cache {self.root}: layers {missing} requested, the cache stores "
                                 f"{self.manifest.get('layers', [])}")

    # --- what the manifest says ----------------------------------------------------------
    @property
    def settings(self) -> dict:
        return settings_of(self.manifest)

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def hidden_widths(self) -> dict[int, int]:
        return dict(zip(self.manifest.get("layers", []), self.manifest.get("hidden_widths", [])))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def shard_sequences(self, shard: int) -> range:
        """Cache positions held by shard `shard` (split shards across ranks / workers with this)."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range (cache has {self.num_shards})")
        return range(int(self._starts[shard]), int(self._starts[shard + 1]))

    def blocks(self) -> list[range]:
        """Cache positions of every block, in order: a loader that shuffles whole blocks (then
        within a buffer) decodes each block once per epoch instead of once per sequence."""
        out = []
        for number, starts in enumerate(self._block_starts):
            base = int(self._starts[number])
            out += [range(base + int(a), base + int(b)) for a, b in zip(starts[:-1], starts[1:])]
        return out

    def __getstate__(self):
        """Picklable for DataLoader workers: open handles and decoded blocks are not carried."""
        state = dict(self.__dict__)
        state["_open"] = None
        state["_block"] = None
        return state

    # --- decoding ------------------------------------------------------------------------
    def _shard(self, number: int):
        pid = os.getpid()  # a handle opened before a fork is reopened in the child
        if self._open is None or self._open[0] != pid or self._open[1] != number:
            self._open = (pid, number, open_shard(self.root, self.manifest["shards"][number], number,
                                                  self.format_version))
        return self._open[2]

    def _decode(self, number: int, block: int) -> list[CachedSequence]:
        if self._block is not None and self._block[:2] == (number, block):
            return self._block[2]
        shard = self._shard(number)
        try:
            seqs = shard.decode_block(block, layers=self.layers)
        except CacheError:
            raise
        except Exception as err:  # noqa: BLE001 - codec / safetensors errors mean a corrupt block
            raise CacheError(f"{shard.where}: block {block} cannot be decoded ({err}); "
                             f"run `fastkd cache verify {self.root}`") from None
        self._block = (number, block, seqs)
        return seqs

    def read_block(self, shard: int, block: int) -> list[CachedSequence]:
        """Decode one block (the sequences of `blocks()`' matching range) without caching it."""
        seqs = self._decode(shard, block)
        self._block = None
        return seqs

    def locate(self, i: int) -> tuple[int, int, int]:
        """(shard, block, position inside the block) of cache position i."""
        number = int(np.searchsorted(self._starts, i, side="right") - 1)
        inside = i - int(self._starts[number])
        shard = self._shard(number)
        block = shard.block_of(inside)
        return number, block, inside - int(shard.block_start[block])

    def __getitem__(self, i: int) -> CachedSequence:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"cache position {i} out of range (cache holds {len(self)} sequences)")
        number, block, j = self.locate(i)
        return self._decode(number, block)[j]

    def iter_shard(self, number: int) -> Iterator[CachedSequence]:
        """The sequences of one shard in order, decoding one block at a time."""
        shard = self._shard(number)
        for block in range(shard.num_blocks):
            seqs = self._decode(number, block)
            self._block = None  # streaming: do not keep the block alive
            yield from seqs

    def __iter__(self) -> Iterator[CachedSequence]:
        for number in range(self.num_shards):
            yield from self.iter_shard(number)
