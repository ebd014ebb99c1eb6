"""The training loop: student + loss from kernels/ + AdamW, on one process or under torchrun.

Read top to bottom: `train(config)` sets up the run (data, student, loss, optimizer, resume),
then loops: take `grad_accum` micro-batches, count their loss rows across ranks, forward and
backward each (its loss weighted by its share of the rows, so the step's gradient is the mean
over every loss row of the global batch, whatever the split), clip, step, log, evaluate,
checkpoint. Checkpoints hold everything needed to continue bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastkd.checkpoint import CHECKPOINT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastkd.errors import UserError
from fastkd.loader import IGNORE_INDEX, Batch, CacheSource, RecordSource, make_loader, plan_for, split_holdout
from fastkd.train import TrainConfig, save_config


# ----------------------------------------------------------------------------- the loss module

class StudentWithLoss(nn.Module):
    """Student forward + distillation loss as one module, so DDP/FSDP wrap (and sync) both the
    student and the hidden-state projector. Logits are computed only at loss rows and only over
    the tokenizer's vocabulary (a padded embedding's extra rows are never seen)."""

    def __init__(self, student: nn.Module, vocab_size: int, config: TrainConfig, *, student_layers=(), projector=None):
        super().__init__()
        self.student = student
        self.projector = projector
        self.vocab_size = vocab_size
        self.student_layers = list(student_layers)
        self.cfg = config
        cfg = student.config
        # models whose logits are not lm_head(last hidden) (soft-capping, logit scale) take the full forward
        self.full_forward = bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
                                 or not isinstance(student.get_output_embeddings(), nn.Linear))

    @property
    def loss_path(self) -> str:
        """The loss implementation this module runs: the lightest correct one unless --loss-impl chose."""
        return choose_loss_path(self.cfg.loss_impl, self.full_forward)

    def forward(self, input_ids, attention_mask, labels, topk_ids=None, topk_logprobs=None, tail=None, counts=None,
                teacher_hidden=None, loss_index=None):
        from fastkd.kernels import LossTerms, distill_loss

        cfg = self.cfg
        if loss_index is None:  # callers without a collated Batch: found here (a host sync on a GPU)
            loss_index = (labels.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)
        pick = lambda x: x.flatten(0, 1).index_select(0, loss_index)  # noqa: E731 - the loss rows, row-major
        y = pick(labels)
        want_hidden = bool(self.projector is not None and cfg.hidden_weight)
        if self.full_forward:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               output_hidden_states=want_hidden)
            logits, h, hidden_states = pick(out.logits)[:, :self.vocab_size], None, out.hidden_states
        else:
            out = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                          output_hidden_states=want_hidden)
            h, logits, hidden_states = pick(out.last_hidden_state), None, out.hidden_states
        head = self.student.get_output_embeddings()
        if topk_ids is None:  # SFT: no teacher signal
            if logits is None:
                logits = head(h)[:, :self.vocab_size]
            ce = nn.functional.cross_entropy(logits.float(), y) if y.numel() else logits.sum() * 0.0
            zero = torch.zeros((), device=ce.device)
            terms = LossTerms(total=cfg.ce_weight * ce, ce=ce.detach(), kl=zero, hidden=zero, num_tokens=int(y.numel()))
        else:
            common = dict(counts=counts, mode=cfg.mode, ce_weight=cfg.ce_weight, kl_weight=cfg.kl_weight,
                          temperature=cfg.temperature, chunk_size=cfg.chunk_size)
            if self.loss_path == "fused":
                from fastkd.kernels import fused_linear_distill_loss

                weight = head.weight[:self.vocab_size]
                bias = head.bias[:self.vocab_size] if head.bias is not None else None
                terms = fused_linear_distill_loss(h, weight, y, topk_ids, topk_logprobs, tail, bias=bias, **common)
            else:
                if logits is None:
                    logits = head(h)[:, :self.vocab_size]
                # the logits are this step's own intermediate (nothing else reads them): the gradient may
                # overwrite them, saving one [rows, V] buffer
                terms = distill_loss(logits.float(), y, topk_ids, topk_logprobs, tail, inplace=True, **common)
        if want_hidden:
            student_hidden = [pick(hidden_states[layer]) for layer in self.student_layers]
            hidden = self.projector(student_hidden, teacher_hidden)
            terms.total = terms.total + cfg.hidden_weight * hidden.to(terms.total.dtype)
            terms.hidden = hidden.detach()
        return terms


def choose_loss_path(loss_impl: str, full_forward: bool) -> str:
    """auto: the fused linear + loss (no [rows, V] logits: the lightest in time and memory on CPU and CUDA,
    see benchmarks/train_step_table.py) unless the model's logits are not lm_head(hidden)."""
    if loss_impl == "auto":
        return "logits" if full_forward else "fused"
    if loss_impl == "fused" and full_forward:
        return "logits"  # soft-capped / scaled logits: the fused path would compute other logits
    return loss_impl


