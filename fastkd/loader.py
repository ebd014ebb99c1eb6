"""Sequences of a source (a teacher cache, or records: train_data.RecordSource) -> seeded epoch plans (fastkd.plans)
-> padded `Batch`es built in DataLoader workers, each rank taking its slice of every global batch."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from fastkd.batching import labels_from_mask, pad_batch
from fastkd.errors import UserError, user_errors
from fastkd.plans import PlanMaker, epoch_plan, rank_slice

__all__ = ["PlanMaker", "epoch_plan"]  # fastkd.plans' names, importable from here as before the split

IGNORE_INDEX = -100


class CacheSource:
    """Sequences of a teacher cache (fastkd.cache_tools.CacheReader, opened lazily so it pickles into workers);
    `shards` are its blocks, decoded ones kept in a small LRU; `layers=[]` skips the hidden states."""

    has_teacher = True

    def __init__(self, path, *, layers: list[int] | None = None, cached_blocks: int = 8,
                 verify: bool = True):
        self.path = str(path)
        self.layers = layers
        self.verify = verify
        self.cached_blocks = max(1, int(cached_blocks))
        self._reader = None
        self._blocks: dict = {}
        reader = self.reader
        self.manifest = reader.manifest
        self.lengths = np.asarray(reader.lengths, dtype=np.int64)
        self.shards = [np.arange(r.start, r.stop, dtype=np.int64) for r in reader.blocks()]
        if len(self.lengths) == 0:
            from fastkd.cache_tools import CacheError

            raise CacheError(f"cache {self.path}: holds no sequences")

    @property
    def reader(self):
        if self._reader is None:
            from fastkd.cache_tools import CacheReader

            self._reader = CacheReader(self.path, layers=self.layers, verify=self.verify)
        return self._reader

    def __getstate__(self):
        """Picklable (DataLoader workers) and copied (the held-out split): each copy opens its own reader."""
        return dict(self.__dict__, _reader=None, _blocks={})

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, position: int):
        shard, block, inside = self.reader.locate(int(position))
        key = (shard, block)
        seqs = self._blocks.pop(key, None)
        if seqs is None:
            seqs = self.reader.read_block(shard, block)  # decoded once while it stays in the LRU
        self._blocks[key] = seqs
        while len(self._blocks) > self.cached_blocks:
            self._blocks.pop(next(iter(self._blocks)))
        return seqs[inside]

    def expect(self, positions) -> None:
        """The positions about to be read, in order (an iterable, consumed only by a reader with a read-ahead
        budget, a URL's by default, which fetches their blocks ahead)."""
        reader = self.reader
        if reader.read_ahead.budget:  # their blocks in first-use order, each once
            reader.expect(list(dict.fromkeys(reader.locate(int(position))[:2] for position in positions)))

    def corrupt_positions(self, progress=None) -> tuple[np.ndarray, list[str]]:
        """Positions held by blocks that fail their digests, and one message per such block."""
        bad = self.reader.find_corrupt_blocks(progress)
        positions = np.concatenate([np.arange(r.start, r.stop) for r, _ in bad]) if bad else np.zeros(0, np.int64)
        return positions.astype(np.int64), [message for _, message in bad]


@dataclass
class Batch:
    """A padded micro-batch (or packed rows: fastkd.packing) and the teacher signal for its loss rows (row-major)."""

    input_ids: torch.Tensor             # long [B, T], right-padded
    attention_mask: torch.Tensor        # long [B, T]
    loss_mask: torch.Tensor             # long [B, T]
    labels: torch.Tensor                # long [B, T]; IGNORE_INDEX except where position t predicts a loss token
    topk_ids: torch.Tensor | None = None        # long [M, k]
    topk_logprobs: torch.Tensor | None = None   # float [M, k]
    tail: torch.Tensor | None = None            # float [M]
    counts: torch.Tensor | None = None          # int [M, k]
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> float [M, d]
    record_indices: list[int] = field(default_factory=list)
    loss_index: torch.Tensor | None = None      # long [M]: flat (b*T + t) index of each loss row, made on the host
    # packed rows (fastkd.packing): positions restart per sequence; cu_seqlens/max_seqlen for flash attention
    position_ids: torch.Tensor | None = None    # long [B, T]
    cu_seqlens: torch.Tensor | None = None      # int32 [S + 1]: segment starts in the flattened [B * T] grid
    max_seqlen: int | None = None
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # (row, start, length) of each sequence

    @property
    def num_rows(self) -> int:
        return int(self.loss_index.numel())  # shape metadata: no read of the tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def _map(self, fn) -> "Batch":
        tensors = {f.name: fn(v) for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}
        return replace(self, **tensors, hidden={layer: fn(h) for layer, h in self.hidden.items()})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


def collate(sequences: list, pad_id: int) -> Batch:
    """Pad sequences (right) and concatenate their teacher rows in the same row-major order as the
    labels, so row r of the teacher tensors belongs to the r-th label != IGNORE_INDEX."""
    ids, attn, loss = pad_batch([s.input_ids.tolist() for s in sequences], pad_id, "right",
                                [s.loss_mask.tolist() for s in sequences])
    return make_batch(sequences, ids, attn, loss, labels_from_mask(ids, loss, IGNORE_INDEX))


def make_batch(sequences: list, ids, attn, loss, labels: torch.Tensor, **packed) -> Batch:
    """The Batch of `sequences` laid out in these tensors (`packed`: a packed one's fields), with their teacher
    rows (if any) concatenated in order: the batch's loss rows are theirs, in order."""
    # the loss rows as indices, found here on the host: a boolean mask on the device would sync every step
    loss_index = (labels.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)
    batch = Batch(ids, attn, loss, labels, record_indices=[int(s.record_index) for s in sequences],
                  loss_index=loss_index, **packed)
    if getattr(sequences[0], "topk_ids", None) is None:
        return batch
    for s in sequences:
        predicts = int(np.asarray(s.loss_mask)[1:].sum())
        if len(s.topk_ids) != predicts:
            raise UserError(f"cache record {s.record_index}: {len(s.topk_ids)} teacher rows but {predicts} "
                            f"predictable loss positions (field topk_ids); the cache is inconsistent")

    def joined(rows, dtype) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([np.asarray(r, dtype=dtype) for r in rows]))

    for name, dtype in (("topk_ids", np.int64), ("topk_logprobs", np.float32), ("tail", np.float32),
                        ("counts", np.int32)):
        if getattr(sequences[0], name) is not None:
            setattr(batch, name, joined([getattr(s, name) for s in sequences], dtype))
    for layer in sequences[0].hidden:
        batch.hidden[int(layer)] = joined([s.hidden[layer] for s in sequences], np.float32)
    return batch


