"""Shard layout, format versions 1 and 2: one safetensors file, an index plus zstd byte blocks.

Tensors: `index.record_index` int64 [S], `index.length` int32 [S], `index.num_loss` int32 [S],
`index.task` int32 [S] (into the `tasks` metadata list), `index.block_start` int64 [B+1];
per block b: `block.{b:05d}.tokens`, `.topk`, `.counts` (sampled mode), `.hidden.{layer}`,
all uint8. The metadata's `digests` holds the xxh3-128 digest of every tensor's bytes (`digest`
names the algorithm), and the manifest holds the sha256 of the header (which holds those), so
every byte is checked before use. Version 2 = version 1 plus the codecs that need it
(`kt2-zstd`: its decoder takes the block's next-token ids from `tokens`; `ks-zstd`: sampled ids +
counts in `topk`, no `counts` tensor). docs/cache-format.md is the full specification.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

import numpy as np
from safetensors.numpy import save_file

from .codecs import (VERSION2_TOPK_CODECS, get_hidden_codec, get_topk_codec, id_dtype, join_planes, split_planes,
                     zstd_compress, zstd_decompress)
from fastkd.integrity import BLOCK_DIGEST, digest_bytes, is_hex_digest

from .format import FORMAT_NAME, MAX_COUNT, MAX_K, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, CachedSequence

SHARD_FORMAT_VERSION = 1   # the version of a layout without version-2 codecs (format_version_for)
TOKENS_CODEC = "int32-planes+uint8-zstd"
COUNTS_CODEC = "uint16-planes-zstd"
INDEX_DTYPES = {"index.record_index": np.int64, "index.length": np.int32, "index.num_loss": np.int32,
                "index.task": np.int32, "index.block_start": np.int64}
MAX_BLOCK_RAW_BYTES = 1 << 34  # a block decoding to more than 16 GiB is taken for a corrupt index


class CorruptShard(ValueError):
    """Bytes of a shard that fail their digest or describe something impossible."""


@dataclass(frozen=True)
class Layout:
    """What every shard of one cache holds: k, vocabulary, mode, hidden layers, codecs."""

    k: int
    vocab_size: int
    mode: str  # "topk" or "sample"
    layers: tuple[int, ...] = ()
    widths: tuple[int, ...] = ()
    topk_codec: dict = field(default_factory=lambda: {"name": "raw-zstd", "params": {}})
    hidden_codec: dict = field(default_factory=lambda: {"name": "bf16-zstd", "params": {}})
    captured: bool = False   # selective capture: a `rows` tensor per block says which rows hold the teacher

    @property
    def sampled(self) -> bool:
        return self.mode == "sample"

    @property
    def counts_tensor(self) -> bool:
        """Sampled mode stores counts in their own tensor unless the codec holds them (ks-zstd)."""
        if not self.sampled:
            return False
        try:
            return not get_topk_codec(self.topk_codec["name"]).sampled
        except KeyError:   # an unknown codec: decoding it fails later, naming it
            return True

    @property
    def format_version(self) -> int:
        return 2 if self.captured else format_version_for(self.topk_codec)

    def raw_bytes(self, length: int, n: int) -> int:
        """Uncompressed size of one sequence (used to size blocks)."""
        per_row = self.k * (id_dtype(self.vocab_size).itemsize + 2 + (2 if self.sampled else 0)) + 4
        return 5 * length + n * per_row + n * 2 * sum(self.widths)

    def metadata(self) -> dict:
        return {
            "format": FORMAT_NAME + "-shard",
            "format_version": str(self.format_version),
            "k": str(self.k),
            "vocab_size": str(self.vocab_size),
            "mode": self.mode,
            "layers": json.dumps(list(self.layers)),
            "hidden_widths": json.dumps(list(self.widths)),
            "tokens_codec": TOKENS_CODEC,
            "topk_codec": json.dumps(self.topk_codec, sort_keys=True),
            "counts_codec": COUNTS_CODEC if self.counts_tensor else "",
            "hidden_codec": json.dumps(self.hidden_codec, sort_keys=True),
            **({"captured": "1"} if self.captured else {}),
        }

    @classmethod
    def from_metadata(cls, meta: dict) -> "Layout":
        return cls(k=int(meta["k"]), vocab_size=int(meta["vocab_size"]), mode=meta["mode"],
                   layers=tuple(json.loads(meta["layers"])), widths=tuple(json.loads(meta["hidden_widths"])),
                   topk_codec=json.loads(meta["topk_codec"]), hidden_codec=json.loads(meta["hidden_codec"]),
                   captured=meta.get("captured", "") == "1")


def format_version_for(topk_codec: dict) -> int:
    """2 for a cache whose logits codec needs format version 2 (kt2-zstd, ks-zstd), else 1: a cache
    that needs nothing new stays readable by older fastkd."""
    return 2 if topk_codec.get("name") in VERSION2_TOPK_CODECS else 1


def check_codec_mode(lay: "Layout") -> None:
    """A sampled-mode codec (ids + counts) only in mode sample, a top-k codec with labels only in mode topk."""
    codec = get_topk_codec(lay.topk_codec["name"])
    if codec.sampled and not lay.sampled:
        raise ValueError(f"logits codec {codec.name} stores sampled ids with counts: it needs mode 'sample'")
    if codec.labels and lay.sampled:
        raise ValueError(f"logits codec {codec.name} is for mode 'topk'; mode 'sample' uses ks-zstd (or raw-zstd)")


def plan_blocks(raw_sizes: list[int], block_bytes: int, max_block_sequences: int) -> list[int]:
    """Block start positions (plus the end): consecutive sequences, at most `block_bytes` raw
    bytes and `max_block_sequences` sequences each, never an empty block."""
    starts = [0]
    size = 0
    for i, raw in enumerate(raw_sizes):
        count = i - starts[-1]
        if count and (size + raw > block_bytes or count >= max_block_sequences):
            starts.append(i)
            size = 0
        size += raw
    starts.append(len(raw_sizes))
    if len(raw_sizes) == 0:
        return [0, 0]
    return starts


def part_names(layout: Layout, block: int) -> list[str]:
    names = [f"block.{block:05d}.tokens", f"block.{block:05d}.topk"]
    if layout.captured:
        names.append(f"block.{block:05d}.rows")
    if layout.counts_tensor:
        names.append(f"block.{block:05d}.counts")
    names += [f"block.{block:05d}.hidden.{layer}" for layer in layout.layers]
    return names


def part_kind(name: str) -> str:
    """'tokens', 'topk', 'rows', 'counts' or 'hidden' for a block tensor name."""
    return name.split(".")[2]


class EncodeError(ValueError):
    """A codec refused a block; names the record it could not encode when one can be found."""


def _le_bytes(a: np.ndarray) -> bytes:
    """The bytes safetensors stores for an array: C order, little endian."""
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def _encode_block(layout: Layout, seqs: list[CachedSequence]) -> dict[str, bytes]:
    """All parts of one block; a codec failure is traced to the record that causes it."""
    try:
        return _encode_block_parts(layout, seqs)
    except EncodeError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the record named
        if len(seqs) > 1:
            for s in seqs:
                _encode_block(layout, [s])  # raises EncodeError naming the record
        records = ", ".join(str(s.record_index) for s in seqs[:4]) + (", ..." if len(seqs) > 4 else "")
        raise EncodeError(f"record{'s' if len(seqs) > 1 else ''} {records}: {type(err).__name__}: {err}") from err


def _encode_block_parts(layout: Layout, seqs: list[CachedSequence]) -> dict[str, bytes]:
    ids = [np.asarray(s.input_ids, np.int32) for s in seqs]
    masks = [np.asarray(s.loss_mask, np.uint8) for s in seqs]
    parts = {"tokens": zstd_compress(split_planes(np.concatenate(ids) if ids else np.zeros(0, np.int32))
                                     + np.concatenate(masks).tobytes())}
    n = sum(int(m.sum()) for m in masks)
    k = layout.k

    def rows(get, dtype, width):
        if not seqs:
            return np.zeros((0, width) if width else (0,), dtype)
        return np.concatenate([np.asarray(get(s), dtype).reshape((-1, width) if width else (-1,)) for s in seqs])

    if n == 0:  # nothing to encode: empty payloads (the codecs are never called with n=0)
        parts["topk"] = b""
        if layout.captured:
            parts["rows"] = b""
        if layout.counts_tensor:
            parts["counts"] = b""
        for layer in layout.layers:
            parts[f"hidden.{layer}"] = b""
        return parts
    codec = get_topk_codec(layout.topk_codec["name"])
    if codec.sampled:   # ids + counts in one payload; the log-probs and tail are not stored (section 4.2)
        parts["topk"] = codec.encode(rows(lambda s: s.topk_ids, np.int64, k), rows(lambda s: s.counts, np.int64, k),
                                     layout.vocab_size, **layout.topk_codec["params"])
        extra = {}
    else:
        top_ids, top_lp, tail = rows(lambda s: s.topk_ids, np.int64, k), rows(lambda s: s.topk_logprobs, np.float32, k), \
            rows(lambda s: s.tail, np.float32, 0)
        labels = block_labels(ids, masks) if codec.labels else None
        if layout.captured:   # only the rows that hold the teacher go to the codec; a bit per row says which
            kept = ~((top_ids == -1).all(axis=1) & np.isneginf(top_lp).all(axis=1) & (tail == 1.0))
            parts["rows"] = zstd_compress(np.packbits(kept).tobytes())
            top_ids, top_lp, tail = top_ids[kept], top_lp[kept], tail[kept]
            labels = None if labels is None else labels[kept]
        extra = {"labels": labels} if codec.labels else {}
        parts["topk"] = codec.encode(top_ids, top_lp, tail, layout.vocab_size, **layout.topk_codec["params"],
                                     **extra) if len(tail) else b""
    if layout.counts_tensor:
        parts["counts"] = zstd_compress(split_planes(rows(lambda s: s.counts, np.uint16, k)))
    hcodec = get_hidden_codec(layout.hidden_codec["name"])
    for layer, width in zip(layout.layers, layout.widths):
        x = rows(lambda s: s.hidden[layer], np.float32, width)
        parts[f"hidden.{layer}"] = hcodec.encode(x, **layout.hidden_codec["params"])
    return parts


def block_labels(ids: list, masks: list) -> np.ndarray:
    """The token at each loss position of a block, in row order: row j is the teacher's distribution
    for the j-th masked token, so these are the labels kt2-zstd codes its ids against."""
    if not ids:
        return np.zeros(0, np.int64)
    flat, mask = np.concatenate(ids), np.concatenate(masks)
    return flat[mask.astype(bool)].astype(np.int64)


def write_shard(path, seqs: list[CachedSequence], layout: Layout, shard_number: int, *,
                block_bytes: int = 1 << 20, max_block_sequences: int = 16) -> dict:
    """Encode `seqs` into one safetensors file at `path`; returns counts for the manifest."""
    lengths = [len(s.input_ids) for s in seqs]
    nloss = [s.num_loss_positions for s in seqs]
    starts = plan_blocks([layout.raw_bytes(L, n) for L, n in zip(lengths, nloss)], block_bytes, max_block_sequences)
    tasks = sorted({s.task for s in seqs})
    task_ids = {t: i for i, t in enumerate(tasks)}
    tensors = {
        "index.record_index": np.array([s.record_index for s in seqs], np.int64),
        "index.length": np.array(lengths, np.int32),
        "index.num_loss": np.array(nloss, np.int32),
        "index.task": np.array([task_ids[s.task] for s in seqs], np.int32),
        "index.block_start": np.array(starts, np.int64),
    }
    part_bytes = {"tokens": 0, "topk": 0, "counts": 0, "hidden": 0, **({"rows": 0} if layout.captured else {})}
    hidden_bytes = {str(layer): 0 for layer in layout.layers}
    for b in range(len(starts) - 1):
        for kind, payload in _encode_block(layout, seqs[starts[b]: starts[b + 1]]).items():
            name = f"block.{b:05d}.{kind}"
            tensors[name] = np.frombuffer(payload, np.uint8)
            part_bytes[part_kind(name)] += len(payload)
            if kind.startswith("hidden."):
                hidden_bytes[kind.split(".", 1)[1]] += len(payload)
    meta = layout.metadata()
    meta.update({"shard": str(shard_number), "num_sequences": str(len(seqs)), "num_blocks": str(len(starts) - 1),
                 "tasks": json.dumps(tasks), "digest": BLOCK_DIGEST,
                 "digests": json.dumps({name: digest_bytes(_le_bytes(t), BLOCK_DIGEST) for name, t in tensors.items()},
                                       sort_keys=True)})
    save_file(tensors, str(path), metadata=meta)
    return {"num_sequences": len(seqs), "num_loss_positions": int(sum(nloss)), "num_tokens": int(sum(lengths)),
            "num_blocks": len(starts) - 1, "payload_bytes": part_bytes, "hidden_bytes": hidden_bytes}


class ShardV1:
    """Read side of one version-1 (or, as ShardV2, version-2) shard: the index at open, one block at a time on demand.

    verify=True (the default) checks every tensor's bytes against the `digests` metadata before
    they are used (shards written before digests existed carry crc32s of their block tensors
    only; the reader then checks the whole file's sha256 at open, see reader.open_shard). The
    index is checked for impossible values either way.
    """

    version = 1

    def __init__(self, handle, where: str, *, verify: bool = True):
        self.handle = handle
        self.where = where
        self.verify = verify
        self.meta = handle.metadata() or {}
        try:
            self.layout = Layout.from_metadata(self.meta)
            self.tasks = json.loads(self.meta.get("tasks", "[]"))
            self.digests = json.loads(self.meta.get("digests", "{}"))
            self.digest = self.meta.get("digest", BLOCK_DIGEST)
            self.crc32 = json.loads(self.meta.get("crc32", "{}"))
        except (KeyError, ValueError, TypeError) as err:
            raise CorruptShard(f"metadata field {err} is missing or not valid") from None
        check_layout(self.layout)
        check_meta_codecs(self.meta, self.layout)
        if self.meta.get("format_version", str(self.version)) != str(self.version):
            raise CorruptShard(f"metadata format_version {self.meta.get('format_version')!r}, the manifest says {self.version}")
        if self.layout.format_version > self.version:
            raise CorruptShard(f"metadata {'captured' if self.layout.captured else 'topk_codec ' + self.layout.topk_codec['name']}"
                               f" needs format version 2, the shard says {self.version}")
        if not isinstance(self.tasks, list) or not all(isinstance(t, str) for t in self.tasks):
            raise CorruptShard("metadata field 'tasks' is not a list of names")
        if not isinstance(self.digests, dict) or not all(is_hex_digest(v, self.digest) for v in self.digests.values()):
            raise CorruptShard(f"metadata field 'digests' is not a map of tensor names to {self.digest} digests")
        if self.digests and set(self.digests) != set(handle.keys()):
            extra = sorted(set(handle.keys()) ^ set(self.digests))[:3]
            raise CorruptShard(f"tensors and metadata field 'digests' do not list the same names ({extra})")
        index = {}
        for name, dtype in INDEX_DTYPES.items():
            try:
                array = handle.get_tensor(name)
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

    @property
    def num_blocks(self) -> int:
        return len(self.block_start) - 1

    def block_tensor_bytes(self) -> dict[str, int]:
        """Stored size of every block tensor, from the header alone (nothing is read): what the manifest's
        payload_bytes / hidden_bytes count. Refuses tensors that are not 1-D U8 or not of this layout."""
        expected = {name for b in range(self.num_blocks) for name in self.part_names(b)}
        names = [name for name in self.handle.keys() if name not in INDEX_DTYPES]
        unknown = sorted(set(names) - expected)
        if unknown:
            raise CorruptShard(f"tensor {unknown[0]} is not one of its {self.num_blocks} blocks' parts "
                               f"({', '.join(sorted({part_kind(n) for n in expected})) or 'none'})")
        missing = sorted(expected - set(names))
        if missing:
            raise CorruptShard(f"tensor {missing[0]} is missing (the index announces {self.num_blocks} blocks)")
        sizes = {}
        for name in names:
            dtype, shape = _tensor_type(self.handle, name)
            if dtype != "U8" or len(shape) != 1:
                raise CorruptShard(f"tensor {name} is {dtype} {list(shape)}, expected 1-D U8 (a block part)")
            sizes[name] = int(shape[0])
        return sizes

    def block_of(self, position: int) -> int:
        return int(np.searchsorted(self.block_start, position, side="right") - 1)

    def part_names(self, block: int) -> list[str]:
        return part_names(self.layout, block)

    def _check_digest(self, name: str, data: bytes) -> None:
        if not self.verify:
            return
        if name in self.digests:
            if digest_bytes(data, self.digest) != self.digests[name]:
                raise CorruptShard(f"tensor {name} fails its {self.digest} check (corrupted bytes)")
        elif name in self.crc32:
            if zlib.crc32(data) != self.crc32[name]:
                raise CorruptShard(f"tensor {name} fails its crc32 check (corrupted bytes)")
        elif self.digests:
            raise CorruptShard(f"tensor {name} has no digest in the shard metadata")

    def raw_part(self, name: str) -> bytes:
        """One block tensor's bytes, checked against its digest (when verify is on)."""
        try:
            data = self.handle.get_tensor(name).tobytes()
        except Exception as err:  # noqa: BLE001 - a missing tensor or unreadable bytes
            raise CorruptShard(f"tensor {name} cannot be read ({err})") from None
        self._check_digest(name, data)
        return data

    def check_block(self, block: int) -> None:
        """Check every tensor of a block against its digest without decoding it."""
        for name in self.part_names(block):
            self.raw_part(name)

    @staticmethod
    def _kept_rows(payload: bytes, n: int, prefix: str) -> np.ndarray:
        """The `rows` tensor of a selective-capture block: one bit per loss row (1 = holds the teacher)."""
        bits = np.frombuffer(zstd_decompress(payload, (n + 7) // 8), np.uint8)
        if len(bits) != (n + 7) // 8 or (n % 8 and bits[-1] & ((1 << (8 - n % 8)) - 1)):
            raise ValueError(f"tensor {prefix}rows does not hold {n} row bits")
        return np.unpackbits(bits, count=n).astype(bool)

    def decode_block(self, block: int, layers=None) -> list[CachedSequence]:
        """The sequences of one block; `layers` limits which hidden layers are decoded (None: all).
        With verify on, every tensor of the block is checked first, decoded or not: a block is
        used whole or not at all."""
        lay = self.layout
        wanted = lay.layers if layers is None else [l for l in lay.layers if l in set(layers)]
        names = self.part_names(block) if self.verify else \
            [n for n in self.part_names(block) if part_kind(n) != "hidden" or int(n.rsplit(".", 1)[1]) in wanted]
        raw = {name: self.raw_part(name) for name in names}
        lo, hi = int(self.block_start[block]), int(self.block_start[block + 1])
        lengths, nloss = self.length[lo:hi], self.num_loss[lo:hi]
        total_len, n, k = int(lengths.sum()), int(nloss.sum()), lay.k
        prefix = f"block.{block:05d}."
        body = zstd_decompress(raw[prefix + "tokens"], total_len * 5)
        all_ids = join_planes(body[: 4 * total_len], np.int32, total_len)
        all_mask = np.frombuffer(body[4 * total_len:], np.uint8).copy()
        if np.any(all_mask > 1):
            raise ValueError(f"tensor {prefix}tokens: loss_mask values other than 0/1")
        if n == 0:
            ids = np.zeros((0, k), np.int64)
            lp = np.zeros((0, k), np.float32)
            tail = np.zeros(0, np.float32)
            counts = np.zeros((0, k), np.int32) if lay.sampled else None
        else:
            codec = get_topk_codec(lay.topk_codec["name"])
            counts = None
            if codec.sampled:
                ids, counts = codec.decode(raw[prefix + "topk"], n, k, lay.vocab_size, **lay.topk_codec["params"])
                ids, counts = np.asarray(ids, np.int64), np.asarray(counts, np.int32)
                if ids.shape != (n, k) or counts.shape != (n, k):
                    raise ValueError(f"tensor {prefix}topk decoded to shapes {ids.shape}, {counts.shape}")
                lp, tail = empirical_logprobs(counts)
            else:
                labels = all_ids[all_mask.astype(bool)].astype(np.int64)
                kept = self._kept_rows(raw[prefix + "rows"], n, prefix) if lay.captured else None
                m = n if kept is None else int(kept.sum())
                if kept is not None:
                    labels = labels[kept]
                extra = {"labels": labels} if codec.labels else {}
                if m:
                    ids, lp, tail = codec.decode(raw[prefix + "topk"], m, k, lay.vocab_size,
                                                 **lay.topk_codec["params"], **extra)
                    ids, lp, tail = np.asarray(ids, np.int64), np.asarray(lp, np.float32), np.asarray(tail, np.float32)
                    if ids.shape != (m, k) or lp.shape != (m, k) or tail.shape != (m,):
                        raise ValueError(f"tensor {prefix}topk decoded to shapes {ids.shape}, {lp.shape}, {tail.shape}")
                elif raw[prefix + "topk"]:
                    raise ValueError(f"tensor {prefix}topk holds bytes but {prefix}rows keeps no row")
                if kept is not None:   # the rows without the teacher: ids -1, log-probs -inf, tail 1
                    full_ids, full_lp = np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32)
                    full_tail = np.ones(n, np.float32)
                    if m:
                        full_ids[kept], full_lp[kept], full_tail[kept] = ids, lp, tail
                    ids, lp, tail = full_ids, full_lp, full_tail
            if ids.shape != (n, k) or lp.shape != (n, k) or tail.shape != (n,):
                raise ValueError(f"tensor {prefix}topk decoded to shapes {ids.shape}, {lp.shape}, {tail.shape}")
            if lay.counts_tensor:
                counts = join_planes(zstd_decompress(raw[prefix + "counts"], n * k * 2),
                                     np.uint16, n * k).reshape(n, k).astype(np.int32)
        hidden = {}
        for layer in wanted:
            width = lay.widths[lay.layers.index(layer)]
            if n == 0:
                hidden[layer] = np.zeros((0, width), np.float32)
                continue
            hcodec = get_hidden_codec(lay.hidden_codec["name"])
            x = np.asarray(hcodec.decode(raw[f"{prefix}hidden.{layer}"], n, width,
                                         **lay.hidden_codec["params"]), np.float32)
            if x.shape != (n, width):
                raise ValueError(f"tensor {prefix}hidden.{layer} decoded to shape {x.shape}, expected {(n, width)}")
            hidden[layer] = x
        out = []
        tok = row = 0
        for j in range(hi - lo):
            L, m = int(lengths[j]), int(nloss[j])
            mask = all_mask[tok: tok + L]
            if int(mask.sum()) != m:
                raise ValueError(f"tensor {prefix}tokens: sequence {lo + j} has {int(mask.sum())} loss positions, "
                                 f"index says {m}")
            out.append(CachedSequence(
                record_index=int(self.record_index[lo + j]), task=self.tasks[int(self.task[lo + j])],
                input_ids=all_ids[tok: tok + L].copy(), loss_mask=mask.copy(),
                topk_ids=ids[row: row + m], topk_logprobs=lp[row: row + m], tail=tail[row: row + m],
                counts=None if counts is None else counts[row: row + m],
                hidden={layer: h[row: row + m] for layer, h in hidden.items()}))
            tok += L
            row += m
        return out


def _tensor_type(handle, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype name, shape) of a tensor, from the header of a local or remote shard."""
    tensors = getattr(handle, "tensors", None)
    if tensors is not None:   # storage.RangeShardFile: the header it parsed
        dtype, shape, _, _ = tensors[name]
        return ("U8" if np.dtype(dtype) == np.uint8 else str(dtype)), tuple(shape)
    view = handle.get_slice(name)
    return str(view.get_dtype()), tuple(int(x) for x in view.get_shape())


def empirical_logprobs(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a sampled-mode codec without log-probs (ks-zstd) decodes to: log(count / draws) per used
    slot (-inf for unused ones) and tail 0, the target the sampled-mode loss trains on."""
    total = counts.sum(axis=1, keepdims=True, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = np.where(counts > 0, np.log(counts / np.maximum(total, 1)), -np.inf).astype(np.float32)
    return lp, np.zeros(len(counts), np.float32)


def check_layout(lay: Layout) -> None:
    """Impossible layouts (hostile or corrupt metadata) are refused before any size is computed."""
    if not 1 <= lay.vocab_size <= MAX_VOCAB or not 1 <= lay.k <= min(MAX_K, lay.vocab_size):
        raise CorruptShard(f"metadata k={lay.k}, vocab_size={lay.vocab_size} out of range")
    if lay.mode not in ("topk", "sample"):
        raise CorruptShard(f"metadata mode {lay.mode!r} is not 'topk' or 'sample'")
    if len(lay.layers) != len(lay.widths) or len(lay.layers) > MAX_LAYERS \
            or not all(isinstance(w, int) and 1 <= w <= MAX_WIDTH for w in lay.widths) \
            or not all(isinstance(x, int) for x in lay.layers):
        raise CorruptShard(f"metadata layers {list(lay.layers)[:4]} / hidden_widths {list(lay.widths)[:4]} are not valid")
    for part, codec in (("topk_codec", lay.topk_codec), ("hidden_codec", lay.hidden_codec)):
        if not isinstance(codec, dict) or not isinstance(codec.get("name"), str) or not isinstance(codec.get("params", {}), dict):
            raise CorruptShard(f"metadata {part} {codec!r} is not {{name, params}}")


def check_meta_codecs(meta: dict, lay: Layout) -> None:
    """The fixed codec names of the metadata: tokens always int32-planes+uint8-zstd, counts exactly when
    the layout has a counts tensor."""
    if meta.get("tokens_codec", TOKENS_CODEC) != TOKENS_CODEC:
        raise CorruptShard(f"metadata tokens_codec {meta['tokens_codec']!r} is not {TOKENS_CODEC!r}")
    counts = COUNTS_CODEC if lay.counts_tensor else ""
    if meta.get("counts_codec", counts) != counts:
        raise CorruptShard(f"metadata counts_codec {meta['counts_codec']!r}, expected {counts!r} in mode {lay.mode}"
                           f" with logits codec {lay.topk_codec['name']}")


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
            raise CorruptShard(f"block {b} would decode to {shard.layout.raw_bytes(t, n)} bytes (index values too large)")


class ShardV2(ShardV1):
    """A version-2 shard: the same tensors; its codecs may be kt2-zstd and ks-zstd (module doc)."""

    version = 2


# format_version (from the manifest / shard metadata) -> shard reader class
SHARD_READERS = {1: ShardV1, 2: ShardV2}
