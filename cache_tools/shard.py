"""Shard layout (format 3): one safetensors file, an index plus zstd byte-plane blocks (tokens, topk, rows,
hidden.<layer>), each tensor digested; written and decoded part by part. Spec: docs/cache-format.md."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from safetensors.numpy import save_file

from .codecs import get_codec
from .errors import CacheError
from .format import FORMAT_NAME, FORMAT_VERSION, CachedSequence
from .integrity import BLOCK_DIGEST, digest_bytes
from .planes import ZSTD_LEVEL, compress_planes, decompress_planes, pack_frames, unpack_frames

INDEX_DTYPES = {"index.record_index": np.int64, "index.length": np.int32, "index.num_loss": np.int32,
                "index.task": np.int32, "index.block_start": np.int64}
MAX_BLOCK_RAW_BYTES = 1 << 34  # a block decoding to more than 16 GiB is taken for a corrupt index


@dataclass(frozen=True)
class Layout:
    """What every shard of one cache holds: k, vocabulary, mode, hidden layers, codecs, selective capture."""

    k: int
    vocab_size: int
    mode: str  # "topk" or "sample"
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    topk_codec: dict
    hidden_codec: dict
    captured: bool   # selective capture: a `rows` tensor per block says which rows hold the teacher

    @property
    def sampled(self) -> bool:
        return self.mode == "sample"

    def raw_bytes(self, length: int, n: int) -> int:
        """Uncompressed size of one sequence (sizes blocks): ids in their smallest type, fp16 values, counts."""
        id_bytes = 1 if self.vocab_size <= 255 else 2 if self.vocab_size <= 65535 else 4
        per_row = self.k * (id_bytes + 2 + (2 if self.sampled else 0)) + 4
        return 5 * length + n * per_row + n * 2 * sum(self.widths)

    def metadata(self) -> dict:
        return {"format": FORMAT_NAME + "-shard", "format_version": str(FORMAT_VERSION), "k": str(self.k),
                "vocab_size": str(self.vocab_size), "mode": self.mode, "layers": json.dumps(list(self.layers)),
                "hidden_widths": json.dumps(list(self.widths)),
                "topk_codec": json.dumps(self.topk_codec, sort_keys=True),
                "hidden_codec": json.dumps(self.hidden_codec, sort_keys=True),
                **({"captured": "1"} if self.captured else {})}

    @classmethod
    def from_metadata(cls, meta: dict) -> "Layout":
        return cls(k=int(meta["k"]), vocab_size=int(meta["vocab_size"]), mode=meta["mode"],
                   layers=tuple(json.loads(meta["layers"])), widths=tuple(json.loads(meta["hidden_widths"])),
                   topk_codec=json.loads(meta["topk_codec"]), hidden_codec=json.loads(meta["hidden_codec"]),
                   captured=meta.get("captured", "") == "1")


def plan_blocks(layout: Layout, lengths, losses, block_bytes: int, max_block_sequences: int) -> list[int]:
    """Block start positions (plus the end) for sequences of these token and loss counts: consecutive
    sequences, at most `block_bytes` raw bytes and `max_block_sequences` sequences each, never an empty block."""
    starts = [0]
    size = 0
    for i, raw in enumerate(layout.raw_bytes(n, m) for n, m in zip(lengths, losses)):
        count = i - starts[-1]
        if count and (size + raw > block_bytes or count >= max_block_sequences):
            starts.append(i)
            size = 0
        size += raw
    starts.append(len(lengths))
    return starts


def part_names(layout: Layout, block: int, layers=None) -> list[str]:
    """The tensors of a block (of its hidden layers only `layers`, when given)."""
    names = [f"block.{block:05d}.{part}" for part in ("tokens", "topk", "rows") if part != "rows" or layout.captured]
    return names + [f"block.{block:05d}.hidden.{layer}" for layer in layout.layers if layers is None or layer in layers]


def part_kind(name: str) -> str:
    """'tokens', 'topk', 'rows' or 'hidden' for a block tensor name."""
    return name.split(".")[2]


def payload_sizes(layout: Layout, sizes: dict[str, int]) -> tuple[dict, dict]:
    """The manifest's payload_bytes (per part) and hidden_bytes (per layer) of block tensors of these sizes."""
    parts = {"tokens": 0, "topk": 0, "hidden": 0, **({"rows": 0} if layout.captured else {})}
    hidden = {str(layer): 0 for layer in layout.layers}
    for name, size in sizes.items():
        parts[part_kind(name)] += size
        if part_kind(name) == "hidden":
            hidden[name.rsplit(".", 1)[1]] += size
    return parts, hidden


class EncodeError(CacheError):
    """A codec refused a block; names the shard, the record it could not encode (when one can be found), the codecs."""


def _le_bytes(a: np.ndarray) -> bytes:
    """The bytes safetensors stores for an array: C order, little endian."""
    a = np.ascontiguousarray(a)
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def empty_rows(ids, logprobs, tail) -> np.ndarray:
    """Rows a selective-capture cache stores without the teacher (bool [n]): every id -1, every log-prob -inf,
    tail exactly 1."""
    return ((np.asarray(ids) == -1).all(axis=1) & np.isneginf(np.asarray(logprobs, np.float64)).all(axis=1)
            & (np.asarray(tail) == 1.0))


