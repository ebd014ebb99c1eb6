"""Sequences (from a teacher cache or from records) -> shuffled, length-grouped, padded batches.

One data module for training and evaluation: a *source* gives sequences by position (a cache
reader, or records tokenised with fastkd.templates), `epoch_plan` decides which positions go into
which global batch for an epoch (seeded: order of cache blocks, a shuffle buffer, length
groups), and `BatchStream` (a torch IterableDataset) turns the plan into padded `Batch`es in
DataLoader worker processes, each rank taking its own disjoint slice of every global batch.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from fastkd.batching import labels_from_mask, pad_batch
from fastkd.errors import UserError

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- sources

@dataclass
class RecordSequence:
    """A tokenised record without a teacher signal (SFT, online KD)."""

    record_index: int
    task: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    cot: bool = True


class CacheSource:
    """Sequences of a teacher cache, read through fastkd.cache_tools.CacheReader.

    `shards` are the cache's compressed blocks (the unit the plan shuffles first, so reads stay
    local); recently decoded blocks are kept in a small LRU so a shuffle buffer spanning a few
    blocks decodes each block about once per epoch. `layers=[]` skips decoding hidden states.
    The reader is opened lazily so the source pickles into DataLoader workers. verify=True (the
    default) checks every block against its digests before decoding it (see CacheReader).
    """

    has_teacher = True

    def __init__(self, path: str | Path, *, layers: list[int] | None = None, cached_blocks: int = 8,
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
        """The positions about to be read, in order (an iterable, consumed only by a reader of a URL, which
        fetches their blocks ahead; a folder's reader needs no notice)."""
        reader = self.reader
        if not getattr(reader, "remote", False):
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


class RecordSource:
    """Records tokenised with fastkd.templates.build_example: one more data source beside the cache.

    A record with `"cot": false` is built with Template(cot=False), every other one with the
    template given (CoT by default), so CoT and answer-only records can be mixed in one file.
    """

    has_teacher = False
    manifest = None

    def __init__(self, data: str | Path, tokenizer, *, cot: bool = True, chat: bool = False,
                 max_length: int | None = None, overflow: str = "truncate", skip_bad: bool = False,
                 split: str = "train"):
        from fastkd.templates import BuildReport, Template, build_examples
        from fastkd.records import FieldMap

        self.path = str(data)
        self.report = BuildReport()
        examples = build_examples(data, tokenizer, Template(cot=cot, chat=chat), FieldMap(), max_length, overflow,
                                  skip_bad, split, self.report)
        self.sequences: list[RecordSequence] = [
            RecordSequence(ex.record_index, ex.task, np.asarray(ex.input_ids, dtype=np.int32),
                           np.asarray(ex.loss_mask, dtype=np.uint8), ex.cot) for ex in examples]
        if not self.sequences:
            raise UserError(f"{self.path}: no usable records ({self.report.as_dict()})")
        self.lengths = np.array([len(s.input_ids) for s in self.sequences], dtype=np.int64)
        # records sit in memory, so each is its own shard: an epoch is a full permutation (files are
        # often sorted by task, and a streaming shuffle buffer would train on one task at a time)
        self.shards = list(np.arange(len(self.sequences), dtype=np.int64).reshape(-1, 1))

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, position: int):
        return self.sequences[int(position)]