class BatchStream(torch.utils.data.IterableDataset):
    """This rank's steps from (epoch, start) as (epoch, position after, [micro-batches]): its share of each global
    batch cut into `accum` micro-batches; worker w builds items w, w+W, ... (the plan's order for any W)."""

    def __init__(self, source, plans, pad_id: int, *, rank: int = 0, world: int = 1, accum: int = 1,
                 epoch: int = 0, start: int = 0, epochs: int | None = None, collate_fn=collate):
        self.source, self.plans, self.pad_id, self.collate_fn = source, plans, pad_id, collate_fn
        self.rank, self.world, self.accum = rank, world, accum
        self.epoch, self.start, self.epochs = epoch, start, epochs

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        item, epoch, start = 0, self.epoch, self.start   # item: steps so far, counted from (self.epoch, self.start)
        expect = getattr(self.source, "expect", None)
        while self.epochs is None or epoch < self.epoch + self.epochs:
            plan = self.plans(epoch) if callable(self.plans) else self.plans  # a list: the same plan every epoch
            if not plan:
                raise UserError("the data source gives no batch for one step (too few sequences for the processes "
                                "and micro-batches of one step)")
            mine = range(start + (worker - item) % workers, len(plan), workers)  # this worker's steps of the epoch
            item += len(plan) - start
            if expect is not None:  # a remote cache fetches this worker's blocks ahead, in the order they come
                expect(p for index in mine for entry in rank_slice(plan[index], self.rank, self.world)
                       for p in np.atleast_1d(entry))
            for index in mine:
                try:
                    micro = [self.collate_fn([self._item(p) for p in part], self.pad_id)
                             for part in np.array_split(rank_slice(plan[index], self.rank, self.world), self.accum)
                             if len(part)]
                except user_errors() as err:  # yielded across the worker boundary: make_loader raises it
                    yield err
                    return
                yield epoch, index + 1, micro
            epoch, start = epoch + 1, 0

    def _item(self, entry):
        """A sequence, or (a packed row: an array of positions) its sequences."""
        return self.source[entry] if np.ndim(entry) == 0 else [self.source[p] for p in entry]


_END = object()


def read_ahead(items, depth: int):
    """Iterate `items` in a daemon thread at most `depth` items ahead; its exception is raised in the consumer (the
    same object), and closing the consumer stops the thread at its next item."""
    slots: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def offer(entry) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not offer((True, item)):
                    return
            offer((True, _END))
        except BaseException as err:  # noqa: BLE001 - carried to the consumer and raised there
            offer((False, err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name="fastkd-read-ahead", daemon=True)
    worker.start()

    def consume():
        try:
            while True:
                ok, item = slots.get()
                if not ok:
                    raise item
                if item is _END:
                    return
                yield item
        finally:
            stop.set()  # the producer stops at its next item; wait for it, so no thread outlives the run
            worker.join(timeout=60)

    return consume()


def make_loader(source, plans, pad_id: int, *, num_workers: int = 0, pin_memory: bool = False, prefetch: int = 0,
                **stream):
    """This rank's steps from a DataLoader over `BatchStream(source, plans, pad_id, **stream)`, a worker's user error
    raised as itself (no worker traceback); prefetch > 0: that many steps built ahead in a thread (read_ahead)."""
    loader = torch.utils.data.DataLoader(BatchStream(source, plans, pad_id, **stream), batch_size=None,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         prefetch_factor=4 if num_workers else None, persistent_workers=False)
    items = _raise_failures(iter(loader))  # workers start here, in the caller's thread, never in read_ahead's
    return read_ahead(items, prefetch) if prefetch > 0 else items


def _raise_failures(batches):
    for item in batches:
        if isinstance(item, BaseException):
            del batches  # its workers stop now, not when the error is freed
            raise item
        yield item
