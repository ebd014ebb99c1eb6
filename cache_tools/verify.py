"""Check a cache end to end: every shard's size and sha256, its index, and that every block decodes."""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open

from .format import SHARD_DIR, read_manifest
from .shard import SHARD_READERS
from .writer import SHARD_NAME


@dataclass
class Problem:
    shard: str
    block: int | None
    message: str

    def __str__(self) -> str:
        where = f"shard {self.shard}" + (f" block {self.block}" if self.block is not None else "")
        return f"{where}: {self.message}"


@dataclass
class VerifyReport:
    root: str
    shards: int = 0
    blocks: int = 0
    sequences: int = 0
    loss_positions: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"cache": self.root, "ok": self.ok, "shards": self.shards, "blocks": self.blocks,
                "sequences": self.sequences, "loss_positions": self.loss_positions,
                "problems": [{"shard": p.shard, "block": p.block, "message": p.message} for p in self.problems],
                "warnings": self.warnings}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_shard(root: Path, entry: dict, version: int, report: VerifyReport, seen: dict[int, str]) -> None:
    """Append to `report` every problem found in one shard (digest, index, each block)."""
    name = entry["file"]
    path = root / name
    bad = lambda block, msg: report.problems.append(Problem(name, block, msg))  # noqa: E731
    if not path.exists():
        bad(None, "file is missing")
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        bad(None, f"has {size} bytes, manifest.json says {entry['bytes']} (truncated or replaced)")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        bad(None, f"sha256 {digest[:16]}... differs from manifest.json's {entry['sha256'][:16]}... (file corrupted)")
    try:
        handle = safe_open(str(path), "numpy")
        shard = SHARD_READERS[version](handle, f"shard {name}")
    except Exception as err:  # noqa: BLE001 - any failure: unreadable header or index
        bad(None, f"safetensors header or index unreadable ({err})")
        return
    meta_version = shard.meta.get("format_version")
    if meta_version != str(version):
        bad(None, f"metadata format_version {meta_version!r}, manifest.json says {version}")
    count = len(shard.record_index)
    if count != entry["num_sequences"]:
        bad(None, f"index holds {count} sequences, manifest.json says {entry['num_sequences']}")
    starts = shard.block_start
    if len(starts) < 2 or starts[0] != 0 or starts[-1] != count or np.any(np.diff(starts) < 0):
        bad(None, f"index.block_start {starts.tolist()[:8]} is not a valid block table for {count} sequences")
        return
    if np.any(shard.num_loss > shard.length) or np.any(shard.num_loss < 0):
        bad(None, "index.num_loss exceeds index.length for some sequence")
    if len(shard.tasks) and (shard.task.min() < 0 or shard.task.max() >= len(shard.tasks)):
        bad(None, "index.task points outside the tasks list")
    for r in shard.record_index.tolist():
        if r in seen:
            bad(None, f"record {r} is also stored in shard {seen[r]} (duplicate)")
        seen[r] = name
    report.shards += 1
    report.sequences += count
    report.loss_positions += int(shard.num_loss.sum())
    keys = set(handle.keys())
    for block in range(shard.num_blocks):
        report.blocks += 1
        names = shard.part_names(block)
        missing = [n for n in names if n not in keys]
        if missing:
            bad(block, f"tensor(s) {missing} missing")
            continue
        broken = False
        for tensor in names:
            if tensor in shard.crc32 and zlib.crc32(handle.get_tensor(tensor).tobytes()) != shard.crc32[tensor]:
                bad(block, f"crc32 mismatch in tensor {tensor} (corrupted bytes)")
                broken = True
        if broken:
            continue
        try:
            shard.decode_block(block)
        except Exception as err:  # noqa: BLE001 - any decode failure is the finding
            bad(block, f"does not decode: {err}")


def verify_cache(root, progress=None) -> VerifyReport:
    """Verify every shard the manifest lists; `progress` wraps the shard iterable (e.g. tqdm)."""
    root = Path(root)
    manifest = read_manifest(root)
    report = VerifyReport(str(root))
    version = manifest["format_version"]
    if version not in SHARD_READERS:
        report.problems.append(Problem("manifest.json", None, f"format version {version} unknown to this fastkd"))
        return report
    entries = manifest["shards"]
    seen: dict[int, str] = {}
    for entry in (progress(entries) if progress else entries):
        verify_shard(root, entry, version, report, seen)
    counts = manifest.get("counts", {})
    if report.ok and counts.get("sequences") not in (None, report.sequences):
        report.problems.append(Problem("manifest.json", None, f"counts.sequences {counts.get('sequences')} but the "
                                                              f"shards hold {report.sequences}"))
    listed = {e["file"] for e in entries}
    shard_dir = root / SHARD_DIR
    if shard_dir.is_dir():
        for path in sorted(shard_dir.iterdir()):
            rel = f"{SHARD_DIR}/{path.name}"
            if (SHARD_NAME.match(path.name) or path.name.endswith(".tmp")) and rel not in listed:
                report.warnings.append(f"{rel} is not listed in manifest.json (left by an interrupted run; "
                                       f"a resumed run removes it)")
    if not manifest.get("complete"):
        report.warnings.append("manifest.json says the cache is not complete (the writing run has not closed it)")
    return report
