"""The trainer's hot path: the lightest loss path by default, decoding in a read-ahead thread, no host
sync per step (issue 18)."""

from __future__ import annotations

import threading
import time
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode


from fastkd.errors import UserError
from fastkd.loader import read_ahead
from fastkd.trainer import train
from helpers import build_teacher_and_cache, final_weights, max_weight_diff, quiet

pytestmark = pytest.mark.usefixtures("one_thread")

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
            "aten.masked_select.default", "aten.equal.default", "aten.allclose.default"}


def skip(frame) -> bool:
    """Reads that are not device syncs of ours: AdamW's step counters (CPU tensors on every device);
    transformers' attention-mask builder checking whether the padding mask is all ones (the model's
    own, in transformers' code); the loss backward's test for an upstream factor of exactly 1, which
    runs only for CPU tensors (test_scaled_gradient_never_reads_a_device_value covers the other branch)."""
    return ("/torch/optim/" in frame.filename or frame.filename.endswith("transformers/masking_utils.py")
            or (frame.filename.endswith("kernels/function.py") and frame.name == "scaled_gradient"))


class HostSyncs(TorchDispatchMode):
    """Records every op that reads a tensor's value back to the host (on a GPU: a device sync), with the
    innermost fastkd frame that caused it (see `skip` for what is not counted)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for a in args if isinstance(a, (list, tuple)) for i in a)
        if name in SYNC_OPS or bool_index:
            stack = traceback.extract_stack()
            if not any(skip(f) for f in stack):
                ours = [f for f in stack if "/fastkd/" in f.filename or "/kernels/" in f.filename]
                where = f"{ours[-1].filename.split('/')[-1]}:{ours[-1].lineno}" if ours else "?"
                self.calls.append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def kd(tmp_path_factory, tiny_qwen_dir):
    return build_teacher_and_cache(tmp_path_factory.mktemp("kd_hot"), tiny_qwen_dir)


def _step_parts(kd, student_dir, **overrides):
    """A real run's pieces (data, module, optimizer, step stream) for driving train_step directly."""
    from fastkd.teacher import load_tokenizer
    from fastkd.trainer import Env, StudentWithLoss, build_data, load_student, step_stream

    config = quiet(cache=str(kd["cache"]), student=str(student_dir), batch_size=4, **overrides).validate()
    env = Env(torch.device("cpu"))
    tok = load_tokenizer(str(student_dir))
    data = build_data(config, tok, env)
    student = load_student(config, env.device, len(tok))
    module = StudentWithLoss(student, len(tok), config)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    stream = step_stream(data, config, env, tok.pad_token_id, 0, 0)
    return config, env, data, module, optimizer, stream, len(tok)


@pytest.mark.parametrize("loss_impl", ["fused", "logits"])
@pytest.mark.parametrize("world", [1, 2])
def test_a_training_step_reads_nothing_back_to_the_host(kd, tiny_llama_dir, monkeypatch, loss_impl, world):
    """Between log lines a step (forward, loss, backward, clip, AdamW) makes no host sync in fastkd's
    code: on a GPU each one stalls the pipeline. The loss's value checks (a sync on a GPU, hence off
    there by default) are turned off here as on CUDA; world=2 runs the cross-rank row count (a
    one-rank stand-in for all_reduce) through the same device-side path."""
    import fastkd.kernels.loss as entry
    import fastkd.train_step as step_module
    from fastkd.trainer import train_step

    real = entry.check_inputs  # every loss path checks its inputs there
    monkeypatch.setattr(entry, "check_inputs", lambda *a, **k: real(*a, **{**k, "check_values": False}))
    monkeypatch.setattr(step_module.dist, "all_reduce", lambda tensor, *a, **k: tensor)
    config, env, data, module, optimizer, stream, vocab = _step_parts(kd, tiny_llama_dir, loss_impl=loss_impl)
    env.world = world
    window = torch.zeros(5, dtype=torch.float64)
    assert module.loss_path == loss_impl
    syncs = HostSyncs()
    for _ in range(3):
        _, _, micro = next(stream)
        with syncs:
            train_step(module, module, optimizer, micro, data, config, env, vocab, window)
    stream.close()
    assert syncs.calls == [], sorted(set(syncs.calls))
    assert float(window[0]) > 0  # the steps did run and counted rows


def test_scaled_gradient_never_reads_a_device_value():
    """On a non-CPU device the backward helper scales in place without looking at the factor: meta
    tensors have no values, so any read would raise."""
    from types import SimpleNamespace

    from fastkd.kernels.function import keep_gradients, scaled_gradient

    ctx = SimpleNamespace()
    grad = torch.empty(4, 7, device="meta")
    keep_gradients(ctx, grad)
    out = scaled_gradient(ctx, 0, torch.empty((), device="meta"))
    assert out.shape == (4, 7) and out.device.type == "meta"