def describe_loss_path(module: "StudentWithLoss", device: torch.device) -> str:
    path = module.loss_path
    what = {"fused": "fused linear + loss, chunked over rows (no [rows, V] logits)",
            "logits": "logits [rows, V], loss gradient written over them"}[path]
    why = "auto: the lightest on " + device.type if module.cfg.loss_impl == "auto" else f"--loss-impl {module.cfg.loss_impl}"
    if module.full_forward and module.cfg.loss_impl != "logits":
        why = "the student's logits are not lm_head(hidden) (soft-capping or a logit scale)"
    return f"loss: {path} ({what}; {why}; --loss-impl fused|logits overrides)"


def batch_inputs(batch: Batch, teacher_layers: list[int]) -> dict:
    """The keyword arguments StudentWithLoss takes, from a batch."""
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs, tail=batch.tail, counts=batch.counts,
                teacher_hidden=[batch.hidden[layer] for layer in teacher_layers] if batch.hidden else None,
                loss_index=batch.loss_index)


# ----------------------------------------------------------------------------- setup helpers

@dataclass
class Env:
    """Where this process runs: device, rank, world size."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False            # this run created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_env(config: TrainConfig) -> Env:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    from fastkd.teacher import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(config.device)
    if world == 1:
        return Env(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(device, rank, world, owns)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_student(config: TrainConfig, device: torch.device, vocab_size: int = 0) -> nn.Module:
    """From a folder/hub id, or freshly initialised from a config (seeded) for from-scratch runs.
    A config whose vocabulary is smaller than the tokenizer's (or the cache's ids) is refused
    before any weight is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = config.student or config.student_config
    flag = "--student" if config.student else "--student-config"
    try:
        model_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UserError(f"{flag} {source}: {str(err).splitlines()[0]}") from None
    rows = getattr(model_config, "vocab_size", None) or getattr(getattr(model_config, "text_config", None), "vocab_size", None)
    if isinstance(rows, int) and rows < vocab_size:
        raise UserError(f"{flag} {source}: its config has vocab_size {rows}, fewer than the {vocab_size} token ids the "
                        f"tokenizer and teacher cache use; the student cannot score them. Use a student made for this "
                        f"tokenizer (or resize its embeddings and save it first)")
    if config.student:
        from fastkd.teacher import load_causal_lm

        model = load_causal_lm(config.student, dtype="float32", device=str(device), role="student")
    else:
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config).to(device)
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)     # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def cache_vocab(data: "DataSide") -> int:
    """The vocabulary size the cache's ids were drawn from (0 without a cache)."""
    manifest = getattr(data.train, "manifest", None) or {}
    return int((manifest.get("tokenizer") or {}).get("vocab_size") or 0)


def check_vocab(model: nn.Module, vocab_size: int, where: str) -> None:
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise UserError(f"{where}: the student's output layer has {rows} rows, fewer than the tokenizer's "
                        f"{vocab_size} tokens; student and tokenizer do not belong together")


def map_layers(teacher_layers: list[int], teacher_depth: int, student_depth: int, given: list[int] | None) -> list[int]:
    """Student hidden-state index for each teacher layer: as given, or at the same relative depth."""
    if given is not None:
        if len(given) != len(teacher_layers):
            raise UserError(f"--student-layers has {len(given)} entries but the teacher signal has "
                            f"{len(teacher_layers)} layers {teacher_layers}")
        bad = [s for s in given if not 0 <= s <= student_depth]
        if bad:
            raise UserError(f"--student-layers {bad}: out of range 0..{student_depth}")
        return list(given)
    return [round(layer * student_depth / max(teacher_depth, 1)) for layer in teacher_layers]


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