def _rows(seqs, get, dtype, width: int = 0) -> np.ndarray:
    """The block's rows of one field, the sequences' rows concatenated ([N, width], or [N] for width 0)."""
    shape = (-1, width) if width else (-1,)
    empty = np.zeros((0, *shape[1:]), dtype)
    return np.concatenate([empty, *(np.asarray(get(s), dtype).reshape(shape) for s in seqs)])


def _encode_tokens(seqs) -> bytes:
    """The block's token ids (4 byte planes) and loss masks (1 plane), sequences concatenated."""
    return pack_frames(b"", [compress_planes(_rows(seqs, lambda s: s.input_ids, np.int64), 4, ZSTD_LEVEL),
                             compress_planes(_rows(seqs, lambda s: s.loss_mask, np.uint8), 1, ZSTD_LEVEL)])


def _encode_topk(layout: Layout, seqs) -> dict[str, bytes]:
    """`topk` (and `rows` in a selective-capture block): ks takes ids + counts, kt the rows holding the teacher."""
    k, params = layout.k, layout.topk_codec["params"]
    codec = get_codec("topk", layout.topk_codec["name"])
    ids = _rows(seqs, lambda s: s.topk_ids, np.int64, k)
    if codec.sampled:   # ids + counts in one payload; the log-probs and tail are not stored (section 4.2)
        return {"topk": codec.encode(ids, _rows(seqs, lambda s: s.counts, np.int64, k), layout.vocab_size, **params)}
    lp, tail = _rows(seqs, lambda s: s.topk_logprobs, np.float32, k), _rows(seqs, lambda s: s.tail, np.float32)
    # row j is the teacher's distribution for the j-th masked token: kt at small precision codes ids against it
    labels = _rows(seqs, lambda s: s.input_ids, np.int64)[_rows(seqs, lambda s: s.loss_mask, bool)]
    parts = {}
    if layout.captured:   # only the rows that hold the teacher go to the codec; a bit per row says which
        kept = ~empty_rows(ids, lp, tail)
        parts["rows"] = pack_frames(b"", [compress_planes(np.packbits(kept), 1, ZSTD_LEVEL)])
        ids, lp, tail, labels = ids[kept], lp[kept], tail[kept], labels[kept]
    parts["topk"] = codec.encode(ids, lp, tail, layout.vocab_size, labels=labels, **params) if len(tail) else b""
    return parts


def _encode_hidden(layout: Layout, seqs) -> dict[str, bytes]:
    codec = get_codec("hidden", layout.hidden_codec["name"])
    return {f"hidden.{layer}": codec.encode(_rows(seqs, lambda s: s.hidden[layer], np.float32, width),
                                            **layout.hidden_codec["params"])
            for layer, width in zip(layout.layers, layout.widths)}


def encode_block(layout: Layout, seqs: list[CachedSequence], where: str) -> dict[str, bytes]:
    """All parts of one block (empty payloads when it has no loss position); a codec failure is traced
    to the record that causes it (`where`: the shard, as the error names it)."""
    try:
        if sum(s.num_loss_positions for s in seqs) == 0:
            empty = {"topk": b"", **({"rows": b""} if layout.captured else {})}
            return {"tokens": _encode_tokens(seqs), **empty, **{f"hidden.{layer}": b"" for layer in layout.layers}}
        return {"tokens": _encode_tokens(seqs), **_encode_topk(layout, seqs), **_encode_hidden(layout, seqs)}
    except EncodeError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the record named
        if len(seqs) > 1:
            for s in seqs:
                encode_block(layout, [s], where)  # raises EncodeError naming the record
        records = ", ".join(str(s.record_index) for s in seqs[:4]) + (", ..." if len(seqs) > 4 else "")
        codecs = {"topk": layout.topk_codec, "hidden": layout.hidden_codec}
        raise EncodeError(f"{where}: cannot encode record{'s' if len(seqs) > 1 else ''} {records}: "
                          f"{type(err).__name__}: {err} (codecs {codecs})") from None


def assemble_shard(path, seqs, layout: Layout, number: int, starts: list[int], payloads: list[dict]) -> dict:
    """The shard file from blocks already encoded (`payloads[b]` for the sequences starts[b]:starts[b+1]); `seqs`
    need only record_index, task, input_ids and loss_mask. Returns counts for the manifest."""
    lengths = [len(s.input_ids) for s in seqs]
    nloss = [s.num_loss_positions for s in seqs]
    tasks = sorted({s.task for s in seqs})
    task_ids = {t: i for i, t in enumerate(tasks)}
    index = {"index.record_index": [s.record_index for s in seqs], "index.length": lengths, "index.num_loss": nloss,
             "index.task": [task_ids[s.task] for s in seqs], "index.block_start": starts}
    tensors = {name: np.array(values, INDEX_DTYPES[name]) for name, values in index.items()}
    blocks = {f"block.{b:05d}.{kind}": payload for b, parts in enumerate(payloads) for kind, payload in parts.items()}
    tensors.update((name, np.frombuffer(payload, np.uint8)) for name, payload in blocks.items())
    part_bytes, hidden_bytes = payload_sizes(layout, {name: len(payload) for name, payload in blocks.items()})
    meta = dict(layout.metadata(), shard=str(number), num_sequences=str(len(seqs)), num_blocks=str(len(starts) - 1),
                tasks=json.dumps(tasks), digest=BLOCK_DIGEST,
                digests=json.dumps({name: digest_bytes(_le_bytes(t), BLOCK_DIGEST) for name, t in tensors.items()},
                                   sort_keys=True))
    save_file(tensors, str(path), metadata=meta)
    return {"num_sequences": len(seqs), "num_loss_positions": int(sum(nloss)), "num_tokens": int(sum(lengths)),
            "num_blocks": len(starts) - 1, "payload_bytes": part_bytes, "hidden_bytes": hidden_bytes}


