"""The training loop: student + loss from kernels/ + AdamW, on one process or under torchrun.

Read top to bottom: `train(config)` sets up the run (data, student, loss, optimizer, resume),
then loops: take `grad_accum` micro-batches, count their loss rows across ranks, forward and
backward each (its loss weighted by its share of the rows, so the step's gradient is the mean
over every loss row of the global batch, whatever the split), clip, step, log, evaluate,
checkpoint. Checkpoints hold everything needed to continue bit for bit. Each stage has its own
module: train_config (options), train_data (data side), student (model set-up and loss module),
train_step (the step and evaluation), checkpoint (saving and resuming), runtime (processes).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fastkd.checkpoint import (CHECKPOINT, check_resumable, clear_run, existing_run, full_state, load_checkpoint,
                               load_full_state, rng_state, save_checkpoint, save_final, set_rng_state)
from fastkd.errors import Interrupted, UserError
from fastkd.runtime import Env, StopSignals, agree, seed_everything, setup_env, wrap_distributed
from fastkd.student import (StudentWithLoss, batch_inputs, causal_lm, check_vocab, choose_loss_path,
                            describe_loss_path, load_student, map_layers)
from fastkd.train_config import TrainConfig
from fastkd.train_data import (DataSide, add_teacher_signal, build_data, cache_vocab, skip_corrupt, step_stream,
                               train_plans)
from fastkd.train_step import BBHProbe, autocast, evaluate, train_step

__all__ = ["train", "TrainResult", "MetricsLog", "make_schedule",
           # the stages' pieces, importable from here as before the split
           "Env", "setup_env", "seed_everything", "wrap_distributed", "StudentWithLoss", "batch_inputs", "check_vocab",
           "choose_loss_path", "describe_loss_path", "load_student", "map_layers", "DataSide", "add_teacher_signal",
           "build_data", "cache_vocab", "skip_corrupt", "step_stream", "train_plans", "autocast", "evaluate",
           "train_step", "check_resumable", "full_state", "load_full_state", "save_final"]


def _clock() -> float:
    """Seconds on a monotonic clock: when checkpoints are due (tests replace it)."""
    return time.monotonic()


def make_schedule(optimizer, config: TrainConfig, total_steps: int):
    """Linear warmup, then cosine or linear decay to min_lr_ratio (or constant)."""
    warm, floor = config.warmup_steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)



class MetricsLog:
    """JSONL metrics (+ TensorBoard when installed), written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop lines written after the checkpoint
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()



@dataclass
class TrainResult:
    """What a run produced (paths) and the held-out metrics before and after training."""

    run_dir: Path
    final_dir: Path | None
    checkpoint_dir: Path
    metrics_path: Path
    config_path: Path
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    is_main: bool = True

    def summary(self) -> str:
        def fmt(d):
            return ", ".join(f"{k} {v:.4f}" for k, v in d.items() if k not in ("rows", "bbh_items") and v is not None) or "n/a"
        lines = [f"run: {self.run_dir}  ({self.steps} steps, {self.tokens} loss tokens, {self.seconds:.1f} s)",
                 f"  held-out before: {fmt(self.before)}", f"  held-out after:  {fmt(self.after)}"]
        if self.final_dir:
            lines.append(f"  student: {self.final_dir}")
        return "\n".join(lines)



