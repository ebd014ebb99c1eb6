"""Data parallel training: ranks read disjoint sequences, and `torchrun --nproc-per-node 2 -m fastkd train`
(DDP on gloo, CPU) ends where a one-process run with the same global batch ends."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from fastkd.trainer import train
from helpers import build_teacher_and_cache, final_weights, max_weight_diff, quiet

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kd(tmp_path_factory, tiny_qwen_dir):
    return build_teacher_and_cache(tmp_path_factory.mktemp("kd_dist"), tiny_qwen_dir)


def test_ranks_read_disjoint_sequences_that_make_up_the_global_batch(kd, tiny_llama_dir):
    """The trainer's own step stream, as rank 0 and rank 1 of 2, against one process with twice the batch."""
    from fastkd.teacher import load_tokenizer
    from fastkd.trainer import Env, build_data, step_stream

    tok = load_tokenizer(str(tiny_llama_dir))
    steps = 10    # more than one epoch (the cache holds 48 sequences; 40 are for training)

    def records(rank, world, batch_size):
        cfg = quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), batch_size=batch_size, grad_accum=2,
                    eval_sequences=8, seed=4, group_batches=2)
        env = Env(torch.device("cpu"), rank, world)
        data = build_data(cfg, tok, env)
        stream = step_stream(data, cfg, env, tok.pad_token_id, 0, 0)
        out = []
        for _ in range(steps):
            epoch, position, micro = next(stream)
            out.append((epoch, position, [r for b in micro for r in b.record_indices]))
        return out, set(int(data.train[p].record_index) for p in data.eval_positions)

    (r0, held), (r1, _) = records(0, 2, 2), records(1, 2, 2)
    (one, _) = records(0, 1, 4)
    for a, b, whole in zip(r0, r1, one):
        assert a[:2] == b[:2] == whole[:2]                       # same epoch and position on every rank
        assert not set(a[2]) & set(b[2])                          # disjoint
        assert sorted(a[2] + b[2]) == sorted(whole[2])            # together: the one-process global batch
        assert not set(whole[2]) & held                           # held-out sequences never trained on
    assert one[-1][0] == 1                                       # the test crossed an epoch boundary


def _free_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("engine", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_torchrun_two_processes_matches_one_process(kd, tiny_llama_dir, tmp_path, engine):
    common = dict(cache=str(kd["cache"]), student=str(tiny_llama_dir), lr=3e-3, max_steps=4, seed=2, grad_accum=2,
                  hidden_weight=0.5)
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastkd", "train",
           "--out", str(out), "--no-progress", "--distributed", engine, "--batch-size", "2"]
    for key, value in common.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    done = subprocess.run(cmd, env=_free_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    train(quiet(out=str(tmp_path / "one"), batch_size=4, **common))
    assert max_weight_diff(final_weights(out), final_weights(tmp_path / "one")) < 1e-5
    metrics = (out / "metrics.jsonl").read_text()
    assert '"step": 4' in metrics
