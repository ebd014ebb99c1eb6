"""CacheReader: random access by cache position and streaming iteration over a cache folder or an fsspec
URL (s3://, gs://, hf://, file://, memory://), both through one storage interface (storage.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from .errors import CacheError, CodecError, CorruptCacheError, CorruptShard
from .format import CachedSequence
from .manifest_checks import check_manifest_totals
from .shard import INDEX_DTYPES, Layout, part_kind, payload_sizes
from .shard_read import Shard
from .storage import ReadAhead, open_storage, read_ahead_bytes

OPEN_THREADS = 8               # shards opened (header + index fetched) at once


def load_manifest(storage) -> dict:
    """The manifest of a storage, checked completely (fields, seal, `counts` totals, symlinks out of a folder):
    every reader opens a cache here (CacheReader, `fastkd cache verify | inspect | stats`)."""
    manifest = storage.manifest()
    check_manifest_totals(manifest, f"cache {storage.label}: manifest.json")
    return manifest


def open_shard(storage, entry: dict, number: int, *, verify: bool = True) -> Shard:
    """Open one shard of a storage; CacheError naming the shard. verify=True: the file size must match the
    manifest, and the header (which holds the digest of every tensor) the manifest's header_sha256."""
    name = entry["file"]
    where = f"cache {storage.label}: shard {name}"
    try:
        size = storage.size(name)
    except FileNotFoundError:
        raise CacheError(f"{where} (shards[{number}] in manifest.json) is missing") from None
    hint = f"Run `fastkd cache verify {storage.label}` to list every damaged shard and block"
    try:
        if verify and size != entry["bytes"]:
            raise CorruptShard(f"file has {size} bytes, manifest.json says {entry['bytes']} (truncated or replaced)")
        return Shard(storage, name, size, entry["header_sha256"], verify=verify)
    except CorruptShard as err:
        raise CorruptCacheError(f"{where}: {err}; it is not used. {hint}", name) from None
    except CacheError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable shard
        raise CorruptCacheError(f"{where}: cannot read the shard header or index ({err}). {hint}", name) from None


