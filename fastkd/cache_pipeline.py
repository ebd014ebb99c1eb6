"""The cache stage's work on one rank: which work units it writes (cut on the raw records), the records' identity,
and the unit loop, where the teacher runs while the last units are encoded and written (cache_tools.encode_pool)."""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastkd.batching import length_sorted_batches
from fastkd.errors import UserError
from fastkd.records import DataError, scan_records
from fastkd.templates import BuildReport, build_examples


@dataclass
class Plan:
    """What rank 0 read of the cache before any record: its work unit and the units its manifest lists."""

    work_unit: int
    done: list[int] = field(default_factory=list)    # sorted


@dataclass
class OwnRecords:
    """This rank's share: its units (number -> kept examples in record order; [] for a unit all skipped), the
    records count of --data (the cut), and the tokenising report of every rank added up."""

    units: dict[int, list]
    count: int
    report: dict
    conversations: dict | None = None   # BuildReport.conversations: how conversation records became masks


def unit_rank(number: int, done: list[int], world: int) -> int:
    """The rank that writes unit `number`: the units the manifest does not list are dealt out in turn."""
    return (number - bisect.bisect_left(done, number)) % world


def from_main(env, work) -> dict:
    """Rank 0's `work()` (a dict) on every rank; its failure stops every rank with the same message."""
    state = None
    if env.is_main:
        try:
            state = dict(work(), error=None)
        except Exception as err:
            env.broadcast({"error": str(err)})
            raise
    state = env.broadcast(state)
    if state["error"]:
        raise UserError(state["error"])
    return state


def read_plan(config, env) -> Plan:
    """Rank 0 reads the cache's work unit and listed units (a new cache: --sequences-per-shard, none) and tells
    every rank."""
    from fastkd.cache_tools.writing import existing_manifest, refuse_token_cut

    def read() -> dict:
        existing = existing_manifest(config.out) or {}
        refuse_token_cut(Path(config.out), existing)     # before any record is tokenised or the model loaded
        return {"work_unit": int(existing.get("work_unit") or config.sequences_per_shard),
                "done": sorted(int(e["unit"]) for e in existing.get("shards", []))}

    state = from_main(env, read)
    return Plan(state["work_unit"], state["done"])


def own_records(config, tokenizer, template, plan: Plan, rank: int, world: int, report: BuildReport) -> OwnRecords:
    """Read every record but validate and tokenise only those of this rank's units; `report` counts them."""
    from fastkd.cache_tools.units import RecordCut

    done = set(plan.done)
    last = [-1]

    def mine(number: int) -> bool:
        return number not in done and unit_rank(number, plan.done, world) == rank

    def keep(index: int) -> bool:
        last[0] = index
        return mine(index // plan.work_unit)

    examples = build_examples(config.data, tokenizer, template, config.field_map(), config.max_length,
                              config.overflow, config.skip_bad, config.split, report, keep=keep)
    count = last[0] + 1
    units = {u: [] for u in RecordCut(count, plan.work_unit).numbers if mine(u)}
    for ex in examples:
        units[ex.record_index // plan.work_unit].append(ex)
    return OwnRecords(units, count, report.as_dict(), report.conversations)


def tokenise_own_units(config, tokenizer, template, plan: Plan, env) -> OwnRecords:
    """own_records on every rank; a bad record (or any failure) on any rank stops all of them with its message
    (the one earliest in --data), and the reports are added up."""
    report, error, at = BuildReport(), None, -1
    try:
        own = own_records(config, tokenizer, template, plan, env.rank, env.world, report)
    except Exception as err:    # noqa: BLE001 - every rank must hear of it, or the others wait forever
        if env.world == 1:
            raise
        own, error, at = None, err, _record_number(str(err))
    parts = env.gather({"error": str(error) if error else None, "at": at, "report": report.as_dict()})
    failed = sorted((p["at"], p["error"]) for p in parts if p["error"])
    if failed:
        if error is not None and str(error) == failed[0][1]:
            raise error
        raise DataError(failed[0][1])
    reports = [p["report"] for p in parts]
    own.report = {"kept": sum(r["kept"] for r in reports), "truncated": sum(r["truncated"] for r in reports),
                  "skipped": dict(sum((Counter(r["skipped"]) for r in reports), Counter())),
                  "first_errors": sorted((m for r in reports for m in r["first_errors"]),
                                         key=_record_number)[:BuildReport.MAX_ERRORS_KEPT]}
    return own


def records_identity(source, split: str) -> dict:
    """The `records` setting's digest: SHA-256 of the --data file's bytes, or for a hub dataset of its records'
    canonical JSON (one line each, keys sorted), so a resume on other data is refused before any is tokenised."""
    from fastkd.cache_tools.integrity import file_digest

    if Path(source).is_file():
        try:
            return {"sha256": file_digest(Path(source))[0], "digest": "file"}
        except OSError as err:
            raise DataError(f"{source}: cannot read ({err.strerror or err})", reason="unreadable") from None
    h = hashlib.sha256()
    for _index, _where, record, _error in scan_records(source, split):
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str).encode())
        h.update(b"\n")
    return {"sha256": h.hexdigest(), "digest": "records"}


