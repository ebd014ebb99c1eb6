"""One optimizer step over a step's micro-batches, and the held-out evaluation: the loss step's one home."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn

from fastkd.loader import Batch, PlanMaker, make_loader
from fastkd.runtime import Env
from fastkd.student import StudentWithLoss, batch_inputs
from fastkd.train_config import TrainConfig
from fastkd.train_data import DataSide, add_teacher_signal


def _terms(model: nn.Module, batch: Batch, data: DataSide, config: TrainConfig, env: Env, vocab_size: int):
    """The loss terms of one batch on the device, the live teacher's signal added (online KD)."""
    batch = add_teacher_signal(batch.to(env.device, non_blocking=True), data, config, vocab_size)
    with autocast(config, env):
        return model(**batch_inputs(batch, data.teacher_layers))


def _weighted(terms, rows: int, device) -> torch.Tensor:
    """[rows, then rows x total, ce, kl, hidden] in float64 on the device (rows counted on the host): what a
    log line's window and an evaluation sum."""
    return torch.stack([torch.tensor(float(rows), dtype=torch.float64, device=device)] +
                       [t.detach().double() * rows for t in (terms.total, terms.ce, terms.kl, terms.hidden)])


def train_step(model: nn.Module, module: "StudentWithLoss", optimizer, micro: list[Batch], data: DataSide,
               config: TrainConfig, env: Env, vocab_size: int, window: torch.Tensor):
    """One optimizer step, each micro-batch weighted by its share of the step's loss rows (all ranks), no host sync;
    returns (loss rows >= 1, grad norm before clipping or None) and adds row-weighted terms to `window`."""
    counts = [b.num_rows for b in micro]                  # on the host, before the copy: no device sync
    if env.world > 1:  # the global row count stays on the device
        rows = torch.tensor([float(sum(counts))], dtype=torch.float64, device=env.device)  # NCCL: device tensors
        dist.all_reduce(rows)
        step_rows = rows[0].clamp_min(1.0)
        divisor = step_rows.float()
    else:
        step_rows = divisor = max(float(sum(counts)), 1.0)
    for i, (batch, n) in enumerate(zip(micro, counts)):
        last = i == len(micro) - 1
        with (nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()):
            terms = _terms(model, batch, data, config, env, vocab_size)
            (terms.total * (n * env.world / divisor)).backward()
        window += _weighted(terms, n, env.device)
    grad_norm = (torch.nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
                 if config.max_grad_norm else None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_rows, grad_norm


@torch.no_grad()
def evaluate(module: StudentWithLoss, data: DataSide, config: TrainConfig, env: Env, pad_id: int) -> dict:
    """Row-weighted CE and KL to the teacher (in the loss's KL mode) over the held-out sequences."""
    if data.eval is None:
        return {}
    plan = PlanMaker(data.eval.lengths, data.eval.shards, config.batch_size * env.world, config.seed,
                     min_size=env.world, shuffle=False, group_batches=1 << 20, allowed=data.eval_positions)(0)
    plan = plan[:config.eval_batches] if config.eval_batches else plan
    if not plan:
        return {}
    was_training = module.training
    module.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=env.device)
    for _, _, (batch,) in make_loader(data.eval, plan, pad_id, rank=env.rank, world=env.world, epochs=1):
        sums += _weighted(_terms(module, batch, data, config, env, module.vocab_size), batch.num_rows, env.device)
    if env.world > 1:
        dist.all_reduce(sums)
    module.train(was_training)
    total_rows, _, ce, kl, _ = sums.tolist()
    result = {"ce": ce / max(total_rows, 1.0), "rows": int(total_rows)}
    if data.eval.has_teacher or data.teacher is not None:
        result["kl"] = kl / max(total_rows, 1.0)
    return result


def autocast(config: TrainConfig, env: Env):
    bf16 = config.precision == "bf16" or (config.precision == "auto" and env.device.type == "cuda")
    return torch.autocast(env.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def bbh_probe(config: TrainConfig, tokenizer):
    """--eval-bbh-tasks: student -> BBH subset scores by greedy generation (main process only), on the prompts
    eval-bbh builds for a trained student (`--prompt-format trained`, same template)."""
    from fastkd import bbh
    from fastkd.bbh_results import item_row, results_from_rows
    from fastkd.evaluate import build_prompts
    from fastkd.generate import greedy_generate

    items, root = bbh.load_tasks(bbh.select_tasks(config.eval_bbh_tasks), config.bbh_dir, config.eval_bbh_limit)
    fmt = "trained" if config.cot else "trained-direct"
    prompts = [ids for _, ids in build_prompts(items, tokenizer, fmt, config.chat_template, root)]
    flat = [it for task_items in items.values() for it in task_items]

    @torch.no_grad()
    def probe(student: nn.Module) -> dict:
        was_training = student.training
        student.eval()
        try:
            gens = greedy_generate(student, tokenizer, prompts, config.eval_bbh_max_new_tokens,
                                   stop_strings=(bbh.STOP_STRING,), batch_size=config.batch_size)
        finally:
            student.train(was_training)
        summary = results_from_rows([item_row(item, None, None, gen.text, gen.finish)
                                     for item, gen in zip(flat, gens)])["summary"]
        return {"bbh_strict": summary["strict"]["micro"], "bbh_lenient": summary["lenient"]["micro"],
                "bbh_items": summary["n_items"]}

    return probe
