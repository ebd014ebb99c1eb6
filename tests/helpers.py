"""Helpers the tests of several folders share (plain functions; the shared fixtures are in conftest.py)."""

import json
import os
import random
import struct
import sys
from pathlib import Path

import numpy as np

from fastkd.cache_stage import cache_teacher
from fastkd.cache_tools import CacheWriter
from fastkd.cache_tools.synthetic import random_sequence, synthetic_settings
from fastkd.train_config import TrainConfig
from fastkd.trainer import train

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
    return TrainConfig.make(overrides={"progress": False, "tensorboard": False, **overrides})


def build_teacher_and_cache(root: Path, qwen_dir: Path, k: int = 16, layers: str | None = "1") -> dict:
    """SFT the tiny Qwen2 a little (so it is far from uniform, like a real teacher), then cache it."""
    from fastkd.cache_stage import cache_teacher

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

    train(quiet(out=str(root / "straight"), max_steps=4, **options))
    train(quiet(out=str(root / "split"), max_steps=2, **options))
    train(quiet(out=str(root / "split"), max_steps=4, resume=True, **options))
    a = load_file(str(root / "straight" / "final" / weights))
    b = load_file(str(root / "split" / "final" / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