# ----------------------------------------------------------------------------- the data side

@dataclass
class DataSide:
    """Training source + positions, held-out source + positions, and what the loss needs from them."""

    train: object
    train_positions: np.ndarray | None
    eval: object | None
    eval_positions: np.ndarray | None
    teacher_layers: list[int]
    teacher_widths: list[int]
    teacher_depth: int
    teacher: nn.Module | None = None
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # corrupt blocks' positions


def build_data(config: TrainConfig, tokenizer, env: Env) -> DataSide:
    """Open the cache (checking tokenizer and mode) or tokenise the records (+ load a live teacher)."""
    from fastkd.data import check_tokenizer, tokenizer_identity

    excluded = np.zeros(0, dtype=np.int64)
    if config.cache:
        layers = None if config.hidden_weight else []          # skip decoding hidden states nobody uses
        if not config.verify_cache and env.is_main:
            warnings.warn(f"--no-verify-cache: blocks of cache {config.cache} are decoded without checking their "
                          f"digests; corrupt bytes would be trained on", stacklevel=2)
        train = CacheSource(config.cache, layers=layers, verify=config.verify_cache)
        if config.skip_corrupt_blocks:
            excluded = skip_corrupt(train, config.cache, config, env)
        span = config.shuffle_buffer + config.group_batches * config.batch_size * env.world * config.grad_accum
        train.cached_blocks = 2 + math.ceil(span / max(1.0, len(train) / max(1, len(train.shards))))
        manifest = train.manifest
        check_tokenizer(manifest.get("tokenizer", {}), tokenizer, f"cache {config.cache}")
        cached_mode = manifest.get("mode", "topk")
        if (cached_mode == "sample") != (config.mode == "sampled"):
            hint = "--mode sampled" if cached_mode == "sample" else "--mode tail or --mode renorm"
            raise UserError(f"cache {config.cache} holds {'sampled ids with counts' if cached_mode == 'sample' else 'top-k log-probs'} "
                            f"(manifest mode {cached_mode!r}) but --mode is {config.mode!r}; use {hint}")
        layers = [int(x) for x in manifest.get("layers", [])]
        widths = [int(x) for x in manifest.get("hidden_widths", [])]
        depth = int(manifest.get("teacher", {}).get("num_hidden_layers") or 0)
        if config.hidden_weight and not layers:
            raise UserError(f"--hidden-weight {config.hidden_weight}: cache {config.cache} holds no hidden states "
                            f"(make it with `fastkd cache-teacher --layers ...`)")
        teacher = None
        evaluation = None
        if config.eval_cache:
            evaluation = CacheSource(config.eval_cache, layers=layers, verify=config.verify_cache)
            check_tokenizer(evaluation.manifest.get("tokenizer", {}), tokenizer, f"eval cache {config.eval_cache}")
    else:
        rec = dict(cot=config.cot, chat=config.chat_template, max_length=config.max_length)
        train = RecordSource(config.data, tokenizer, **rec)
        evaluation = RecordSource(config.eval_data, tokenizer, **rec) if config.eval_data else None
        teacher, layers, widths, depth = None, [], [], 0
        if config.teacher:
            from fastkd.teacher import load_causal_lm, load_tokenizer

            check_tokenizer(tokenizer_identity(load_tokenizer(config.teacher)), tokenizer, f"teacher {config.teacher}")
            teacher = load_causal_lm(config.teacher, dtype=config.teacher_dtype, device=str(env.device))
            depth = int(teacher.config.num_hidden_layers)
            layers = list(config.teacher_layers or [])
            widths = [int(teacher.config.hidden_size)] * len(layers)
    if config.hidden_weight == 0:
        layers, widths = [], []
    train_positions = eval_positions = None
    if evaluation is None and config.eval_sequences:
        train_positions, eval_positions = split_holdout(len(train), config.eval_sequences, config.seed)
        # its own reader and block cache: the training stream decodes in a background thread meanwhile
        evaluation = copy.copy(train) if isinstance(train, CacheSource) else train
    if len(excluded):
        keep = lambda positions: np.setdiff1d(positions, excluded)  # noqa: E731
        train_positions = keep(np.arange(len(train)) if train_positions is None else train_positions)
        eval_positions = None if eval_positions is None else keep(eval_positions)
        if not len(train_positions):
            raise UserError(f"cache {config.cache}: every block fails its digests; nothing is left to train on")
    return DataSide(train, train_positions, evaluation, eval_positions, layers, widths, depth, teacher,
                    excluded=excluded)


