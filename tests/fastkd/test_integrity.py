"""Integrity: no byte of a cache or checkpoint is used before its digest is checked, hostile files
run no code and allocate nothing absurd, and every refusal names the file, shard, block or field."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fastkd.cache_tools import CacheError, CacheReader, CacheWriter, CorruptCacheError
from fastkd.cache_tools.integrity import digest_bytes, seal
from fastkd.errors import UserError
from fastkd.loader import CacheSource, PlanMaker, make_loader
from helpers import random_sequence, synthetic_settings, tensor_ranges, write_cache


def flip(path: Path, offset: int, mask: int = 0x20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def read_everything(root: Path, num_workers: int = 0) -> int:
    """Stream every sequence through the training loader; the number of sequences seen."""
    source = CacheSource(root)
    plans = PlanMaker(source.lengths, source.shards, 4, seed=0)
    return sum(len(b.record_indices) for _, _, micro in make_loader(source, plans, 0, epochs=1, num_workers=num_workers)
               for b in micro)


@pytest.fixture
def cache(tmp_path):
    return write_cache(tmp_path / "cache")


# ----------------------------------------------------------------------------- shard bytes

def test_a_clean_cache_reads_whole(cache):
    assert read_everything(cache) == 24


def test_every_block_tensor_flip_stops_the_loader_naming_shard_and_block(cache, tmp_path):
    shard = "shards/shard-00001.safetensors"
    ranges = tensor_ranges(cache / shard)
    blocks = sorted(name for name in ranges if name.startswith("block."))
    assert len(blocks) == 9  # 3 blocks x (tokens, topk, hidden.1)
    rng = np.random.default_rng(0)
    for name in blocks:
        copy = tmp_path / name
        shutil.copytree(cache, copy)
        lo, hi = ranges[name]
        flip(copy / shard, int(rng.integers(lo, hi)))
        with pytest.raises(CorruptCacheError) as err:
            read_everything(copy)
        block = int(name.split(".")[1])
        assert f"shard {shard} block {block}" in str(err.value) and name in str(err.value), str(err.value)
        assert (err.value.shard, err.value.block) == (shard, block)


def test_flips_in_index_and_header_are_refused_at_open(cache, tmp_path):
    shard = "shards/shard-00000.safetensors"
    ranges = tensor_ranges(cache / shard)
    header_end = min(lo for lo, _ in ranges.values())
    targets = [("header length", 2), ("header json", 40), ("metadata", header_end - 30)]
    targets += [(name, (lo + hi) // 2) for name, (lo, hi) in ranges.items() if name.startswith("index.")]
    for what, offset in targets:
        copy = tmp_path / what.replace(" ", "_")
        shutil.copytree(cache, copy)
        flip(copy / shard, offset)
        with pytest.raises(CacheError, match=f"shard {shard}") as err:
            CacheReader(copy)
        assert "Traceback" not in str(err.value)


def test_truncated_or_grown_shard_is_refused(cache):
    path = cache / "shards" / "shard-00001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(CorruptCacheError, match="manifest.json says"):
        CacheReader(cache)
    path.write_bytes(data + b"\0")
    with pytest.raises(CorruptCacheError, match="manifest.json says"):
        CacheReader(cache)


def test_worker_processes_report_the_same_clear_error(cache):
    path = cache / "shards" / "shard-00001.safetensors"
    lo, hi = tensor_ranges(path)["block.00001.topk"]
    flip(path, (lo + hi) // 2)
    with pytest.raises(CorruptCacheError) as err:
        read_everything(cache, num_workers=2)
    assert "block 1" in str(err.value) and "Traceback" not in str(err.value) and "DataLoader worker" not in str(err.value)


def test_digests_catch_what_the_codecs_alone_let_through(tmp_path):
    """With the default codecs, some flips in a block decode silently to other values; with the
    digests on (the default) every one of them is refused, and verify=False really skips them."""
    root = tmp_path / "c"
    settings = synthetic_settings(vocab_size=300, k=8, layers=(1,), widths=(16,), codecs={})  # the format's defaults
    rng = np.random.default_rng(5)
    with CacheWriter(root, settings, sequences_per_shard=8, max_block_sequences=8) as writer:
        for i in range(8):
            writer.add(random_sequence(rng, i, settings, length=12, num_loss=8))
    path = root / "shards" / "shard-00000.safetensors"
    original = path.read_bytes()
    clean = [s.hidden[1].copy() for s in CacheReader(root)]
    silent = 0
    lo, hi = tensor_ranges(path)["block.00000.hidden.1"]
    for offset in range(lo, hi, max(1, (hi - lo) // 60)):
        flip(path, offset, 0x01)
        with pytest.raises(CorruptCacheError, match="block 0"):
            CacheReader(root)[0]
        try:
            got = [s.hidden[1] for s in CacheReader(root, verify=False)]
            silent += any(not np.array_equal(a, b) for a, b in zip(got, clean))
        except CacheError:
            pass
        path.write_bytes(original)
    assert silent > 0, "no flip got past the codecs: this test would not show the digests' worth"


# ----------------------------------------------------------------------------- digests are required

def test_a_manifest_or_shard_without_its_digest_is_refused(cache):
    """Every cache carries its seal and each shard its header digest: one missing is refused before any read."""
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    unsealed = {key: value for key, value in manifest.items() if key != "self_sha256"}
    path.write_text(json.dumps(unsealed))
    with pytest.raises(CacheError, match=r"manifest.json field 'self_sha256' is missing"):
        CacheReader(cache)
    del manifest["shards"][1]["header_sha256"]
    path.write_text(json.dumps(seal({key: value for key, value in manifest.items() if key != "self_sha256"})))
    with pytest.raises(CacheError, match=r"manifest.json field 'shards\[1\].header_sha256' is missing"):
        CacheReader(cache)


# ----------------------------------------------------------------------------- manifest

def test_every_manifest_byte_flip_is_an_error_or_changes_nothing(cache):
    path = cache / "manifest.json"
    original = path.read_bytes()
    content = json.loads(original)
    outcomes = {"error": 0, "same": 0}
    for offset in range(len(original)):
        data = bytearray(original)
        data[offset] ^= 0x04
        path.write_bytes(bytes(data))
        try:
            reader = CacheReader(cache)
        except CacheError as err:
            assert "manifest.json" in str(err) or "shard" in str(err)
            outcomes["error"] += 1
            continue
        assert reader.manifest == content, f"byte {offset}: a changed manifest was accepted"
        outcomes["same"] += 1
    path.write_bytes(original)
    assert outcomes["error"] > 0.9 * len(original)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["shards"][0].update(file="shards/../../etc/passwd"), "shards[0].file"),
    (lambda m: m["shards"][0].update(file="/etc/passwd"), "shards[0].file"),
    (lambda m: m["shards"][1].update(file=m["shards"][0]["file"]), "shards[1].file"),
    (lambda m: m["shards"][0].update(num_sequences=10 ** 15), "shards[0].num_sequences"),
    (lambda m: m["shards"][0].update(bytes=-5), "shards[0].bytes"),
    (lambda m: m["shards"][0].update(sha256="z" * 64), "shards[0].sha256"),
    (lambda m: m.update(k=10 ** 12), "k"),
    (lambda m: m.update(k="64"), "k"),
    (lambda m: m.update(hidden_widths=[2 ** 40]), "hidden_widths"),
    (lambda m: m.update(layers=[1, 1]), "layers"),
    (lambda m: m["tokenizer"].update(vocab_size=True), "tokenizer.vocab_size"),
    (lambda m: m.update(mode="dense"), "mode"),
    (lambda m: m.update(shards={"a": 1}), "shards"),
])
def test_hostile_manifest_values_are_refused_naming_the_field(cache, edit, field):
    """Values a hostile or buggy writer could seal: refused before any file is opened."""
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(seal(manifest)))
    with pytest.raises(CacheError, match=f"field '{field.replace('[', '.').replace(']', '')}'|field {field!r}"
                                         f"|{field.split('.')[0].replace('[', '.')}") as err:
        CacheReader(cache)
    assert "manifest.json" in str(err.value)


def test_manifest_and_shard_layout_must_agree(cache):
    path = cache / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["k"] = 4
    path.write_text(json.dumps(seal(manifest)))
    with pytest.raises(CorruptCacheError, match="metadata says k 8, manifest.json field 'k' says 4"):
        CacheReader(cache)


def test_hostile_index_with_valid_digests_is_refused_without_allocating(cache):
    """A shard whose digests are right but whose index claims absurd sizes (a hostile writer)."""
    from safetensors.numpy import save_file

    entry_no, name = 0, "shards/shard-00000.safetensors"
    path = cache / name
    with safe_open(str(path), "numpy") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    tensors["index.length"] = tensors["index.length"].copy()
    tensors["index.num_loss"] = tensors["index.num_loss"].copy()
    tensors["index.length"][0] = tensors["index.num_loss"][0] = 2 ** 31 - 1
    meta["digests"] = json.dumps({k: digest_bytes(v.tobytes(), "xxh3-128") for k, v in tensors.items()})
    save_file(tensors, str(path), metadata=meta)
    manifest = json.loads((cache / "manifest.json").read_text())
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    manifest["shards"][entry_no].update(bytes=len(data), sha256=digest_bytes(data), header_sha256=digest_bytes(data[:8 + size]))
    (cache / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(CorruptCacheError, match="would decode to"):
        CacheReader(cache)


# ----------------------------------------------------------------------------- the teacher's values

def test_nan_teacher_values_are_never_written(tmp_path):
    settings = synthetic_settings(vocab_size=300, k=8, layers=(1,), widths=(16,))
    rng = np.random.default_rng(3)
    good = random_sequence(rng, 0, settings, length=10, num_loss=5)
    with CacheWriter(tmp_path / "c", settings, sequences_per_shard=1) as writer:
        writer.add(good)
        for field, value in (("topk_logprobs", np.nan), ("tail", np.nan), ("tail", 1.5)):
            bad = random_sequence(rng, 1, settings, length=10, num_loss=5)
            getattr(bad, field)[0] = value
            with pytest.raises(CacheError, match=f"record 1: field {field}"):
                writer.add(bad)
        bad = random_sequence(rng, 1, settings, length=10, num_loss=5)
        bad.hidden[1][2, 3] = np.inf
        with pytest.raises(CacheError, match=r"record 1: field hidden\[1\]"):
            writer.add(bad)
    reader = CacheReader(tmp_path / "c")
    assert len(reader) == 1 and reader[0].record_index == 0   # what was written before stays


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_state_round_trips_every_kind_of_value(tmp_path):
    from fastkd.checkpoint import load_checkpoint, save_checkpoint

    weight = torch.randn(4, 3)
    state = {"model": {"embed.weight": weight, "head.weight": weight, "bias": torch.zeros(3, dtype=torch.bfloat16)},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}},
                           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0], "foreach": None}]},
             "rng": {"python": (3, tuple(range(5)), None), "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 2, 0, 0.0)},
             "before": {"kl": float("nan"), "ce": float("inf")}, "step": 7, "epoch": 0, "position": 3}
    save_checkpoint(tmp_path, state)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["checkpoint.json", "progress.json",
                                                                           "state.safetensors"]
    back = load_checkpoint(tmp_path)
    assert torch.equal(back["model"]["embed.weight"], weight) and back["model"]["bias"].dtype == torch.bfloat16
    assert set(back["optimizer"]["state"]) == {0} and back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["rng"]["python"] == (3, (0, 1, 2, 3, 4), None)
    assert back["rng"]["numpy"][1].dtype == np.uint32 and back["rng"]["numpy"][1].tolist() == [0, 1, 2, 3]
    assert np.isnan(back["before"]["kl"]) and back["before"]["ce"] == float("inf") and back["step"] == 7
    with pytest.raises(TypeError, match="state.model.fn: a builtin_function_or_method cannot be stored"):
        save_checkpoint(tmp_path / "bad", {"model": {"fn": len}})


def test_corrupt_checkpoint_files_are_refused(tmp_path):
    from fastkd.checkpoint import load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, {"model": {"w": torch.randn(64, 64)}, "step": 1})
    folder = tmp_path / "checkpoint"
    tensors, index = (folder / "state.safetensors").read_bytes(), (folder / "checkpoint.json").read_bytes()
    flip(folder / "state.safetensors", len(tensors) - 100)
    with pytest.raises(UserError, match="state.safetensors fails its sha256 check"):
        load_checkpoint(tmp_path)
    (folder / "state.safetensors").write_bytes(tensors)
    (folder / "checkpoint.json").write_bytes(index.replace(b'"step": 1', b'"step": 2'))
    with pytest.raises(UserError, match="checkpoint.json does not match its digest"):
        load_checkpoint(tmp_path)


class _Payload:
    """Unpickling this writes a marker file: the code a hostile checkpoint would run."""

    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_pickle_in_an_old_checkpoint_never_runs(tmp_path):
    from fastkd.checkpoint import load_checkpoint

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    torch.save({"model": {}, "step": 1, "rng": payload}, folder / "state.pt")
    with pytest.raises(UserError, match="never unpickles"):
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned").exists()
    # an old checkpoint of plain data is refused the same way (a pickle is never loaded: fastkd/checkpoint.py)
    torch.save({"model": {"w": torch.ones(2)}, "rng": {"numpy": np.random.get_state()}, "step": 4}, folder / "state.pt")
    with pytest.raises(UserError, match="pre-release fastkd, which fastkd never unpickles"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- fastkd train


def _train(**overrides):
    from fastkd.train_config import TrainConfig
    from fastkd.trainer import train

    torch.set_num_threads(1)
    return train(TrainConfig.make(overrides={"progress": False, "tensorboard": False, "batch_size": 4, **overrides}))


def test_train_stops_on_a_corrupt_block_or_skips_it_when_asked(tmp_path, tiny_tokenizer, student, capsys):
    cache = write_cache(tmp_path / "cache", tiny_tokenizer)
    path = cache / "shards" / "shard-00001.safetensors"
    lo, hi = tensor_ranges(path)["block.00002.topk"]
    flip(path, (lo + hi) // 2)
    for workers in (0, 2):
        with pytest.raises(CorruptCacheError, match="shard shards/shard-00001.safetensors block 2"):
            _train(cache=str(cache), student=str(student), out=str(tmp_path / f"run{workers}"), epochs=1,
                   num_workers=workers)
    result = _train(cache=str(cache), student=str(student), out=str(tmp_path / "skip"), epochs=1,
                    skip_corrupt_blocks=True)
    err = capsys.readouterr().err
    assert "1 of 6 blocks" in err and "shard shards/shard-00001.safetensors block 2" in err
    reader = CacheReader(cache, verify=False)
    kept = [i for i in range(len(reader)) if not 20 <= i < 24]  # shard 1 holds 12..23, its block 2 is 20..23
    assert result.tokens == sum(int(reader[i].loss_mask[1:].sum()) for i in kept)


def test_student_with_a_smaller_vocabulary_is_refused_before_loading(tmp_path, tiny_tokenizer):
    from fastkd.tiny import save_tiny

    cache = write_cache(tmp_path / "cache", tiny_tokenizer)
    small = save_tiny(tmp_path / "small", "llama", tokenizer=tiny_tokenizer, hidden=32, layers=1, heads=4, kv_heads=2)
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = len(tiny_tokenizer) - 100
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=f"vocab_size {len(tiny_tokenizer) - 100}, fewer than the {len(tiny_tokenizer)}"):
        _train(cache=str(cache), student=str(small), out=str(tmp_path / "run"), max_steps=1)
