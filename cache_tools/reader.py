"""CacheReader: random access by cache position and streaming iteration over a cache folder or
an fsspec URL (s3://, gs://, hf://, file://, memory://; see storage.py)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from safetensors import safe_open

from fastkd.integrity import digest_bytes, file_digest

from .format import (MANIFEST, CacheError, CachedSequence, CorruptCacheError, check_local_paths, check_manifest_totals,
                     parse_manifest, read_manifest, settings_of)
from .shard import SHARD_READERS, CorruptShard, Layout, part_kind
from .storage import (LocalStorage, RangeShardFile, ReadAhead, RemoteStorage, open_storage, read_ahead_bytes,
                      remote_file_digest, remote_shard_head)

MAX_HEADER_BYTES = 100 << 20   # safetensors' own limit on the JSON header
OPEN_SHARDS = 16               # shard handles a reader keeps open (a shuffled plan hops between shards)
OPEN_THREADS = 8               # remote shards opened (header + index fetched) at once


def shard_header(path: Path) -> bytes:
    """The first bytes of a safetensors file: 8-byte little-endian length, then the JSON header."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CorruptShard("file is shorter than a safetensors header")
        size = int.from_bytes(prefix, "little")
        if size > min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise CorruptShard(f"header length {size} is impossible for this file")
        body = fh.read(size)
    return prefix + body


def load_manifest(storage) -> dict:
    """The manifest of a cache (a LocalStorage or RemoteStorage), checked completely: fields, seal, the
    `counts` totals, and (in a folder) paths that symlinks would lead outside. Every reader opens a
    cache through here: CacheReader (train, the library), `fastkd cache verify | inspect | stats`."""
    if storage.local:
        manifest = read_manifest(storage.root)
    else:
        try:
            data = storage.read_bytes(MANIFEST)
        except FileNotFoundError:
            raise CacheError(f"cache {storage.label}: no manifest.json (not a cache, a mistyped URL, or a copy still "
                             f"being uploaded: upload manifest.json last)") from None
        manifest = parse_manifest(data, storage.label)
    where = f"cache {storage.label}: manifest.json"
    check_manifest_totals(manifest, where)
    if storage.local:
        check_local_paths(storage.root, manifest, where)
    return manifest


def open_shard(root: Path, entry: dict, number: int, version: int, *, verify: bool = True,
               checked_whole: set | None = None):
    """Open one shard with the reader class for `version`; CacheError naming the shard.

    verify=True: the file size must match the manifest, and the header (which holds the digest
    of every tensor) must match the manifest's header_sha256; a shard written before header
    digests existed is checked whole against its sha256 instead (one read of the file; the files
    already checked, by (name, size, mtime), are kept in `checked_whole` so a reopen skips it).
    `root` may be a RemoteStorage: the same checks on bytes fetched by range (storage.py).
    """
    if isinstance(root, RemoteStorage):
        return _open_remote_shard(root, entry, number, version, verify=verify, checked_whole=checked_whole)
    if isinstance(root, LocalStorage):
        root = root.root
    path = Path(root) / entry["file"]
    where = f"cache {root}: shard {entry['file']}"
    if not path.is_file():
        raise CacheError(f"{where} (shards[{number}] in manifest.json) is missing")
    reader_class = SHARD_READERS.get(version)
    if reader_class is None:
        raise CacheError(f"cache {root}: format version {version} is not known to this fastkd "
                         f"(knows {sorted(SHARD_READERS)}); upgrade fastkd")
    hint = f"Run `fastkd cache verify {root}` to list every damaged shard and block"
    try:
        if verify:
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise CorruptShard(f"file has {size} bytes, manifest.json says {entry['bytes']} (truncated or replaced)")
            if "header_sha256" in entry:
                if digest_bytes(shard_header(path)) != entry["header_sha256"]:
                    raise CorruptShard("header fails its sha256 check against manifest.json (corrupted bytes)")
            else:
                key = (entry["file"], size, path.stat().st_mtime_ns)
                if checked_whole is None or key not in checked_whole:
                    if file_digest(path)[0] != entry["sha256"]:
                        raise CorruptShard("file fails its sha256 check against manifest.json (corrupted bytes)")
                    if checked_whole is not None:
                        checked_whole.add(key)
        handle = safe_open(str(path), "numpy")
        return reader_class(handle, where, verify=verify)
    except CorruptShard as err:
        raise CorruptCacheError(f"{where}: {err}; it is not used. {hint}", entry["file"]) from None
    except CacheError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable shard
        raise CorruptCacheError(f"{where}: cannot read the shard header or index ({err}). {hint}",
                                entry["file"]) from None


