"""Sequences of a source (a teacher cache, or records: train_data.RecordSource) -> seeded epoch plans of
global batches (fastkd.plans) -> padded `Batch`es built in DataLoader workers, each rank taking its slice of every
batch."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from fastkd.batching import labels_from_mask, pad_batch
from fastkd.errors import UserError, user_errors
from fastkd.plans import FixedPlan, PlanMaker, epoch_plan, epoch_stream, plan_for, rank_slice

__all__ = ["CacheSource", "Batch", "collate", "attach_teacher", "batch_positions", "BatchStream", "StreamFailure",
           "Loader", "read_ahead", "make_loader", "IGNORE_INDEX",
           # the plan's names (fastkd.plans), importable from here as before the split
           "FixedPlan", "PlanMaker", "epoch_plan", "epoch_stream", "plan_for", "rank_slice"]

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- sources

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
        state = dict(self.__dict__)
        state["_reader"], state["_blocks"] = None, {}
        return state

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
        if not reader.read_ahead.budget:
            return
        order, seen = [], set()
        for position in positions:
            key = reader.locate(int(position))[:2]
            if key not in seen:
                seen.add(key)
                order.append(key)
        reader.expect(order)

    def corrupt_positions(self, progress=None) -> tuple[np.ndarray, list[str]]:
        """Positions held by blocks that fail their digests, and one message per such block."""
        bad = self.reader.find_corrupt_blocks(progress)
        positions = np.concatenate([np.arange(r.start, r.stop) for r, _ in bad]) if bad else np.zeros(0, np.int64)
        return positions.astype(np.int64), [message for _, message in bad]


# ----------------------------------------------------------------------------- batches

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
        if self.loss_index is not None:
            return int(self.loss_index.numel())  # shape metadata: no read of the tensor
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def _map(self, fn) -> "Batch":
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = fn(value)
            elif f.name == "hidden":
                value = {layer: fn(h) for layer, h in value.items()}
            out[f.name] = value
        return Batch(**out)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


def collate(sequences: list, pad_id: int) -> Batch:
    """Pad sequences (right) and concatenate their teacher rows in the same row-major order as the
    labels, so row r of the teacher tensors belongs to the r-th label != IGNORE_INDEX."""
    ids, attn, loss = pad_batch([s.input_ids.tolist() for s in sequences], pad_id, "right",
                                [s.loss_mask.tolist() for s in sequences])
    labels = labels_from_mask(ids, loss, IGNORE_INDEX)
    # the loss rows as indices, found here on the host: a boolean mask on the device would sync every step
    loss_index = (labels.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)
    batch = Batch(ids, attn, loss, labels, record_indices=[int(s.record_index) for s in sequences],
                  loss_index=loss_index)
    return attach_teacher(batch, sequences)


def attach_teacher(batch: Batch, sequences: list) -> Batch:
    """The sequences' teacher rows (if any), concatenated in order: the batch's loss rows are theirs, in order."""
    if getattr(sequences[0], "topk_ids", None) is None:
        return batch
    for s in sequences:
        predicts = int(np.asarray(s.loss_mask)[1:].sum())
        if len(s.topk_ids) != predicts:
            raise UserError(f"cache record {s.record_index}: {len(s.topk_ids)} teacher rows but {predicts} "
                            f"predictable loss positions (field topk_ids); the cache is inconsistent")
    batch.topk_ids = torch.from_numpy(np.concatenate([np.asarray(s.topk_ids, dtype=np.int64) for s in sequences]))
    batch.topk_logprobs = torch.from_numpy(np.concatenate([np.asarray(s.topk_logprobs, dtype=np.float32)
                                                           for s in sequences]))
    batch.tail = torch.from_numpy(np.concatenate([np.asarray(s.tail, dtype=np.float32) for s in sequences]))
    if sequences[0].counts is not None:
        batch.counts = torch.from_numpy(np.concatenate([np.asarray(s.counts, dtype=np.int32) for s in sequences]))
    for layer in sequences[0].hidden:
        batch.hidden[int(layer)] = torch.from_numpy(np.concatenate([np.asarray(s.hidden[layer], dtype=np.float32)
                                                                    for s in sequences]))
    return batch


def batch_positions(batch: np.ndarray) -> np.ndarray:
    """The positions of a global batch: an array of positions, or of packed rows (an object array of arrays)."""
    if batch.dtype != object:
        return batch
    return np.concatenate(list(batch)) if len(batch) else np.zeros(0, np.int64)


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
        item, epoch, start = 0, self.epoch, self.start
        while self.epochs is None or epoch < self.epoch + self.epochs:
            plan = self.plans(epoch)
            if not plan:
                raise UserError("the data source gives no batch for one step (too few sequences for the processes "
                                "and micro-batches of one step)")
            expect = getattr(self.source, "expect", None)
            if expect is not None:  # a remote cache fetches this worker's blocks ahead, in the order they come
                expect(p for index in range(start, len(plan)) if (item + index - start) % workers == worker
                       for p in batch_positions(rank_slice(plan[index], self.rank, self.world)))
            for index in range(start, len(plan)):
                if item % workers == worker:
                    mine = rank_slice(plan[index], self.rank, self.world)
                    try:
                        micro = [self.collate_fn([self._item(p) for p in part], self.pad_id)
                                 for part in np.array_split(mine, self.accum) if len(part)]
                    except user_errors() as err:  # crosses the worker boundary as a message, not a traceback
                        yield StreamFailure(err)
                        return
                    yield epoch, index + 1, micro
                item += 1
            epoch, start = epoch + 1, 0

    def _item(self, entry):
        """A sequence, or (a packed row: an array of positions) its sequences."""
        return self.source[entry] if np.ndim(entry) == 0 else [self.source[p] for p in entry]


@dataclass
class StreamFailure:
    """A user-facing error raised while building a batch (e.g. a corrupt cache block), carried out of a
    DataLoader worker so the main process raises it with its own message, not a worker traceback."""

    error: Exception


@dataclass
class Loader:
    """A DataLoader raising the error a StreamFailure carries; prefetch > 0 builds that many items ahead in a
    thread (read_ahead), in plan order with their (epoch, position), so a resume is exact."""

    dataloader: torch.utils.data.DataLoader
    prefetch: int = 0

    def _items(self):
        for item in self.dataloader:
            if isinstance(item, StreamFailure):
                raise item.error
            yield item

    def __iter__(self):
        return read_ahead(self._items(), self.prefetch) if self.prefetch > 0 else self._items()


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


def make_loader(source, plans, pad_id: int, *, rank: int = 0, world: int = 1, accum: int = 1, epoch: int = 0,
                start: int = 0, epochs: int | None = None, num_workers: int = 0,
                pin_memory: bool = False, prefetch: int = 0, collate_fn=collate) -> Loader:
    """A DataLoader over `BatchStream`; `plans`: a picklable epoch -> global batches (PlanMaker) or a fixed list;
    prefetch > 0 builds that many steps ahead in a background thread (Loader); collate_fn(items, pad_id) -> Batch
    (fastkd.packing.collate_packed for packed plans)."""
    if isinstance(plans, list):
        plans = FixedPlan(plans)
    stream = BatchStream(source, plans, pad_id, rank=rank, world=world, accum=accum, epoch=epoch, start=start,
                         epochs=epochs, collate_fn=collate_fn)
    return Loader(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                              prefetch_factor=4 if num_workers else None, persistent_workers=False),
                  prefetch=prefetch)
