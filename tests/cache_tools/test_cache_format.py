"""The cache shard format: round trips, random access, block independence, resume, locks, errors."""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fastkd.cache_tools import FORMAT_VERSION, CacheError, CachedSequence, CacheReader, CacheWriter
from fastkd.cache_tools.integrity import seal
from fastkd.errors import user_errors
from helpers import hidden_error_bound, random_sequence, random_sequences, synthetic_settings, tensor_ranges


def bf16_reference(x):
    """Independent bf16 rounding: torch's cast."""
    return torch.from_numpy(np.asarray(x, np.float32)).to(torch.bfloat16).float().numpy()


def by_id(ids, *arrays):
    """Rows sorted by id (the slot order within a row carries no meaning: docs/cache-format.md section 1)."""
    order = np.argsort(np.asarray(ids), axis=1, kind="stable")
    return [np.take_along_axis(np.asarray(a), order, 1) for a in (ids, *arrays)]


def assert_same(stored: CachedSequence, got: CachedSequence, hidden_ref=bf16_reference):
    """Every field equal to what was added, up to the documented storage: kt at precision exact keeps every
    log-prob's bits, ks keeps the draws (ids + counts) and gives log(count / draws) with tail 0."""
    assert got.record_index == stored.record_index and got.task == stored.task
    np.testing.assert_array_equal(got.input_ids, stored.input_ids)
    assert got.input_ids.dtype == np.int32 and got.loss_mask.dtype == np.uint8
    np.testing.assert_array_equal(got.loss_mask, stored.loss_mask)
    n = int(stored.loss_mask.sum())
    assert got.topk_ids.shape == (n, stored.topk_ids.shape[1]) and got.topk_ids.dtype == np.int64
    assert got.topk_logprobs.dtype == np.float32 and got.tail.dtype == np.float32
    if stored.counts is None:
        assert got.counts is None
        for a, b in zip(by_id(got.topk_ids, got.topk_logprobs), by_id(stored.topk_ids, stored.topk_logprobs)):
            np.testing.assert_array_equal(a, b)                         # float32 log-probs: bit for bit
        np.testing.assert_array_equal(got.tail, stored.tail)  # fp32: exact
    else:
        for a, b in zip(by_id(got.topk_ids, got.counts), by_id(stored.topk_ids, stored.counts)):
            np.testing.assert_array_equal(a, b)                         # the draws: lossless
        used = got.counts > 0
        np.testing.assert_allclose(np.exp(got.topk_logprobs[used]),
                                   (got.counts / np.maximum(got.counts.sum(1, keepdims=True), 1))[used], rtol=1e-6)
        assert np.isneginf(got.topk_logprobs[~used]).all() and (got.tail == 0).all()
    assert set(got.hidden) == set(stored.hidden)
    for layer, x in stored.hidden.items():
        assert got.hidden[layer].dtype == np.float32 and got.hidden[layer].shape == x.shape
        if hidden_ref is not None:   # None: a lossy method, checked against its bound by the caller
            np.testing.assert_array_equal(got.hidden[layer], hidden_ref(x))


