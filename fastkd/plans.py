"""The epoch plan: a source's positions in a seeded order (shards shuffled, a shuffle buffer), grouped into global
batches of similar lengths or (--packing) of rows packed best-fit-decreasing. Plain numpy: workers recompute it."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from fastkd.errors import UserError


def epoch_stream(lengths: np.ndarray, shards: list[np.ndarray], *, seed: int, epoch: int, shuffle: bool = True,
                 shuffle_buffer: int = 1024, allowed: np.ndarray | None = None):
    """(positions in this epoch's order, the epoch's generator): shards in shuffled order through a shuffle buffer
    (without shuffle: cache order); `allowed` keeps only those positions. The plans draw on from the generator."""
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
    return stream, rng


def epoch_plan(lengths: np.ndarray, shards: list[np.ndarray], global_batch: int, *, seed: int, epoch: int,
               shuffle: bool = True, shuffle_buffer: int = 1024, group_batches: int = 32,
               allowed: np.ndarray | None = None) -> list[np.ndarray]:
    """One epoch's global batches (arrays of positions), seeded: the epoch_stream in windows of `group_batches`
    batches sorted by length, batches shuffled (without shuffle: cache order)."""
    stream, rng = epoch_stream(lengths, shards, seed=seed, epoch=epoch, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
                               allowed=allowed)
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
    for n, item in enumerate(stream[size:]):
        out[n] = buffer[picks[n]]
        buffer[picks[n]] = item
    out[len(stream) - size:] = np.array(buffer, dtype=stream.dtype)[rng.permutation(size)]
    return out


def best_fit_decreasing(positions: np.ndarray, lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Rows (arrays of positions) of at most `capacity` tokens: longest sequence first, each into the row it fills
    most tightly (a new row when none has room); deterministic for given positions."""
    order = positions[np.argsort(-lengths[positions], kind="stable")].tolist()
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for p, need in zip(order, lengths[order].tolist()):
        if need > capacity:
            raise UserError(f"sequence {p} has {need} tokens, more than the packed row length {capacity}")
        i = bisect.bisect_left(room, (need, -1))
        if i == len(room):
            rows.append([p])
            free, row = capacity - need, len(rows) - 1
        else:
            free, row = room.pop(i)
            rows[row].append(p)
            free -= need
        bisect.insort(room, (free, row))
    return [np.asarray(row, dtype=np.int64) for row in rows]


def _as_rows(rows: list[np.ndarray]) -> np.ndarray:
    """An object array of rows: np.array_split cuts it by rows (ranks, micro-batches) like a batch of positions."""
    out = np.empty(len(rows), dtype=object)
    out[:] = rows
    return out


def _enough_rows(rows: list[np.ndarray], min_rows: int) -> list[np.ndarray]:
    """The epoch's last global batch: rows split into single sequences until every rank and micro-batch gets one
    (none when even that is too few, as a sequence-count plan drops such a batch)."""
    rows = list(rows)
    while len(rows) < min_rows:
        widest = max(range(len(rows)), key=lambda i: len(rows[i]), default=None)
        if widest is None or len(rows[widest]) < 2:
            return []
        rows.append(rows[widest][-1:])
        rows[widest] = rows[widest][:-1]
    return rows


def rank_slice(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of a global batch (shares differ by at most one sequence)."""
    return np.array_split(batch, world)[rank]


@dataclass
class PlanMaker:
    """epoch -> that epoch's global batches for a source, of `global_batch` sequences (or, with `row_length`,
    packed rows), each at least `min_size` of them; picklable, so workers recompute it."""

    lengths: np.ndarray
    shards: list
    global_batch: int
    seed: int
    min_size: int = 1
    shuffle: bool = True
    shuffle_buffer: int = 1024
    group_batches: int = 32
    allowed: np.ndarray | None = None
    row_length: int | None = None

    def __call__(self, epoch: int) -> list[np.ndarray]:
        if self.row_length:
            return self._packed(epoch)
        plan = epoch_plan(self.lengths, self.shards, self.global_batch, seed=self.seed, epoch=epoch,
                          shuffle=self.shuffle, shuffle_buffer=self.shuffle_buffer, group_batches=self.group_batches,
                          allowed=self.allowed)
        return [b for b in plan if len(b) >= self.min_size]

    def _packed(self, epoch: int) -> list[np.ndarray]:
        """Batches of `global_batch` rows (object arrays of position arrays): windows of `group_batches` batches' worth
        of tokens packed best-fit-decreasing, rows short of a batch carried on, batches shuffled within their window."""
        lengths, per_batch, row_length = self.lengths, self.global_batch, self.row_length
        stream, rng = epoch_stream(lengths, self.shards, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                                   shuffle_buffer=self.shuffle_buffer, allowed=self.allowed)
        budget = max(1, self.group_batches) * per_batch * row_length
        ends = np.cumsum(lengths[stream])
        plan, carry, start = [], np.zeros(0, dtype=np.int64), 0
        while start < len(stream) or len(carry):
            if start < len(stream):  # the window: the carried sequences + the stream's next `budget` tokens
                need = max(budget - int(lengths[carry].sum()), 1)
                base = int(ends[start - 1]) if start else 0
                stop = min(int(np.searchsorted(ends, base + need, side="left")) + 1, len(stream))
                window, start = np.concatenate([carry, stream[start:stop]]), stop
            else:
                window = carry
            rows = best_fit_decreasing(window, lengths, row_length)
            last = start >= len(stream)
            keep = len(rows) if last else len(rows) // per_batch * per_batch
            carry = np.concatenate(rows[keep:]) if keep < len(rows) else np.zeros(0, dtype=np.int64)
            batches = [rows[i:i + per_batch] for i in range(0, keep, per_batch)]
            if last and batches:
                batches[-1] = _enough_rows(batches[-1], self.min_size)
                batches = [b for b in batches if b]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            plan.extend(_as_rows(b) for b in batches)
        return plan
