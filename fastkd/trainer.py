"""The training loop, on one process or under torchrun: `train(config)` sets up the run (data, student, loss,
optimizer, resume), then steps, logs, evaluates and checkpoints (everything needed to continue bit for bit)."""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from fastkd.cache_pipeline import from_main
from fastkd.checkpoint import (CHECKPOINT, check_resumable, clear_run, existing_run, full_state, how_to_continue,
                               load_checkpoint, load_full_state, lock_run, rng_state, save_checkpoint, save_final,
                               saved_settings, set_rng_state, unlock_run)
from fastkd.errors import Interrupted, UserError
from fastkd.kernels import HiddenProjector
from fastkd.packing import check_packed_attention
from fastkd.runtime import Env, StopSignals, agree, join_ranks, seed_everything, wrap_distributed
from fastkd.student import StudentWithLoss, batch_inputs, causal_lm, describe_loss_path, load_student, map_layers
from fastkd.train_config import TrainConfig
from fastkd.train_data import DataSide, add_teacher_signal, build_data, cache_vocab, step_stream, train_plans
from fastkd.train_step import autocast, bbh_probe, evaluate, train_step

__all__ = ["train", "TrainResult", "make_schedule",  # and, importable from here as before the split:
           "Env", "StudentWithLoss", "batch_inputs", "load_student", "DataSide", "add_teacher_signal", "build_data",
           "step_stream", "train_step"]


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
        self.path, self.enabled, self.tb = run_dir / "metrics.jsonl", enabled, None
        if not enabled:
            return
        # a new run starts it empty; a resumed one drops the lines written after its checkpoint
        old = self.path.read_text().splitlines() if resume_step is not None and self.path.exists() else []
        self.path.write_text("".join(line + "\n" for line in old if line and json.loads(line)["step"] <= resume_step))
        if tensorboard:
            with suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))

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


