"""Work units: one cache written by many processes (torchrun ranks), resumable with any number of them.

The records are cut into fixed work units of `work_unit` consecutive sequences (the cut does not
depend on how many processes run). Unit u is written whole, by whichever rank takes it, as
`shards/shard-<u>.safetensors`, followed by a sealed receipt `units/unit-<u>.json` holding its
manifest entry: the receipt is the unit's durable commit. One coordinator (rank 0) holds the
cache lock, merges receipts into manifest.json (the cache's commit marker) at the start of every
run and after every rank finished, and removes what no receipt accounts for.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastkd.integrity import canonical_json, digest_bytes, seal, seal_matches

from .format import (FORMAT_NAME, FORMAT_VERSION, LOCK, MANIFEST, SHARD_DIR, CacheError, atomic_write_bytes,
                     jsonable, read_manifest, settings_of, write_manifest)
from .lock import acquire_lock, clear_stale_lock, release_lock
from .reader import check_shard_matches, open_shard
from .writer import (SHARD_NAME, _owned_copy, _version, check_sequence, layout_of, normalize_settings,
                     resume_settings, shard_file, totals, write_shard_file)

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


def sequence_digest(h, record_index: int, task: str, input_ids, loss_mask) -> None:
    """Feed one tokenised record into a running sha256 (what the cache's content depends on)."""
    ids = np.asarray(input_ids, np.int64)
    task_bytes = str(task).encode()
    h.update(np.array([record_index, len(ids), len(task_bytes)], np.int64).tobytes())
    h.update(task_bytes)
    h.update(ids.astype("<i8").tobytes())
    h.update(np.asarray(loss_mask, np.uint8).tobytes())


def make_units(examples, work_unit: int) -> tuple[list[Unit], dict]:
    """Cut examples (objects with record_index, task, input_ids, loss_mask) into units; also the
    `records` setting: count and sha256 over the unit digests."""
    if work_unit < 1:
        raise CacheError(f"work unit (sequences per shard) must be >= 1, got {work_unit}")
    units, whole = [], hashlib.sha256()
    for number, start in enumerate(range(0, len(examples), work_unit)):
        chunk = examples[start:start + work_unit]
        h = hashlib.sha256()
        for ex in chunk:
            sequence_digest(h, int(ex.record_index), ex.task, ex.input_ids, ex.loss_mask)
        digest = h.hexdigest()
        whole.update(digest.encode())
        units.append(Unit(number, tuple(int(ex.record_index) for ex in chunk), digest))
    return units, {"count": len(examples), "sha256": whole.hexdigest()}


def settings_digest(settings: dict) -> str:
    return digest_bytes(canonical_json(jsonable(settings)))


def receipt_file(number: int) -> str:
    return f"{UNIT_DIR}/unit-{number:05d}.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class UnitWriter:
    """Writes work units of one cache; `UnitWriter.open` (the coordinator, rank 0) or `.join` (other ranks).

    Settings must hold `records` (count, sha256) and `work_unit`; `units` must be the cut those describe.
    """

    def __init__(self, root, settings: dict, units: list[Unit], *, rank: int = 0,
                 block_bytes: int = 1 << 20, max_block_sequences: int = 16):
        self.root = Path(root)
        self.settings = normalize_settings(settings)
        if "records" not in self.settings or "work_unit" not in self.settings:
            raise CacheError("unit cache settings need 'records' and 'work_unit'")
        self.layout = layout_of(self.settings)
        self.units = list(units)
        self.rank = rank
        self.block_bytes = block_bytes
        self.max_block_sequences = max_block_sequences
        self.coordinator = False
        self.manifest: dict | None = None
        self.settings_sha256 = settings_digest(self.settings)
        self.warnings: list[str] = []
        self._lock: Path | None = None

    # --- coordinator ---------------------------------------------------------------------
    @classmethod
    def open(cls, root, settings: dict, units: list[Unit], **kw) -> "UnitWriter":
        """Take the cache lock, check or create the manifest, merge the receipts of earlier runs."""
        self = cls(root, settings, units, rank=0, **kw)
        self.coordinator = True
        try:
            (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)
            (self.root / UNIT_DIR).mkdir(exist_ok=True)
        except OSError as err:
            raise CacheError(f"cache {self.root}: cannot create the folder: {err}") from None
        self._lock = self.root / LOCK
        acquire_lock(self._lock)
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
        return self

    def _open_manifest(self) -> None:
        path = self.root / MANIFEST
        existing = read_manifest(self.root) if path.exists() else None
        if existing is not None and not existing["shards"] and "records" not in existing:
            existing = None      # an empty cache begun by an older fastkd: nothing to keep
        if existing is None:
            strays = [p.name for p in (self.root / SHARD_DIR).iterdir() if SHARD_NAME.match(p.name)]
            strays += [p.name for p in (self.root / UNIT_DIR).iterdir() if RECEIPT_NAME.match(p.name)]
            if strays:  # never delete data that no manifest accounts for
                raise CacheError(f"cache {self.root}: holds {len(strays)} shard or unit file(s) ({sorted(strays)[0]}, "
                                 f"...) but no manifest.json; restore it, or move them away to start a new cache")
            self.manifest = {"format": FORMAT_NAME, "format_version": self.layout.format_version, "fastkd_version": _version(),
                             "complete": False, "created": _now(), "updated": _now(), **self.settings,
                             "shards": [], "counts": totals([]), "summary": None}
            write_manifest(self.root, self.manifest)
            return
        if existing["format_version"] != self.layout.format_version:
            raise CacheError(f"cache {self.root}: written with format version {existing['format_version']}, this "
                             f"fastkd writes version {self.layout.format_version} with these settings; it can be read but not extended")
        if "work_unit" not in existing:
            raise CacheError(f"cache {self.root}: begun by a fastkd without work units (one writer, shards in write "
                             f"order); finish it with one process (no torchrun), or write to a new cache folder")
        self.settings = resume_settings(self.root, existing, self.settings)
        self.settings_sha256 = settings_digest(self.settings)
        by_number = {u.number: u for u in self.units}
        for j, entry in enumerate(existing["shards"]):  # every finished unit is checked before it counts as done
            unit = by_number.get(entry.get("unit"))
            if unit is None or entry.get("unit_sha256") != unit.sha256:
                raise CacheError(f"cache {self.root}: cannot resume on other data: manifest.json shards[{j}] (unit "
                                 f"{entry.get('unit')}) was written from other records than this run's unit; resume "
                                 f"with the same --data file contents, or write to a new cache folder")
            shard = open_shard(self.root, entry, j, self.layout.format_version)
            check_shard_matches(self.root, existing, entry, shard)
        self.manifest = existing

    @property
    def done_units(self) -> set[int]:
        return {int(e["unit"]) for e in self.manifest["shards"]}

    def merge(self, clean: bool = True) -> int:
        """Add every sound receipt's unit to the manifest (sorted by unit); with `clean` (no rank is
        writing) also remove what nothing accounts for (unreceipted shards, stale receipts, temp
        files). Returns how many units were added."""
        if not self.coordinator:
            raise CacheError(f"cache {self.root}: only the coordinating rank merges units")
        by_number = {u.number: u for u in self.units}
        listed = self.done_units
        added = []
        for path in sorted((self.root / UNIT_DIR).iterdir()):
            m = RECEIPT_NAME.match(path.name)
            if not m:
                if clean and path.name.endswith(".tmp"):
                    _unlink(path)
                continue
            number = int(m.group(1))
            if number in listed:
                continue
            problem, entry = self._check_receipt(path, by_number.get(number))
            if problem and not clean:
                continue               # judged (and removed) by the next cleaning merge
            if problem:
                self.warnings.append(f"{UNIT_DIR}/{path.name}: {problem}; unit {number} is written again")
                _unlink(path)
                _unlink(self.root / shard_file(number))
                continue
            added.append(entry)
        if added:
            shards = sorted(self.manifest["shards"] + added, key=lambda e: e["unit"])
            self.manifest["shards"] = shards
            self.manifest["counts"] = totals(shards)
            self.manifest["updated"] = _now()
            write_manifest(self.root, self.manifest)
        for e in (self.manifest["shards"] if clean else added):   # the manifest now records these units
            _unlink(self.root / receipt_file(int(e["unit"])))
        if not clean:
            return len(added)
        keep = {e["file"] for e in self.manifest["shards"]}
        for path in (self.root / SHARD_DIR).iterdir():   # killed between shard and receipt, or temp files
            if path.name.endswith(".tmp") or (SHARD_NAME.match(path.name) and f"{SHARD_DIR}/{path.name}" not in keep):
                _unlink(path)
        for path in self.root.glob(f".{MANIFEST}.*.tmp"):
            _unlink(path)
        return len(added)

    def _check_receipt(self, path: Path, unit: Unit | None) -> tuple[str | None, dict | None]:
        """(problem, entry): a receipt counts only if sealed, written under these settings, for this
        unit's records, and its shard opens and matches."""
        if unit is None:
            return "names a unit this run's records do not have", None
        try:
            receipt = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return f"unreadable ({err})", None
        if not isinstance(receipt, dict) or receipt.get("format") != RECEIPT_FORMAT or seal_matches(receipt) is not True:
            return "not a sealed unit receipt (corrupt or cut short)", None
        if receipt.get("settings_sha256") != self.settings_sha256:
            return "written under other settings (stale)", None
        entry = receipt.get("entry")
        if not isinstance(entry, dict) or entry.get("unit") != unit.number or entry.get("unit_sha256") != unit.sha256 \
                or entry.get("file") != shard_file(unit.number):
            return "written from other records (stale)", None
        try:
            shard = open_shard(self.root, entry, unit.number, self.layout.format_version)
            check_shard_matches(self.root, self.manifest, entry, shard)
        except CacheError as err:
            return f"its shard fails its checks ({err})", None
        if tuple(int(r) for r in shard.record_index) != unit.records:
            return "its shard holds other records than the unit", None
        return None, entry

    def finish(self, summary: dict | None = None) -> bool:
        """Coordinator: merge every receipt, store `summary`, mark complete when every unit is in,
        release the lock; other ranks: release their lock. True when the cache is complete."""
        try:
            if not self.coordinator:
                return False
            self.merge()
            complete = self.done_units == {u.number for u in self.units}
            if summary is not None:
                try:
                    self.manifest["summary"] = jsonable(summary)
                except TypeError as err:
                    raise CacheError(f"cache {self.root}: summary: {err}") from None
            self.manifest["complete"] = complete
            self.manifest["updated"] = _now()
            write_manifest(self.root, self.manifest)
            return complete
        finally:
            self.abort()

    # --- any rank ------------------------------------------------------------------------
    @classmethod
    def join(cls, root, settings: dict, units: list[Unit], settings_sha256: str, rank: int, **kw) -> "UnitWriter":
        """A non-coordinating rank, after the coordinator opened the cache: takes its own rank lock."""
        self = cls(root, settings, units, rank=rank, **kw)
        self.settings_sha256 = settings_sha256
        self._lock = self.root / f"{LOCK}.rank-{rank}"
        acquire_lock(self._lock)
        return self

    def write_unit(self, number: int, seqs: list) -> dict:
        """Write unit `number` (its sequences, in the unit's record order) as a shard, then its receipt."""
        unit = self.units[number]
        got = tuple(int(s.record_index) for s in seqs)
        if got != unit.records:
            raise CacheError(f"cache {self.root}: unit {number} must hold records {unit.records[:4]}..., got {got[:4]}...")
        for seq in seqs:
            check_sequence(self.root, self.layout, seq, captured="capture" in self.settings)
        seqs = [_owned_copy(s) for s in seqs]
        name = shard_file(number)
        entry = write_shard_file(self.root, name, number, seqs, self.layout, self.settings,
                                 block_bytes=self.block_bytes, max_block_sequences=self.max_block_sequences)
        entry.update(unit=number, unit_sha256=unit.sha256)
        receipt = seal({"format": RECEIPT_FORMAT, "settings_sha256": self.settings_sha256, "entry": entry,
                        "rank": self.rank, "host": socket.gethostname(), "written": _now()})
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
