"""`fastkd train --out`: a run is never overwritten or mixed with another, nothing is created by a run
that fails before training, and a run stopped by SIGTERM (or killed after a timed checkpoint) resumes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastkd.checkpoint import load_checkpoint
from fastkd.errors import Interrupted, UserError
from fastkd.train_config import TrainConfig
from fastkd.trainer import train
from helpers import cli_env

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


def sft(records, student, out, **extra) -> dict:
    """An SFT run's options (no teacher: the run folder is what is tested)."""
    return {"data": str(records), "student": str(student), "out": str(out), "kl_weight": 0.0, "batch_size": 2,
            "max_steps": 4, "lr": 3e-3, "seed": 1, "progress": False, "tensorboard": False, **extra}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(tmp_path, records_jsonl, tiny_llama_dir):
    out = tmp_path / "run"
    train(sft(records_jsonl, tiny_llama_dir, out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run .*--resume.*--overwrite"):
        train(sft(records_jsonl, tiny_llama_dir, out, lr=1e-2))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_overwrite_clears_the_old_run_so_nothing_is_mixed(tmp_path, records_jsonl, tiny_llama_dir):
    out = tmp_path / "run"
    train(sft(records_jsonl, tiny_llama_dir, out, max_steps=6))
    (out / "final" / "adapter_config.json").write_text("{}")   # as a LoRA run leaves it
    (out / "notes.txt").write_text("mine")                     # not a run file: kept
    new = train(sft(records_jsonl, tiny_llama_dir, out, lr=1e-2, overwrite=True))
    assert not (out / "final" / "adapter_config.json").exists() and (out / "notes.txt").read_text() == "mine"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and max(steps) == 4 and new.steps == 4
    fresh = train(sft(records_jsonl, tiny_llama_dir, tmp_path / "fresh", lr=1e-2))
    a, b = weights(out / "final"), weights(fresh.final_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_that_fails_before_training_creates_nothing(tmp_path, records_jsonl, tiny_llama_dir):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="no such folder"):
        train(sft(records_jsonl, tmp_path / "no-such-student", out))
    assert not out.exists()
    with pytest.raises(UserError, match="--resume: .* holds no run"):
        train(sft(records_jsonl, tiny_llama_dir, out, resume=True))
    assert not out.exists()


def test_resume_of_a_run_without_checkpoint_says_to_overwrite(tmp_path, records_jsonl, tiny_llama_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    (out / "config.yaml").write_text("")
    with pytest.raises(UserError, match="stopped before its first checkpoint.*--overwrite"):
        train(sft(records_jsonl, tiny_llama_dir, out, resume=True))


def test_options_that_make_no_sense_are_refused():
    for bad, match in [({"max_steps": 0}, "--max-steps must be >= 1"), ({"top_k": 0}, "--top-k must be >= 1"),
                       ({"resume": True, "overwrite": True}, "give one of them"),
                       ({"save_every_minutes": -1.0}, "must be >= 0"), ({"epochs": 0.0}, "--epochs must be > 0")]:
        with pytest.raises(UserError, match=match):
            TrainConfig.make(overrides={"data": "r.jsonl", "student": "s", "kl_weight": 0.0, **bad})


def test_checkpoints_are_timed_by_default(tmp_path, records_jsonl, tiny_llama_dir, monkeypatch):
    import fastkd.trainer as trainer

    assert TrainConfig.make(overrides={"data": "r", "student": "s", "kl_weight": 0.0}).save_every_minutes > 0
    saved, real = [], trainer.save_checkpoint
    monkeypatch.setattr(trainer, "save_checkpoint", lambda run, state: (saved.append(state["step"]), real(run, state)))
    clock = iter(range(0, 10 ** 6, 45))   # each look at the clock 45 s later: a 1-minute interval passes every other step
    monkeypatch.setattr(trainer, "_clock", lambda: float(next(clock)))
    train(sft(records_jsonl, tiny_llama_dir, tmp_path / "run", max_steps=7, save_every_minutes=1.0))
    assert saved == [2, 4, 6, 7]   # timed ones, then the end of the run


def test_sigterm_saves_a_checkpoint_and_resume_gives_the_same_weights(tmp_path, records_jsonl, tiny_llama_dir):
    """Default options (no --save-every): SIGTERM (what schedulers send before a kill) saves and stops."""
    steps, out = 80, tmp_path / "stopped"
    options = sft(records_jsonl, tiny_llama_dir, out, max_steps=steps, log_every=1)
    argv = [sys.executable, "-m", "fastkd", "train"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag if value is not False else "--no-" + key.replace("_", "-")] + ([] if isinstance(value, bool) else [str(value)])
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"loss"') >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    stopped_at = load_checkpoint(out)["step"]
    assert 2 <= stopped_at < steps and not (out / "final").exists()
    resumed = subprocess.run(argv + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = train(sft(records_jsonl, tiny_llama_dir, tmp_path / "straight", max_steps=steps, log_every=1))
    a, b = weights(out / "final"), weights(straight.final_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert logged == list(range(1, steps + 1))


def test_interrupted_is_a_user_error_with_the_signal_exit_code():
    err = Interrupted("stopped", signal.SIGINT)
    assert isinstance(err, UserError) and err.exit_code == 130