@dataclass
class Run:
    """One training run while it trains: what it was built from, the counters a checkpoint saves, and the loss
    window (the terms summed over the loss rows of every step since the last log line)."""

    config: TrainConfig
    env: Env
    run_dir: Path
    tokenizer: object
    data: DataSide
    module: StudentWithLoss
    model: torch.nn.Module          # the module, wrapped for DDP/FSDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    student_layers: list = field(default_factory=list)
    step: int = 0
    epoch: int = 0
    position: int = 0
    tokens: int = 0
    before: dict | None = None
    after: dict | None = None       # the held-out metrics at the end (in the last checkpoint: a resume keeps them)
    changes: list = field(default_factory=list)   # each resume's changed FROM_HERE_KEYS (checkpoint.check_resumable)
    log: MetricsLog | None = None
    probe: object = None            # --eval-bbh-tasks: student -> BBH scores (train_step.bbh_probe)
    last_saved: int = 0             # the newest step whose weights are on disk (or the start)
    saved_at: float = 0.0
    sums: torch.Tensor | None = None            # rows, row-weighted total, ce, kl, hidden (this rank)
    pending_tokens: torch.Tensor | None = None  # global loss rows not yet in `tokens` (kept on the device)
    first_step: int = 1
    started: float = 0.0

    def evaluate(self) -> dict:
        """Held-out CE/KL on every rank together, then the BBH subset on the main one; logged as eval_*."""
        result = evaluate(self.module, self.data, self.config, self.env, self.tokenizer.pad_token_id)
        if self.probe is not None:
            result.update(self.probe(causal_lm(self.module.student)))
        if result:
            self.log.write(self.step, {f"eval_{k}": v for k, v in result.items()})
        return result

    def restart_window(self) -> None:
        if self.sums is None:
            self.sums = torch.zeros(5, dtype=torch.float64, device=self.env.device)
            self.pending_tokens = torch.zeros((), dtype=torch.float64, device=self.env.device)
        self.sums.zero_()
        self.first_step, self.started = self.step + 1, time.perf_counter()

    def settle_tokens(self) -> None:
        """Fold the device-side token count into the host one (a sync: at log or save time only)."""
        self.tokens += int(round(float(self.pending_tokens)))
        self.pending_tokens.zero_()

    def check_finite(self) -> None:
        """Stop at the first non-finite loss (any rank) before it reaches a log line or a checkpoint: its optimizer
        step has already spoilt the weights, and saving them would overwrite the last good ones."""
        bad = (~torch.isfinite(self.sums)).any().double()
        if self.env.world > 1:
            dist.all_reduce(bad)
        if bad:
            raise UserError(f"training loss became NaN or inf in steps {self.first_step}..{self.step}; stopped "
                            f"before saving, so {self.run_dir / CHECKPOINT} still holds step {self.last_saved} "
                            "(if any). Check the data (`fastkd cache verify`; a label or teacher id outside the "
                            "student's vocabulary makes its rows NaN on CUDA), then "
                            f"{how_to_continue(self.run_dir)}; a lower --lr needs a new run (--overwrite)")

    def log_line(self, grad_norm, bar) -> None:
        """The averages since the last line, to metrics.jsonl, TensorBoard and the progress bar; then restart."""
        if self.env.world > 1:
            dist.all_reduce(self.sums)
        totals = self.sums.tolist()
        if not all(map(math.isfinite, totals)):   # the reduced totals: every rank stops here together
            self.check_finite()
        values = dict(zip(("loss", "ce", "kl", "hidden"), (x / max(totals[0], 1.0) for x in totals[1:])))
        lr = self.scheduler.get_last_lr()[0]
        rate = totals[0] / max(time.perf_counter() - self.started, 1e-9)
        self.log.write(self.step, {**values, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                                   "loss_tokens_per_s": rate, "epoch": self.epoch})
        bar.set_postfix(loss=f"{values['loss']:.3f}", ce=f"{values['ce']:.3f}", kl=f"{values['kl']:.3f}",
                        tok_s=f"{rate:.0f}", lr=f"{lr:.2e}")
        self.restart_window()

    def checkpoint(self) -> None:
        self.check_finite()
        self.settle_tokens()
        model_state, optim_state = full_state(self.module, self.optimizer, self.config, self.env)
        if self.env.is_main:
            save_checkpoint(self.run_dir, {
                "model": model_state, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(), "step": self.step, "epoch": self.epoch, "position": self.position,
                "tokens": self.tokens, "before": self.before, "after": self.after, "changes": self.changes,
                "config": asdict(self.config), "world": self.env.world})
        self.last_saved, self.saved_at = self.step, _clock()
        self.env.barrier()


def train(config: TrainConfig | dict) -> TrainResult:
    """Run one training job described by `config` (a TrainConfig, or a dict of its fields)."""
    config = TrainConfig.make(overrides=config) if isinstance(config, dict) else config.validate()
    started, run_dir = time.perf_counter(), Path(config.out)
    env = join_ranks(config.device)
    made = from_main(env, lambda: lock_run(run_dir))["made"]  # rank 0 holds <out>/.lock until the run ends
    opened = False
    try:
        old_run = existing_run(run_dir, config)  # refused here, before anything is loaded or created
        step, changed = check_resume(config, env, run_dir) if config.resume else (0, {})
        seed_everything(config.seed)
        run = build_run(config, env, step)
        if config.resume:
            resume(run, changed)
        opened = True   # from here on the run folder changes
        open_run_folder(run, old_run)
        if run.before is None:
            run.before = run.evaluate()
        announce(run)
        loop(run)
        return finish(run, started)
    except (KeyboardInterrupt, OSError) as err:
        raise stopped(err, run_dir, opened) from None
    finally:
        if env.is_main:
            unlock_run(run_dir, made)


