"""`fastkd cache inspect | verify | stats` against hand-computed values and corrupted caches."""

import hashlib
import json
import math

import numpy as np
import pytest
from safetensors import safe_open

from fastkd.cache_tools import CachedSequence, CacheWriter
from fastkd.cache_tools.stats import entropy_bounds
from fastkd.cli import main
from helpers import random_sequences, synthetic_settings, tensor_ranges


def run_cli(capsys, *argv):
    code = main(["cache", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cache(tmp_path):
    settings = synthetic_settings(mode="sample")
    root = tmp_path / "cache"
    with CacheWriter(root, settings, sequences_per_shard=10, max_block_sequences=3) as w:
        for s in random_sequences(21, 25, settings):
            w.add(s)
        w.close(summary={"teacher_seconds": 1.5})
    return root


def test_inspect_numbers_match_the_files(capsys, cache):
    code, out, _ = run_cli(capsys, "inspect", cache, "--json")
    assert code == 0
    s = json.loads(out)
    shards = sorted((cache / "shards").iterdir())
    sizes = {"topk": 0, "hidden": 0, "tokens": 0}   # mode sample: the ks payload in `topk` holds the counts
    positions = sequences = 0
    for path in shards:  # independent count: tensor sizes straight from the files
        with safe_open(str(path), "numpy") as f:
            for name in f.keys():
                if name.startswith("block."):
                    sizes[name.split(".")[2]] += f.get_tensor(name).nbytes
            positions += int(f.get_tensor("index.num_loss").sum())
            sequences += len(f.get_tensor("index.record_index"))
    total = sum(p.stat().st_size for p in shards)
    assert (s["shards"], s["sequences"], s["loss_positions"], s["bytes"]) == (3, 25, positions, total)
    assert sequences == 25
    b = s["bytes_per_loss_position"]
    assert b["total"] == pytest.approx(total / positions)
    assert b["logits"] == pytest.approx(sizes["topk"] / positions)
    assert b["hidden"] == pytest.approx(sizes["hidden"] / positions)
    assert sum(b["hidden_by_layer"].values()) == pytest.approx(b["hidden"])
    assert b["logits"] + b["hidden"] + b["tokens"] + b["index_and_headers"] == pytest.approx(b["total"])
    assert s["teacher"]["path"] == "synthetic-teacher" and s["template"] == {"chat": False, "cot": True}
    assert s["mode"] == "sample" and s["summary"] == {"teacher_seconds": 1.5} and s["complete"] is True
    code, out, _ = run_cli(capsys, "inspect", cache)
    assert code == 0 and "synthetic-teacher" in out and f"{positions:,}" in out and "logits" in out


def test_verify_ok_then_flipped_byte_names_shard_and_block(capsys, cache):
    code, out, _ = run_cli(capsys, "verify", cache, "--no-progress")
    assert code == 0 and out.startswith("OK: 3 shards, 10 blocks, 25 sequences")
    shard = cache / "shards" / "shard-00001.safetensors"
    a, b = tensor_ranges(shard)["block.00002.topk"]
    data = bytearray(shard.read_bytes())
    data[(a + b) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "verify", cache, "--no-progress")
    assert code == 1
    assert "shard shards/shard-00001.safetensors: sha256" in out
    assert "shard shards/shard-00001.safetensors block 2: tensor block.00002.topk fails its xxh3-128 check" in out
    assert "shard-00000" not in out and "shard-00002" not in out
    code, out, _ = run_cli(capsys, "verify", cache, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert {(p["shard"], p["block"]) for p in report["problems"]} == {("shards/shard-00001.safetensors", None),
                                                                     ("shards/shard-00001.safetensors", 2)}


def test_verify_detects_truncation_and_header_damage(capsys, cache):
    shard = cache / "shards" / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    head = cache / "shards" / "shard-00000.safetensors"
    data = bytearray(head.read_bytes())
    data[9] = ord("!")  # inside the JSON header
    head.write_bytes(bytes(data))
    code, out, _ = run_cli(capsys, "verify", cache, "--no-progress")
    assert code == 1
    assert "shard shards/shard-00002.safetensors: has" in out and "manifest.json says" in out
    assert "shard shards/shard-00000.safetensors: header fails its sha256 check" in out


def test_verify_checks_the_saved_teacher_tokenizer_against_its_digests(capsys, tmp_path):
    """teacher_tokenizer/ files (their sha256 in the manifest) are verified too: an edited or missing one is named."""
    files = {"tokenizer.json": b'{"pad": "<|pad|>"}', "tokenizer_config.json": b"{}"}
    settings = synthetic_settings(teacher_tokenizer={"dir": "teacher_tokenizer", "files": {
        name: hashlib.sha256(data).hexdigest() for name, data in files.items()}})
    root = tmp_path / "cache"
    (root / "teacher_tokenizer").mkdir(parents=True)
    for name, data in files.items():
        (root / "teacher_tokenizer" / name).write_bytes(data)
    with CacheWriter(root, settings, sequences_per_shard=10) as w:
        for s in random_sequences(2, 3, settings):
            w.add(s)
    code, out, _ = run_cli(capsys, "verify", root, "--no-progress")
    assert code == 0 and out.startswith("OK: 1 shards")
    (root / "teacher_tokenizer" / "tokenizer.json").write_bytes(b'{"pad": "<|pod|>"}')
    (root / "teacher_tokenizer" / "tokenizer_config.json").unlink()
    code, out, _ = run_cli(capsys, "verify", root, "--json")
    assert code == 1
    found = {p["shard"]: p["message"] for p in json.loads(out)["problems"]}
    assert set(found) == {"teacher_tokenizer/tokenizer.json", "teacher_tokenizer/tokenizer_config.json"}
    assert "differs from manifest.json's" in found["teacher_tokenizer/tokenizer.json"]
    assert found["teacher_tokenizer/tokenizer_config.json"].startswith("file is missing")


def test_missing_cache_is_one_line_error(capsys, tmp_path):
    for command in ("inspect", "verify", "stats"):
        code, out, err = run_cli(capsys, command, tmp_path / "nothing")
        assert code == 2 and "does not exist" in err and "Traceback" not in err


def _row(probs, k):
    p = np.array(probs, np.float64)
    return np.log(p).astype(np.float32), np.float32(1 - p.sum())


def test_stats_match_hand_computed_values(capsys, tmp_path):
    V, k = 10, 2
    rows = [[0.5, 0.25], [0.9, 0.05], [0.3, 0.3]]
    settings = synthetic_settings(vocab_size=V, k=k, layers=(), widths=())
    seq = CachedSequence(0, "t", np.arange(4, dtype=np.int32), np.array([0, 1, 1, 1], np.uint8),
                         np.array([[1, 2], [3, 4], [5, 6]]), np.log(np.array(rows)).astype(np.float32),
                         np.array([0.25, 0.05, 0.4], np.float32), None, {})
    with CacheWriter(tmp_path / "c", settings) as w:
        w.add(seq)
    code, out, _ = run_cli(capsys, "stats", tmp_path / "c", "--json")
    assert code == 0
    s = json.loads(out)
    ln = math.log
    known = [-(0.5 * ln(0.5) + 0.25 * ln(0.25)), -(0.9 * ln(0.9) + 0.05 * ln(0.05)), -2 * 0.3 * ln(0.3)]
    # least tail entropy: as many tokens as possible at the smallest stored probability, then the rest
    lower = [known[0] + 0.25 * ln(4), known[1] + 0.05 * ln(20), known[2] + 0.3 * ln(1 / 0.3) + 0.1 * ln(10)]
    # most: the tail spread evenly over the 8 tokens not stored
    upper = [known[0] + 0.25 * ln(8 / 0.25), known[1] + 0.05 * ln(8 / 0.05), known[2] + 0.4 * ln(8 / 0.4)]
    m = s["metrics"]
    assert (s["sequences"], s["loss_positions"]) == (1, 3)
    for name, values in [("tail_mass", [0.25, 0.05, 0.4]), ("top1_prob", [0.5, 0.9, 0.3]),
                         ("entropy_lower", lower), ("entropy_upper", upper),
                         ("entropy_gap", [u - l for u, l in zip(upper, lower)])]:
        assert m[name]["mean"] == pytest.approx(np.mean(values), abs=2e-3), name
        assert m[name]["quantiles"]["0.0"] == pytest.approx(min(values), abs=2e-3), name
        assert m[name]["quantiles"]["0.5"] == pytest.approx(np.median(values), abs=2e-3), name
        assert m[name]["quantiles"]["1.0"] == pytest.approx(max(values), abs=2e-3), name
    code, out, _ = run_cli(capsys, "stats", tmp_path / "c", "--no-progress")
    assert code == 0 and "entropy_lower" in out and "q0.5" in out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_bounds_bracket_the_true_entropy(seed):
    """Brute force: full random distributions, their true entropy lies within the bounds, and
    the lower bound is reached by the distribution that packs the tail at the cap."""
    rng = np.random.default_rng(seed)
    V, k, n = 50, 5, 200
    logits = rng.standard_normal((n, V)) * rng.uniform(0.1, 4, (n, 1))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = np.argsort(-p, 1)[:, :k]
    top = np.take_along_axis(p, ids, 1)
    tail = 1 - top.sum(1)
    lower, upper = entropy_bounds(ids, np.log(top), tail, V)
    true = -(p * np.log(p)).sum(1)
    assert np.all(lower <= true + 1e-9) and np.all(true <= upper + 1e-9)
    for j in range(5):  # lower bound attained
        cap, t = top[j].min(), tail[j]
        fill = [cap] * int(t // cap) + ([t - cap * int(t // cap)] if t - cap * int(t // cap) > 0 else [])
        q = np.concatenate([top[j], fill])
        assert -(q * np.log(q)).sum() == pytest.approx(lower[j], rel=1e-9)
    # sampled mode (no cap): still a bracket, and a wider one
    lo2, up2 = entropy_bounds(ids, np.log(top), tail, V, capped=False)
    assert np.all(lo2 <= lower + 1e-12) and np.all(lo2 <= true + 1e-9)