def _open_remote_shard(storage: RemoteStorage, entry: dict, number: int, version: int, *, verify: bool = True,
                       checked_whole: set | None = None):
    """open_shard for a cache under a URL: size, header digest (or whole-file sha256), index digests."""
    name = entry["file"]
    where = f"cache {storage.label}: shard {name}"
    try:
        size = storage.size(name)
    except FileNotFoundError:
        raise CacheError(f"{where} (shards[{number}] in manifest.json) is missing") from None
    reader_class = SHARD_READERS.get(version)
    if reader_class is None:
        raise CacheError(f"cache {storage.label}: format version {version} is not known to this fastkd "
                         f"(knows {sorted(SHARD_READERS)}); upgrade fastkd")
    hint = f"Run `fastkd cache verify` on a local copy to list every damaged shard and block"
    try:
        if verify and size != entry["bytes"]:
            raise CorruptShard(f"file has {size} bytes, manifest.json says {entry['bytes']} (truncated or replaced)")
        head = remote_shard_head(storage, name, size)
        if verify:
            if "header_sha256" in entry:
                if digest_bytes(head[:8 + int.from_bytes(head[:8], "little")]) != entry["header_sha256"]:
                    raise CorruptShard("header fails its sha256 check against manifest.json (corrupted bytes)")
            elif checked_whole is None or (name, size) not in checked_whole:
                if remote_file_digest(storage, name, size) != entry["sha256"]:
                    raise CorruptShard("file fails its sha256 check against manifest.json (corrupted bytes)")
                if checked_whole is not None:
                    checked_whole.add((name, size))
        return reader_class(RangeShardFile(storage, name, size, head), where, verify=verify)
    except CorruptShard as err:
        raise CorruptCacheError(f"{where}: {err}; it is not used. {hint}", name) from None
    except CacheError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable shard
        raise CorruptCacheError(f"{where}: cannot read the shard header or index ({err}). {hint}", name) from None


