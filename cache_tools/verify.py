"""Check a cache end to end: the manifest (every field, load_manifest), every shard's size and sha256, its
index and what the manifest says of it (check_shard_matches), and that every block decodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastkd.integrity import file_digest

from .format import SHARD_DIR, CacheError
from .reader import check_shard_matches, load_manifest, open_shard
from .shard import SHARD_READERS, CorruptShard
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


def verify_shard(root: Path, manifest: dict, number: int, report: VerifyReport, seen: dict[int, str]) -> None:
    """Append to `report` every problem found in one shard: whole-file digest, header and index
    (the same checks the reader makes), then every block's digests and decode."""
    entry = manifest["shards"][number]
    name = entry["file"]
    path = root / name
    bad = lambda block, msg: report.problems.append(Problem(name, block, msg))  # noqa: E731
    if not path.is_file():
        bad(None, "file is missing")
        return
    size = path.stat().st_size
    if size != entry["bytes"]:
        bad(None, f"has {size} bytes, manifest.json says {entry['bytes']} (truncated or replaced)")
    digest = file_digest(path)[0]
    if digest != entry["sha256"]:
        bad(None, f"sha256 {digest[:16]}... differs from manifest.json's {entry['sha256'][:16]}... (file corrupted)")
    if "header_sha256" not in entry:
        report.warnings.append(f"{name}: written before header digests; the reader checks it whole at open")
    try:
        # the whole-file digest was just checked: open_shard checks the rest (size, header, index)
        shard = open_shard(root, dict(entry, sha256=digest), number, manifest["format_version"])
        check_shard_matches(root, manifest, entry, shard, number)
    except CacheError as err:
        bad(None, str(err).split(f"shard {name}", 1)[-1].lstrip(": ").split("; it is not used")[0])
        return
    meta_version = shard.meta.get("format_version")
    if meta_version != str(manifest["format_version"]):
        bad(None, f"metadata format_version {meta_version!r}, manifest.json says {manifest['format_version']}")
    count = len(shard.record_index)
    for r in shard.record_index.tolist():
        if r in seen:
            bad(None, f"record {r} is also stored in shard {seen[r]} (duplicate)")
        seen[r] = name
    report.shards += 1
    report.sequences += count
    report.loss_positions += int(shard.num_loss.sum())
    for block in range(shard.num_blocks):
        report.blocks += 1
        try:
            shard.check_block(block)
            shard.decode_block(block)
        except Exception as err:  # noqa: BLE001 - any digest or decode failure is the finding
            bad(block, f"{err}" if isinstance(err, CorruptShard) else f"does not decode: {err}")


def verify_url(url: str, progress=None) -> VerifyReport:
    """A cache at an fsspec URL: the manifest (refused as for a folder), every shard's size and header digest
    (opening the reader checks them), then every block's digests and decoding, one range request per block."""
    from .reader import CacheReader
    from .storage import open_storage

    report = VerifyReport(url)
    load_manifest(open_storage(url))   # a refused manifest is an error, as for a folder
    try:
        reader = CacheReader(url)
    except CacheError as err:  # a shard's size, header or what the manifest says of it: named in the message
        report.problems.append(Problem("manifest.json" if "manifest" in str(err) else "?", None, str(err)))
        return report
    table = reader.block_table()
    report.shards = reader.num_shards
    for shard, block, positions in (progress(table) if progress else table):
        report.blocks += 1
        try:
            sequences = reader.read_block(shard, block)
        except CacheError as err:
            report.problems.append(Problem(reader.manifest["shards"][shard]["file"], block, str(err)))
            continue
        report.sequences += len(sequences)
        report.loss_positions += sum(len(s.tail) for s in sequences)
    if not reader.manifest.get("complete"):
        report.warnings.append("manifest.json says the cache is not complete (the writing run has not closed it)")
    return report


def verify_cache(root, progress=None) -> VerifyReport:
    """Verify every shard the manifest lists; `progress` wraps the shard iterable (e.g. tqdm)."""
    from .storage import LocalStorage, is_url

    if is_url(root):
        return verify_url(str(root), progress)
    root = Path(root)
    manifest = load_manifest(LocalStorage(root))   # every manifest field and total, as any reader checks them
    report = VerifyReport(str(root))
    version = manifest["format_version"]
    if version not in SHARD_READERS:
        report.problems.append(Problem("manifest.json", None, f"format version {version} unknown to this fastkd"))
        return report
    entries = manifest["shards"]
    seen: dict[int, str] = {}
    for number in (progress(range(len(entries))) if progress else range(len(entries))):
        verify_shard(root, manifest, number, report, seen)
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
    units = root / "units"
    if units.is_dir():
        pending = sorted(p.name for p in units.iterdir() if p.name.startswith("unit-") and p.name.endswith(".json"))
        if pending:
            report.warnings.append(f"units/ holds {len(pending)} finished unit(s) not yet in manifest.json "
                                   f"({pending[0]}, ...): re-run the same cache-teacher command to merge them")
    if not manifest.get("complete"):
        report.warnings.append("manifest.json says the cache is not complete (the writing run has not closed it)")
    return report