class CacheReader:
    """Reads a cache folder or URL: `reader[i]` decodes only the block of sequence i, iteration streams block by
    block; every byte checked first (verify=True); `read_ahead` bytes of next blocks fetched ahead."""

    def __init__(self, root, *, layers=None, verify: bool = True, storage_options: dict | None = None,
                 read_ahead=None):
        self.storage = open_storage(root, storage_options)
        self.root = self.storage.label
        self.verify = verify
        self.manifest = load_manifest(self.storage)
        self.layers = None if layers is None else list(layers)
        if self.layers is not None and set(self.layers) - set(self.manifest["layers"]):
            raise CacheError(f"cache {self.root}: layers {sorted(set(self.layers) - set(self.manifest['layers']))} "
                             f"requested, the cache stores {self.manifest['layers']}")
        entries = self.manifest["shards"]
        if not entries:
            raise CacheError(f"cache {self.root}: holds no finished shard yet (manifest.json lists none)")
        with ThreadPoolExecutor(min(OPEN_THREADS, len(entries))) as pool:  # latency-bound: fetch headers at once
            self._shards = list(pool.map(lambda j: open_shard(self.storage, entries[j], j, verify=verify),
                                         range(len(entries))))
        for j, shard in enumerate(self._shards):
            check_shard_matches(self.root, self.manifest, entries[j], shard, j)
        self.record_indices = np.concatenate([s.record_index for s in self._shards])
        self.lengths = np.concatenate([s.length for s in self._shards])
        self.num_loss_positions = np.concatenate([s.num_loss for s in self._shards])
        self._starts = np.concatenate([[0], np.cumsum([len(s.record_index) for s in self._shards])]).astype(np.int64)
        self._block_offsets = np.concatenate([[0], np.cumsum([s.num_blocks for s in self._shards])]).astype(np.int64)
        self._block: tuple[int, int, list[CachedSequence]] | None = None  # (shard, block, sequences)
        self.read_ahead = ReadAhead(read_ahead_bytes(read_ahead, self.storage.scheme))
        self._recent = (-3, -3)                # global numbers of the last two blocks fetched (streak detection)
        self._expected: list[tuple[int, int]] = []  # blocks announced by expect(), in order

    @property
    def format_version(self) -> int:
        return self.manifest["format_version"]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def shard_sequences(self, shard: int) -> range:
        """Cache positions held by shard `shard` (split shards across ranks / workers with this)."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range (cache has {self.num_shards})")
        return range(int(self._starts[shard]), int(self._starts[shard + 1]))

    def block_table(self) -> list[tuple[int, int, range]]:
        """(shard, block, cache positions) of every block, in order."""
        out = []
        for number, shard in enumerate(self._shards):
            base, starts = int(self._starts[number]), shard.block_start
            out += [(number, b, range(base + int(lo), base + int(hi)))
                    for b, (lo, hi) in enumerate(zip(starts[:-1], starts[1:]))]
        return out

    def blocks(self) -> list[range]:
        """Cache positions of every block, in order: a loader that shuffles whole blocks (then
        within a buffer) decodes each block once per epoch instead of once per sequence."""
        return [positions for _, _, positions in self.block_table()]

    def find_corrupt_blocks(self, progress=None) -> list[tuple[range, str]]:
        """(cache positions, message) of every block whose bytes fail their digests (reads every
        block once, decodes none); `progress` wraps the block iterable (e.g. tqdm)."""
        table = self.block_table()
        bad = []
        for shard, block, positions in (progress(table) if progress else table):
            try:
                self._fetch(shard, block, sequential=True)
                self._shards[shard].read_parts(self._shards[shard].part_names(block))
            except CorruptShard as err:
                bad.append((positions, str(self._corrupt(shard, block, err))))
            except CacheError as err:
                bad.append((positions, str(err)))
        return bad

    def __getstate__(self):
        """Picklable for DataLoader workers: the shards (header + index, no OS resource) go along, decoded
        blocks do not."""
        return dict(self.__dict__, _block=None)

    def _block_item(self, number: int, block: int):
        """(key, size, load) of a block for the read-ahead: its tensors, one range read per contiguous run."""
        shard = self._shards[number]
        names = shard.part_names(block, self.layers)
        size = sum(length for _, length, _ in shard.ranges(names))
        return (number, block), size, lambda: shard.fetch(names)

    def _fetch(self, number: int, block: int, sequential: bool = False) -> None:
        """Stage a block's bytes in its shard file (fetched ahead or now), then plan the next fetches:
        the blocks given to expect(), or the next ones in cache order while reads are in order."""
        key, _, load = self._block_item(number, block)
        try:
            parts = self.read_ahead.take(key, load)
        except CorruptShard as err:
            raise self._corrupt(number, block, err) from None
        self._shards[number].stage(parts)
        here = int(self._block_offsets[number]) + block
        if key in self._expected:
            self._expected = self._expected[self._expected.index(key) + 1:]
            upcoming = iter(self._expected)
        elif sequential or self._recent == (here - 2, here - 1):
            self._expected = []
            upcoming = (self._global_block(g) for g in range(here + 1, int(self._block_offsets[-1])))
        else:
            self._expected, upcoming = [], iter(())
        self._recent = (self._recent[1], here)
        self.read_ahead.want(self._block_item(*key) for key in upcoming)

    def _global_block(self, g: int) -> tuple[int, int]:
        number = int(np.searchsorted(self._block_offsets, g, side="right") - 1)
        return number, g - int(self._block_offsets[number])

    def expect(self, blocks) -> None:
        """Announce the (shard, block) pairs about to be read, in order: the reader fetches them ahead
        within its read-ahead budget."""
        self._expected = [(int(s), int(b)) for s, b in blocks]
        self.read_ahead.want(self._block_item(*key) for key in self._expected)

    def _decode(self, number: int, block: int, sequential: bool = False) -> list[CachedSequence]:
        if self._block is not None and self._block[:2] == (number, block):
            return self._block[2]
        self._fetch(number, block, sequential)
        try:
            seqs = self._shards[number].decode_block(block, layers=self.layers)
        except Exception as err:  # noqa: BLE001 - digest, codec or format errors mean a corrupt block
            if isinstance(err, CacheError) and not isinstance(err, CodecError):
                raise        # the storage's own error (network, credentials): not the block's
            raise self._corrupt(number, block, err) from None
        self._block = (number, block, seqs)
        return seqs

    def _corrupt(self, number: int, block: int, err: Exception) -> CorruptCacheError:
        entry = self.manifest["shards"][number]
        what = "fails its digest" if isinstance(err, CorruptShard) and "check" in str(err) else "cannot be decoded"
        return CorruptCacheError(f"cache {self.root}: shard {entry['file']} block {block} {what} ({err}); its "
                                 f"sequences are not used. Run `fastkd cache verify {self.root}` to list every "
                                 f"damaged block", entry["file"], block)

    def read_block(self, shard: int, block: int, sequential: bool = False) -> list[CachedSequence]:
        """Decode one block (the sequences of `blocks()`' matching range) without keeping it."""
        seqs = self._decode(shard, block, sequential)
        self._block = None
        return seqs

    def locate(self, i: int) -> tuple[int, int, int]:
        """(shard, block, position inside the block) of cache position i."""
        number = int(np.searchsorted(self._starts, i, side="right") - 1)
        inside = i - int(self._starts[number])
        shard = self._shards[number]
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

    def __iter__(self) -> Iterator[CachedSequence]:
        """Every sequence in cache order, decoding one block at a time."""
        for number in range(self.num_shards):
            for block in range(self._shards[number].num_blocks):
                yield from self.read_block(number, block, sequential=True)


def check_shard_matches(root, manifest: dict, entry: dict, shard, number: int | None = None) -> None:
    """A shard must hold what the manifest says of it (counts, blocks, records, layout, codecs, payload sizes);
    CorruptCacheError naming the field. `number`: the entry's position in manifest["shards"] (None: a receipt's)."""
    where = f"cache {root}: shard {entry['file']}"
    name = f"shards[{number}]" if number is not None else f"entry of {entry['file']}"
    _check_entry_counts(where, name, entry, shard)
    _check_layout_matches(where, manifest, entry, shard.layout)
    try:
        _check_payload_sizes(where, name, entry, shard)
    except CorruptShard as err:
        raise CorruptCacheError(f"{where}: {err}; it is not used", entry["file"]) from None


def _mismatch(where: str, entry: dict, field: str, value, expected, source: str) -> CorruptCacheError:
    return CorruptCacheError(f"{where}: manifest.json field {field!r} is {value!r}: expected {expected!r}, {source}; "
                             f"one of them is corrupt or edited", entry["file"])


def _check_entry_counts(where: str, name: str, entry: dict, shard) -> None:
    """num_sequences, num_blocks, num_tokens, num_loss_positions, first/last record against the index, and
    the shard's own metadata (num_sequences, num_blocks, shard number) against it too."""
    records = shard.record_index
    actual = {"num_sequences": (len(records), "the number of sequences in the shard's index"),
              "num_blocks": (shard.num_blocks, "the shard's own block count (index.block_start)"),
              "num_tokens": (int(shard.length.sum()), "the sum of the shard's index.length"),
              "num_loss_positions": (int(shard.num_loss.sum()), "the sum of the shard's index.num_loss"),
              "first_record": (int(records[0]) if len(records) else None, "the shard's first record_index"),
              "last_record": (int(records[-1]) if len(records) else None, "the shard's last record_index")}
    for key, (value, source) in actual.items():
        if entry.get(key, value) != value:
            raise _mismatch(where, entry, f"{name}.{key}", entry[key], value, source)
    number = int(entry["file"].rsplit("-", 1)[1].split(".")[0])
    for key, value in (("num_sequences", len(records)), ("num_blocks", shard.num_blocks), ("shard", number)):
        if key in shard.meta and shard.meta[key] != str(value):
            raise CorruptCacheError(f"{where}: its metadata says {key} {shard.meta[key]!r}, its "
                                    f"{'file name' if key == 'shard' else 'index'} says {value}; it is corrupt",
                                    entry["file"])


def _check_layout_matches(where: str, manifest: dict, entry: dict, lay: Layout) -> None:
    """k, vocabulary, mode, layers, widths, codecs (names and params) and capture as the settings say."""
    expected = {"k": (manifest["k"], "k"), "vocab_size": (manifest["tokenizer"]["vocab_size"], "tokenizer.vocab_size"),
                "mode": (manifest.get("mode", "topk"), "mode"),
                "layers": (tuple(manifest.get("layers", [])), "layers"),
                "widths": (tuple(manifest.get("hidden_widths", [])), "hidden_widths"),
                "topk_codec": (_codec((manifest.get("codecs") or {}).get("topk")), "codecs.topk"),
                "hidden_codec": (_codec((manifest.get("codecs") or {}).get("hidden")), "codecs.hidden"),
                "captured": ("capture" in manifest, "capture")}
    for key, (value, field) in expected.items():
        have = _codec(getattr(lay, key)) if key.endswith("_codec") else getattr(lay, key)
        if have != value:
            said = ("present" if value else "absent") if key == "captured" else repr(value)
            meta = {"widths": "hidden_widths", "captured": "captured"}.get(key, key)
            raise CorruptCacheError(f"{where}: its metadata says {meta} {have!r}, manifest.json field {field!r} says "
                                    f"{said}; one of them is corrupt", entry["file"])


def _codec(spec):
    return {"name": spec.get("name"), "params": spec.get("params", {})} if isinstance(spec, dict) else spec


def _check_payload_sizes(where: str, name: str, entry: dict, shard) -> None:
    """The block tensors are the layout's parts, 1-D U8 (from the header alone: nothing is read), and
    payload_bytes per part and hidden_bytes per layer equal their sizes."""
    expected = {tensor for b in range(shard.num_blocks) for tensor in shard.part_names(b)}
    names = [tensor for tensor in shard.tensors if tensor not in INDEX_DTYPES]
    unknown = sorted(set(names) - expected)
    if unknown:
        raise CorruptShard(f"tensor {unknown[0]} is not one of its {shard.num_blocks} blocks' parts "
                           f"({', '.join(sorted({part_kind(n) for n in expected})) or 'none'})")
    missing = sorted(expected - set(names))
    if missing:
        raise CorruptShard(f"tensor {missing[0]} is missing (the index announces {shard.num_blocks} blocks)")
    for tensor in names:
        dtype, shape, _, _ = shard.tensors[tensor]
        if dtype != "U8" or len(shape) != 1:
            raise CorruptShard(f"tensor {tensor} is {dtype} {list(shape)}, expected 1-D U8 (a block part)")
    parts, hidden = payload_sizes(shard.layout, {tensor: int(shard.tensors[tensor][1][0]) for tensor in names})
    for label, table, actual in (("payload_bytes", entry.get("payload_bytes"), parts),
                                 ("hidden_bytes", entry.get("hidden_bytes"), hidden)):
        if not isinstance(table, dict):
            continue   # not an entry of a checked manifest (a unit receipt): it is checked for what it has
        for key in sorted(set(table) | set(actual)):
            if table.get(key, 0) != actual.get(key, 0):
                tensors = f"block.*.hidden.{key}" if label == "hidden_bytes" else f"block.*.{key}"
                raise _mismatch(where, entry, f"{name}.{label}.{key}", table.get(key), actual.get(key, 0),
                                f"the bytes of the shard's {tensors} tensors")