def write_cache(root, settings, seqs, **kw):
    with CacheWriter(root, settings, **kw) as writer:
        for s in seqs:
            writer.add(s)
    return CacheReader(root)


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_round_trip_every_field(tmp_path, mode):
    settings = synthetic_settings(mode=mode, vocab_size=300)
    rng = np.random.default_rng(1)
    seqs = [random_sequence(rng, i, settings) for i in range(40)]
    seqs += [random_sequence(rng, 40, settings, length=5, num_loss=0),  # empty response: stored, n = 0
             random_sequence(rng, 41, settings, length=7, num_loss=7)]
    seqs[3].hidden[1][0, :3] = [1e30, -1e-30, -0.0]  # extreme finite values and -0 survive bf16 (NaN is refused)
    reader = write_cache(tmp_path / "c", settings, seqs, sequences_per_shard=16, max_block_sequences=3)
    assert len(reader) == len(seqs) and reader.num_shards == 3
    for s, got in zip(seqs, reader):
        assert_same(s, got)
    assert reader[40].topk_ids.shape == (0, 8) and reader[40].hidden[3].shape == (0, 24)
    np.testing.assert_array_equal(reader.record_indices, [s.record_index for s in seqs])
    np.testing.assert_array_equal(reader.lengths, [len(s.input_ids) for s in seqs])
    np.testing.assert_array_equal(reader.num_loss_positions, [int(s.loss_mask.sum()) for s in seqs])
    m = reader.manifest
    assert m["format_version"] == FORMAT_VERSION and m["complete"] is True
    assert m["counts"]["sequences"] == len(seqs)
    assert m["counts"]["loss_positions"] == sum(int(s.loss_mask.sum()) for s in seqs)
    assert m["counts"]["bytes"] == sum(os.path.getsize(tmp_path / "c" / e["file"]) for e in m["shards"])
    assert m["k"] == 8 and m["mode"] == mode and m["layers"] == [1, 3] and m["hidden_widths"] == [16, 24]
    assert m["codecs"]["topk"] == ({"name": "ks", "params": {}} if mode == "sample"
                                   else {"name": "kt", "params": {"precision": "exact"}})
    assert m["codecs"]["hidden"] == {"name": "kh", "params": {"method": "bf16", "block": 128}}
    assert m["teacher"]["path"] == "synthetic-teacher"


def test_writer_keeps_its_own_copy(tmp_path):
    settings = synthetic_settings()
    seqs = random_sequences(25, 3, settings)
    expected = [CachedSequence(s.record_index, s.task, s.input_ids.copy(), s.loss_mask.copy(), s.topk_ids.copy(),
                               s.topk_logprobs.copy(), s.tail.copy(), None, {l: h.copy() for l, h in s.hidden.items()})
                for s in seqs]
    with CacheWriter(tmp_path / "c", settings) as writer:
        for s in seqs:
            writer.add(s)
            for arr in (s.input_ids, s.topk_ids, s.topk_logprobs, s.tail, *s.hidden.values()):
                arr[...] = 0  # a caller reusing its buffers before the shard is written
    for e, got in zip(expected, CacheReader(tmp_path / "c")):
        assert_same(e, got)


def test_block_of_only_empty_responses(tmp_path):
    settings = synthetic_settings()
    rng = np.random.default_rng(2)
    seqs = [random_sequence(rng, i, settings, num_loss=0) for i in range(3)] + [random_sequence(rng, 3, settings)]
    reader = write_cache(tmp_path / "c", settings, seqs, max_block_sequences=3)
    for s, got in zip(seqs, reader):
        assert_same(s, got)


@pytest.mark.parametrize("mode", ["topk", "sample"])
@pytest.mark.parametrize("vocab", [255, 256, 65535, 65536, 151936])
def test_vocabulary_size_edges(tmp_path, vocab, mode):
    """Ids at both ends of the vocabulary, at the sizes where a byte plane more is needed."""
    settings = synthetic_settings(vocab_size=vocab, k=3, layers=(), widths=(), mode=mode)
    sampled = mode == "sample"
    lp = np.log(np.array([[0.5, 0.25, 0.125], [0.6, 0.3, 0.05]])).astype(np.float32)
    seq = CachedSequence(7, "t", np.array([0, vocab - 1, 5], np.int32), np.array([0, 1, 1], np.uint8),
                         np.array([[vocab - 1, 0, -1], [-1, -1, -1]] if sampled
                                  else [[vocab - 1, 0, 1], [2, vocab - 2, 0]]),
                         np.array([[-0.1, -3, -np.inf], [-np.inf] * 3], np.float32) if sampled else lp,
                         np.array([0.5, 1.0] if sampled else [0.125, 0.05], np.float32),
                         np.array([[3, 1, 0], [0, 0, 0]], np.int32) if sampled else None, {})
    reader = write_cache(tmp_path / "c", settings, [seq])
    assert_same(seq, reader[0])