def test_the_old_step_synced_and_the_check_sees_it():
    """The detector is not blind: a boolean-mask row selection and an .item() are both caught."""
    syncs = HostSyncs()
    labels = torch.tensor([[1, -100, 3]])
    with syncs:
        (labels != -100).sum().item()
        labels[labels != -100]
    assert len(syncs.calls) >= 2


def test_auto_picks_the_fused_path_on_cpu_and_says_so(kd, tiny_llama_dir, tmp_path, capsys):
    config, env, data, module, optimizer, stream, vocab = _step_parts(kd, tiny_llama_dir)
    stream.close()
    assert module.loss_path == "fused"
    train(quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), out=str(tmp_path / "r"), max_steps=1,
                batch_size=4, progress=True, save_final=False))
    err = capsys.readouterr().err
    assert "loss: fused" in err and "--loss-impl" in err


def test_read_ahead_thread_and_loss_paths_give_the_same_weights(kd, tiny_llama_dir, tmp_path):
    """prefetch (default) vs decoding on the training thread: the same batches in the same order, so the
    same weights; and the fused and logits loss paths agree closely (same math, other summation order)."""
    common = dict(cache=str(kd["cache"]), student=str(tiny_llama_dir), lr=3e-3, max_steps=4, batch_size=4, seed=2,
                  grad_accum=2)
    train(quiet(out=str(tmp_path / "ahead"), **common))
    train(quiet(out=str(tmp_path / "inline"), prefetch=0, **common))
    train(quiet(out=str(tmp_path / "logits"), loss_impl="logits", **common))
    ahead, inline = final_weights(tmp_path / "ahead"), final_weights(tmp_path / "inline")
    assert max_weight_diff(ahead, inline) == 0.0
    assert max_weight_diff(ahead, final_weights(tmp_path / "logits")) < 1e-4


def test_read_ahead_keeps_order_bounds_its_queue_and_raises_the_producers_error():
    made = []

    def items():
        for i in range(50):
            made.append(i)
            yield i

    got = []
    reader = read_ahead(items(), 3)
    for item in reader:
        got.append(item)
        time.sleep(0.002)
        assert len(made) - len(got) <= 3 + 1  # the queue's 3 plus the one waiting to go in
    assert got == list(range(50))

    def failing():
        yield 1
        raise UserError("cache x: shard 0 block 2 fails its digest")

    reader = read_ahead(failing(), 2)
    assert next(reader) == 1
    with pytest.raises(UserError, match="block 2 fails its digest"):
        next(reader)


def test_closing_the_reader_stops_its_thread():
    closed = []

    def endless():
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    before = threading.active_count()
    source = endless()    # held here, so only read_ahead can close it
    reader = read_ahead(source, 2)
    assert [next(reader) for _ in range(5)] == [0, 1, 2, 3, 4]
    reader.close()
    assert closed   # the source is closed by close() itself (its queued items cancelled, not waited for)
    deadline = time.time() + 5
    while threading.active_count() > before and time.time() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_resume_after_a_kill_is_exact_with_read_ahead(kd, tiny_llama_dir, tmp_path):
    """The saved position is the one of the step trained, not of the batches read ahead."""
    common = dict(cache=str(kd["cache"]), student=str(tiny_llama_dir), lr=3e-3, batch_size=4, seed=4, prefetch=8,
                  schedule="constant")
    train(quiet(out=str(tmp_path / "straight"), max_steps=6, **common))
    train(quiet(out=str(tmp_path / "split"), max_steps=3, **common))
    train(quiet(out=str(tmp_path / "split"), max_steps=6, resume=True, **common))
    assert max_weight_diff(final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")) == 0.0


def test_negative_prefetch_is_a_clear_error(kd, tiny_llama_dir):
    with pytest.raises(UserError, match="--prefetch must be >= 0"):
        quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), prefetch=-1).validate()


@pytest.mark.parametrize("name", ["embedded-student", "embedded"])
def test_the_embedded_names_load_as_the_student(name, tmp_path, monkeypatch):
    """README: the embedded names work wherever a model is asked for, --student included (never sent to the hub)."""
    from fastkd.student import load_student

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    student = load_student(quiet(cache=str(tmp_path), student=name).validate(), torch.device("cpu"))
    assert student.training and sum(p.numel() for p in student.parameters()) > 0


def test_a_mistyped_student_is_no_local_folder(tmp_path, monkeypatch):
    from fastkd.student import load_student

    monkeypatch.chdir(tmp_path)
    by_flag = {"--student": quiet(cache=str(tmp_path), student="studnt"),
               "--student-config": quiet(cache=str(tmp_path), student_config="studnt", tokenizer="embedded")}
    for flag, config in by_flag.items():
        with pytest.raises(UserError) as err:
            load_student(config.validate(), torch.device("cpu"))
        msg = str(err.value)
        assert msg.startswith(f"{flag} 'studnt': no local folder of that name") and "HF_HUB_OFFLINE is set" in msg