def write_units(config, writer, own: OwnRecords, done: set, backend, summary, env, after_unit) -> list[int]:
    """This rank's units the cache lacks: the teacher over each, batch by batch, its sequences handed to the encode
    pool (--encode-threads), which writes them while the next unit's forward runs. Returns the units found empty."""
    import torch
    from tqdm.auto import tqdm

    from fastkd.cache_tools.encode_pool import EncodePool

    mine = [u for u in sorted(own.units) if u not in done]
    empty = [u for u in mine if not own.units[u]]
    bar = tqdm(total=sum(len(own.units[u]) for u in mine), unit="seq", desc="cache-teacher",
               disable=not config.progress or not env.is_main, postfix={"resumed": summary.sequences_resumed})
    pool = EncodePool(writer, config.encode_threads, on_commit=Merges(writer) if env.is_main else None)
    started = time.perf_counter()
    try:
        for number in (u for u in mine if own.units[u]):
            exs = own.units[number]
            lengths = [len(ex.input_ids) for ex in exs]
            pool.begin(number, [ex.record_index for ex in exs], lengths, [sum(ex.loss_mask) for ex in exs])
            seed = config.seed * 1_000_003 + number      # --sample: one seed per unit, whatever the number of ranks
            generator = torch.Generator(device=backend.device).manual_seed(seed) if config.sample else None
            for batch in length_sorted_batches(lengths, config.batch_size):
                chunk = [exs[i] for i in batch]
                t0 = time.perf_counter()
                sig = backend.signal(chunk, generator)
                summary.seconds_teacher += time.perf_counter() - t0
                for seq in _sequences(chunk, sig):
                    pool.add(seq)
                summary.sequences_written += len(chunk)
                summary.loss_positions += sum(sig.rows_per_sequence)
                bar.update(len(chunk))
                bar.set_postfix(tok_s=f"{summary.loss_positions / max(time.perf_counter() - started, 1e-9):.0f}")
            for _ in pool.committed():
                after_unit()
        for _ in pool.drain():
            after_unit()
    finally:
        pool.close()
        bar.close()
    summary.seconds_write += time.perf_counter() - started - summary.seconds_teacher
    summary.seconds_encode += pool.encode_seconds
    return empty


class Merges:
    """Rank 0 merges receipts into manifest.json as units are written (the partial cache stays readable), one thread
    at a time and at most a fifth of the time (rewriting it after each of 10,000s of units would cost more)."""

    def __init__(self, writer):
        self.writer, self.lock, self.next_at = writer, threading.Lock(), 0.0

    def __call__(self) -> None:
        with self.lock:
            started = time.perf_counter()
            if started >= self.next_at:
                self.writer.merge(clean=False)
                self.next_at = time.perf_counter() + 4 * (time.perf_counter() - started)


def _sequences(chunk, sig) -> list:
    """Split a batch's rows back into sequences (row-major order)."""
    import numpy as np

    from fastkd.cache_tools import CachedSequence

    cuts = np.cumsum(sig.rows_per_sequence)[:-1]
    ids, logprobs, tail = (np.split(t.cpu().numpy(), cuts) for t in (sig.topk_ids, sig.topk_logprobs, sig.tail))
    counts = np.split(sig.counts.cpu().numpy(), cuts) if sig.counts is not None else [None] * len(chunk)
    hidden = {layer: np.split(h.cpu().numpy(), cuts) for layer, h in sig.hidden.items()}
    return [CachedSequence(record_index=ex.record_index, task=ex.task, input_ids=np.asarray(ex.input_ids, np.int32),
                           loss_mask=np.asarray(ex.loss_mask, np.uint8), topk_ids=ids[i], topk_logprobs=logprobs[i],
                           tail=tail[i], counts=counts[i], hidden={layer: h[i] for layer, h in hidden.items()})
            for i, ex in enumerate(chunk)]


def _record_number(message: str) -> int:
    """The record a DataError's message names ('<file>: record 12 (line 13): ...'): the earliest of several ranks'
    errors, and every rank's first skips merged in order."""
    found = re.search(r": record (\d+)", message)
    return int(found.group(1)) if found else -1
