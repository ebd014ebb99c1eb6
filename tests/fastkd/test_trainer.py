"""`fastkd train`: offline KD lowers held-out KL, k = V equals full KL, exact resume after SIGKILL,
refusals (tokenizer, empty/corrupt cache), padded embeddings, config file, SFT and online baselines."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastkd.errors import Interrupted, UserError
from fastkd.train_config import TrainConfig
from fastkd.trainer import train
from helpers import build_teacher_and_cache, cli_env, final_weights, max_weight_diff, quiet, write_arith_records

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kd(tmp_path_factory, tiny_qwen_dir):
    return build_teacher_and_cache(tmp_path_factory.mktemp("kd"), tiny_qwen_dir)


# ----------------------------------------------------------------------------- training works

def test_offline_kd_halves_heldout_kl_and_saves_a_loadable_student(kd, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = train(quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), out=str(out), lr=3e-3, max_steps=30,
                         batch_size=8, eval_sequences=8, eval_every=15, hidden_weight=0.5, seed=0))
    assert result.before["kl"] > 1.0, "the teacher should be far from the untrained student"
    assert result.after["kl"] <= 0.5 * result.before["kl"], (result.before, result.after)
    assert result.after["ce"] < result.before["ce"]
    # run folder: resolved config, metrics, checkpoint, final student (+ projector) loadable by plain transformers
    saved = (out / "config.yaml").read_text()
    assert "hidden_weight: 0.5" in saved and "max_steps: 30" in saved
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_kl" in x and x["step"] == 15 for x in lines) and any("loss" in x for x in lines)
    assert (out / "checkpoint" / "checkpoint.json").exists() and (out / "checkpoint" / "state.safetensors").exists()
    assert not list((out / "checkpoint").glob("*.pt")), "checkpoints hold no pickle"
    assert (out / "final" / "projector.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert len(tok) == model.config.vocab_size
    ids = torch.tensor([tok("1 + 2 is")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()


def test_grad_accum_matches_one_big_batch(kd, tiny_llama_dir, tmp_path):
    """batch 8 x accum 1 and batch 4 x accum 2 see the same sequences per step: same weights."""
    common = dict(cache=str(kd["cache"]), student=str(tiny_llama_dir), lr=3e-3, max_steps=3, seed=1, save_final=True)
    train(quiet(out=str(tmp_path / "a"), batch_size=8, grad_accum=1, **common))
    train(quiet(out=str(tmp_path / "b"), batch_size=4, grad_accum=2, **common))
    assert max_weight_diff(final_weights(tmp_path / "a"), final_weights(tmp_path / "b")) < 1e-5
    # resuming a run with settings that change which sequences a step sees is refused
    with pytest.raises(UserError, match="batch_size: checkpoint 8, now 4"):
        train(quiet(out=str(tmp_path / "a"), batch_size=4, grad_accum=2, resume=True, **common))


def test_gradient_checkpointing_gives_the_same_weights(kd, tiny_llama_dir, tmp_path):
    common = dict(cache=str(kd["cache"]), student=str(tiny_llama_dir), lr=3e-3, max_steps=2, batch_size=4, seed=3)
    train(quiet(out=str(tmp_path / "plain"), **common))
    train(quiet(out=str(tmp_path / "ckpt"), gradient_checkpointing=True, **common))
    assert max_weight_diff(final_weights(tmp_path / "plain"), final_weights(tmp_path / "ckpt")) < 1e-6
    from fastkd.trainer import load_student

    student = load_student(quiet(gradient_checkpointing=True, **common), torch.device("cpu"))
    assert getattr(student, "is_activation_checkpointing", None) or student.is_gradient_checkpointing


# ----------------------------------------------------------------------------- the loss on a batch

def _batch_and_module(cache, student_path, tokenizer_path, **cfg):
    from fastkd.loader import CacheSource, collate
    from fastkd.teacher import load_causal_lm, load_tokenizer
    from fastkd.trainer import StudentWithLoss

    tok = load_tokenizer(str(tokenizer_path))
    source = CacheSource(cache)
    batch = collate([source[i] for i in (0, 5, 9, 13)], tok.pad_token_id)
    student = load_causal_lm(str(student_path), dtype="float32", device="cpu", role="student")
    module = StudentWithLoss(student, len(tok), quiet(cache=str(cache), student=str(student_path), **cfg))
    return batch, module, tok


def test_top_k_equal_to_vocab_equals_full_kl_offline_and_online(tmp_path, kd, tiny_llama_dir):
    """With k = V the cached loss is the full-vocabulary KL, computed here independently in float64."""
    from fastkd.cache_stage import cache_teacher
    from fastkd.teacher import load_causal_lm
    from fastkd.trainer import DataSide, add_teacher_signal, batch_inputs

    vocab = json.loads((Path(kd["teacher"]) / "config.json").read_text())["vocab_size"]
    caches = {}
    for codec in ("kt:precision=exact", None):     # lossless log-probs, and the default (quantised) codec
        caches[codec] = tmp_path / f"full-{codec}"
        cache_teacher(dict(teacher=str(kd["teacher"]), data=str(kd["records"]), out=str(caches[codec]), top_k=vocab,
                           max_length=96, batch_size=16, sequences_per_shard=16, logits_codec=codec, progress=False))
    teacher = load_causal_lm(str(kd["teacher"]), dtype="float32", device="cpu")
    # the default codec quantises log-probs (docs/codec.md): the KL moves by well under 1%
    batch, module, tok = _batch_and_module(caches[None], tiny_llama_dir, tiny_llama_dir, ce_weight=0.0)
    with torch.no_grad():
        lossy = module(**batch_inputs(batch, [])).kl.item()
    for mode in ("tail", "renorm"):
        batch, module, tok = _batch_and_module(caches["kt:precision=exact"], tiny_llama_dir, tiny_llama_dir, ce_weight=0.0,
                                               mode=mode)
        with torch.no_grad():
            terms = module(**batch_inputs(batch, []))
            rows = batch.labels != -100
            p = torch.log_softmax(teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[rows].double(), -1)
            q = torch.log_softmax(module.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[rows].double(), -1)
            full_kl = (p.exp() * (p - q)).sum(-1).mean().item()
        assert full_kl > 0.5
        assert abs(terms.kl.item() - full_kl) < 1e-5 * max(1.0, full_kl), (mode, terms.kl.item(), full_kl)
        assert abs(terms.total.item() - full_kl) < 1e-5 * max(1.0, full_kl)
        # online: the live teacher's signal on the same batch gives the same loss
        online = batch.to("cpu")
        online.topk_ids = online.topk_logprobs = online.tail = None
        data = DataSide(None, None, None, None, [], [], 0, teacher)
        cfg = quiet(data=str(kd["records"]), student=str(tiny_llama_dir), teacher=str(kd["teacher"]), top_k=vocab)
        online = add_teacher_signal(online, data, cfg, len(tok))
        with torch.no_grad():
            online_terms = module(**batch_inputs(online, []))
        assert abs(online_terms.kl.item() - full_kl) < 1e-5 * max(1.0, full_kl)
        if mode == "tail":
            assert abs(lossy - full_kl) < 1e-2 * full_kl


def test_padded_student_embedding_uses_only_the_real_vocabulary(tmp_path, kd, tiny_tokenizer):
    """A student whose output layer has more rows than the tokenizer: the extra rows never count."""
    from fastkd.tiny import build_model

    padded = build_model(tiny_tokenizer, "llama", hidden=32, layers=2, vocab_size=len(tiny_tokenizer) + 40, seed=3)
    padded.save_pretrained(tmp_path / "padded")
    tiny_tokenizer.save_pretrained(tmp_path / "padded")
    batch, module, tok = _batch_and_module(kd["cache"], tmp_path / "padded", tmp_path / "padded")
    from fastkd.trainer import batch_inputs

    with torch.no_grad():
        before = module(**batch_inputs(batch, []))
        module.student.get_output_embeddings().weight[len(tok):] = 50.0    # would dominate a softmax over them
        after = module(**batch_inputs(batch, []))
        module.cfg.loss_impl = "fused"                                    # fused linear + loss, same value
        fused = module(**batch_inputs(batch, []))
    assert torch.equal(before.total, after.total) and torch.equal(before.kl, after.kl)
    assert abs(fused.total.item() - after.total.item()) < 1e-4 * abs(after.total.item())
    # and a short run trains it end to end
    result = train(quiet(cache=str(kd["cache"]), student=str(tmp_path / "padded"), out=str(tmp_path / "run"),
                         max_steps=2, batch_size=4))
    assert result.steps == 2


def test_sampled_cache_trains_in_sampled_mode_only(tmp_path, kd, tiny_llama_dir):
    from fastkd.cache_stage import cache_teacher

    cache = tmp_path / "sampled"
    cache_teacher(dict(teacher=str(kd["teacher"]), data=str(kd["records"]), out=str(cache), sample=24, max_length=96,
                       batch_size=16, progress=False))
    with pytest.raises(UserError, match="--mode sampled"):
        train(quiet(cache=str(cache), student=str(tiny_llama_dir), out=str(tmp_path / "r0"), max_steps=1))
    result = train(quiet(cache=str(cache), student=str(tiny_llama_dir), out=str(tmp_path / "r1"), mode="sampled",
                         lr=3e-3, max_steps=6, batch_size=8, eval_sequences=8))
    assert result.after["kl"] < result.before["kl"]


# ----------------------------------------------------------------------------- refusals

def test_tokenizer_mismatch_is_refused_with_what_differs(tmp_path, kd, capsys):
    from fastkd.cli import main
    from fastkd.tiny import save_tiny, train_tokenizer

    other = train_tokenizer(["a completely different corpus of words", "zebra yak xylophone"] * 3, vocab_size=300)
    save_tiny(tmp_path / "other", "llama", tokenizer=other, hidden=32, layers=1, heads=4, kv_heads=2)
    rc = main(["train", "--cache", str(kd["cache"]), "--student", str(tmp_path / "other"), "--out",
               str(tmp_path / "run"), "--no-progress", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "does not match" in err and "vocab_size" in err and "vocab_sha256" in err and str(kd["cache"]) in err


def test_empty_and_corrupt_caches_give_clear_errors(tmp_path, kd, tiny_llama_dir, capsys):
    from fastkd.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["train", "--cache", str(empty), "--student", str(tiny_llama_dir), "--out", str(tmp_path / "r1")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(empty) in err and len(err.splitlines()) == 1

    corrupt = tmp_path / "corrupt"
    shutil.copytree(kd["cache"], corrupt)
    for shard in sorted((corrupt / "shards").glob("*.safetensors")):
        data = bytearray(shard.read_bytes())
        for i in range(len(data) // 2, len(data), 7):   # scribble over the compressed payload
            data[i] ^= 0x5A
        shard.write_bytes(bytes(data))
    from fastkd.cache_tools import CorruptCacheError

    with pytest.raises(CorruptCacheError, match="corrupt|cannot|decod|digest|verify"):
        train(quiet(cache=str(corrupt), student=str(tiny_llama_dir), out=str(tmp_path / "r2"), max_steps=3, batch_size=4))


# ----------------------------------------------------------------------------- config, SFT, online

def test_config_file_with_cli_overrides(tmp_path):
    from fastkd.cli import build_parser

    config_from_args = TrainConfig.from_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("cache: /some/cache\nstudent: s\nlr: 1e-3\nbatch-size: 3\nkl_weight: 0.5\nstudent_layers: [1, 2]\n"
                   "weight_decay: 1e-2\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--lr", "0.02", "--no-progress"])
    config = config_from_args(args)
    assert (config.lr, config.batch_size, config.kl_weight, config.progress, config.student_layers) == (0.02, 3, 0.5, False, [1, 2])
    assert config.weight_decay == 0.01 and isinstance(config.weight_decay, float)    # YAML reads 1e-2 as a string
    cfg.write_text("cache: c\nstudent: s\nmode: topk\n")
    with pytest.raises(UserError, match="mode.*not one of"):
        config_from_args(build_parser().parse_args(["train", "--config", str(cfg)]))
    assert config.mode == "tail"                       # untouched default
    cfg.write_text("cache: c\nstudent: s\nlearning_rate: 1\n")
    with pytest.raises(UserError, match="unknown option.*learning_rate"):
        config_from_args(build_parser().parse_args(["train", "--config", str(cfg)]))
    with pytest.raises(UserError, match="kl-weight 0"):
        TrainConfig.make(overrides={"data": "r.jsonl", "student": "s"})       # SFT must say so


def test_sft_from_records_with_a_student_config_and_mixed_cot(tmp_path, tiny_llama_dir):
    records = write_arith_records(tmp_path / "mixed.jsonl", n=40, seed=3, answer_only_every=3)
    shutil.copy(Path(tiny_llama_dir) / "config.json", tmp_path / "config.json")
    result = train(quiet(data=str(records), student_config=str(tmp_path / "config.json"), tokenizer=str(tiny_llama_dir),
                         kl_weight=0.0, out=str(tmp_path / "sft"), lr=5e-3, max_steps=12, batch_size=8,
                         eval_sequences=8))
    assert "kl" not in result.after and result.after["ce"] < result.before["ce"] - 0.5
    assert (result.final_dir / "model.safetensors").exists() and (result.final_dir / "tokenizer.json").exists()


def test_online_kd_runs_the_live_teacher(tmp_path, kd, tiny_llama_dir):
    result = train(quiet(data=str(kd["records"]), teacher=str(kd["teacher"]), student=str(tiny_llama_dir),
                         out=str(tmp_path / "online"), top_k=16, lr=3e-3, max_steps=3, batch_size=8, eval_sequences=8))
    assert result.before["kl"] > 1.0 and result.after["kl"] < result.before["kl"]


# ----------------------------------------------------------------------------- SIGKILL + resume


def test_sigkill_then_resume_gives_the_same_weights(tmp_path, kd, tiny_llama_dir):
    steps = 24
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"cache: {kd['cache']}\nstudent: {tiny_llama_dir}\nlr: 0.003\nbatch_size: 4\nmax_steps: {steps}\n"
                   f"save_every: 3\nlog_every: 1\nprogress: false\ntensorboard: false\nseed: 7\nhidden_weight: 0.5\n")
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastkd", "train", "--config", str(cfg), "--out", str(killed)]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    progress = killed / "checkpoint" / "progress.json"
    deadline = time.time() + 120
    while not progress.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (killed / "final").exists()
    stopped_at = json.loads(progress.read_text())["step"]
    assert 0 < stopped_at < steps

    resumed = subprocess.run(cmd + ["--resume"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    straight = train(quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), lr=0.003, batch_size=4,
                           max_steps=steps, seed=7, hidden_weight=0.5, out=str(tmp_path / "straight")))
    assert max_weight_diff(final_weights(killed), final_weights(tmp_path / "straight")) <= 1e-6
    from safetensors.torch import load_file

    a = load_file(str(killed / "final" / "projector.safetensors"))
    b = load_file(str(straight.final_dir / "projector.safetensors"))
    assert max_weight_diff(a, b) <= 1e-6
    logged = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert logged == list(range(1, steps + 1))          # every step once: nothing lost, nothing repeated


def test_a_resume_after_the_last_checkpoint_logs_nothing_twice(tmp_path, records_jsonl, tiny_llama_dir):
    """--resume on a finished run, or on one killed after its last checkpoint (final/ not written): the final
    held-out metrics come from the checkpoint, so metrics.jsonl stays the uninterrupted run's, line for line."""
    out = tmp_path / "run"
    options = dict(data=str(records_jsonl), student=str(tiny_llama_dir), out=str(out), kl_weight=0.0, batch_size=2,
                   max_steps=4, lr=3e-3, save_every=2, log_every=1, eval_every=2, eval_sequences=1)
    train(quiet(**options))
    metrics, weights = (out / "metrics.jsonl").read_text(), final_weights(out)
    assert metrics.count('"eval_ce"') == 3                      # before, at step 2, after
    train(quiet(**options, resume=True))
    assert (out / "metrics.jsonl").read_text() == metrics
    shutil.rmtree(out / "final")
    again = train(quiet(**options, resume=True))
    assert (out / "metrics.jsonl").read_text() == metrics and again.after["ce"] == json.loads(
        metrics.splitlines()[-1])["eval_ce"]
    assert max_weight_diff(final_weights(out), weights) == 0