def test_random_access_equals_iteration(tmp_path):
    settings = synthetic_settings()
    seqs = random_sequences(3, 60, settings)
    reader = write_cache(tmp_path / "c", settings, seqs, sequences_per_shard=13, block_bytes=4000)
    streamed = list(reader)
    order = np.random.default_rng(0).permutation(len(reader))
    for i in order:
        assert_same(streamed[i], reader[int(i)], hidden_ref=lambda x: x)
    assert_same(streamed[-1], reader[-1], hidden_ref=lambda x: x)
    with pytest.raises(IndexError):
        reader[len(reader)]
    spans = [reader.shard_sequences(j) for j in range(reader.num_shards)]
    assert [i for r in spans for i in r] == list(range(len(reader)))
    assert [len(r) for r in spans] == [13, 13, 13, 13, 8]
    blocks = reader.blocks()
    assert [i for r in blocks for i in r] == list(range(len(reader))) and len(blocks) > reader.num_shards
    shard, block, inside = reader.locate(40)
    assert reader.read_block(shard, block)[inside].record_index == streamed[40].record_index
    first = [r for r in blocks if 40 in r][0]
    assert [s.record_index for s in reader.read_block(shard, block)] == [streamed[i].record_index for i in first]
    clone = pickle.loads(pickle.dumps(reader))  # DataLoader workers get a copy
    assert_same(streamed[33], clone[33], hidden_ref=lambda x: x)
    # a reader that skips the hidden states decodes the same logits
    light = CacheReader(tmp_path / "c", layers=[])
    assert light[5].hidden == {} and np.array_equal(light[5].topk_ids, streamed[5].topk_ids)


def test_a_block_decodes_without_the_others(tmp_path):
    settings = synthetic_settings()
    seqs = random_sequences(4, 20, settings)
    root = tmp_path / "c"
    write_cache(root, settings, seqs, max_block_sequences=4)  # 5 blocks in one shard
    shard = root / "shards" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    for name, (a, b) in tensor_ranges(shard).items():
        if name.startswith("block.") and not name.startswith("block.00002."):
            data[a:b] = bytes(b - a)  # wipe every other block
    shard.write_bytes(bytes(data))
    reader = CacheReader(root)
    for i in range(8, 12):
        assert_same(seqs[i], reader[i])
    with pytest.raises(CacheError, match=r"shard-00000.*block 0"):
        reader[0]


INDEX = ("index.record_index", "index.length", "index.num_loss", "index.task", "index.block_start")


def test_every_shard_is_plain_safetensors(tmp_path):
    settings = synthetic_settings(mode="sample")
    write_cache(tmp_path / "c", settings, random_sequences(5, 30, settings), sequences_per_shard=10, max_block_sequences=4)
    shards = sorted((tmp_path / "c" / "shards").iterdir())
    assert [p.name for p in shards] == [f"shard-0000{j}.safetensors" for j in range(3)]
    for path in shards:
        with safe_open(str(path), "numpy") as f:
            keys = set(f.keys())
            meta = f.metadata()
            assert set(INDEX) <= keys
            starts = f.get_tensor("index.block_start")
            assert starts.tolist() == [0, 4, 8, 10]
            for b in range(3):
                for part in ("tokens", "topk", "hidden.1", "hidden.3"):
                    t = f.get_tensor(f"block.{b:05d}.{part}")
                    assert t.dtype == np.uint8 and t.ndim == 1
            assert keys == set(INDEX) | {f"block.{b:05d}.{part}" for b in range(3)   # the ks payload holds the counts
                                         for part in ("tokens", "topk", "hidden.1", "hidden.3")}
            assert meta["format_version"] == str(FORMAT_VERSION) and json.loads(meta["topk_codec"])["name"] == "ks"
            assert "counts_codec" not in meta and json.loads(meta["layers"]) == [1, 3]


# --- resume after a kill -------------------------------------------------------------------

KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from fastkd.cache_tools import CacheWriter, units as wmod
    root, where = sys.argv[1], sys.argv[2]
    sys.path.insert(0, sys.argv[3])
    from helpers import random_sequences, synthetic_settings
    settings = synthetic_settings()
    seqs = random_sequences(11, 40, settings)
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    calls = {"n": 0}
    if where == "before-manifest":   # shard and receipt in place, manifest not yet updated
        real = wmod.write_manifest
        def write_manifest(root_, m):
            calls["n"] += 1
            if calls["n"] == 4:  # 1: at open, 2 and 3: units 0 and 1 merged
                die()
            real(root_, m)
        wmod.write_manifest = write_manifest
    if where == "mid-shard":         # temp shard written, not renamed
        real_replace = os.replace
        def replace(a, b):
            if str(a).endswith(".tmp") and "shard-00002" in str(a):
                die()
            real_replace(a, b)
        os.replace = replace
    w = CacheWriter(root, settings, sequences_per_shard=8)
    for i, s in enumerate(seqs):
        if where == "after-adds" and i == 20:   # 2.5 shards
            die()
        w.add(s)
    w.close()