def split_holdout(num: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, held-out positions): `holdout` positions chosen with a seeded draw."""
    if holdout < 0 or holdout >= num:
        raise UserError(f"--eval-sequences {holdout}: must be between 0 and {num - 1} (the source holds {num} sequences)")
    rng = np.random.default_rng([seed, 0xE7A1])
    held = np.sort(rng.choice(num, size=holdout, replace=False)) if holdout else np.zeros(0, dtype=np.int64)
    keep = np.ones(num, dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep), held


# ----------------------------------------------------------------------------- the plan

def epoch_plan(lengths: np.ndarray, shards: list[np.ndarray], global_batch: int, *, seed: int, epoch: int,
               shuffle: bool = True, shuffle_buffer: int = 1024, group_batches: int = 32,
               allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """Global batches (arrays of source positions) for one epoch, a pure function of its inputs.

    `shards` are runs of consecutive positions (a cache's compressed blocks): their order is
    shuffled per epoch, then positions stream through a seeded shuffle buffer (reads stay local
    to a few blocks at a time); each window of `group_batches` batches is sorted by
    length and cut into batches (little padding), and the batches of a window are shuffled.
    Without shuffle: cache order, length-grouped windows, no shuffling (evaluation).
    """
    rng = np.random.default_rng([seed, epoch])
    keep = None
    if allowed is not None:
        keep = np.zeros(len(lengths), dtype=bool)
        keep[allowed] = True
    order_shards = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
    stream = [shards[j][keep[shards[j]]] if keep is not None else shards[j] for j in order_shards]
    stream = np.concatenate(stream) if stream else np.zeros(0, dtype=np.int64)
    if shuffle:
        stream = _buffer_shuffle(stream, shuffle_buffer, rng)
    window = max(1, group_batches) * global_batch
    plan = []
    for start in range(0, len(stream), window):
        chunk = stream[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches = [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        plan.extend(batches)
    return plan


def _buffer_shuffle(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A streaming shuffle: keep `size` items, emit a random one, refill from the stream."""
    size = max(1, int(size))
    if size >= len(stream):
        return stream[rng.permutation(len(stream))]
    buffer = list(stream[:size])
    out = np.empty(len(stream), dtype=stream.dtype)
    picks = rng.integers(0, size, size=len(stream))
    n = 0
    for item in stream[size:]:
        j = picks[n]
        out[n] = buffer[j]
        buffer[j] = item
        n += 1
    tail = np.array(buffer, dtype=stream.dtype)[rng.permutation(size)]
    out[n:] = tail
    return out


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of a global batch (shares differ by at most one sequence)."""
    return np.array_split(batch, world)[rank]


# ----------------------------------------------------------------------------- batches

@dataclass
class Batch:
    """A padded micro-batch and the teacher signal for its loss rows (row-major order)."""

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
    if getattr(sequences[0], "topk_ids", None) is None:
        return batch
    for s in sequences:
        predicts = int(np.asarray(s.loss_mask)[1:].sum())
        if len(s.topk_ids) != predicts:
            raise UserError(f"cache record {s.record_index}: {len(s.topk_ids)} teacher rows but {predicts} "
                            f"predictable loss positions (field topk_ids); the cache is inconsistent")
    batch.topk_ids = torch.from_numpy(np.concatenate([np.asarray(s.topk_ids, dtype=np.int64) for s in sequences]))
    batch.topk_logprobs = torch.from_numpy(np.concatenate([np.asarray(s.topk_logprobs, dtype=np.float32) for s in sequences]))
    batch.tail = torch.from_numpy(np.concatenate([np.asarray(s.tail, dtype=np.float32) for s in sequences]))
    if sequences[0].counts is not None:
        batch.counts = torch.from_numpy(np.concatenate([np.asarray(s.counts, dtype=np.int32) for s in sequences]))
    for layer in sequences[0].hidden:
        batch.hidden[int(layer)] = torch.from_numpy(np.concatenate([np.asarray(s.hidden[layer], dtype=np.float32)
                                                                    for s in sequences]))
    return batch


class BatchStream(torch.utils.data.IterableDataset):
    """This rank's steps, epoch after epoch, from (epoch, start): items are (epoch, position after
    the step, [micro-batches]). `plans(epoch)` gives the epoch's global batches (one per step).

    A global batch is split into `world` contiguous rank shares and each share into `accum`
    micro-batches, so a step sees the same sequences whatever the process count or accumulation.
    With DataLoader workers, worker w builds items w, w+W, ... and the DataLoader reads workers
    round-robin, so the order is the plan's whatever the worker count; workers live for the run.
    """

    def __init__(self, source, plans, pad_id: int, *, rank: int = 0, world: int = 1, accum: int = 1,
                 epoch: int = 0, start: int = 0, epochs: int | None = None):
        self.source, self.plans, self.pad_id = source, plans, pad_id
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
                       for p in rank_slice(plan[index], self.rank, self.world))
            for index in range(start, len(plan)):
                if item % workers == worker:
                    mine = rank_slice(plan[index], self.rank, self.world)
                    try:
                        micro = [collate([self.source[p] for p in part], self.pad_id)
                                 for part in np.array_split(mine, self.accum) if len(part)]
                    except UserError as err:  # crosses the worker boundary as a message, not a traceback
                        yield StreamFailure(err)
                        return
                    yield epoch, index + 1, micro
                item += 1
            epoch, start = epoch + 1, 0


@dataclass
class StreamFailure:
    """A UserError raised while building a batch (e.g. a corrupt cache block), carried out of a
    DataLoader worker so the main process raises it with its own message, not a worker traceback."""

    error: UserError


@dataclass
class Loader:
    """A DataLoader whose iteration raises the error a StreamFailure carries (with its message).

    prefetch > 0: a background thread builds up to `prefetch` items ahead into a bounded queue
    (decoding, collation and pinning leave the training thread); items keep their plan order and
    their (epoch, position), so a resume is exact whatever was read ahead.
    """

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
    """Iterate `items` in a daemon thread, at most `depth` items ahead of the consumer.

    An exception in the thread is raised in the consumer (the same object, so a UserError keeps its
    message); closing the consumer (or dropping it) stops the thread at its next item.
    """
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
                pin_memory: bool = False, prefetch: int = 0) -> Loader:
    """A DataLoader over `BatchStream` (batches are built in the dataset, so batch_size=None).
    `plans` is a picklable callable epoch -> list of global batches (see `PlanMaker`) or a fixed list.
    prefetch > 0 builds that many steps ahead in a background thread (see Loader)."""
    if isinstance(plans, list):
        plans = FixedPlan(plans)
    stream = BatchStream(source, plans, pad_id, rank=rank, world=world, accum=accum, epoch=epoch, start=start,
                         epochs=epochs)
    return Loader(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                              prefetch_factor=4 if num_workers else None, persistent_workers=False),
                  prefetch=prefetch)


@dataclass
class FixedPlan:
    """The same plan every epoch (evaluation)."""

    plan: list

    def __call__(self, epoch: int) -> list:
        return self.plan


@dataclass
class PlanMaker:
    """epoch -> that epoch's global batches for a source; picklable, so workers recompute it."""

    lengths: np.ndarray
    shards: list
    global_batch: int
    seed: int
    min_size: int = 1
    shuffle: bool = True
    shuffle_buffer: int = 1024
    group_batches: int = 32
    allowed: np.ndarray | None = None

    def __call__(self, epoch: int) -> list[np.ndarray]:
        plan = epoch_plan(self.lengths, self.shards, self.global_batch, seed=self.seed, epoch=epoch,
                          shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer, group_batches=self.group_batches,
                          allowed=self.allowed)
        return [b for b in plan if len(b) >= self.min_size]


def plan_for(source, global_batch: int, *, seed: int, epoch: int = 0, **options) -> list[np.ndarray]:
    """One epoch's global batches for a source (see PlanMaker for the options)."""
    return PlanMaker(source.lengths, source.shards, global_batch, seed, **options)(epoch)
