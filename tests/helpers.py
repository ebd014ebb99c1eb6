"""Helpers the tests of several folders share (plain functions; the shared fixtures are in conftest.py), light to
import (the app's heavy modules load inside the functions that need them): subprocess scripts use it too."""

import json
import os
import random
import struct
import sys
from pathlib import Path

import numpy as np

from fastkd.cache_tools import CacheWriter, CachedSequence

ROOT = Path(__file__).resolve().parents[1]


def write_arith_records(path: Path, n: int = 48, seed: int = 0, answer_only_every: int = 0) -> Path:
    """Small-number additions with a one-sentence rationale: a task a tiny model can fit."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rec = {"source": f"{a} + {b} is", "rationale": f"{a} plus {b} is {a + b}.", "target": str(a + b), "task": "add"}
        if answer_only_every and i % answer_only_every == 0:
            rec["cot"] = False
        lines.append(json.dumps(rec) + "\n")
    path.write_text("".join(lines))
    return path


def quiet(**overrides):
    from fastkd.train_config import TrainConfig

    return TrainConfig.make(overrides={"progress": False, "tensorboard": False, **overrides})


def build_teacher_and_cache(root: Path, qwen_dir: Path, k: int = 16, layers: str | None = "1") -> dict:
    """SFT the tiny Qwen2 a little (so it is far from uniform, like a real teacher), then cache it."""
    from fastkd.cache_stage import cache_teacher
    from fastkd.trainer import train

    records = write_arith_records(root / "records.jsonl")
    sft = train(quiet(data=str(records), student=str(qwen_dir), out=str(root / "teacher_run"), kl_weight=0.0,
                      lr=1e-2, max_steps=24, batch_size=8, seed=0))
    teacher = sft.final_dir
    cache = root / "cache"
    cache_teacher(dict(teacher=str(teacher), data=str(records), out=str(cache), top_k=k, layers=layers,
                       max_length=96, batch_size=16, sequences_per_shard=16, progress=False))
    return {"records": records, "teacher": teacher, "cache": cache}


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def cli_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cache(teacher, data, out, vllm_engine=None, **options):
    """cache_teacher with a dict config (paths as strings, no progress bars)."""
    from fastkd.cache_stage import cache_teacher

    return cache_teacher(dict(teacher=str(teacher), data=str(data), out=str(out), progress=False, **options),
                         vllm_engine=vllm_engine)


def slow_cli(seconds: float) -> list[str]:
    """`python -m fastkd` whose cache stage sleeps after every unit (fastkd.cache_stage._after_unit), so a kill
    lands part-way through a run."""
    code = ("import sys, time; import fastkd.cache_stage as stage; "
            f"stage._after_unit = lambda: time.sleep({seconds}); "
            "from fastkd.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code]


def random_records(n, seed=0):
    rng = np.random.default_rng(seed)
    words = ["True", "False", "and", "or", "not", "(", ")", "step", "Take", "Yes", "No"]
    recs = []
    for i in range(n):
        src = " ".join(rng.choice(words, size=rng.integers(2, 12)))
        rat = " ".join(rng.choice(words, size=rng.integers(0, 20)))
        target = str(rng.choice(["True", "False"]))
        recs.append({"source": src, "rationale": rat, "target": target, "task": f"t{i % 3}"})
    return recs


def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor, from the safetensors header (independent of our reader)."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    return {k: (8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def write_cache(root: Path, tokenizer=None, count: int = 24, seed: int = 0, **settings_extra) -> Path:
    """A cache of random well-formed sequences (4 per block, 12 per shard); with a tokenizer, its
    identity and vocabulary, so `fastkd train` accepts it for a student with that tokenizer."""
    from fastkd.tokenizer_identity import tokenizer_identity

    vocab = len(tokenizer) if tokenizer is not None else 300
    settings = synthetic_settings(vocab_size=vocab, k=8, layers=(1,), widths=(16,), **settings_extra)
    if tokenizer is not None:
        settings["tokenizer"] = tokenizer_identity(tokenizer)
    rng = np.random.default_rng(seed)
    with CacheWriter(root, settings, sequences_per_shard=12, max_block_sequences=4) as writer:
        for i in range(count):
            length = int(rng.integers(6, 20))
            writer.add(random_sequence(rng, i, settings, length=length, num_loss=int(rng.integers(1, length))))
    return root


def assert_resume_is_exact(root: Path, weights: str = "model.safetensors", **options) -> None:
    """Four steps in one run, and two steps then two more with --resume: the saved `final/<weights>` agree bit
    for bit (options: a train config without out / max_steps)."""
    import torch
    from safetensors.torch import load_file

    from fastkd.trainer import train

    train(quiet(out=str(root / "straight"), max_steps=4, **options))
    train(quiet(out=str(root / "split"), max_steps=2, **options))
    train(quiet(out=str(root / "split"), max_steps=4, resume=True, **options))
    a = load_file(str(root / "straight" / "final" / weights))
    b = load_file(str(root / "split" / "final" / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def synthetic_settings(vocab_size: int = 1000, k: int = 8, mode: str = "topk", layers=(1, 3),
                       widths=(16, 24), **extra) -> dict:
    """Settings as the cache stage passes them (placeholder identities), with exact codecs pinned (kt at
    precision exact, ks in mode sample, kh bf16) so format tests compare bit for bit."""
    topk = "ks" if mode == "sample" else "kt:precision=exact"
    extra.setdefault("codecs", {"topk": topk, "hidden": "kh:method=bf16"})
    return {"teacher": {"path": "synthetic-teacher", "config_sha256": "0" * 64, "dtype": "bfloat16"},
            "tokenizer": {"vocab_size": vocab_size, "vocab_sha256": "1" * 64},
            "template": {"cot": True, "chat": False}, "k": k, "mode": mode,
            "sample_n": 32 if mode == "sample" else None,
            "layers": list(layers), "hidden_widths": list(widths), "max_length": 512, **extra}


def random_sequence(rng: np.random.Generator, record_index: int, settings: dict, length: int | None = None,
                    num_loss: int | None = None) -> CachedSequence:
    """One sequence whose teacher rows are a real distribution: top-k log-probs sorted, tail = 1 - sum."""
    vocab, k = settings["tokenizer"]["vocab_size"], settings["k"]
    L = int(rng.integers(1, 40)) if length is None else length
    n = int(rng.integers(0, L + 1)) if num_loss is None else num_loss
    mask = np.zeros(L, np.uint8)
    mask[L - n:] = 1  # the response is the end of the sequence
    logits = rng.standard_normal((n, vocab)) * 3.0
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    part = np.argpartition(-logp, min(k, vocab - 1), axis=1)[:, :k] if n else np.zeros((0, k), np.int64)
    order = np.take_along_axis(part, np.argsort(-np.take_along_axis(logp, part, axis=1), axis=1), axis=1)
    top = np.take_along_axis(logp, order, axis=1)
    counts = None
    ids = order.astype(np.int64)
    lp = top.astype(np.float32)
    tail = (1.0 - np.exp(top).sum(axis=1)).astype(np.float32)
    if settings.get("mode") == "sample":
        ids = np.full((n, k), -1, np.int64)
        lp = np.full((n, k), -np.inf, np.float32)
        counts = np.zeros((n, k), np.int32)
        for j in range(n):
            draws = rng.choice(vocab, size=settings.get("sample_n") or 16, p=np.exp(logp[j]))
            uniq, cnt = np.unique(draws, return_counts=True)
            uniq, cnt = uniq[:k], cnt[:k]
            ids[j, : len(uniq)] = uniq
            lp[j, : len(uniq)] = logp[j, uniq]
            counts[j, : len(uniq)] = cnt
        tail = (1.0 - np.exp(lp.astype(np.float64)).sum(axis=1)).astype(np.float32)
    hidden = {layer: (rng.standard_normal((n, d)) * 2).astype(np.float32)
              for layer, d in zip(settings.get("layers", []), settings.get("hidden_widths", []))}
    return CachedSequence(record_index=record_index, task=f"task_{record_index % 3}",
                          input_ids=rng.integers(0, vocab, L).astype(np.int32), loss_mask=mask,
                          topk_ids=ids, topk_logprobs=lp, tail=tail, counts=counts, hidden=hidden)


def random_sequences(seed: int, count: int, settings: dict, start: int = 0) -> list[CachedSequence]:
    """`count` random_sequence()s from `seed`, record indices from `start`."""
    rng = np.random.default_rng(seed)
    return [random_sequence(rng, start + i, settings) for i in range(count)]


def topk_error_bound(x: np.ndarray, step: float = 0.08, max_step: float = 5.0, growth: float = 0.25) -> np.ndarray:
    """docs/codec.md's bound on kt's quantisation error (nats) of an entry x nats below the row's top-1, before
    the decoder's common rescaling: half the widest step within reach of x."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * np.minimum(step * np.exp(growth * (x + 0.5 * max_step)), max_step) + 1e-6 * (1 + x)


def hidden_error_bound(x: np.ndarray, method: str, block: int = 128) -> np.ndarray:
    """docs/codec.md's per-element bound on kh's |decoded - x| for [n, d] inputs (blocks zero-padded)."""
    x = np.asarray(x, dtype=np.float32)
    if method == "bf16":
        return np.abs(x) * 2.0 ** -8 + 1e-38   # half an ulp of an 8-bit significand, plus subnormals
    n, d = x.shape
    size = block or d
    blocks = np.pad(x, ((0, 0), (0, -d % size))).reshape(n, -1, size)
    absmax = np.abs(blocks).max(axis=2, keepdims=True)
    if method == "int8":
        bound = np.broadcast_to(absmax / 254.0, blocks.shape)
    else:   # e4m3: 3 mantissa bits -> relative 2^-4; below 2^-6 * scale the absolute subnormal step 2^-10 * scale
        bound = np.maximum(np.abs(blocks) * 2.0 ** -4, absmax / 448.0 * 2.0 ** -10)
    return (bound * (1 + 1e-6)).reshape(n, -1)[:, :d]
