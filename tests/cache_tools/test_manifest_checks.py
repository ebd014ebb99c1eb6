"""The manifest is checked completely on every open: hostile values sealed with a valid digest (so only
these checks can catch them) are refused by the training reader, `verify_cache` and `fastkd cache verify`,
each naming the field; a full disk while the manifest is replaced keeps the old one; `fastkd cache inspect`
prints the tokenizer identity readably."""

import errno
import hashlib
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from fastkd.cache_tools import FORMAT_VERSION, CacheError, CacheReader, CacheWriter
from fastkd.cache_tools import format as fmt
from fastkd.cache_tools.integrity import seal
from fastkd.cache_tools.verify import verify_cache
from fastkd.cli import main
from fastkd.loader import CacheSource
from helpers import random_sequence, synthetic_settings

HEX = "ab" * 32


def build_cache(root: Path, layers=(1,), widths=(16,), mode="topk", **extra) -> Path:
    """A small real cache: 3 shards of 4 sequences, 2 per block, one hidden layer of width 16, a teacher
    tokenizer folder as the cache stage saves it."""
    settings = synthetic_settings(vocab_size=300, k=8, mode=mode, layers=layers, widths=widths, **extra)
    settings["teacher"]["num_hidden_layers"] = 2
    digest = hashlib.sha256(b"{}").hexdigest()   # the tokenizer.json written below
    settings["teacher_tokenizer"] = {"dir": "teacher_tokenizer", "files": {"tokenizer.json": digest}}
    rng = np.random.default_rng(5)
    with CacheWriter(root, settings, sequences_per_shard=4, max_block_sequences=2) as writer:
        for i in range(12):
            length = int(rng.integers(4, 12))
            writer.add(random_sequence(rng, i, settings, length=length, num_loss=int(rng.integers(1, length))))
    (root / "teacher_tokenizer").mkdir()
    (root / "teacher_tokenizer" / "tokenizer.json").write_text("{}")
    return root


@pytest.fixture
def cache(tmp_path):
    return build_cache(tmp_path / "cache")


def reseal(cache: Path, edit) -> dict:
    """Apply `edit` to the manifest and write it back sealed: the seal passes, only the field checks can refuse."""
    manifest = json.loads((cache / "manifest.json").read_text())
    edit(manifest)
    (cache / "manifest.json").write_text(json.dumps(seal(manifest)))
    return manifest