class CacheReader:
    """Reads a finished (or partially written) cache: `reader[i]` decodes only the block that
    holds sequence i; iteration streams shard by shard, block by block.

    verify=True (the default): every byte is checked against its digest before it is decoded
    (manifest seal, shard header, index and block tensors); a failure raises CorruptCacheError
    naming the shard and block. verify=False skips the digests (not the sanity checks).

    `root` is a folder (shards are mmapped) or an fsspec URL (blocks are fetched by byte range,
    checked the same way; `storage_options` go to fsspec): a remote reader keeps up to
    `read_ahead` bytes (default $FASTKD_CACHE_READ_AHEAD, else 16 MiB; 0 for file://, memory://) of the next blocks when it
    reads in cache order, or of the blocks named by `expect()`.
    """

    def __init__(self, root, *, layers=None, verify: bool = True, storage_options: dict | None = None,
                 read_ahead=None):
        self.storage = open_storage(root, storage_options)
        self.remote = not self.storage.local
        self.root = self.storage.label if self.remote else Path(root)
        self.verify = verify
        self.manifest = self._read_manifest()
        self.format_version = self.manifest["format_version"]
        if self.format_version not in SHARD_READERS:
            raise CacheError(f"cache {self.root}: format version {self.format_version} is not known to this fastkd "
                             f"(knows {sorted(SHARD_READERS)}); upgrade fastkd")
        self.layers = None if layers is None else list(layers)
        shards = self.manifest["shards"]
        if not shards:
            raise CacheError(f"cache {self.root}: holds no finished shard yet (manifest.json lists none)")
        record, length, nloss, per_shard, self._block_starts = [], [], [], [], []
        self._checked_whole: set = set()      # pre-digest shards already checked whole
        self._handles: dict[int, object] = {}  # shard number -> open shard (most recent last), this pid's
        self._handles_pid = os.getpid()
        for j, shard in enumerate(self._open_all(shards)):
            check_shard_matches(self.root, self.manifest, shards[j], shard, j)
            if self.remote:  # a remote shard holds no OS resource: keep it (its header was fetched once)
                self._handles[j] = shard
            record.append(shard.record_index)
            length.append(shard.length)
            nloss.append(shard.num_loss)
            per_shard.append(len(shard.record_index))
            self._block_starts.append(shard.block_start)
        self.record_indices = np.concatenate(record)
        self.lengths = np.concatenate(length)
        self.num_loss_positions = np.concatenate(nloss)
        self._starts = np.concatenate([[0], np.cumsum(per_shard)]).astype(np.int64)
        self._block_offsets = np.concatenate([[0], np.cumsum([len(b) - 1 for b in self._block_starts])]).astype(np.int64)
        self._block: tuple[int, int, list[CachedSequence]] | None = None  # (shard, block, sequences)
        self._read_ahead = ReadAhead(read_ahead_bytes(read_ahead, self.storage.scheme)) if self.remote else None
        self._recent = (-3, -3)                # global numbers of the last two blocks fetched (streak detection)
        self._expected: list[tuple[int, int]] = []  # blocks announced by expect(), in order
        if self.layers is not None:
            missing = sorted(set(self.layers) - set(self.manifest.get("layers", [])))
            if missing:
                raise CacheError(f"cache {self.root}: layers {missing} requested, the cache stores "
                                 f"{self.manifest.get('layers', [])}")

    def _read_manifest(self) -> dict:
        return load_manifest(self.storage)

    def _open_all(self, shards: list[dict]) -> list:
        def one(j):
            return open_shard(self.storage if self.remote else self.root, shards[j], j, self.format_version,
                              verify=self.verify, checked_whole=self._checked_whole)
        if not self.remote or len(shards) == 1:
            return [one(j) for j in range(len(shards))]
        with ThreadPoolExecutor(min(OPEN_THREADS, len(shards))) as pool:  # latency-bound: fetch headers at once
            return list(pool.map(one, range(len(shards))))

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

    def block_table(self) -> list[tuple[int, int, range]]:
        """(shard, block, cache positions) of every block, in order."""
        out = []
        for number, starts in enumerate(self._block_starts):
            base = int(self._starts[number])
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
                self.check_block(shard, block)
            except CacheError as err:
                bad.append((positions, str(err)))
        return bad

    def __getstate__(self):
        """Picklable for DataLoader workers: open handles and decoded blocks are not carried."""
        state = dict(self.__dict__)
        if not self.remote:  # remote shards are plain data (header + index): workers keep them
            state["_handles"] = {}
        state["_block"] = None
        return state

    # --- decoding ------------------------------------------------------------------------
    def _shard(self, number: int):
        if self.remote:
            shard = self._handles.get(number)
            if shard is not None:
                return shard
        elif self._handles_pid != os.getpid():  # handles opened before a fork are reopened in the child
            self._handles, self._handles_pid = {}, os.getpid()
        shard = self._handles.pop(number, None)
        if shard is None:
            shard = open_shard(self.storage if self.remote else self.root, self.manifest["shards"][number], number,
                               self.format_version, verify=self.verify, checked_whole=self._checked_whole)
            check_shard_matches(self.root, self.manifest, self.manifest["shards"][number], shard, number)
        self._handles[number] = shard
        if self.remote:
            return shard
        while len(self._handles) > OPEN_SHARDS:
            self._handles.pop(next(iter(self._handles)))
        return shard

    # --- remote blocks: one range read per block, through the read-ahead ----------------------
    def _wanted_parts(self, shard, block: int) -> list[str]:
        """The tensors of a block that decode_block reads (all of them when verifying)."""
        names = shard.part_names(block)
        if self.verify or self.layers is None:
            return names
        keep = set(self.layers)
        return [n for n in names if part_kind(n) != "hidden" or int(n.rsplit(".", 1)[1]) in keep]

    def _block_item(self, number: int, block: int):
        shard = self._shard(number)
        names = self._wanted_parts(shard, block)
        size = sum(length for _, length, _ in shard.handle.ranges(names))
        return (number, block), size, lambda: shard.handle.fetch(names)

    def _fetch(self, number: int, block: int, sequential: bool = False) -> None:
        """Stage a remote block's bytes in its shard handle (fetched ahead or now), then plan the next
        fetches: the blocks given to expect(), or the next ones in cache order while reads are in order."""
        key, _, load = self._block_item(number, block)
        try:
            parts = self._read_ahead.take(key, load)
        except CorruptShard as err:
            raise self._corrupt(number, block, err) from None
        self._shard(number).handle.stage(parts)
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
        self._read_ahead.want(self._within_budget(upcoming))

    def _within_budget(self, blocks):
        items, total = [], 0
        for number, block in blocks:
            item = self._block_item(number, block)
            total += item[1]
            if total > self._read_ahead.budget:
                break
            items.append(item)
        return items

    def _global_block(self, g: int) -> tuple[int, int]:
        number = int(np.searchsorted(self._block_offsets, g, side="right") - 1)
        return number, g - int(self._block_offsets[number])

    def expect(self, blocks) -> None:
        """Announce the (shard, block) pairs about to be read, in order: a remote reader fetches
        them ahead within its read-ahead budget (a local one ignores this)."""
        if self.remote:
            self._expected = [(int(s), int(b)) for s, b in blocks]
            self._read_ahead.want(self._within_budget(self._expected))

    @property
    def read_ahead(self) -> ReadAhead | None:
        """The remote reader's read-ahead (budget, held, peak, hits, misses); None for a folder."""
        return self._read_ahead

    def _decode(self, number: int, block: int, sequential: bool = False) -> list[CachedSequence]:
        if self._block is not None and self._block[:2] == (number, block):
            return self._block[2]
        shard = self._shard(number)
        if self.remote:
            self._fetch(number, block, sequential)
        try:
            seqs = shard.decode_block(block, layers=self.layers)
        except CacheError:
            raise
        except Exception as err:  # noqa: BLE001 - digest, codec or safetensors errors mean a corrupt block
            raise self._corrupt(number, block, err) from None
        self._block = (number, block, seqs)
        return seqs

    def _corrupt(self, number: int, block: int, err: Exception) -> CorruptCacheError:
        entry = self.manifest["shards"][number]
        what = "fails its digest" if isinstance(err, CorruptShard) and "check" in str(err) else "cannot be decoded"
        return CorruptCacheError(f"cache {self.root}: shard {entry['file']} block {block} {what} ({err}); its "
                                 f"sequences are not used. Run `fastkd cache verify {self.root}` to list every "
                                 f"damaged block", entry["file"], block)

    def check_block(self, shard: int, block: int) -> None:
        """Check a block's bytes against their digests without decoding (CorruptCacheError if bad)."""
        try:
            if self.remote:
                self._fetch(shard, block, sequential=True)
            self._shard(shard).check_block(block)
        except CorruptShard as err:
            raise self._corrupt(shard, block, err) from None

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
            seqs = self._decode(number, block, sequential=True)
            self._block = None  # streaming: do not keep the block alive
            yield from seqs

    def __iter__(self) -> Iterator[CachedSequence]:
        for number in range(self.num_shards):
            yield from self.iter_shard(number)