def skip_corrupt(source: CacheSource, path: str, config: TrainConfig, env: Env) -> np.ndarray:
    """--skip-corrupt-blocks: check every block's digests once; the positions of the bad ones."""
    import sys

    from tqdm.auto import tqdm

    show = config.progress and env.is_main
    positions, messages = source.corrupt_positions(
        progress=(lambda xs: tqdm(xs, desc="check cache", unit="block", file=sys.stderr)) if show else None)
    if messages and env.is_main:
        print(f"--skip-corrupt-blocks: {len(messages)} of {len(source.shards)} blocks of cache {path} fail their "
              f"digests; their {len(positions)} sequences are left out of training:", file=sys.stderr)
        for message in messages[:10]:
            print(f"  {message.split('; its sequences')[0]}", file=sys.stderr)
        if len(messages) > 10:
            print(f"  ... and {len(messages) - 10} more (`fastkd cache verify {path}` lists them all)", file=sys.stderr)
    return positions


def add_teacher_signal(batch: Batch, data: DataSide, config: TrainConfig, vocab_size: int) -> Batch:
    """Online KD: run the live teacher on the batch and attach the same signal a cache would hold."""
    if data.teacher is None or batch.topk_ids is not None:
        return batch
    from fastkd.teacher import teacher_signal

    sig = teacher_signal(data.teacher, batch.input_ids, batch.attention_mask, batch.loss_mask, k=config.top_k,
                         layers=tuple(data.teacher_layers), vocab_size=vocab_size)
    batch.topk_ids, batch.topk_logprobs, batch.tail = sig.topk_ids, sig.topk_logprobs, sig.tail
    batch.hidden = dict(sig.hidden)
    return batch


def train_plans(data: DataSide, config: TrainConfig, env: Env):
    """epoch -> the epoch's global batches; one global batch = one optimizer step."""
    from fastkd.loader import PlanMaker

    return PlanMaker(data.train.lengths, data.train.shards, config.batch_size * env.world * config.grad_accum,
                     config.seed, min_size=env.world * config.grad_accum, shuffle_buffer=config.shuffle_buffer,
                     group_batches=config.group_batches, allowed=data.train_positions)


def step_stream(data: DataSide, config: TrainConfig, env: Env, pad_id: int, epoch: int, position: int):
    """Endless (epoch, position-after, micro-batches) over the training source from a saved position."""
    return iter(make_loader(data.train, train_plans(data, config, env), pad_id, rank=env.rank, world=env.world,
                            accum=config.grad_accum, epoch=epoch, start=position, num_workers=config.num_workers,
                            pin_memory=env.device.type == "cuda", prefetch=config.prefetch))


