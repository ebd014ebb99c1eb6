"""Work units, the one protocol every cache is written with (one process or many): unit u is a shard plus a
sealed receipt (its commit); the coordinator merges receipts into manifest.json (docs/cache-format.md 6)."""

from __future__ import annotations

import hashlib
import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CacheError
from .format import (FORMAT_NAME, FORMAT_VERSION, LOCK, MANIFEST, SHARD_DIR, atomic_write_bytes, jsonable,
                     write_manifest)
from .integrity import canonical_json, digest_bytes, is_hex_digest, seal, seal_matches
from .lock import acquire_lock, clear_stale_lock, release_lock
from .manifest_checks import manifest_totals
from .reader import check_shard_matches, open_shard
from .storage import LocalStorage, refuse_url_for_writing
from .writing import (SHARD_NAME, check_sequence, existing_manifest, fastkd_version, layout_of, normalize_settings,
                      now, resume_settings, shard_file, write_shard_file)

UNIT_DIR = "units"
RECEIPT_NAME = re.compile(r"^unit-(\d{5,})\.json$")
RECEIPT_FORMAT = "fastkd-teacher-cache-unit"
WORKER_LOCK = re.compile(r"^\.lock\.rank-(\d+)$")


@dataclass(frozen=True)
class Unit:
    """One work unit: its number, the record indices it holds (in order) and their digest."""

    number: int
    records: tuple[int, ...]
    sha256: str


def unit_of(number: int, examples) -> Unit:
    """The unit `number` holding `examples` (objects with record_index, task, input_ids, loss_mask), in order;
    its digest covers each one's index, task, token ids and loss mask (what the cache's content depends on)."""
    h = hashlib.sha256()
    for ex in examples:
        ids = np.asarray(ex.input_ids, np.int64)
        task = str(ex.task).encode()
        h.update(np.array([int(ex.record_index), len(ids), len(task)], np.int64).tobytes())
        h.update(task)
        h.update(ids.astype("<i8").tobytes())
        h.update(np.asarray(ex.loss_mask, np.uint8).tobytes())
    return Unit(number, tuple(int(ex.record_index) for ex in examples), h.hexdigest())