def check_shard_matches(root: Path, manifest: dict, entry: dict, shard, number: int | None = None) -> None:
    """A shard must hold what the manifest says of it: counts, block count, first and last record, the
    layout and codecs of the settings, payload sizes; CorruptCacheError naming the manifest field.
    `number`: the entry's position in manifest["shards"] (found when not given)."""
    where = f"cache {root}: shard {entry['file']}"
    name = _entry_name(manifest, entry, number)
    _check_entry_counts(where, name, entry, shard)
    _check_layout_matches(where, manifest, entry, shard.layout)
    try:
        sizes = shard.block_tensor_bytes()
    except CorruptShard as err:
        raise CorruptCacheError(f"{where}: {err}; it is not used", entry["file"]) from None
    _check_payload_sizes(where, name, entry, sizes)


def _entry_name(manifest: dict, entry: dict, number: int | None) -> str:
    """'shards[j]' for a manifest entry; a unit receipt's entry (not listed yet) by its file."""
    shards = manifest.get("shards", [])
    if number is None:   # a sequential cache lists shard j at position j: try that before searching
        number = int(entry["file"].rsplit("-", 1)[1].split(".")[0])
    if not (0 <= number < len(shards) and shards[number] is entry):
        number = next((j for j, e in enumerate(shards) if e is entry), None)
    return f"shards[{number}]" if number is not None else f"entry of {entry['file']}"


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
                "topk_codec": (_codec(manifest, "topk"), "codecs.topk"),
                "hidden_codec": (_codec(manifest, "hidden"), "codecs.hidden"),
                "captured": ("capture" in manifest, "capture")}
    for key, (value, field) in expected.items():
        have = getattr(lay, key)
        if key.endswith("_codec"):
            have = {"name": have.get("name"), "params": have.get("params", {})}
        if have != value:
            said = ("present" if value else "absent") if key == "captured" else repr(value)
            meta = {"widths": "hidden_widths", "captured": "captured"}.get(key, key)
            raise CorruptCacheError(f"{where}: its metadata says {meta} {have!r}, manifest.json field {field!r} says "
                                    f"{said}; one of them is corrupt", entry["file"])