def train_step(model: nn.Module, module: "StudentWithLoss", optimizer, micro: list[Batch], data: DataSide,
               config: TrainConfig, env: Env, vocab_size: int, window: torch.Tensor):
    """One optimizer step over the step's micro-batches, each weighted by its share of the step's loss rows
    (all ranks), with no host synchronisation: returns (the step's loss rows, clamped to >= 1: a host
    float in one process, a device scalar across ranks; the gradient norm before clipping, a device
    scalar or None) and adds rows and row-weighted loss terms to `window` on the device."""
    counts = [b.num_rows for b in micro]                  # on the host, before the copy: no device sync
    if env.world > 1:  # the global row count stays on the device
        rows = torch.tensor([float(sum(counts))], dtype=torch.float64, device=env.device)  # NCCL: device tensors
        dist.all_reduce(rows)
        step_rows = rows[0].clamp_min(1.0)
        divisor = step_rows.float()
    else:
        step_rows = divisor = max(float(sum(counts)), 1.0)
    for i, (batch, n) in enumerate(zip(micro, counts)):
        batch = add_teacher_signal(batch.to(env.device, non_blocking=True), data, config, vocab_size)
        last = i == len(micro) - 1
        with (nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
            with autocast(config, env):
                terms = model(**batch_inputs(batch, data.teacher_layers))
            (terms.total * (n * env.world / divisor)).backward()
        window += torch.stack([torch.tensor(float(n), dtype=torch.float64, device=env.device)] +
                              [t.detach().double() * n for t in (terms.total, terms.ce, terms.kl, terms.hidden)])
    grad_norm = (torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
                 if config.max_grad_norm else None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_rows, grad_norm


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(module: StudentWithLoss, data: DataSide, config: TrainConfig, env: Env, pad_id: int) -> dict:
    """Row-weighted CE and KL to the teacher (in the loss's KL mode) over the held-out sequences."""
    if data.eval is None:
        return {}
    plan = plan_for(data.eval, config.batch_size * env.world, seed=config.seed, epoch=0, min_size=env.world,
                    shuffle=False, group_batches=1 << 20, allowed=data.eval_positions)
    if config.eval_batches:
        plan = plan[:config.eval_batches]
    if not plan:
        return {}
    was_training = module.training
    module.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # rows, ce*rows, kl*rows
    has_teacher = data.eval.has_teacher or data.teacher is not None
    for _, _, (batch,) in make_loader(data.eval, plan, pad_id, rank=env.rank, world=env.world, epochs=1):
        n = float(batch.num_rows)                                   # counted on the host
        batch = add_teacher_signal(batch.to(env.device), data, config, module.vocab_size)
        with autocast(config, env):
            terms = module(**batch_inputs(batch, data.teacher_layers))
        sums += torch.stack([torch.tensor(n, dtype=torch.float64, device=env.device),
                             terms.ce.double() * n, terms.kl.double() * n])
    if env.world > 1:
        dist.all_reduce(sums)
    module.train(was_training)
    total_rows, ce, kl = sums.tolist()
    result = {"ce": ce / max(total_rows, 1.0), "rows": int(total_rows)}
    if has_teacher:
        result["kl"] = kl / max(total_rows, 1.0)
    return result


def autocast(config: TrainConfig, env: Env):
    bf16 = config.precision == "bf16" or (config.precision == "auto" and env.device.type == "cuda")
    return torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


# ----------------------------------------------------------------------------- checkpoints

def full_state(module: nn.Module, optimizer, config: TrainConfig, env: Env) -> tuple[dict, dict | None]:
    """Unsharded model (and optimizer) state; under FSDP every rank takes part in gathering it."""
    if env.world > 1 and config.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if optimizer is None:
            return get_model_state_dict(module, options=options), None
        return get_state_dict(module, optimizer, options=options)
    if not env.is_main:
        return {}, None
    return module.state_dict(), optimizer.state_dict() if optimizer is not None else None


def load_full_state(module: nn.Module, optimizer, model_state: dict, optim_state: dict, config: TrainConfig,
                    env: Env) -> None:
    if env.world > 1 and config.distributed == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True))
        return
    module.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


# settings that decide which sequences each step sees: a resumed run must keep them
DATA_ORDER_KEYS = ("cache", "data", "seed", "batch_size", "grad_accum", "shuffle_buffer", "group_batches",
                   "eval_sequences", "max_length", "cot")


def check_resumable(state: dict, config: TrainConfig, env: Env, run_dir: Path) -> None:
    """Refuse to resume with settings that change the data order (the saved position would mean other data)."""
    saved = dict(state.get("config", {}), world=state.get("world", 1))
    now = dict(asdict(config), world=env.world)
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, now {now[key]!r}" for key in DATA_ORDER_KEYS + ("world",)
             if key in saved and saved.get(key) != now[key]]
    if diffs:
        raise UserError(f"--resume {run_dir}: the checkpoint was made with other data-order settings "
                        f"({'; '.join(diffs)}); resume with the same ones or start a new run folder")


def save_final(module: StudentWithLoss, tokenizer, out: Path, extra: dict, model_state: dict | None = None) -> Path:
    """save_pretrained the student + its tokenizer (loadable by plain transformers), and the projector."""
    from safetensors.torch import save_file

    model_state = model_state if model_state is not None else module.state_dict()
    out.mkdir(parents=True, exist_ok=True)
    student_state = {k[len("student."):]: v for k, v in model_state.items() if k.startswith("student.")}
    module.student.save_pretrained(out, state_dict=student_state)
    tokenizer.save_pretrained(out)
    projector = {k[len("projector."):]: v.detach().cpu().contiguous() for k, v in model_state.items()
                 if k.startswith("projector.")}
    if projector:
        save_file(projector, str(out / "projector.safetensors"))
    (out / "fastkd_train.json").write_text(json.dumps(extra, indent=2, default=str))
    return out


