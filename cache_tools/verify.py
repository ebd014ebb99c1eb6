"""Check a cache end to end, in a folder or under a URL: the manifest, each shard's size, sha256, header, index
and what the manifest says of it, every block's digests and decoding, and the saved teacher tokenizer's sha256s."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import CacheError, CorruptShard
from .integrity import chunks_digest, digest_bytes
from .reader import check_shard_matches, load_manifest, open_shard
from .storage import open_storage
from .units import RECEIPT_NAME, UNIT_DIR
from .writing import SHARD_NAME


@dataclass
class Problem:
    shard: str          # the file: shards/shard-N.safetensors, or teacher_tokenizer/<name>
    block: int | None   # None: the shard as a whole
    message: str


@dataclass
class VerifyReport:
    cache: str
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
        return {"cache": self.cache, "ok": self.ok, **asdict(self)}   # the key order of the JSON report


def verify_shard(storage, manifest: dict, number: int, report: VerifyReport, seen: dict[int, str]) -> None:
    """Append to `report` every problem found in one shard: size and whole-file digest, header and index
    (the checks the reader makes), then every block's digests and decode."""
    entry = manifest["shards"][number]
    name = entry["file"]
    bad = lambda block, msg: report.problems.append(Problem(name, block, msg))  # noqa: E731
    try:
        size = storage.size(name)
    except FileNotFoundError:
        bad(None, "file is missing")
        return
    if size != entry["bytes"]:
        bad(None, f"has {size} bytes, manifest.json says {entry['bytes']} (truncated or replaced)")
    chunk = 8 << 20   # the whole file's sha256, streamed by ranges
    digest = chunks_digest(storage.read_range(name, at, min(chunk, size - at)) for at in range(0, size, chunk))[0]
    if digest != entry["sha256"]:
        bad(None, f"sha256 {digest[:16]}... differs from manifest.json's {entry['sha256'][:16]}... (file corrupted)")
    try:
        shard = open_shard(storage, entry, number)
        check_shard_matches(storage.label, manifest, entry, shard, number)
    except CacheError as err:
        bad(None, str(err).split(f"shard {name}", 1)[-1].lstrip(": ").split("; it is not used")[0])
        return
    for r in shard.record_index.tolist():
        if r in seen:
            bad(None, f"record {r} is also stored in shard {seen[r]} (duplicate)")
        seen[r] = name
    report.shards += 1
    report.sequences += len(shard.record_index)
    report.loss_positions += int(shard.num_loss.sum())
    for block in range(shard.num_blocks):
        report.blocks += 1
        try:
            shard.decode_block(block)   # every tensor is checked against its digest first
        except Exception as err:  # noqa: BLE001 - any digest or decode failure is the finding
            bad(block, f"{err}" if isinstance(err, CorruptShard) else f"does not decode: {err}")


def verify_teacher_tokenizer(storage, manifest: dict, report: VerifyReport) -> None:
    """Append a problem for each file of the teacher tokenizer saved in the cache (manifest `teacher_tokenizer`)
    that is missing, unreadable or fails its sha256 (a --cross-tokenizer run would refuse it)."""
    entry = manifest.get("teacher_tokenizer")
    for name, digest in sorted((entry or {}).get("files", {}).items()):
        where = f"{entry['dir']}/{name}"
        try:
            data = storage.read_bytes(where)
        except OSError as err:
            why = "file is missing" if isinstance(err, FileNotFoundError) else f"cannot be read ({err})"
            report.problems.append(Problem(where, None, f"{why} (listed in manifest.json's teacher_tokenizer)"))
            continue
        if digest_bytes(data, "sha256") != digest:
            report.problems.append(Problem(where, None, f"sha256 {digest_bytes(data, 'sha256')[:16]}... differs from "
                                                        f"manifest.json's {digest[:16]}... (file corrupted or edited)"))


def verify_cache(root, progress=None) -> VerifyReport:
    """Verify every shard the manifest lists; `progress` wraps the shard iterable (e.g. tqdm). A manifest
    that fails its checks is a CacheError (as for any reader)."""
    storage = open_storage(root)
    manifest = load_manifest(storage)
    report = VerifyReport(storage.label)
    entries = manifest["shards"]
    seen: dict[int, str] = {}
    for number in (progress(range(len(entries))) if progress else range(len(entries))):
        verify_shard(storage, manifest, number, report, seen)
    verify_teacher_tokenizer(storage, manifest, report)
    listed = {e["file"] for e in entries}
    for name in sorted(storage.list("shards")):
        if (SHARD_NAME.match(name) or name.endswith(".tmp")) and f"shards/{name}" not in listed:
            report.warnings.append(f"shards/{name} is not listed in manifest.json (left by an interrupted run; "
                                   f"a resumed run removes it)")
    pending = sorted(name for name in storage.list(UNIT_DIR) if RECEIPT_NAME.match(name))
    if pending:
        report.warnings.append(f"{UNIT_DIR}/ holds {len(pending)} finished unit(s) not yet in manifest.json "
                               f"({pending[0]}, ...): re-run the same cache-teacher command to merge them")
    if not manifest["complete"]:
        report.warnings.append("manifest.json says the cache is not complete (the writing run has not closed it)")
    return report