def _codec(manifest: dict, part: str):
    spec = (manifest.get("codecs") or {}).get(part)
    return {"name": spec.get("name"), "params": spec.get("params", {})} if isinstance(spec, dict) else spec


def _check_payload_sizes(where: str, name: str, entry: dict, sizes: dict[str, int]) -> None:
    """payload_bytes per part and hidden_bytes per layer equal the sizes of the shard's block tensors."""
    parts: dict[str, int] = {}
    hidden: dict[str, int] = {}
    for tensor, size in sizes.items():
        kind = part_kind(tensor)
        parts[kind] = parts.get(kind, 0) + size
        if kind == "hidden":
            layer = tensor.rsplit(".", 1)[1]
            hidden[layer] = hidden.get(layer, 0) + size
    for label, table, actual in (("payload_bytes", entry.get("payload_bytes"), parts),
                                 ("hidden_bytes", entry.get("hidden_bytes"), hidden)):
        if not isinstance(table, dict):
            continue   # not an entry of a checked manifest (a unit receipt): it is checked for what it has
        for key in sorted(set(table) | set(actual)):
            if table.get(key, 0) != actual.get(key, 0):
                tensors = f"block.*.hidden.{key}" if label == "hidden_bytes" else f"block.*.{key}"
                raise _mismatch(where, entry, f"{name}.{label}.{key}", table.get(key), actual.get(key, 0),
                                f"the bytes of the shard's {tensors} tensors")