# ----------------------------------------------------------------------------- logging

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


# ----------------------------------------------------------------------------- result

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
            return ", ".join(f"{k} {v:.4f}" for k, v in d.items() if k != "rows") or "n/a"
        lines = [f"run: {self.run_dir}  ({self.steps} steps, {self.tokens} loss tokens, {self.seconds:.1f} s)",
                 f"  held-out before: {fmt(self.before)}", f"  held-out after:  {fmt(self.after)}"]
        if self.final_dir:
            lines.append(f"  student: {self.final_dir}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the loop

def train(config: TrainConfig | dict) -> TrainResult:
    """Run one training job described by `config` (a TrainConfig, or a dict of its fields)."""
    from tqdm.auto import tqdm

    from fastkd.teacher import load_tokenizer
    from fastkd.train import make_config

    config = make_config(overrides=config) if isinstance(config, dict) else config.validate()
    started = time.perf_counter()
    env = setup_env(config)
    run_dir = Path(config.out)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)

    # data and models
    tokenizer = load_tokenizer(config.tokenizer or config.student)
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
    if env.is_main:
        save_config(config, run_dir / "config.yaml")
    log = MetricsLog(run_dir, env.is_main, config.tensorboard, step if config.resume else None)
    pad_id = tokenizer.pad_token_id
    if before is None:
        before = evaluate(module, data, config, env, pad_id)
        if before:
            log.write(0, {f"eval_{k}": v for k, v in before.items()})

    def settle_tokens() -> None:  # fold the device-side token count into the host one (a sync: log/save only)
        nonlocal tokens
        if env.world > 1:
            tokens += int(round(float(pending_tokens)))
            pending_tokens.zero_()

    def checkpoint() -> None:
        settle_tokens()
        model_state, optim_state = full_state(module, optimizer, config, env)
        if env.is_main:
            save_checkpoint(run_dir, {"model": model_state, "optimizer": optim_state,
                                      "scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step,
                                      "epoch": epoch, "position": position, "tokens": tokens, "before": before,
                                      "config": asdict(config), "world": env.world})
        if env.world > 1:
            dist.barrier()

    if env.is_main and config.progress:
        import sys

        print(describe_loss_path(module, env.device), file=sys.stderr)
    stream = step_stream(data, config, env, pad_id, epoch, position)
    pending_tokens = torch.zeros((), dtype=torch.float64, device=env.device)  # other ranks' rows, not yet read back
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (config.progress and env.is_main))
    window = torch.zeros(5, dtype=torch.float64, device=env.device)  # rows, then row-weighted total, ce, kl, hidden
    window_start = time.perf_counter()
    module.train()
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
            values = dict(zip(("loss", "ce", "kl", "hidden"), (x / max(totals[0], 1.0) for x in totals[1:])))
            lr = scheduler.get_last_lr()[0]
            rate = totals[0] / max(time.perf_counter() - window_start, 1e-9)
            log.write(step, {**values, "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                             "loss_tokens_per_s": rate, "epoch": epoch})
            bar.set_postfix(loss=f"{values['loss']:.3f}", ce=f"{values['ce']:.3f}", kl=f"{values['kl']:.3f}",
                            tok_s=f"{rate:.0f}", lr=f"{lr:.2e}")
            window.zero_()
            window_start = time.perf_counter()
        if config.eval_every and step % config.eval_every == 0 and step < total_steps:
            result = evaluate(module, data, config, env, pad_id)
            if result:
                log.write(step, {f"eval_{k}": v for k, v in result.items()})
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            checkpoint()
    bar.close()
    stream.close()  # stops the read-ahead thread
    settle_tokens()

    after = evaluate(module, data, config, env, pad_id)
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


def wrap_distributed(module: nn.Module, config: TrainConfig, env: Env) -> nn.Module:
    """DDP (default) or FSDP2 around the student + loss when running under torchrun."""
    if env.world == 1:
        return module
    if config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(module.student.base_model, "layers", []):
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