""")


@pytest.mark.parametrize("where", ["after-adds", "before-manifest", "mid-shard"])
def test_resume_after_sigkill(tmp_path, where):
    settings = synthetic_settings()
    seqs = random_sequences(11, 40, settings)
    root = tmp_path / "c"
    tests = str(Path(__file__).resolve().parents[1])   # where helpers.py is
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), where, tests], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (root / ".lock").exists()  # left behind by the dead process: taken over below
    partial = json.loads((root / "manifest.json").read_text())
    assert partial["complete"] is False and len(partial["shards"]) == 2
    orphan = root / "shards" / "shard-00002.safetensors"
    assert orphan.exists() == (where == "before-manifest")  # on disk but not in the manifest: rewritten
    temps = [p for p in (root / "shards").iterdir() if p.name.endswith(".tmp")]
    assert bool(temps) == (where == "mid-shard")  # an unfinished shard: discarded on resume
    with CacheWriter(root, settings, sequences_per_shard=8) as writer:
        assert writer.done == set(range(16))
        for s in seqs:
            if s.record_index not in writer.done:
                writer.add(s)
    assert not (root / ".lock").exists()
    assert not [p for p in (root / "shards").iterdir() if p.name.endswith(".tmp")]
    reader = CacheReader(root)
    clean = write_cache(tmp_path / "clean", settings, seqs, sequences_per_shard=8)
    assert sorted(reader.record_indices.tolist()) == list(range(40))  # none lost, none twice
    assert len(reader) == len(clean) == 40
    for a, b in zip(reader, clean):
        assert_same(b, a, hidden_ref=lambda x: x)
    assert reader.manifest["counts"] == clean.manifest["counts"]
    for a, b in zip(reader.manifest["shards"], clean.manifest["shards"]):  # same tensors, same metadata
        with safe_open(str(root / a["file"]), "numpy") as fa, safe_open(str(tmp_path / "clean" / b["file"]), "numpy") as fb:
            assert fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys())
            for name in fa.keys():
                np.testing.assert_array_equal(fa.get_tensor(name), fb.get_tensor(name))


def test_resume_in_process_and_duplicates_refused(tmp_path):
    settings = synthetic_settings()
    seqs = random_sequences(12, 10, settings)
    root = tmp_path / "c"
    writer = CacheWriter(root, settings, sequences_per_shard=4)
    for s in seqs[:6]:
        writer.add(s)
    writer.abort()  # as after an exception: finished shard stays, buffered two are dropped
    with CacheWriter(root, settings, sequences_per_shard=4) as writer:
        assert writer.done == {0, 1, 2, 3}
        with pytest.raises(CacheError, match="record 2: already in the cache"):
            writer.add(seqs[2])
        for s in seqs[4:]:
            writer.add(s)
        with pytest.raises(CacheError, match="record 5: already in the cache"):
            writer.add(seqs[5])
    assert CacheReader(root).record_indices.tolist() == list(range(10))
    with pytest.raises(CacheError, match="already holds 3 shard"):
        CacheWriter(root, settings, resume=False)


def test_context_manager_on_exception_keeps_finished_shards(tmp_path):
    settings = synthetic_settings()
    seqs = random_sequences(13, 7, settings)
    with pytest.raises(RuntimeError):
        with CacheWriter(tmp_path / "c", settings, sequences_per_shard=3) as writer:
            for s in seqs:
                writer.add(s)
            raise RuntimeError("teacher crashed")
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 6 and reader.manifest["complete"] is False
    assert not (tmp_path / "c" / ".lock").exists()


def test_settings_mismatch_names_the_key(tmp_path):
    settings = synthetic_settings()
    write_cache(tmp_path / "c", settings, random_sequences(14, 3, settings))
    changed = synthetic_settings()
    changed["teacher"]["config_sha256"] = "f" * 64
    with pytest.raises(CacheError, match=r"teacher\.config_sha256: cache has '0000.*', this run has 'ffff"):
        CacheWriter(tmp_path / "c", changed)
    with pytest.raises(CacheError, match=r"\bk: cache has 8, this run has 16"):
        CacheWriter(tmp_path / "c", synthetic_settings(k=16))
    with pytest.raises(CacheError, match=r"hidden_widths\[1\]: cache has 24, this run has 32"):
        CacheWriter(tmp_path / "c", synthetic_settings(widths=(16, 32)))
    # the same settings in another spelling (dict widths, tuple layers) resume fine
    same = synthetic_settings()
    same["hidden_widths"] = {1: 16, 3: 24}
    same["layers"] = (1, 3)
    CacheWriter(tmp_path / "c", same).close()
    assert not (tmp_path / "c" / ".lock").exists()


def test_lock_held_by_live_process_refused(tmp_path):
    settings = synthetic_settings()
    root = tmp_path / "c"
    root.mkdir()
    (root / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(CacheError, match=rf"another run \(pid {os.getppid()}\) is still writing"):
        CacheWriter(root, settings)
    (root / ".lock").unlink()
    first = CacheWriter(root, settings)
    with pytest.raises(CacheError, match="already has a writer open"):
        CacheWriter(root, settings)
    import gc
    gc.collect()  # the refused writer is gone: it must not have released the first one's lock
    assert (root / ".lock").exists()
    first.close()
    assert not (root / ".lock").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (root / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    CacheWriter(root, settings).close()  # stale lock taken over


def test_a_lock_naming_this_pid_that_this_process_never_took_is_stale(tmp_path):
    """A container restarted after a kill runs the same command with the same pid and host name: the lock its dead
    predecessor left names "us", and must be taken over, not refused as our own or as a live process's."""
    settings = synthetic_settings()
    root = tmp_path / "c"
    root.mkdir()
    (root / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    first = CacheWriter(root, settings)
    with pytest.raises(CacheError, match="already has a writer open"):   # the lock it took now is its own
        CacheWriter(root, settings)
    first.close()
    assert not (root / ".lock").exists()


@pytest.mark.parametrize("content, message", [
    (None, "no manifest.json"), ("", "manifest.json is empty"), ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"), ('{"format": "other"}', "field 'format'"),
])
def test_bad_manifest_is_a_clear_error(tmp_path, content, message):
    root = tmp_path / "c"
    root.mkdir()
    if content is not None:
        (root / "manifest.json").write_text(content)
    with pytest.raises(CacheError, match=message) as info:
        CacheReader(root)
    assert str(root) in str(info.value) and isinstance(info.value, user_errors())


def test_missing_folder_empty_cache_missing_shard(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        CacheReader(tmp_path / "nope")
    settings = synthetic_settings()
    CacheWriter(tmp_path / "empty", settings).close()
    with pytest.raises(CacheError, match="no finished shard"):
        CacheReader(tmp_path / "empty")
    write_cache(tmp_path / "c", settings, random_sequences(15, 5, settings), sequences_per_shard=2)
    (tmp_path / "c" / "shards" / "shard-00001.safetensors").unlink()
    with pytest.raises(CacheError, match=r"shard shards/shard-00001.safetensors \(shards\[1\].*missing"):
        CacheReader(tmp_path / "c")
    with pytest.raises(CacheError, match="shard-00001.safetensors.*missing"):
        CacheWriter(tmp_path / "c", settings)


def test_unknown_format_version_refused(tmp_path):
    settings = synthetic_settings()
    write_cache(tmp_path / "c", settings, random_sequences(16, 2, settings))
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(seal(m)))  # as a newer fastkd would write it
    with pytest.raises(CacheError, match="format version 99 is not known"):
        CacheReader(tmp_path / "c")


@pytest.mark.parametrize("version, sealed", [(1, True), (2, True), (1, False)])
def test_a_pre_1_0_cache_is_refused_in_one_line(tmp_path, version, sealed):
    """Formats 1 and 2 (fastkd before 1.0; format 1 also unsealed, as before digests) are never misread:
    every reader and the writer refuse them with one line saying what to do."""
    from fastkd.cache_tools.verify import verify_cache

    settings = synthetic_settings()
    root = write_cache(tmp_path / "c", settings, random_sequences(16, 3, settings)).root
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["format_version"] = version
    if not sealed:
        del m["self_sha256"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(seal(m) if sealed else m))
    want = f"cache {root}: made by a pre-1.0 fastkd, format {version}; re-create it"
    for open_it in (CacheReader, verify_cache, lambda r: CacheWriter(r, settings)):
        with pytest.raises(CacheError) as err:
            open_it(tmp_path / "c")
        assert str(err.value).startswith(want) and "\n" not in str(err.value)
    assert not (tmp_path / "c" / ".lock").exists()


def test_add_checks_shapes_and_ids(tmp_path):
    settings = synthetic_settings(vocab_size=50)
    rng = np.random.default_rng(17)
    with CacheWriter(tmp_path / "c", settings) as writer:
        s = random_sequence(rng, 0, settings, length=6, num_loss=3)
        s.topk_ids = s.topk_ids[:2]
        with pytest.raises(CacheError, match=r"record 0: field topk_ids has shape \(2, 8\), expected \(3, 8\)"):
            writer.add(s)
        s = random_sequence(rng, 1, settings, length=6, num_loss=3)
        s.topk_ids[0, 0] = 50
        with pytest.raises(CacheError, match=r"record 1: field topk_ids has ids outside \[0, 50\)"):
            writer.add(s)
        s = random_sequence(rng, 2, settings, length=6, num_loss=3)
        del s.hidden[3]
        with pytest.raises(CacheError, match="record 2: field hidden has layers"):
            writer.add(s)
    with pytest.raises(CacheError, match="tokenizer.vocab_size"):
        CacheWriter(tmp_path / "d", {"k": 4})
    with pytest.raises(CacheError, match="unknown logits codec 'nope'"):
        CacheWriter(tmp_path / "d", synthetic_settings(codecs={"topk": "nope"}))


def test_the_codec_registry_is_the_format_s_own(tmp_path):
    """One codec of each kind, written out: any other name (the pre-1.0 ones included) is refused, naming the
    known ones."""
    for codecs, message in [({"topk": "kt2-zstd"}, r"unknown logits codec 'kt2-zstd' \(known: ks, kt\)"),
                            ({"topk": "raw-zstd"}, r"unknown logits codec 'raw-zstd' \(known: ks, kt\)"),
                            ({"hidden": "bf16-zstd"}, r"unknown hidden codec 'bf16-zstd' \(known: kh\)"),
                            ({"topk": "kt:precision=tiny"}, "unknown precision 'tiny'; choose fine, small, exact"),
                            ({"hidden": "kh:method=int4"}, "unknown method 'int4'")]:
        with pytest.raises(CacheError, match=message):
            CacheWriter(tmp_path / "d", synthetic_settings(codecs=codecs))
    assert not (tmp_path / "d").exists()


def _spec_read(root):
    """A reader written from docs/cache-format.md and docs/codec.md alone: json, struct, raw bytes and zstandard
    only (kt at precision exact, kh with method bf16)."""
    import hashlib
    import struct

    import xxhash
    import zstandard

    def frames(payload, offset, groups):
        """[planes u8] per group, [length u32] per frame, the frames: each group's planes joined as uint32."""
        counts = list(payload[offset: offset + groups])
        lengths = struct.unpack_from(f"<{sum(counts)}I", payload, offset + groups)
        pos, out = offset + groups + 4 * sum(counts), []
        for c in counts:
            planes = []
            for length in lengths[len(sum(out, [])): len(sum(out, [])) + c]:
                planes.append(zstandard.ZstdDecompressor().decompress(payload[pos: pos + length]))
                pos += length
            out.append(planes)
        return [sum((np.frombuffer(p, np.uint8).astype(np.uint32) << (8 * b) for b, p in enumerate(g)),
                    np.zeros(len(g[0]) if g else 0, np.uint32)) for g in out]

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == "fastkd-teacher-cache" and manifest["format_version"] == 3
    assert manifest["codecs"]["topk"]["params"]["precision"] == "exact"
    body = {key: v for key, v in manifest.items() if key != "self_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert hashlib.sha256(canonical).hexdigest() == manifest["self_sha256"]
    k = manifest["k"]
    out = []
    for entry in manifest["shards"]:
        raw = (root / entry["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry["sha256"]
        hlen = int.from_bytes(raw[:8], "little")
        assert hashlib.sha256(raw[: 8 + hlen]).hexdigest() == entry["header_sha256"]
        header = json.loads(raw[8: 8 + hlen])
        meta = header.pop("__metadata__")
        assert meta["digest"] == "xxh3-128"
        digests = json.loads(meta["digests"])
        assert set(digests) == set(header)
        for name, spec in header.items():
            a, b = spec["data_offsets"]
            assert xxhash.xxh3_128_hexdigest(raw[8 + hlen + a: 8 + hlen + b]) == digests[name], name
        layers, widths = json.loads(meta["layers"]), json.loads(meta["hidden_widths"])

        def tensor(name, dtype):
            a, b = header[name]["data_offsets"]
            return np.frombuffer(raw[8 + hlen + a: 8 + hlen + b], dtype)

        rec, length = tensor("index.record_index", "<i8"), tensor("index.length", "<i4")
        nloss, starts = tensor("index.num_loss", "<i4"), tensor("index.block_start", "<i8")
        tasks = json.loads(meta["tasks"])
        for b in range(len(starts) - 1):
            lo, hi = starts[b], starts[b + 1]
            T, N = int(length[lo:hi].sum()), int(nloss[lo:hi].sum())
            part = lambda name: tensor(f"block.{b:05d}.{name}", np.uint8).tobytes()  # noqa: E731
            ids_all, mask_all = frames(part("tokens"), 0, 2)    # byte-plane frames without a header
            assert len(ids_all) == len(mask_all) == T
            ids_all, mask_all = ids_all.view(np.int32), mask_all.astype(np.uint8)
            tid, lp, tail, hid = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32), {}
            if N:
                payload = part("topk")                       # KT version 1, flag 4: float32 bits in id order
                magic, version, layout, flags, n, kk = struct.unpack_from("<2sBBBxII", payload)
                assert (magic, version, layout, flags, n, kk) == (b"KT", 1, 1, 4, N, k)
                gaps, bits, tail_bits = frames(payload, 26, 3)
                tid = (np.cumsum(gaps.reshape(N, k).astype(np.int64), axis=1) + np.arange(k)).astype(np.int64)
                lp, tail = bits.view(np.float32).reshape(N, k), tail_bits.view(np.float32)
            for layer, d in zip(layers, widths):
                if N:
                    payload = part(f"hidden.{layer}")         # KH version 1, method 0 (bf16): bits << 16
                    assert struct.unpack_from("<2sBBII", payload) == (b"KH", 1, 0, N, d)
                    hid[layer] = (frames(payload, 16, 2)[1] << 16).view(np.float32).reshape(N, d)
                else:
                    hid[layer] = np.zeros((0, d), np.float32)
            t = r = 0
            for s in range(lo, hi):
                L, n = int(length[s]), int(nloss[s])
                out.append(CachedSequence(int(rec[s]), tasks[tensor("index.task", "<i4")[s]], ids_all[t: t + L],
                                          mask_all[t: t + L], tid[r: r + n], lp[r: r + n], tail[r: r + n], None,
                                          {layer: h[r: r + n] for layer, h in hid.items()}))
                t, r = t + L, r + n
    return out


def test_a_reader_written_from_the_spec_agrees(tmp_path):
    settings = synthetic_settings(vocab_size=70000)
    seqs = random_sequences(20, 30, settings)
    seqs.append(random_sequence(np.random.default_rng(0), 99, settings, length=4, num_loss=0))
    write_cache(tmp_path / "c", settings, seqs, sequences_per_shard=12, max_block_sequences=5)
    got = _spec_read(tmp_path / "c")
    assert len(got) == len(seqs)
    for s, g in zip(seqs, got):
        assert_same(s, g)


def test_codec_failure_names_shard_and_record(tmp_path):
    settings = synthetic_settings()                          # kh with method bf16: a value past bf16's range fails
    seqs = random_sequences(22, 6, settings)
    target = next(s for s in seqs if len(s.tail) > 0 and s.record_index > 0)
    target.hidden[3][0, 0] = 3.4e38                          # finite in float32, so the writer's checks pass it
    writer = CacheWriter(tmp_path / "c", settings, sequences_per_shard=6)
    with pytest.raises(CacheError, match=rf"shard shards/shard-00000.safetensors: cannot encode record "
                                         rf"{target.record_index}: CodecError: hidden codec: a value overflows bf16"):
        for s in seqs:
            writer.add(s)
    writer.abort()
    assert not list((tmp_path / "c" / "shards").iterdir())


def test_the_default_codecs_round_trip_within_their_bounds(tmp_path):
    """Nothing pinned: kt at precision fine and kh int8 (blocks of 128), the defaults of docs/codec.md."""
    settings = synthetic_settings(codecs={})
    seqs = random_sequences(23, 12, settings)
    reader = write_cache(tmp_path / "c", settings, seqs, max_block_sequences=5)
    assert reader.manifest["codecs"] == {"topk": {"name": "kt", "params": {"precision": "fine"}},
                                         "hidden": {"name": "kh", "params": {"method": "int8", "block": 128}}}
    for s, got in zip(seqs, reader):
        np.testing.assert_array_equal(got.input_ids, s.input_ids)
        np.testing.assert_array_equal(np.sort(got.topk_ids, 1), np.sort(s.topk_ids, 1))
        np.testing.assert_allclose(got.tail, s.tail, rtol=0, atol=1e-6)
        for layer, x in s.hidden.items():
            np.testing.assert_allclose(got.hidden[layer], x, atol=np.abs(x).max(initial=0) / 100 + 1e-6)


def test_shards_without_manifest_are_never_deleted(tmp_path):
    settings = synthetic_settings()
    write_cache(tmp_path / "c", settings, random_sequences(24, 4, settings))
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(CacheError, match="holds 1 shard or unit file.*no manifest.json"):
        CacheWriter(tmp_path / "c", settings)
    assert (tmp_path / "c" / "shards" / "shard-00000.safetensors").exists()


def test_codec_spellings_resolve_to_one_setting(tmp_path):
    from fastkd.cache_tools import normalize_codec

    assert normalize_codec(None) == {"name": "kt", "params": {"precision": "fine"}}
    assert normalize_codec(None, "topk", "sample") == {"name": "ks", "params": {}}
    assert normalize_codec("kt:precision=small") == {"name": "kt", "params": {"precision": "small"}}
    assert normalize_codec("kh:method=fp8,block=64", "hidden") == \
        {"name": "kh", "params": {"method": "fp8", "block": 64}}
    assert normalize_codec({"name": "kh", "params": {"method": "bf16"}}, "hidden") == \
        {"name": "kh", "params": {"method": "bf16", "block": 128}}
    with pytest.raises(ValueError, match="name:key=value"):
        normalize_codec("kt:level", "topk")
    # flat keys as the cache stage passes them end up in `codecs` (and resume compares them)
    settings = synthetic_settings(hidden_codec="kh:method=fp8", logits_codec="kt:precision=exact,level=1", codecs={})
    seqs = random_sequences(26, 3, settings)
    reader = write_cache(tmp_path / "c", settings, seqs)
    assert reader.manifest["codecs"] == {"topk": {"name": "kt", "params": {"precision": "exact", "level": 1}},
                                         "hidden": {"name": "kh", "params": {"method": "fp8", "block": 128}}}
    assert "hidden_codec" not in reader.manifest and "logits_codec" not in reader.manifest
    for s, got in zip(seqs, reader):
        assert_same(s, got, hidden_ref=None)
        for layer, x in s.hidden.items() if len(s.tail) else ():
            assert (np.abs(got.hidden[layer].astype(np.float64) - x) <= hidden_error_bound(x, "fp8", 128)).all()
    with pytest.raises(CacheError, match=r"codecs\.hidden\.params\.method: cache has 'fp8', this run has 'bf16'"):
        CacheWriter(tmp_path / "c", synthetic_settings())
    with pytest.raises(CacheError, match="contradicts"):
        CacheWriter(tmp_path / "d", synthetic_settings(hidden_codec="kh:method=fp8", codecs={"hidden": "kh"}))
