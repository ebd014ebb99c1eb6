"""The student side of a step: loading the student, its loss module (forward + distillation loss at the loss rows,
by the loss path picked once at set-up) and the mapping of teacher to student layers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastkd.errors import UserError
from fastkd.kernels import LossSpec, LossTerms, Teacher, distill_loss, fused_linear_distill_loss, uld_loss
from fastkd.kernels.hidden import add_hidden_term
from fastkd.loader import IGNORE_INDEX, Batch
from fastkd.packing import packed_attention
from fastkd.train_config import TrainConfig


class StudentWithLoss(nn.Module):
    """Student forward + loss as one module, so DDP/FSDP wrap (and sync) the student and the projector; logits
    only at loss rows, over the tokenizer's vocabulary (a padded embedding's extra rows are never seen)."""

    def __init__(self, student: nn.Module, vocab_size: int, config: TrainConfig, *, student_layers=(), projector=None):
        super().__init__()
        self.student = student
        self.projector = projector
        self.vocab_size = vocab_size
        self.student_layers = list(student_layers)
        self.cfg = config
        self.spec = LossSpec(mode=config.mode, ce_weight=config.ce_weight, kl_weight=config.kl_weight,
                             hidden_weight=config.hidden_weight, temperature=config.temperature,
                             ignore_index=IGNORE_INDEX, chunk_size=config.chunk_size)
        cfg = student.config
        # models whose logits are not lm_head(last hidden) (soft-capping, logit scale) take the full forward
        self.full_forward = bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
                                 or not isinstance(causal_lm(student).get_output_embeddings(), nn.Linear))
        # a full forward: logits whatever was asked; auto: fused (no [rows, V] logits: the lightest on CPU and CUDA,
        # benchmarks/train_step_table.py)
        self.loss_path = ("uld" if getattr(config, "cross_tokenizer", None) == "uld" else "logits" if self.full_forward
                          else "fused" if config.loss_impl == "auto" else config.loss_impl)

    def forward(self, input_ids, attention_mask, labels, topk_ids=None, topk_logprobs=None, tail=None, counts=None,
                teacher_hidden=None, loss_index=None, runner: nn.Module | None = None, position_ids=None,
                cu_seqlens=None, max_seqlen=None):
        """The loss terms of a batch. `runner`: a wrapper of the student (e.g. another trainer's DDP) run for the full
        forward so its hooks fire; `position_ids` (+ cu_seqlens, max_seqlen): a packed batch."""
        if loss_index is None:  # callers without a collated Batch: found here (a host sync on a GPU)
            loss_index = (labels.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)
        pick = lambda x: x.flatten(0, 1).index_select(0, loss_index)  # noqa: E731 - the loss rows, row-major
        want_hidden = bool(self.projector is not None and self.spec.hidden_weight)
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=want_hidden)
        if position_ids is not None:
            kw.update(packed_attention(self.student.config, position_ids, cu_seqlens, max_seqlen))
        if self.full_forward or runner is not None:
            out = (runner or self.student)(**kw)
            h, logits = None, pick(out.logits)[:, :self.vocab_size]
        else:
            out = causal_lm(self.student).base_model(**kw)
            h, logits = pick(out.last_hidden_state), None
        teacher = None if topk_ids is None else Teacher(topk_ids, topk_logprobs, tail, counts)
        terms = self._loss(h, logits, pick(labels), teacher)
        student_hidden = [pick(out.hidden_states[layer]) for layer in self.student_layers] if want_hidden else None
        return add_hidden_term(terms, self.spec, self.projector, student_hidden, teacher_hidden)

    def _loss(self, h, logits, y, teacher) -> LossTerms:
        """The loss path's terms from hidden states `h` or `logits` (one is None); no teacher (SFT): CE alone."""
        head = causal_lm(self.student).get_output_embeddings()
        if teacher is not None and self.loss_path == "fused" and h is not None:  # h None: a runner made the logits
            bias = head.bias[:self.vocab_size] if head.bias is not None else None
            return fused_linear_distill_loss(h, head.weight[:self.vocab_size], y, teacher, self.spec, bias=bias)
        logits = logits if logits is not None else head(h)[:, :self.vocab_size]
        if teacher is None:
            ce = nn.functional.cross_entropy(logits.float(), y) if y.numel() else logits.sum() * 0.0
            zero = torch.zeros((), device=ce.device)
            return LossTerms(total=self.spec.ce_weight * ce, ce=ce.detach(), kl=zero, hidden=zero,
                             num_tokens=int(y.numel()))
        if self.loss_path == "uld":  # sorted-probability L1 (kernels/uld.py); terms.kl holds it
            return uld_loss(logits, y, teacher, self.spec)
        # the logits are this step's own intermediate: the gradient may overwrite them, saving a [rows, V] buffer
        return distill_loss(logits.float(), y, teacher, self.spec, inplace=True)


def causal_lm(student: nn.Module) -> nn.Module:
    """The transformers *ForCausalLM inside a student (a peft model wraps it: LoRA layers are injected in place)."""
    get_base = getattr(student, "get_base_model", None)
    return get_base() if callable(get_base) else student


def add_lora(model: nn.Module, config: TrainConfig) -> nn.Module:
    """--lora-rank r: freeze the student and train rank-r LoRA adapters on --lora-targets (peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("--lora-rank needs peft: pip install 'fastkd[lora]' (or pip install peft)") from None
    targets = config.lora_targets.strip()
    modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank,
                      lora_dropout=config.lora_dropout, target_modules=modules, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as err:  # e.g. target modules not found in the model
        raise UserError(f"--lora-targets {targets}: {str(err).splitlines()[0]}") from None


def describe_loss_path(module: "StudentWithLoss", device: torch.device) -> str:
    path = module.loss_path
    if path == "uld":
        return "loss: uld (logits [rows, V], CE + the L1 distance of sorted probabilities; --cross-tokenizer uld)"
    what = {"fused": "fused linear + loss, chunked over rows (no [rows, V] logits)",
            "logits": "logits [rows, V], loss gradient written over them"}[path]
    impl = module.cfg.loss_impl
    why = "auto: the lightest on " + device.type if impl == "auto" else f"--loss-impl {impl}"
    if module.full_forward and impl != "logits":
        why = "the student's logits are not lm_head(hidden) (soft-capping or a logit scale)"
    return f"loss: {path} ({what}; {why}; --loss-impl fused|logits overrides)"


def batch_inputs(batch: Batch, teacher_layers: list[int]) -> dict:
    """The keyword arguments StudentWithLoss takes, from a batch (a packed one adds its position ids)."""
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels,
                  topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs, tail=batch.tail, counts=batch.counts,
                  teacher_hidden=[batch.hidden[layer] for layer in teacher_layers] if batch.hidden else None,
                  loss_index=batch.loss_index)
    if batch.position_ids is not None:
        inputs.update(position_ids=batch.position_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    return inputs


def load_student(config: TrainConfig, device: torch.device, vocab_size: int = 0) -> nn.Module:
    """From a folder/hub id, or initialised from a config (seeded); a student with fewer output rows than the
    tokenizer's (or the cache's) ids is refused, from its config before any weight is loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fastkd.paths import resolve_model
    from fastkd.teacher import hub_failure

    given = config.student or config.student_config
    flag = "--student" if config.student else "--student-config"
    source = given if config.student_config and Path(given).is_file() else resolve_model(given, flag)  # a config.json
    try:
        model_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        if not Path(source).exists():
            raise hub_failure(flag, source, err) from None
        raise UserError(f"{flag} {source}: {str(err).splitlines()[0]}") from None
    text_config = getattr(model_config, "text_config", None)
    rows = getattr(model_config, "vocab_size", None) or getattr(text_config, "vocab_size", None)
    if isinstance(rows, int) and rows < vocab_size:
        raise UserError(f"{flag} {source}: its config has vocab_size {rows}, fewer than the {vocab_size} token ids the "
                        f"tokenizer and teacher cache use; the student cannot score them. Use a student made for this "
                        f"tokenizer (or resize its embeddings and save it first)")
    if config.student:
        from fastkd.teacher import load_causal_lm

        model = load_causal_lm(source, dtype="float32", device=str(device), role="student")
    else:
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(model_config).to(device)
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise UserError(f"{flag} {source}: the student's output layer has {rows} rows, fewer than the {vocab_size} "
                        f"token ids the tokenizer and teacher cache use; student and tokenizer do not belong together")
    if config.lora_rank:
        model = add_lora(model, config)
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


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