def train(config: TrainConfig | dict) -> TrainResult:
    """Run one training job described by `config` (a TrainConfig, or a dict of its fields)."""
    from tqdm.auto import tqdm

    from fastkd.teacher import load_tokenizer

    config = TrainConfig.make(overrides=config) if isinstance(config, dict) else config.validate()
    started = time.perf_counter()
    env = setup_env(config)
    run_dir = Path(config.out)
    old_run = existing_run(run_dir, config)  # refused here, before anything is loaded or created
    seed_everything(config.seed)

    # data and models
    tokenizer = load_tokenizer(config.tokenizer or config.student, "--tokenizer" if config.tokenizer else "--student")
    vocab_size = len(tokenizer)
    data = build_data(config, tokenizer, env)
    student = load_student(config, env.device, max(vocab_size, cache_vocab(data)))
    check_vocab(student, vocab_size, config.student or config.student_config)
    projector = None
    student_layers = []
    if config.hidden_weight:
        from fastkd.kernels import HiddenProjector

        student_layers = map_layers(data.teacher_layers, data.teacher_depth, student.config.num_hidden_layers,
                                    config.student_layers)
        projector = HiddenProjector(student.config.hidden_size, data.teacher_widths).to(env.device)
    module = StudentWithLoss(student, vocab_size, config, student_layers=student_layers, projector=projector)
    model = wrap_distributed(module, config, env)

    # optimisation
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    total_steps = config.max_steps if config.max_steps is not None else \
        math.ceil(config.epochs * len(train_plans(data, config, env)(0)))
    if total_steps < 1:
        raise UserError("no training step to run: the training source makes no full batch (fewer sequences than "
                        "--batch-size x processes x --grad-accum); give more data or a smaller --batch-size")
    scheduler = make_schedule(optimizer, config, total_steps)

    # state: fresh or resumed
    step, epoch, position, tokens, before = 0, 0, 0, 0, None
    if config.resume:
        state = load_checkpoint(run_dir)
        check_resumable(state, config, env, run_dir)
        load_full_state(module, optimizer, state["model"], state["optimizer"], config, env)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, epoch, position, tokens, before = (state["step"], state["epoch"], state["position"],
                                                 state["tokens"], state.get("before"))
    if env.is_main:  # everything loaded: the run folder is made (or the old run cleared) only now
        if config.overwrite:
            clear_run(old_run)
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    if env.world > 1:
        dist.barrier()
    log = MetricsLog(run_dir, env.is_main, config.tensorboard, step if config.resume else None)
    pad_id = tokenizer.pad_token_id
    probe = BBHProbe(config, tokenizer) if config.eval_bbh_tasks and env.is_main else None

    def evaluate_all() -> dict:  # held-out CE/KL on every rank together, then the BBH subset on the main one
        result = evaluate(module, data, config, env, pad_id)
        if probe is not None:
            result.update(probe(causal_lm(module.student)))
        return result

    if before is None:
        before = evaluate_all()
        if before:
            log.write(0, {f"eval_{k}": v for k, v in before.items()})

    def settle_tokens() -> None:  # fold the device-side token count into the host one (a sync: log/save only)
        nonlocal tokens
        if env.world > 1:
            tokens += int(round(float(pending_tokens)))
            pending_tokens.zero_()

    last_saved = step  # the newest step whose weights are on disk (or the start)
    window_from = step + 1  # first step whose loss terms are in `window`

    def check_finite(totals: list[float] | None = None) -> None:
        """Stop at the first non-finite loss (bad data, or divergence) before it reaches a log line or a checkpoint:
        its optimizer step has already spoilt the weights, and saving them would overwrite the last good ones."""
        if totals is None:
            bad = (~torch.isfinite(window)).any().double()
            if env.world > 1:
                dist.all_reduce(bad)
            finite = not bool(bad)
        else:
            finite = all(math.isfinite(x) for x in totals)
        if not finite:
            raise UserError(f"training loss became NaN or inf in steps {window_from}..{step}; stopped before saving, "
                            f"so {run_dir / CHECKPOINT} still holds step {last_saved} (if any). Check the data "
                            "(`fastkd cache verify`; a label or teacher id outside the student's vocabulary makes "
                            "its rows NaN on CUDA), or lower --lr, then resume with --resume")

    def checkpoint() -> None:
        nonlocal last_saved, saved_at
        check_finite()
        settle_tokens()
        model_state, optim_state = full_state(module, optimizer, config, env)
        if env.is_main:
            save_checkpoint(run_dir, {"model": model_state, "optimizer": optim_state,
                                      "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step,
                                      "epoch": epoch, "position": position, "tokens": tokens, "before": before,
                                      "config": asdict(config), "world": env.world})
        last_saved, saved_at = step, _clock()
        if env.world > 1:
            dist.barrier()

    if env.is_main and config.progress:
        import sys

        print(describe_loss_path(module, env.device), file=sys.stderr)
        capture = (getattr(data.train, "manifest", None) or {}).get("capture")
        if capture:
            print(f"cache: selective capture, the teacher at {capture['share']:.0%} of loss positions (by {capture['by']}): "
                  f"CE + KL there, CE alone elsewhere", file=sys.stderr)
    stream = step_stream(data, config, env, pad_id, epoch, position)
    pending_tokens = torch.zeros((), dtype=torch.float64, device=env.device)  # other ranks' rows, not yet read back
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (config.progress and env.is_main))
    window = torch.zeros(5, dtype=torch.float64, device=env.device)  # rows, then row-weighted total, ce, kl, hidden
    window_start, saved_at = time.perf_counter(), _clock()
    save_interval = 60.0 * config.save_every_minutes
    module.train()
    with StopSignals() as stops:  # SIGTERM/SIGINT: checkpoint after this step, then stop
        while step < total_steps:
            # one optimizer step: grad_accum micro-batches, each weighted by its share of the step's loss rows
            epoch, position, micro = next(stream)
            step_rows, grad_norm = train_step(model, module, optimizer, micro, data, config, env, vocab_size, window)
            if env.world > 1:
                pending_tokens += step_rows
            else:
                tokens += int(step_rows)
            scheduler.step()
            step += 1
            bar.update(1)
            if step % max(1, config.log_every) == 0 or step == total_steps:
                # loss terms averaged over the loss rows of every step since the last line, all ranks
                if env.world > 1:
                    dist.all_reduce(window)
                totals = window.tolist()
                check_finite(totals)
                values = dict(zip(("loss", "ce", "kl", "hidden"), (x / max(totals[0], 1.0) for x in totals[1:])))
                lr = scheduler.get_last_lr()[0]
                rate = totals[0] / max(time.perf_counter() - window_start, 1e-9)
                log.write(step, {**values, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                 "loss_tokens_per_s": rate, "epoch": epoch})
                bar.set_postfix(loss=f"{values['loss']:.3f}", ce=f"{values['ce']:.3f}", kl=f"{values['kl']:.3f}",
                                tok_s=f"{rate:.0f}", lr=f"{lr:.2e}")
                window.zero_()
                window_from = step + 1
                window_start = time.perf_counter()
            if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                result = evaluate_all()
                if result:
                    log.write(step, {f"eval_{k}": v for k, v in result.items()})
            timed, stop = agree(env, bool(save_interval) and _clock() - saved_at >= save_interval,
                                stops.received is not None)
            if (timed or stop or (config.save_every and step % config.save_every == 0)) and step < total_steps:
                checkpoint()
            if stop and step < total_steps:
                bar.close()
                stream.close()
                name = signal.Signals(stops.received).name if stops.received else "a signal on another rank"
                raise Interrupted(f"stopped by {name} after step {step} of {total_steps}; the checkpoint in "
                                  f"{run_dir / CHECKPOINT} holds it: re-run the same command with --resume to continue",
                                  stops.received or signal.SIGTERM)
    bar.close()
    stream.close()  # stops the read-ahead thread
    settle_tokens()

    after = evaluate_all()
    if after:
        log.write(step, {f"eval_{k}": v for k, v in after.items()})
    checkpoint()
    final_dir = None
    if config.save_final:
        model_state = full_state(module, None, config, env)[0] if env.world > 1 and config.distributed == "fsdp" else None
        if env.is_main:
            final_dir = save_final(module, tokenizer, run_dir / "final",
                                   {"config": asdict(config), "before": before, "after": after, "steps": step,
                                    "student_layers": student_layers, "teacher_layers": data.teacher_layers},
                                   model_state)
    log.close()
    if env.world > 1:
        dist.barrier()
        if env.owns_group:
            dist.destroy_process_group()
    return TrainResult(run_dir, final_dir, run_dir / CHECKPOINT, log.path, run_dir / "config.yaml", before, after,
                       step, tokens, time.perf_counter() - started, env.is_main)