def refused_everywhere(cache: Path, field: str, capsys) -> None:
    """The training reader, verify_cache and `fastkd cache verify` all refuse, naming the cache and field."""
    needle = repr(field)
    with pytest.raises(CacheError) as err:
        CacheSource(cache)                      # what `fastkd train` opens
    message = str(err.value)
    assert needle in message and str(cache) in message and "manifest.json" in message and "\n" not in message
    with pytest.raises(CacheError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        CacheReader(cache, verify=False)        # the sanity checks hold without digests too
    try:
        report = verify_cache(cache)
    except CacheError as caught:
        assert needle in str(caught)
    else:
        assert not report.ok and any(needle in p.message for p in report.problems), report.problems
    code = main(["cache", "verify", str(cache), "--no-progress"])
    out = capsys.readouterr()
    assert code in (1, 2) and needle in out.out + out.err and "Traceback" not in out.err


def drop(path: str):
    """An edit deleting the key at a dotted path ('shards.1.num_blocks')."""
    def edit(manifest):
        *parents, key = path.split(".")
        obj = manifest
        for part in parents:
            obj = obj[int(part)] if isinstance(obj, list) else obj[part]
        del obj[key]
    return edit


def set_value(path: str, value):
    def edit(manifest):
        *parents, key = path.split(".")
        obj = manifest
        for part in parents:
            obj = obj[int(part)] if isinstance(obj, list) else obj[part]
        obj[int(key) if isinstance(obj, list) else key] = value(obj[int(key) if isinstance(obj, list) else key]) \
            if callable(value) else value
    return edit


def both(*edits):
    def edit(manifest):
        for one in edits:
            one(manifest)
    return edit


def test_an_unedited_cache_opens_everywhere(cache, capsys):
    reader = CacheReader(cache)
    assert len(reader) == 12 and reader.num_shards == 3
    assert len(CacheSource(cache)) == 12
    assert verify_cache(cache).ok
    assert main(["cache", "verify", str(cache), "--no-progress"]) == 0
    assert main(["cache", "inspect", str(cache)]) == 0
    assert main(["cache", "stats", str(cache), "--no-progress"]) == 0
    capsys.readouterr()


HOSTILE = [
    ("num_blocks 2**40", set_value("shards.1.num_blocks", 2 ** 40), "shards[1].num_blocks"),
    ("num_blocks off by one", set_value("shards.1.num_blocks", lambda v: v - 1), "shards[1].num_blocks"),
    ("counts 2**62", set_value("counts.sequences", 2 ** 62), "counts.sequences"),
    ("counts.tokens 2**62", set_value("counts.tokens", 2 ** 62), "counts.tokens"),
    ("counts total not the sum", set_value("counts.loss_positions", lambda v: v + 1), "counts.loss_positions"),
    ("counts payload total not the sum", set_value("counts.payload_bytes.topk", lambda v: v + 1),
     "counts.payload_bytes.topk"),
    ("num_sequences off by one", set_value("shards.2.num_sequences", lambda v: v - 1), "counts.sequences"),
    ("num_sequences above the work unit", set_value("shards.2.num_sequences", lambda v: v + 1),
     "shards[2].num_sequences"),
    ("num_sequences off by one, counts kept consistent",
     both(set_value("shards.2.num_sequences", lambda v: v - 1), set_value("counts.sequences", lambda v: v - 1)),
     "shards[2].num_sequences"),
    ("num_tokens off by one, counts kept consistent",
     both(set_value("shards.0.num_tokens", lambda v: v + 1), set_value("counts.tokens", lambda v: v + 1)),
     "shards[0].num_tokens"),
    ("first_record", set_value("shards.0.first_record", 7), "shards[0].first_record"),
    ("payload_bytes of a shard", both(set_value("shards.0.payload_bytes.tokens", lambda v: v + 1),
                                      set_value("counts.payload_bytes.tokens", lambda v: v + 1)),
     "shards[0].payload_bytes.tokens"),
    ("unknown logits codec", set_value("codecs.topk.name", "zz-zstd"), "codecs.topk.name"),
    ("unknown hidden codec", set_value("codecs.hidden.name", "zz-zstd"), "codecs.hidden.name"),
    ("codec params differ from the shard", set_value("codecs.topk.params", {"level": 9}), "codecs.topk"),
    ("unknown teacher dtype", set_value("teacher.dtype", "int3"), "teacher.dtype"),
    ("unknown hidden dtype", both(set_value("codecs.hidden", {"name": "kh", "params": {"method": "int3"}})),
     "codecs.hidden.params.method"),
    ("unknown top-k precision", set_value("codecs.topk.params.precision", "tiny"), "codecs.topk.params.precision"),
    ("sampled codec in mode topk", set_value("codecs.topk", {"name": "ks", "params": {}}), "codecs.topk.name"),
    ("a pre-1.0 codec name", set_value("codecs.topk.name", "kt2-zstd"), "codecs.topk.name"),
    ("an experimental kt option no release reads", set_value("codecs.topk.params.layout", "value"),
     "codecs.topk.params.layout"),
    ("a hidden param kh does not know", set_value("codecs.hidden.params.scale", 2), "codecs.hidden.params.scale"),
    ("unknown mode", set_value("mode", "dense"), "mode"),
    ("k differs from the shard", set_value("k", 4), "k"),
    ("layer width differs from the shard", set_value("hidden_widths", [32]), "hidden_widths"),
    ("layer differs from the shard", set_value("layers", [2]), "shards[0].hidden_bytes.1"),
    ("layer differs from the shard, sizes kept consistent",
     lambda m: [e.update(hidden_bytes={"2": e["hidden_bytes"]["1"]}) for e in [*m["shards"], m["counts"]]]
     + [m.update(layers=[2])], "layers"),
    ("layer beyond the teacher", set_value("layers", [9]), "layers[0]"),
    ("vocabulary differs from the shard", set_value("tokenizer.vocab_size", 400), "tokenizer.vocab_size"),
    ("capture in a cache whose shards have no rows",
     set_value("capture", {"share": 0.5, "by": "entropy", "seed": None}), "shards[0].payload_bytes.rows"),
    ("unit out of order", set_value("shards.1.unit", 0), "shards[1].unit"),
    ("unit digest not hex", set_value("shards.1.unit_sha256", "z" * 64), "shards[1].unit_sha256"),
    ("more sequences than the work unit", set_value("work_unit", 3), "shards[0].num_sequences"),
    ("format_version not an integer", set_value("format_version", "3"), "format_version"),
    ("capture with an unknown rule", set_value("capture", {"share": 0.5, "by": "luck", "seed": None}), "capture.by"),
    ("tokenizer folder absolute", set_value("teacher_tokenizer.dir", "/etc"), "teacher_tokenizer.dir"),
    ("tokenizer folder with ..", set_value("teacher_tokenizer.dir", "../elsewhere"), "teacher_tokenizer.dir"),
    ("tokenizer file with ..", set_value("teacher_tokenizer.files", {"../x": HEX}), "teacher_tokenizer.files"),
    ("shard listed out of place", set_value("shards.1.file", "shards/shard-00007.safetensors"), "shards[1].file"),
    ("complete is not a bool", set_value("complete", "yes"), "complete"),
    ("records digest of an unknown kind", set_value("records", {"count": 12, "sha256": HEX, "digest": "tokens"}),
     "records.digest"),
    ("records count not a count", set_value("records", {"count": -1, "sha256": HEX, "digest": "file"}),
     "records.count"),
]


@pytest.mark.parametrize("edit, field", [pytest.param(e, f, id=name) for name, e, f in HOSTILE])
def test_hostile_sealed_edits_are_refused_naming_the_field(cache, capsys, edit, field):
    reseal(cache, edit)
    refused_everywhere(cache, field, capsys)


REQUIRED = ["format_version", "fastkd_version", "complete", "created", "updated", "summary", "shards", "counts",
            "tokenizer", "tokenizer.vocab_size", "k", "mode", "layers", "hidden_widths", "codecs", "codecs.topk",
            "codecs.topk.name", "codecs.topk.params", "codecs.hidden", "codecs.hidden.name",
            "counts.shards", "counts.sequences", "counts.loss_positions", "counts.tokens", "counts.bytes",
            "counts.payload_bytes", "counts.hidden_bytes", "work_unit"] + \
           [f"shards.1.{key}" for key in ("file", "sha256", "header_sha256", "bytes", "num_sequences",
                                          "num_loss_positions", "num_tokens", "num_blocks", "payload_bytes",
                                          "hidden_bytes", "first_record", "last_record", "unit", "unit_sha256")]


@pytest.mark.parametrize("path", REQUIRED)
def test_each_required_key_deleted_is_refused(cache, capsys, path):
    reseal(cache, drop(path))
    parts = path.split(".")
    field = ".".join(f"[{p}]" if p.isdigit() else p for p in parts).replace(".[", "[")
    refused_everywhere(cache, field, capsys)


def test_a_symlink_taking_the_tokenizer_folder_outside_is_refused(cache, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(cache / "teacher_tokenizer", outside / "tok")
    os.symlink(outside / "tok", cache / "teacher_tokenizer")
    refused_everywhere(cache, "teacher_tokenizer.dir", capsys)


def test_what_is_legitimately_optional_still_opens(tmp_path):
    """No hidden layers, sampled mode, selective capture, an unfinished cache, no tokenizer folder."""
    plain = build_cache(tmp_path / "plain", layers=(), widths=())
    assert len(CacheReader(plain)) == 12
    sampled = build_cache(tmp_path / "sampled", mode="sample", sample_n=16)
    assert CacheReader(sampled).manifest["mode"] == "sample" and verify_cache(sampled).ok
    captured = build_cache(tmp_path / "captured", capture={"share": 1.0, "by": "entropy", "seed": None})
    assert CacheReader(captured).format_version == FORMAT_VERSION and verify_cache(captured).ok
    partial = reseal(plain, lambda m: m.update(complete=False))
    assert not partial["complete"] and len(CacheReader(plain)) == 12
    reseal(plain, lambda m: m.pop("teacher_tokenizer"))
    assert len(CacheReader(plain)) == 12


@pytest.mark.parametrize("version", [1, 2])
def test_a_pre_1_0_cache_is_refused_everywhere_in_one_line(cache, capsys, version):
    """A cache of format 1 or 2 (fastkd before 1.0) is never misread: every reader says to re-create it."""
    reseal(cache, set_value("format_version", version))
    want = f"cache {cache}: made by a pre-1.0 fastkd, format {version}; re-create it"
    for open_it in (CacheSource, CacheReader, verify_cache):
        with pytest.raises(CacheError) as err:
            open_it(cache)
        assert str(err.value).startswith(want) and "\n" not in str(err.value)
    for command in ("verify", "inspect", "stats"):
        assert main(["cache", command, str(cache)]) == 2
        out = capsys.readouterr()
        assert want in out.err and "Traceback" not in out.err


def test_a_remote_cache_gets_the_same_checks(cache, capsys):
    fsspec = pytest.importorskip("fsspec")
    reseal(cache, set_value("shards.1.num_blocks", lambda v: v - 1))
    fs = fsspec.filesystem("memory")
    path = f"/manifest-checks-{os.getpid()}/cache"
    url = f"memory://{path.lstrip('/')}"
    fs.put(str(cache), path, recursive=True)
    try:
        with pytest.raises(CacheError, match=r"'shards\[1\].num_blocks'"):
            CacheReader(url)
        assert main(["cache", "verify", url]) == 1 and "'shards[1].num_blocks'" in capsys.readouterr().out
        reseal(cache, set_value("teacher_tokenizer.dir", "/etc"))
        fs.put(str(cache / "manifest.json"), path + "/manifest.json")
        for open_it in (CacheReader, verify_cache):
            with pytest.raises(CacheError, match="'teacher_tokenizer.dir'"):
                open_it(url)
        assert main(["cache", "inspect", url]) == 2 and "'teacher_tokenizer.dir'" in capsys.readouterr().err
    finally:
        fs.rm(path, recursive=True)


# ----------------------------------------------------------------------------- a full disk

def test_a_full_disk_while_the_manifest_is_replaced_keeps_the_old_one(cache, monkeypatch):
    before = (cache / "manifest.json").read_bytes()
    manifest = json.loads(before)
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fmt.os, "replace", full)
    with pytest.raises(CacheError) as err:
        fmt.write_manifest(cache, dict(manifest, complete=False))
    message = str(err.value)
    assert str(cache) in message and "manifest.json" in message and "No space left on device" in message
    assert "previous manifest.json is kept" in message and "free space" in message and "re-run" in message
    assert "\n" not in message and err.value.errno == errno.ENOSPC
    assert (cache / "manifest.json").read_bytes() == before
    assert not [p.name for p in cache.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert len(CacheReader(cache)) == 12


def test_a_full_disk_during_the_write_itself_leaves_no_temporary_file(tmp_path, monkeypatch):
    settings = synthetic_settings(vocab_size=300, k=8, layers=(), widths=())
    rng = np.random.default_rng(1)
    writer = CacheWriter(tmp_path / "c", settings, sequences_per_shard=100)
    writer.add(random_sequence(rng, 0, settings, length=6, num_loss=3))
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, mode):   # only the manifest's temporary file meets the full disk (the unit's receipt is written)
        full = ".manifest.json." in os.readlink(f"/proc/self/fd/{fd}")
        return Full(real_fdopen(fd, mode)) if full else real_fdopen(fd, mode)

    monkeypatch.setattr(fmt.os, "fdopen", fdopen)
    with pytest.raises(CacheError, match=r"cache .*c: cannot write manifest.json \(No space left on device\)"):
        writer.close()
    monkeypatch.undo()
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before
    assert not [p.name for p in (tmp_path / "c").iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- inspect

def test_inspect_prints_the_tokenizer_identity_readably(tmp_path, capsys):
    digest = "0123456789abcdef" * 4
    identity = {"vocab_size": 300, "vocab_sha256": digest, "eos_token_id": 0, "pad_token_id": 1,
                "class": "TokenizersBackend", "identity_version": 2,
                "components": {part: digest for part in ("merges", "model", "normalizer", "pre_tokenizer",
                                                         "post_processor", "added_tokens", "special_tokens", "probe")},
                "special_tokens": {"bos_token": None, "bos_token_id": None, "eos_token": "<|endoftext|>",
                                   "eos_token_id": 0, "pad_token": "<|pad|>", "pad_token_id": 1},
                "added_token_count": 4, "partial": False}
    root = build_cache(tmp_path / "c")
    reseal(root, lambda m: m.update(tokenizer=identity))
    assert main(["cache", "inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert json.dumps(identity) not in out and max(len(line) for line in out.splitlines()) < 120
    lines = out.splitlines()
    block = list(itertools.takewhile(lambda line: line.startswith("  "), lines[lines.index("tokenizer") + 1:]))
    fields = {line.split()[0]: line.split(None, 1)[1] for line in block}
    assert fields["vocab_size"] == "300" and fields["class"] == "TokenizersBackend"
    assert fields["vocab_sha256"] == "0123456789ab..." and fields["components.merges"] == "0123456789ab..."
    assert fields["special_tokens.eos_token"] == "<|endoftext|>" and "special_tokens.bos_token" not in fields
    assert main(["cache", "inspect", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] == identity      # --json keeps every value whole