@dataclass(frozen=True)
class RecordCut:
    """The work units of `count` records, known before any is read: unit u holds the kept records whose index
    lies in [u * work_unit, (u + 1) * work_unit), in order (skipped records leave it shorter, or empty: no shard)."""

    count: int
    work_unit: int

    def __post_init__(self):
        if self.work_unit < 1 or self.count < 0:
            raise CacheError(f"work unit (sequences per shard) must be >= 1 and the record count >= 0, got "
                             f"{self.work_unit} and {self.count}")

    @property
    def numbers(self) -> range:
        return range(-(-self.count // self.work_unit))

    def span(self, number: int) -> range:
        """The record indices unit `number` may hold."""
        return range(number * self.work_unit, min((number + 1) * self.work_unit, self.count))


def settings_digest(settings: dict) -> str:
    return digest_bytes(canonical_json(jsonable(settings)))


def receipt_file(number: int) -> str:
    return f"{UNIT_DIR}/unit-{number:05d}.json"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class UnitWriter:
    """Writes work units of one cache: `open` (the coordinator, rank 0), `join` (other ranks). `cut`: the units of
    records known by number (the cache stage); None: units are registered as written (CacheWriter). Settings hold
    `work_unit` (and `records` for a cut)."""

    def __init__(self, root, settings: dict, cut: RecordCut | None, *, rank: int = 0,
                 block_bytes: int = 1 << 20, max_block_sequences: int = 16):
        refuse_url_for_writing(root)
        self.root = Path(root)
        self.settings = normalize_settings(settings)
        if "work_unit" not in self.settings or (cut is not None and "records" not in self.settings):
            raise CacheError("unit cache settings need 'work_unit' (and 'records' for a cut of known records)")
        if cut is not None and cut.work_unit != self.settings["work_unit"]:
            raise CacheError(f"cache {root}: the cut's work unit {cut.work_unit} is not the settings' "
                             f"{self.settings['work_unit']}")
        self.layout = layout_of(self.settings)
        self.cut = cut
        self.units: dict[int, Unit] = {}    # open-ended (no cut): the units registered so far
        self.numbers = self.units if cut is None else cut.numbers    # this run's units (open-ended: self.units)
        self.rank = rank
        self.block_bytes = block_bytes
        self.max_block_sequences = max_block_sequences
        self.coordinator = False
        self.manifest: dict | None = None
        self.listed_records: set[int] = set()   # record indices of the shards listed when the cache was opened
        self.settings_sha256 = settings_digest(self.settings)
        self.warnings: list[str] = []
        self._lock: Path | None = None

    @classmethod
    def open(cls, root, settings: dict, cut: RecordCut | None, **kw) -> "UnitWriter":
        """Take the cache lock, check or create the manifest, merge the receipts of earlier runs."""
        self = cls(root, settings, cut, rank=0, **kw)
        self._coordinate()
        return self

    def _coordinate(self) -> None:
        self.coordinator = True
        try:
            (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            (self.root / UNIT_DIR).mkdir(exist_ok=True)
        except OSError as err:
            raise CacheError(f"cache {self.root}: cannot create the folder: {err}") from None
        self._lock = acquire_lock(self.root / LOCK)   # set once taken: a refused writer keeps off another's lock
        try:
            for path in self.root.iterdir():   # ranks of an earlier run must be gone before anything is removed
                m = WORKER_LOCK.match(path.name)
                if m:
                    clear_stale_lock(path, f"rank {m.group(1)} of an earlier run")
            self._open_manifest()
            self.merge()
        except BaseException:
            release_lock(self._lock)
            self._lock = None
            raise

    def _open_manifest(self) -> None:
        existing = existing_manifest(self.root)
        receipts = [p.name for p in (self.root / UNIT_DIR).iterdir() if RECEIPT_NAME.match(p.name)]
        if existing is not None and not existing["shards"] and not receipts:
            existing = None      # an empty cache: nothing to keep
        if existing is None:
            strays = [p.name for p in (self.root / SHARD_DIR).iterdir() if SHARD_NAME.match(p.name)] + receipts
            if strays:  # never delete data that no manifest accounts for
                raise CacheError(f"cache {self.root}: holds {len(strays)} shard or unit file(s) ({sorted(strays)[0]}, "
                                 f"...) but no manifest.json; restore it, or move them away to start a new cache")
            self.manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                             "fastkd_version": fastkd_version(), "complete": False, "created": now(),
                             "updated": now(), **self.settings, "shards": [], "counts": manifest_totals([]),
                             "summary": None}
            write_manifest(self.root, self.manifest)
            return
        resume_settings(self.root, existing, self.settings)
        for j, entry in enumerate(existing["shards"]):  # every finished unit is checked before it counts as done
            shard = open_shard(LocalStorage(self.root), entry, j)
            check_shard_matches(self.root, existing, entry, shard, j)
            problem = None if self.cut is None else self._records_problem(entry["unit"], shard.record_index)
            if problem:
                raise CacheError(f"cache {self.root}: cannot resume on other data: manifest.json shards[{j}] (unit "
                                 f"{entry['unit']}) {problem}; resume with the same --data file contents, or write "
                                 f"to a new cache folder")
            self.listed_records.update(shard.record_index.tolist())
        self.manifest = existing

    @property
    def done_units(self) -> set[int]:
        return {int(e["unit"]) for e in self.manifest["shards"]}

    def merge(self, clean: bool = True) -> int:
        """Add every sound receipt's unit to the manifest; with `clean` (no rank writing) also remove what nothing
        accounts for (unreceipted shards, stale receipts, temp files). Returns how many units were added."""
        if not self.coordinator:
            raise CacheError(f"cache {self.root}: only the coordinating rank merges units")
        listed, added = self.done_units, []
        for path in sorted((self.root / UNIT_DIR).iterdir()):
            m = RECEIPT_NAME.match(path.name)
            number = int(m.group(1)) if m else None
            if number is None or number in listed:
                continue
            problem, entry = self._check_receipt(path, number)
            if problem and clean:
                self.warnings.append(f"{UNIT_DIR}/{path.name}: {problem}; unit {number} is written again")
                _unlink(path)
                _unlink(self.root / shard_file(number))
            elif not problem:
                added.append(entry)    # (a problem without `clean` is judged by the next cleaning merge)
        if added:
            shards = sorted(self.manifest["shards"] + added, key=lambda e: e["unit"])
            manifest = dict(self.manifest, shards=shards, counts=manifest_totals(shards), updated=now())
            write_manifest(self.root, manifest)
            self.manifest = manifest
        for e in (self.manifest["shards"] if clean else added):   # the manifest now records these units
            _unlink(self.root / receipt_file(int(e["unit"])))
        if clean:   # shards of a run killed between shard and receipt, and temporary files
            keep = {e["file"] for e in self.manifest["shards"]}
            for path in (self.root / SHARD_DIR).iterdir():
                if SHARD_NAME.match(path.name) and f"{SHARD_DIR}/{path.name}" not in keep:
                    _unlink(path)
            for pattern in (f"{SHARD_DIR}/*.tmp", f"{UNIT_DIR}/*.tmp", f".{MANIFEST}.*.tmp"):
                for path in self.root.glob(pattern):
                    _unlink(path)
        return len(added)

    def _records_problem(self, number: int, records) -> str | None:
        """Why a shard holding `records` (in its order) cannot be unit `number` of this run; None when it can."""
        got = tuple(int(r) for r in records)
        if number not in self.numbers:
            return "names a unit this run's records do not have"
        if self.cut is None:
            return None if got == self.units[number].records else "holds other records than the unit"
        span = self.cut.span(number)
        if not got or not all(r in span for r in got) or any(b <= a for a, b in zip(got, got[1:])):
            return f"holds other records than unit {number} may (indices {span.start} to {span.stop - 1}, in order)"
        return None

    def _check_receipt(self, path: Path, number: int) -> tuple[str | None, dict | None]:
        """(problem, entry): a receipt counts only if sealed, written under these settings, for this
        unit's records, and its shard opens and matches."""
        if number not in self.numbers:
            return "names a unit this run's records do not have", None
        try:
            receipt = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"unreadable ({err})", None
        if not isinstance(receipt, dict) or receipt.get("format") != RECEIPT_FORMAT \
                or seal_matches(receipt) is not True:
            return "not a sealed unit receipt (corrupt or cut short)", None
        if receipt.get("settings_sha256") != self.settings_sha256:
            return "written under other settings (stale)", None
        entry = receipt["entry"] if isinstance(receipt.get("entry"), dict) else {}
        sha = entry.get("unit_sha256")   # a cut: the writer's digest; open-ended: the registered unit's
        if entry.get("unit") != number or not is_hex_digest(sha) \
                or (self.cut is None and sha != self.units[number].sha256) or entry.get("file") != shard_file(number):
            return "written from other records (stale)", None
        try:
            shard = open_shard(LocalStorage(self.root), entry, number)
            check_shard_matches(self.root, self.manifest, entry, shard)
        except CacheError as err:
            return f"its shard fails its checks ({err})", None
        problem = self._records_problem(number, shard.record_index)
        return (f"its shard {problem}", None) if problem else (None, entry)

    def finish(self, summary: dict | None = None, empty=()) -> bool:
        """Coordinator: merge every receipt, store `summary`, mark complete when every unit is in (`empty`: units
        of the cut found to hold no kept record), release the lock; other ranks: release their lock. True when
        the cache is complete."""
        try:
            if not self.coordinator:
                return False
            self.merge()
            complete = set(self.numbers) - set(empty) <= self.done_units
            if summary is not None:
                try:
                    self.manifest["summary"] = jsonable(summary)
                except TypeError as err:
                    raise CacheError(f"cache {self.root}: summary: {err}") from None
            self.manifest.update(complete=complete, updated=now())
            write_manifest(self.root, self.manifest)
            return complete
        finally:
            self.abort()

    @classmethod
    def join(cls, root, settings: dict, cut: RecordCut, settings_sha256: str, rank: int, **kw) -> "UnitWriter":
        """A non-coordinating rank, after the coordinator opened the cache: takes its own rank lock."""
        self = cls(root, settings, cut, rank=rank, **kw)
        self.settings_sha256 = settings_sha256
        self._lock = acquire_lock(self.root / f"{LOCK}.rank-{rank}")
        return self

    def write_unit(self, number: int, seqs: list, blocks: tuple | None = None, checked: bool = False) -> dict:
        """Write unit `number` (its sequences, in record order) as a shard, then its receipt. `blocks`: (starts,
        payloads) an EncodePool encoded and checked (`seqs` then need only their index fields); `checked`: `seqs`
        were checked and typed already (CacheWriter.add)."""
        got = tuple(int(s.record_index) for s in seqs)
        problem = self._records_problem(number, got)
        if problem:
            raise CacheError(f"cache {self.root}: unit {number} {problem}: got records {got[:4]}...")
        unit = self.units[number] if self.cut is None else unit_of(number, seqs)
        if blocks is None and not checked:
            seqs = [check_sequence(self.root, self.layout, s) for s in seqs]
        name = shard_file(number)
        entry = write_shard_file(self.root, name, number, seqs, self.layout, blocks=blocks,
                                 block_bytes=self.block_bytes, max_block_sequences=self.max_block_sequences)
        entry.update(unit=number, unit_sha256=unit.sha256)
        receipt = seal({"format": RECEIPT_FORMAT, "settings_sha256": self.settings_sha256, "entry": entry,
                        "rank": self.rank, "host": socket.gethostname(), "written": now()})
        try:
            atomic_write_bytes(self.root / receipt_file(number), canonical_json(receipt) + b"\n")
        except OSError as err:   # the shard stays unreceipted: the next run removes and rewrites it
            raise CacheError(f"cache {self.root}: cannot write {receipt_file(number)}: {err}; finished units are "
                             f"kept: free space and re-run the same command to resume") from None
        return entry

    def abort(self) -> None:
        """Release this rank's lock; receipts and shards written so far stay for the next run."""
        if self._lock is not None:
            release_lock(self._lock)
            self._lock = None

    def __del__(self):
        try:
            self.abort()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