def _decode_tokens(payload: bytes, prefix: str, total_len: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = unpack_frames(payload, 0, 2)
    if len(ids) != 4 or len(mask) != 1:
        raise ValueError(f"tensor {prefix}tokens holds {len(ids)} and {len(mask)} byte planes, expected 4 and 1")
    ids, mask = decompress_planes(ids, total_len).view(np.int32), decompress_planes(mask, total_len).astype(np.uint8)
    if np.any(mask > 1):
        raise ValueError(f"tensor {prefix}tokens: loss_mask values other than 0/1")
    return ids, mask


def _decode_rows(payload: bytes, n: int, prefix: str) -> np.ndarray:
    """The `rows` tensor of a selective-capture block: one bit per loss row (1 = holds the teacher)."""
    (frames,) = unpack_frames(payload, 0, 1)
    bits = decompress_planes(frames, (n + 7) // 8).astype(np.uint8)
    if len(frames) != 1 or (n % 8 and bits[-1] & ((1 << (8 - n % 8)) - 1)):
        raise ValueError(f"tensor {prefix}rows does not hold {n} row bits")
    return np.unpackbits(bits, count=n).astype(bool)


def _decode_topk(lay: Layout, raw: dict, prefix: str, n: int, labels: np.ndarray):
    """(ids, log-probs, tail, counts) of the block's n rows: ks gives ids + counts (log-probs from them),
    kt the rows holding the teacher; the others (selective capture) are empty rows."""
    k, params = lay.k, lay.topk_codec["params"]
    codec = get_codec("topk", lay.topk_codec["name"])
    if codec.sampled:
        ids, counts = codec.decode(raw[prefix + "topk"], n, k, lay.vocab_size, **params) if n else \
            (np.zeros((0, k), np.int64), np.zeros((0, k), np.int32))
        ids, counts = np.asarray(ids, np.int64), np.asarray(counts, np.int32)
        if ids.shape != (n, k) or counts.shape != (n, k):
            raise ValueError(f"tensor {prefix}topk decoded to shapes {ids.shape}, {counts.shape}")
        return (ids, *empirical_logprobs(counts), counts)
    kept = _decode_rows(raw[prefix + "rows"], n, prefix) if lay.captured and n else np.ones(n, bool)
    m = int(kept.sum())
    ids, lp, tail = np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32), np.ones(n, np.float32)
    if m:
        got = codec.decode(raw[prefix + "topk"], m, k, lay.vocab_size, labels=labels[kept], **params)
        got = np.asarray(got[0], np.int64), np.asarray(got[1], np.float32), np.asarray(got[2], np.float32)
        if got[0].shape != (m, k) or got[1].shape != (m, k) or got[2].shape != (m,):
            raise ValueError(f"tensor {prefix}topk decoded to shapes {got[0].shape}, {got[1].shape}, {got[2].shape}")
        if m == n:
            return (*got, None)
        ids[kept], lp[kept], tail[kept] = got
    elif raw[prefix + "topk"]:
        raise ValueError(f"tensor {prefix}topk holds bytes but {prefix}rows keeps no row")
    return ids, lp, tail, None


def _decode_hidden(lay: Layout, raw: dict, prefix: str, n: int, layers) -> dict[int, np.ndarray]:
    codec = get_codec("hidden", lay.hidden_codec["name"])
    out = {}
    for layer in layers:
        width = lay.widths[lay.layers.index(layer)]
        x = np.asarray(codec.decode(raw[f"{prefix}hidden.{layer}"], n, width, **lay.hidden_codec["params"]),
                       np.float32) if n else np.zeros((0, width), np.float32)
        if x.shape != (n, width):
            raise ValueError(f"tensor {prefix}hidden.{layer} decoded to shape {x.shape}, expected {(n, width)}")
        out[layer] = x
    return out


def empirical_logprobs(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the sampled codec decodes to beside the counts: log(count / draws) per used slot (-inf for
    unused ones) and tail 0, the target the sampled-mode loss trains on."""
    total = counts.sum(axis=1, keepdims=True, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lp = np.where(counts > 0, np.log(counts / np.maximum(total, 1)), -np.inf).astype(np.float32)
    return lp, np.zeros(len(counts), np.float32)
