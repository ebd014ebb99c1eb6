"""Work units encoded and written on worker threads while the caller computes the next ones: each block of a unit
is checked and encoded (numpy and zstd release the GIL) once its sequences are all in, the shard is written and
receipted once its last block is; at most UNITS_IN_FLIGHT units are held, and a failure stops the caller."""

from __future__ import annotations

import bisect
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from .errors import CacheError
from .format import CachedSequence
from .shard import encode_block, plan_blocks
from .writing import check_sequence, shard_file

UNITS_IN_FLIGHT = 2   # the unit the caller is filling and one being finished: memory for two units' signal


class _Unit:
    """One unit being filled and encoded: its sequences by position (stubs once their block is encoded)."""

    def __init__(self, number: int, lengths: list[int], losses: list[int], starts: list[int]):
        self.number = number
        self.lengths, self.losses = list(lengths), list(losses)
        self.slots: list = [None] * len(lengths)
        self.starts = starts
        self.missing = [b - a for a, b in zip(starts, starts[1:])]   # sequences each block still waits for
        self.payloads: list = [None] * (len(starts) - 1)
        self.arrived = 0


class EncodePool:
    """Takes the sequences of `writer`'s units as they are computed (`begin` a unit, then `add` each of its
    sequences, in any order, before the next unit begins) and writes each unit on `threads` worker threads
    (threads=0: in the caller's thread once it is complete); a worker's error is raised by the caller's next call."""

    def __init__(self, writer, threads: int, on_commit=None):
        if threads < 0:
            raise CacheError(f"encode pool: threads must be >= 0, got {threads}")
        self.writer = writer
        self.on_commit = on_commit      # called after each unit's receipt, in the thread that wrote it (a merge)
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="fastkd-encode") if threads else None
        self.cond = threading.Condition()
        self.pending: dict[int, _Unit] = {}
        self.where: dict[int, tuple[_Unit, int]] = {}   # record index -> (its unit, its position there)
        self.done: list[int] = []                        # receipted units not yet reported by committed()
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.encode_seconds = 0.0                        # CPU seconds the workers spent (threads=0: the caller)

    def begin(self, number: int, records: list[int], lengths: list[int], losses: list[int]) -> None:
        """Announce unit `number`: its record indices (in order) with their token and loss counts; waits while
        UNITS_IN_FLIGHT units are unfinished."""
        if not records:
            raise CacheError(f"cache {self.writer.root}: unit {number} holds no record: it has no shard")
        w = self.writer
        starts = plan_blocks(w.layout, lengths, losses, w.block_bytes, w.max_block_sequences)
        with self.cond:
            self._check_filled()
            while len(self.pending) >= UNITS_IN_FLIGHT and self.error is None:
                self.cond.wait()
            self._raise()
            unit = self.pending[number] = _Unit(number, lengths, losses, starts)
        self.where.update((r, (unit, i)) for i, r in enumerate(records))

    def add(self, seq: CachedSequence) -> None:
        """One sequence of a unit begun before; its block goes to a worker when it is the block's last (threads=0:
        the whole unit is written here with its last sequence)."""
        self._raise()
        if int(seq.record_index) not in self.where:
            raise CacheError(f"cache {self.writer.root}: record {seq.record_index} is in no unit begun, or given twice")
        unit, i = self.where.pop(int(seq.record_index))
        if len(seq.input_ids) != unit.lengths[i] or seq.num_loss_positions != unit.losses[i]:
            raise CacheError(f"cache {self.writer.root}: record {seq.record_index}: {len(seq.input_ids)} tokens, "
                             f"{seq.num_loss_positions} loss positions; unit {unit.number} was begun with "
                             f"{unit.lengths[i]} and {unit.losses[i]}")
        unit.slots[i] = seq
        unit.arrived += 1
        b = bisect.bisect_right(unit.starts, i) - 1
        unit.missing[b] -= 1
        if self.executor is not None and not unit.missing[b]:
            self.executor.submit(self._encode, unit, b)
        elif self.executor is None and unit.arrived == len(unit.slots):    # threads=0: the whole unit, here
            for block in range(len(unit.payloads)):
                self._encode(unit, block)
            self._raise()

    def _encode(self, unit: _Unit, b: int) -> None:
        """A worker (or the caller, threads=0): check and encode block b of `unit`; who encodes a unit's last block
        writes it."""
        if self.stopping.is_set():
            return
        started = time.thread_time()
        try:
            w = self.writer
            a, z = unit.starts[b], unit.starts[b + 1]
            seqs = [check_sequence(w.root, w.layout, s) for s in unit.slots[a:z]]
            payload = encode_block(w.layout, seqs, f"cache {w.root}: shard {shard_file(unit.number)}")
            unit.slots[a:z] = [replace(s, topk_ids=None, topk_logprobs=None, tail=None, counts=None, hidden={})
                               for s in seqs]   # what the shard's index needs: the signal can be freed
            with self.cond:
                unit.payloads[b] = payload
                last = None not in unit.payloads
            if last and not self.stopping.is_set():
                w.write_unit(unit.number, unit.slots, blocks=(unit.starts, unit.payloads))
                if self.on_commit is not None:
                    self.on_commit()
                with self.cond:
                    del self.pending[unit.number]
                    self.done.append(unit.number)
                    self.cond.notify_all()
        except BaseException as err:   # noqa: BLE001 - handed to the caller's thread, which raises it
            with self.cond:
                self.error = self.error or err
                self.stopping.set()
                self.cond.notify_all()
        finally:
            with self.cond:
                self.encode_seconds += time.thread_time() - started

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def committed(self) -> list[int]:
        """The units receipted since the last call, in order; a worker's error is raised here."""
        with self.cond:
            self._raise()
            done, self.done = sorted(self.done), []
        return done

    def drain(self) -> list[int]:
        """Wait until every unit begun is receipted (each must have all its sequences); returns committed()."""
        with self.cond:
            self._check_filled()
            while self.pending and self.error is None:
                self.cond.wait()
        return self.committed()

    def _check_filled(self) -> None:
        """Units are filled one after the other: a unit begun before must have all its sequences (else no worker
        could ever finish it, and waiting for it would never end)."""
        short = sorted(u.number for u in self.pending.values() if u.arrived < len(u.slots))
        if short:
            raise CacheError(f"cache {self.writer.root}: unit(s) {short} lack sequences")

    def close(self) -> None:
        """Stop the workers and wait for them: a shard being written is finished with its receipt, other blocks are
        dropped (their unit is written by the next run). Called after drain(), and on any failure."""
        self.stopping.set()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