def check_resume(config: TrainConfig, env: Env, run_dir: Path) -> tuple[int, dict]:
    """--resume, before anything is loaded: the checkpoint's step and the settings changed since (checked and
    warned about by check_resumable's rules)."""
    saved = saved_settings(run_dir)
    changed = check_resumable(saved, config, env, run_dir)
    if changed and env.is_main:
        print(f"fastkd train: warning: resuming with other settings than the checkpoint's ("
              f"{'; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())}): they apply from step "
              f"{saved['step']} on, so this run will not match one started with them", file=sys.stderr)
    return saved["step"], changed


def stopped(err: BaseException, run_dir: Path, opened: bool) -> UserError:
    """Ctrl-C (outside the loop's own handling) or an OSError (disk full): one line saying what happened and the
    command that continues: the same one while the run folder is untouched, else what how_to_continue says."""
    if opened:
        advice = how_to_continue(run_dir)
    else:
        advice = f"nothing in {run_dir} was changed yet, so re-run the same command"
    if isinstance(err, KeyboardInterrupt):
        return Interrupted(f"interrupted; {advice}", signal.SIGINT)
    where = err.filename or run_dir     # none: a full disk met while writing or closing a file of the run
    return UserError(f"{err.strerror or err} ({where}); fix this, then {advice}")


def build_run(config: TrainConfig, env: Env, resume_step: int = 0) -> Run:
    """Tokenizer, data, student (+ hidden projector) with its loss, optimizer and schedule."""
    from fastkd.teacher import load_tokenizer

    tokenizer = load_tokenizer(config.tokenizer or config.student, "--tokenizer" if config.tokenizer else "--student")
    vocab_size = len(tokenizer)
    data = build_data(config, tokenizer, env)
    total_steps = config.max_steps if config.max_steps is not None else \
        math.ceil(config.epochs * len(train_plans(data, config, env)(0)))
    if total_steps < 1:
        raise UserError("no training step to run: the training source makes no full batch (fewer sequences than "
                        "--batch-size x processes x --grad-accum); give more data or a smaller --batch-size")
    if total_steps < resume_step:
        raise UserError(f"--resume {config.out}: --epochs {config.epochs} makes {total_steps} steps, fewer than the "
                        f"checkpoint's {resume_step}; give more (or --max-steps {resume_step} or more)")
    student = load_student(config, env.device, max(vocab_size, cache_vocab(data)))
    if config.packing:  # the student's attention must keep packed sequences apart (a tiny forward proves it)
        where = f"student {config.student or config.student_config}"
        check_packed_attention(student, env.device, autocast(config, env), where)
    projector, student_layers = None, []
    if config.hidden_weight:
        student_layers = map_layers(data.teacher_layers, data.teacher_depth, student.config.num_hidden_layers,
                                    config.student_layers)
        projector = HiddenProjector(student.config.hidden_size, data.teacher_widths).to(env.device)
    module = StudentWithLoss(student, vocab_size, config, student_layers=student_layers, projector=projector)
    model = wrap_distributed(module, config, env)   # before the optimizer: FSDP replaces the parameters
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                                  weight_decay=config.weight_decay)
    return Run(config, env, Path(config.out), tokenizer, data, module, model, optimizer,
               make_schedule(optimizer, config, total_steps), total_steps, student_layers)


def resume(run: Run, changed: dict) -> None:
    """Weights, optimizer, schedule, RNG and position from <out>/checkpoint (checked by check_resumable); the
    final metrics too when it is the last one, and the settings this resume changed."""
    state = load_checkpoint(run.run_dir)
    load_full_state(run.module, run.optimizer, state["model"], state["optimizer"], run.config, run.env)
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    run.step, run.epoch, run.position, run.tokens = state["step"], state["epoch"], state["position"], state["tokens"]
    run.before, run.last_saved = state.get("before"), state["step"]
    run.after = state.get("after") if state["step"] >= run.total_steps else None   # not evaluated (logged) twice
    run.changes = state.get("changes", []) + ([{"step": state["step"], "changed": changed}] if changed else [])