def test_ctrl_c_or_an_os_error_outside_the_loop_names_the_command_that_continues(tmp_path, records_jsonl,
                                                                                tiny_llama_dir, monkeypatch):
    """While loading nothing is written: the same command. Once the run folder is written and before the first
    checkpoint: --overwrite (the same command and --resume are refused, and say so). After it: --resume."""
    import fastkd.trainer as trainer

    out = tmp_path / "run"
    options = dict(data=str(records_jsonl), student=str(tiny_llama_dir), out=str(out), kl_weight=0.0, batch_size=2,
                   max_steps=4, lr=3e-3, save_every=2)
    real_build, real_evaluate, real_save_final = trainer.build_run, trainer.evaluate, trainer.save_final

    def ctrl_c(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_run", ctrl_c)
    with pytest.raises(Interrupted, match=rf"^interrupted; nothing in {out} was changed yet, so re-run the same "
                                          r"command$") as stop:
        train(quiet(**options))
    assert stop.value.exit_code == 130 and not out.exists()
    monkeypatch.setattr(trainer, "build_run", real_build)
    monkeypatch.setattr(trainer, "evaluate", ctrl_c)          # the held-out evaluation before step 1
    with pytest.raises(Interrupted, match=rf"^interrupted; start it over with --overwrite: {out} holds no checkpoint"):
        train(quiet(**options))
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    for extra in ({}, {"resume": True}):
        with pytest.raises(UserError, match="stopped before its first checkpoint.*start .*over with --overwrite"):
            train(quiet(**options, **extra))
    no_space = OSError(28, "No space left on device")         # as a write or close raises it: no file name
    monkeypatch.setattr(trainer, "save_final", lambda *args: (_ for _ in ()).throw(no_space))
    with pytest.raises(UserError, match=rf"^No space left on device \({out}\); fix this, then continue it with "
                                        r"--resume"):
        train(quiet(**options, overwrite=True))
    monkeypatch.setattr(trainer, "save_final", real_save_final)
    assert train(quiet(**options, resume=True)).final_dir == out / "final"


def test_a_nan_loss_stops_the_run_before_it_overwrites_the_checkpoint(kd, tiny_llama_dir, tmp_path, monkeypatch):
    """No GradScaler, bf16 at most: a non-finite loss is bad data or divergence. The run stops with a clear error
    at the next log line or checkpoint, and the checkpoint on disk keeps the last finite step."""
    import fastkd.trainer as trainer

    real, calls = trainer.train_step, []

    def nan_on_the_fourth_step(*args, **kw):
        out = real(*args, **kw)
        calls.append(1)
        if len(calls) == 4:
            args[-1][1] = float("nan")  # the row-weighted loss in `window`, as a NaN loss leaves it
        return out

    monkeypatch.setattr(trainer, "train_step", nan_on_the_fourth_step)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"NaN or inf in steps 4\.\.4.* still holds step 2.*then continue it with "
                                        r"--resume .*; a lower --lr needs a new run \(--overwrite\)$"):
        train(quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), out=str(out), lr=3e-3, max_steps=8,
                    batch_size=4, save_every=2, log_every=3, seed=0))
    from fastkd.checkpoint import load_checkpoint

    assert load_checkpoint(out)["step"] == 2
