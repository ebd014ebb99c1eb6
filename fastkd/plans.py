"""The epoch plan: a source's positions in a seeded order (shards shuffled, a shuffle buffer), grouped into global
batches of similar lengths; each rank takes its slice of every batch. Plain numpy: workers recompute it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