def open_run_folder(run: Run, old_run: list[Path]) -> None:
    """Everything is loaded: only now is the run folder made (or the old run cleared), the config saved."""
    if run.env.is_main:
        if run.config.overwrite:
            clear_run(old_run)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run.config.save(run.run_dir / "config.yaml")
    run.env.barrier()
    run.log = MetricsLog(run.run_dir, run.env.is_main, run.config.tensorboard, run.step if run.config.resume else None)
    if run.config.eval_bbh_tasks and run.env.is_main:
        run.probe = bbh_probe(run.config, run.tokenizer)


def announce(run: Run) -> None:
    """Say on stderr which loss path runs and whether the cache keeps the teacher at every position."""
    if not (run.env.is_main and run.config.progress):
        return
    print(describe_loss_path(run.module, run.env.device), file=sys.stderr)
    capture = (getattr(run.data.train, "manifest", None) or {}).get("capture")
    if capture:
        print(f"cache: selective capture, the teacher at {capture['share']:.0%} of loss positions (by {capture['by']}): "
              f"CE + KL there, CE alone elsewhere", file=sys.stderr)


def loop(run: Run) -> None:
    """Optimizer steps until total_steps: log, evaluate and checkpoint on schedule; on SIGTERM/SIGINT save and stop."""
    from tqdm.auto import tqdm

    config, total = run.config, run.total_steps
    stream = step_stream(run.data, config, run.env, run.tokenizer.pad_token_id, run.epoch, run.position)
    bar = tqdm(total=total, initial=run.step, desc="train", unit="step", disable=not (config.progress and run.env.is_main))
    run.restart_window()
    run.saved_at, interval = _clock(), 60.0 * config.save_every_minutes
    run.module.train()
    try:
        with StopSignals() as stops:
            while run.step < total:
                run.epoch, run.position, micro = next(stream)
                step_rows, grad_norm = train_step(run.model, run.module, run.optimizer, micro, run.data, config,
                                                  run.env, len(run.tokenizer), run.sums)
                run.pending_tokens += step_rows
                run.scheduler.step()
                run.step += 1
                bar.update(1)
                if run.step % max(1, config.log_every) == 0 or run.step == total:
                    run.log_line(grad_norm, bar)
                if config.eval_every and run.step % config.eval_every == 0 and run.step < total:
                    run.evaluate()
                timed, stop = agree(run.env, bool(interval) and _clock() - run.saved_at >= interval,
                                    stops.received is not None)
                if (timed or stop or (config.save_every and run.step % config.save_every == 0)) and run.step < total:
                    run.checkpoint()
                if stop and run.step < total:
                    name = signal.Signals(stops.received).name if stops.received else "a signal on another rank"
                    raise Interrupted(f"stopped by {name} after step {run.step} of {total}; the checkpoint in "
                                      f"{run.run_dir / CHECKPOINT} holds it: re-run the same command with --resume "
                                      f"(and without --overwrite) to continue", stops.received or signal.SIGTERM)
    finally:
        bar.close()
        stream.close()  # stops the read-ahead thread
    run.settle_tokens()


def finish(run: Run, started: float) -> TrainResult:
    """Held-out metrics after training, the last checkpoint, the final student, and what the run produced."""
    run.after = after = run.evaluate() if run.after is None else run.after
    run.checkpoint()
    final_dir, env, config = None, run.env, run.config
    if config.save_final:
        model_state = full_state(run.module, None, config, env)[0]  # under FSDP every rank gathers it
        if env.is_main:
            final_dir = save_final(run.module, run.tokenizer, run.run_dir / "final",
                                   {"config": asdict(config), "before": run.before, "after": after, "steps": run.step,
                                    "resumed_with_other_settings": run.changes,
                                    "student_layers": run.student_layers, "teacher_layers": run.data.teacher_layers},
                                   model_state)
    run.log.close()
    env.barrier()
    env.close()
    return TrainResult(run.run_dir, final_dir, run.before, after, run.step, run.tokens, time.perf_counter() - started,
                       env.is_main)
