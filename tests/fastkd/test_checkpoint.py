"""`fastkd train --out`: a run is never overwritten or mixed with another, nothing is created by a run
that fails before training, and a run stopped by SIGTERM (or killed after a timed checkpoint) resumes."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastkd.checkpoint import check_resumable, load_checkpoint
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
    with pytest.raises(UserError, match="no such folder"):   # the folders made for the run's lock go with it
        train(sft(records_jsonl, tmp_path / "no-such-student", out / "deeper"))
    assert not out.exists()


def test_resume_of_a_run_without_checkpoint_says_to_overwrite(tmp_path, records_jsonl, tiny_llama_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    (out / "config.yaml").write_text("")
    with pytest.raises(UserError, match="stopped before its first checkpoint.*--overwrite"):
        train(sft(records_jsonl, tiny_llama_dir, out, resume=True))
    with pytest.raises(UserError, match=r"\(config.yaml, metrics.jsonl\); it stopped before its first checkpoint: "
                                        r"delete it and start over with --overwrite, or choose another --out$"):
        train(sft(records_jsonl, tiny_llama_dir, out))      # not "--resume", which would be refused


def test_a_second_run_into_the_folder_is_refused_naming_the_first_pid(tmp_path, records_jsonl, tiny_llama_dir):
    """One run per folder (<out>/.lock): a live run's lock refuses another one, --overwrite and --resume included,
    and nothing in the folder changes; the lock of a run whose process is gone is taken over; a run ends unlocked."""
    out = tmp_path / "run"
    out.mkdir()
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": first.pid, "host": socket.gethostname()}))
        for extra in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(UserError, match=rf"--out {out}: another run \(pid {first.pid}\) is writing into "
                                                r"this folder .*wait for it to end or stop it, or choose another"):
                train(sft(records_jsonl, tiny_llama_dir, out, **extra))
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        first.kill()
        first.wait()
    train(sft(records_jsonl, tiny_llama_dir, out))      # its pid is gone: a killed run's lock
    assert (out / "final").is_dir() and not (out / ".lock").exists()


def test_a_resume_refuses_what_the_checkpoint_fixes_and_warns_about_the_rest(tmp_path, records_jsonl, tiny_llama_dir,
                                                                             capsys, monkeypatch):
    """The optimizer state restores lr, betas, eps and weight decay: another value is refused (before any model is
    loaded), as are fewer steps than done and another model; the schedule and the loss may change from the
    checkpoint's step on, with one warning line, and final/fastkd_train.json records the change."""
    import fastkd.trainer as trainer

    out = tmp_path / "run"
    train(sft(records_jsonl, tiny_llama_dir, out, save_every=2))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_build = trainer.build_run
    monkeypatch.setattr(trainer, "build_run", lambda *a: pytest.fail("a model was loaded"))
    for change, match in [({"lr": 1e-3}, r"other optimizer settings \(lr: checkpoint 0.003, now 0.001\), and its "
                                         r"optimizer state restores those"),
                          ({"adam_beta2": 0.9, "weight_decay": 0.1}, r"\(weight_decay: checkpoint 0.0, now 0.1; "
                                                                     r"adam_beta2: checkpoint 0.95, now 0.9\)"),
                          ({"max_steps": 3}, "--max-steps 3 is below the checkpoint's step 4"),
                          ({"lora_rank": 4}, r"other model settings \(lora_rank: checkpoint 0, now 4\)")]:
        with pytest.raises(UserError, match=match):
            train(sft(records_jsonl, tiny_llama_dir, out, resume=True, **change))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(trainer, "build_run", real_build)
    capsys.readouterr()
    train(sft(records_jsonl, tiny_llama_dir, out, resume=True, max_steps=6, warmup_steps=2, kl_weight=0.0))
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == ["fastkd train: warning: resuming with other settings than the checkpoint's (max_steps: 4 -> 6; "
                       "warmup_steps: 0 -> 2): they apply from step 4 on, so this run will not match one started "
                       "with them"]
    assert "max_steps: 6" in (out / "config.yaml").read_text()
    final = json.loads((out / "final" / "fastkd_train.json").read_text())
    assert final["steps"] == 6 and final["resumed_with_other_settings"] == [
        {"step": 4, "changed": {"max_steps": [4, 6], "warmup_steps": [0, 2]}}]


