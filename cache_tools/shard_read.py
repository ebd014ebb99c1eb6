"""Reading one shard: its file through a storage (byte ranges, header checked here), its index at open, and
its blocks one at a time, every tensor checked against its digest before it is decoded."""

from __future__ import annotations

import json

import numpy as np

from .errors import CacheError, CorruptShard
from .format import FORMAT_VERSION, CachedSequence
from .integrity import BLOCK_DIGEST, digest_bytes, is_hex_digest
from .manifest_checks import MAX_COUNT, MAX_K, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH
from .shard import (INDEX_DTYPES, MAX_BLOCK_RAW_BYTES, Layout, _decode_hidden, _decode_tokens, _decode_topk,
                    _le_bytes, part_names)

FIRST_READ = 64 << 10              # first range read of a shard: its header and usually its index
MAX_HEADER_BYTES = 100 << 20       # safetensors' own limit on the JSON header

DTYPES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4",
          "I32": "<i4", "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}


def parse_header(head: bytes, size: int) -> tuple[dict, dict, int]:
    """(metadata, tensors: name -> (dtype, shape, begin, end), data start) of a safetensors file of `size` bytes
    from its first bytes, checked whatever the digests say: the tensors must tile the data section exactly."""
    data_start = 8 + int.from_bytes(head[:8], "little")
    try:
        header = json.loads(head[8:data_start])
    except (ValueError, RecursionError) as err:
        raise CorruptShard(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CorruptShard("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CorruptShard("header __metadata__ is not a map of strings")
    tensors = {}
    for key, info in header.items():
        try:
            dtype, itemsize = info["dtype"], np.dtype(DTYPES[info["dtype"]]).itemsize
            shape = tuple(int(x) for x in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if any(x < 0 for x in shape) or not all(isinstance(x, int) for x in info["shape"]):
                raise ValueError("shape")
        except (KeyError, TypeError, ValueError):
            raise CorruptShard(f"header entry for tensor {key!r} is not valid (dtype, shape, data_offsets)") from None
        if not 0 <= begin <= end or end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise CorruptShard(f"tensor {key} has data_offsets {[begin, end]} that do not fit its shape "
                               f"{list(shape)}")
        tensors[key] = (dtype, shape, begin, end)
    position = 0
    for begin, end in sorted((b, e) for _, _, b, e in tensors.values()):  # as safetensors requires
        if begin != position:
            raise CorruptShard("tensor data_offsets overlap or leave a hole")
        position = end
    if data_start + position != size:
        raise CorruptShard(f"header describes {data_start + position} bytes, the file has {size}")
    return meta, tensors, data_start


class Shard:
    """One shard of a storage, read by byte ranges: header and index read and checked at open, then one block at a
    time, every tensor checked against its digest first (verify=True)."""

    def __init__(self, storage, name: str, size: int, header_sha256: str, *, verify: bool = True):
        self.storage, self.name, self.size, self.verify = storage, name, size, verify
        self._staged: dict[str, bytes] = {}
        head = storage.read_range(name, 0, min(size, FIRST_READ))  # for a typical shard: header and index tensors
        if len(head) < 8:
            raise CorruptShard("file is shorter than a safetensors header")
        header_end = 8 + int.from_bytes(head[:8], "little")
        if header_end - 8 > min(MAX_HEADER_BYTES, size - 8):
            raise CorruptShard(f"header length {header_end - 8} is impossible for this file")
        head = self._read_on(head, header_end)
        if verify and digest_bytes(head[:header_end]) != header_sha256:
            raise CorruptShard("header fails its sha256 check against manifest.json (corrupted bytes)")
        self.meta, self.tensors, self.data_start = parse_header(head, size)
        head = self._read_on(head, self.data_start + max(  # the index tensors come first in the file
            [e for k, (_, _, _, e) in self.tensors.items() if not k.startswith("block.")], default=0))
        try:
            self.layout = Layout.from_metadata(self.meta)
            self.tasks = json.loads(self.meta["tasks"])
            self.digests = json.loads(self.meta["digests"])
        except (KeyError, ValueError, TypeError) as err:
            raise CorruptShard(f"metadata field {err} is missing or not valid") from None
        check_metadata(self)
        index = {}
        for name, dtype in INDEX_DTYPES.items():
            try:
                kind, shape, begin, end = self.tensors[name]
                array = np.frombuffer(head[self.data_start + begin: self.data_start + end], DTYPES[kind]).reshape(shape)
            except Exception as err:  # noqa: BLE001 - a missing or unreadable index tensor
                raise CorruptShard(f"index tensor {name} cannot be read ({err})") from None
            self._check_digest(name, _le_bytes(array))
            if array.dtype != dtype or array.ndim != 1:
                raise CorruptShard(f"index tensor {name} has dtype {array.dtype} and {array.ndim} dimensions, "
                                   f"expected 1-D {np.dtype(dtype)}")
            index[name] = array.astype(np.int64)
        self.record_index, self.length = index["index.record_index"], index["index.length"]
        self.num_loss, self.task = index["index.num_loss"], index["index.task"]
        self.block_start = index["index.block_start"]
        check_index(self)

    def _read_on(self, head: bytes, end: int) -> bytes:
        """The file's first bytes `head`, read on to byte `end`."""
        if len(head) < end:
            head += self.storage.read_range(self.name, len(head), end - len(head))
            if len(head) < end:
                raise CorruptShard(f"file ended after {len(head)} of {self.size} bytes (truncated)")
        return head

    def __getstate__(self):
        """Picklable (DataLoader workers): staged bytes (memoryviews) stay; a worker fetches its own blocks."""
        return dict(self.__dict__, _staged={})

    def ranges(self, names) -> list[tuple[int, int, list[str]]]:
        """(file offset, length, tensor names) of the contiguous runs covering `names`."""
        runs: list[list] = []
        for name in sorted(names, key=lambda n: self.tensors[n][2]):
            _, _, begin, end = self.tensors[name]
            if runs and runs[-1][1] == begin:
                runs[-1][1] = end
                runs[-1][2].append(name)
            else:
                runs.append([begin, end, [name]])
        return [(self.data_start + b, e - b, names) for b, e, names in runs]

    def fetch(self, names) -> dict[str, bytes]:
        """The bytes of `names` (tensors): those staged by the read-ahead, else one range request per
        contiguous run (one per block)."""
        if self._staged and all(name in self._staged for name in names):
            return {name: self._staged.pop(name) for name in names}
        runs = self.ranges(names)
        out = {}
        blobs = self.storage.read_ranges(self.name, [(o, n) for o, n, _ in runs]) if runs else []
        for (offset, length, group), blob in zip(runs, blobs):
            if len(blob) != length:
                raise CorruptShard(f"file ended after {offset + len(blob)} of {self.size} bytes (truncated)")
            view = memoryview(blob)
            for name in group:
                _, _, begin, end = self.tensors[name]
                start = self.data_start + begin - offset
                out[name] = view[start: start + end - begin]
        return out

    def stage(self, parts: dict) -> None:
        """Bytes fetched ahead (a block's tensors): fetch takes them instead of reading again."""
        self._staged = dict(parts)

    @property
    def num_blocks(self) -> int:
        return len(self.block_start) - 1

    def block_of(self, position: int) -> int:
        return int(np.searchsorted(self.block_start, position, side="right") - 1)

    def part_names(self, block: int, layers=None) -> list[str]:
        """The block's tensors that decoding it reads: all of them when verifying (a block is used whole or
        not at all), else those of the hidden `layers` only (None: all)."""
        return part_names(self.layout, block, None if self.verify or layers is None else set(layers))

    def read_parts(self, names) -> dict[str, bytes]:
        """The bytes of block tensors, each checked against its digest (when verify is on)."""
        try:
            parts = self.fetch(names)
        except (CorruptShard, CacheError):
            raise
        except Exception as err:  # noqa: BLE001 - unreadable bytes
            raise CorruptShard(f"tensors {', '.join(names)} cannot be read ({err})") from None
        for name in names if self.verify else ():
            self._check_digest(name, parts[name])
        return parts

    def _check_digest(self, name: str, data) -> None:
        if self.verify and digest_bytes(data, BLOCK_DIGEST) != self.digests[name]:
            raise CorruptShard(f"tensor {name} fails its {BLOCK_DIGEST} check (corrupted bytes)")

    def decode_block(self, block: int, layers=None) -> list[CachedSequence]:
        """The sequences of one block; `layers` limits which hidden layers are decoded (None: all)."""
        lay = self.layout
        wanted = [layer for layer in lay.layers if layers is None or layer in set(layers)]
        raw = self.read_parts(self.part_names(block, layers))
        lo, hi = int(self.block_start[block]), int(self.block_start[block + 1])
        lengths, nloss = self.length[lo:hi], self.num_loss[lo:hi]
        prefix, n = f"block.{block:05d}.", int(nloss.sum())
        ids, mask = _decode_tokens(raw[prefix + "tokens"], prefix, int(lengths.sum()))
        top_ids, lp, tail, counts = _decode_topk(lay, raw, prefix, n, ids[mask.astype(bool)].astype(np.int64))
        hidden = _decode_hidden(lay, raw, prefix, n, wanted)
        out, tok, row = [], 0, 0
        for j in range(hi - lo):
            L, m = int(lengths[j]), int(nloss[j])
            if int(mask[tok: tok + L].sum()) != m:
                raise ValueError(f"tensor {prefix}tokens: sequence {lo + j} has {int(mask[tok: tok + L].sum())} loss "
                                 f"positions, index says {m}")
            out.append(CachedSequence(
                record_index=int(self.record_index[lo + j]), task=self.tasks[int(self.task[lo + j])],
                input_ids=ids[tok: tok + L].copy(), loss_mask=mask[tok: tok + L].copy(),
                topk_ids=top_ids[row: row + m], topk_logprobs=lp[row: row + m], tail=tail[row: row + m],
                counts=None if counts is None else counts[row: row + m],
                hidden={layer: h[row: row + m] for layer, h in hidden.items()}))
            tok, row = tok + L, row + m
        return out


def check_metadata(shard) -> None:
    """Impossible metadata (hostile or corrupt: layout, version, tasks, digests) is refused before any size
    is computed."""
    lay = shard.layout
    if not 1 <= lay.vocab_size <= MAX_VOCAB or not 1 <= lay.k <= min(MAX_K, lay.vocab_size):
        raise CorruptShard(f"metadata k={lay.k}, vocab_size={lay.vocab_size} out of range")
    if lay.mode not in ("topk", "sample"):
        raise CorruptShard(f"metadata mode {lay.mode!r} is not 'topk' or 'sample'")
    if len(lay.layers) != len(lay.widths) or len(lay.layers) > MAX_LAYERS \
            or not all(isinstance(w, int) and 1 <= w <= MAX_WIDTH for w in lay.widths) \
            or not all(isinstance(x, int) for x in lay.layers):
        raise CorruptShard(f"metadata layers {list(lay.layers)[:4]} / hidden_widths {list(lay.widths)[:4]} are not "
                           f"valid")
    for part, codec in (("topk_codec", lay.topk_codec), ("hidden_codec", lay.hidden_codec)):
        if not isinstance(codec, dict) or not isinstance(codec.get("name"), str) \
                or not isinstance(codec.get("params", {}), dict):
            raise CorruptShard(f"metadata {part} {codec!r} is not {{name, params}}")
    meta = shard.meta
    if meta.get("format_version") != str(FORMAT_VERSION) or meta.get("digest") != BLOCK_DIGEST:
        raise CorruptShard(f"metadata format_version {meta.get('format_version')!r} and digest "
                           f"{meta.get('digest')!r}: expected {str(FORMAT_VERSION)!r} and {BLOCK_DIGEST!r}")
    if not isinstance(shard.tasks, list) or not all(isinstance(t, str) for t in shard.tasks):
        raise CorruptShard("metadata field 'tasks' is not a list of names")
    if not isinstance(shard.digests, dict) or not all(is_hex_digest(v, BLOCK_DIGEST) for v in shard.digests.values()):
        raise CorruptShard(f"metadata field 'digests' is not a map of tensor names to {BLOCK_DIGEST} digests")
    if set(shard.digests) != set(shard.tensors):
        extra = sorted(set(shard.tensors) ^ set(shard.digests))[:3]
        raise CorruptShard(f"tensors and metadata field 'digests' do not list the same names ({extra})")


def check_index(shard) -> None:
    """The index must describe a possible shard: counts, block table, tasks, block sizes."""
    count = len(shard.record_index)
    if not (len(shard.length) == len(shard.num_loss) == len(shard.task) == count) or count > MAX_COUNT:
        raise CorruptShard("index tensors have different lengths")
    starts = shard.block_start
    if len(starts) < 2 or starts[0] != 0 or starts[-1] != count or np.any(np.diff(starts) < 0) \
            or (count and np.any(np.diff(starts) == 0)):
        raise CorruptShard(f"index.block_start {starts.tolist()[:8]} is not a block table for {count} sequences")
    if count and (shard.length.min() < 0 or shard.num_loss.min() < 0 or np.any(shard.num_loss > shard.length)):
        raise CorruptShard("index.num_loss / index.length hold negative counts or more loss positions than tokens")
    if count and (shard.record_index.min() < 0 or len(np.unique(shard.record_index)) != count):
        raise CorruptShard("index.record_index holds negative or repeated record numbers")
    if count and (shard.task.min() < 0 or shard.task.max() >= max(len(shard.tasks), 1) or not shard.tasks):
        raise CorruptShard("index.task points outside the metadata's tasks list")
    tokens = np.add.reduceat(shard.length, starts[:-1]) if count else np.zeros(0, np.int64)
    rows = np.add.reduceat(shard.num_loss, starts[:-1]) if count else np.zeros(0, np.int64)
    for b, (t, n) in enumerate(zip(tokens.tolist(), rows.tolist())):
        if shard.layout.raw_bytes(t, n) > MAX_BLOCK_RAW_BYTES:
            raise CorruptShard(f"block {b} would decode to {shard.layout.raw_bytes(t, n)} bytes (index values too "
                               f"large)")