def test_the_hidden_projector_cannot_come_or_go_on_resume():
    from dataclasses import asdict

    from fastkd.runtime import Env

    def config(weight):
        return TrainConfig.make(overrides={"cache": "c", "student": "s", "hidden_weight": weight})

    saved, env = {"config": asdict(config(0.5)), "world": 1, "step": 4}, Env(torch.device("cpu"))
    with pytest.raises(UserError, match=r"other model settings \(hidden_weight > 0: checkpoint True, now False\)"):
        check_resumable(saved, config(0.0), env, Path("run"))
    assert check_resumable(saved, config(0.25), env, Path("run")) == {"hidden_weight": [0.5, 0.25]}


def test_a_full_disk_names_the_command_that_continues(tmp_path, records_jsonl, tiny_llama_dir, monkeypatch):
    """Before the first checkpoint a run cannot be resumed: the error says --overwrite; after it, --resume. Both
    work once there is space (checkpoints, and the final model: safetensors' own error)."""
    import safetensors.torch
    from safetensors import SafetensorError

    import fastkd.checkpoint as checkpoint

    real, calls = safetensors.torch.save_file, []
    no_space = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def full_disk_at(n):
        def save_file(tensors, path, *args, **kw):
            calls.append(path)
            if len(calls) == n:
                raise no_space
            return real(tensors, path, *args, **kw)
        calls.clear()
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    out = tmp_path / "run"
    full_disk_at(1)
    with pytest.raises(UserError, match=rf"cannot write checkpoint {out / 'checkpoint'}: Error while serializing.*; "
                                        rf"free space, then start it over with --overwrite: {out} holds no checkpoint"):
        train(sft(records_jsonl, tiny_llama_dir, out, save_every=2))
    full_disk_at(2)
    with pytest.raises(UserError, match=rf"free space, then continue it with --resume \(its checkpoint in {out} is"):
        train(sft(records_jsonl, tiny_llama_dir, out, save_every=2, overwrite=True))
    assert load_checkpoint(out)["step"] == 2
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    real_final = checkpoint._write_final
    monkeypatch.setattr(checkpoint, "_write_final", lambda *args: (_ for _ in ()).throw(no_space))
    with pytest.raises(UserError, match=rf"cannot write the final model {out / 'final'}: Error while serializing.*"
                                        r"free space, then continue it with --resume"):
        train(sft(records_jsonl, tiny_llama_dir, out, save_every=2, resume=True))
    monkeypatch.setattr(checkpoint, "_write_final", real_final)
    assert train(sft(records_jsonl, tiny_llama_dir, out, save_every=2, resume=True)).final_dir == out / "final"


def test_a_cache_or_evaluation_folder_is_refused_even_with_overwrite(tmp_path):
    """--overwrite deletes a run's files (config.yaml among them): never those of a cache or an evaluation."""
    from fastkd.checkpoint import existing_run

    cache, evaluation = tmp_path / "cache", tmp_path / "eval"
    for folder, marker in ((cache, "manifest.json"), (evaluation, "results.json")):
        folder.mkdir()
        (folder / marker).write_text("{}")
        (folder / "config.yaml").write_text("mine")
        for extra in ({}, {"overwrite": True}, {"resume": True}):
            config = TrainConfig.make(overrides={"data": "r.jsonl", "student": "s", "kl_weight": 0.0,
                                                 "out": str(folder), **extra})
            with pytest.raises(UserError, match=f"--out {folder} holds a .*{marker}.*, not a training run"):
                existing_run(folder, config)
        assert (folder / "config.yaml").read_text() == "mine"


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
    assert "SIGTERM" in err and "--resume (and without --overwrite)" in err and "Traceback" not in err
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
