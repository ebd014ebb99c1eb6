"""The student side of a step: loading the student, its loss module (forward + distillation loss at the
loss rows), the loss path, and the mapping of teacher to student layers."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.errors import UserError
from fastkd.loader import IGNORE_INDEX, Batch
from fastkd.train_config import TrainConfig


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
                                 or not isinstance(causal_lm(student).get_output_embeddings(), nn.Linear))

    @property
    def loss_path(self) -> str:
        """The loss implementation this module runs: uld under --cross-tokenizer uld, else the lightest
        correct one unless --loss-impl chose."""
        if getattr(self.cfg, "cross_tokenizer", None) == "uld":
            return "uld"
        return choose_loss_path(self.cfg.loss_impl, self.full_forward)

    def forward(self, input_ids, attention_mask, labels, topk_ids=None, topk_logprobs=None, tail=None, counts=None,
                teacher_hidden=None, loss_index=None, runner: nn.Module | None = None):
        """The loss terms of a batch. `runner`: a wrapper of the student (e.g. DDP made by another trainer)
        to run the full forward through, so its gradient hooks fire; logits then come from its output."""
        from fastkd.kernels import LossTerms, distill_loss

        cfg = self.cfg
        if loss_index is None:  # callers without a collated Batch: found here (a host sync on a GPU)
            loss_index = (labels.reshape(-1) != IGNORE_INDEX).nonzero().reshape(-1)
        pick = lambda x: x.flatten(0, 1).index_select(0, loss_index)  # noqa: E731 - the loss rows, row-major
        y = pick(labels)
        want_hidden = bool(self.projector is not None and cfg.hidden_weight)
        lm = causal_lm(self.student)
        if self.full_forward or runner is not None:
            out = (runner or self.student)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                           output_hidden_states=want_hidden)
            logits, h, hidden_states = pick(out.logits)[:, :self.vocab_size], None, out.hidden_states
        else:
            out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                output_hidden_states=want_hidden)
            h, logits, hidden_states = pick(out.last_hidden_state), None, out.hidden_states
        head = lm.get_output_embeddings()
        if topk_ids is None:  # SFT: no teacher signal
            if logits is None:
                logits = head(h)[:, :self.vocab_size]
            ce = nn.functional.cross_entropy(logits.float(), y) if y.numel() else logits.sum() * 0.0
            zero = torch.zeros((), device=ce.device)
            terms = LossTerms(total=cfg.ce_weight * ce, ce=ce.detach(), kl=zero, hidden=zero, num_tokens=int(y.numel()))
        elif self.loss_path == "uld":  # sorted-probability L1 (kernels/uld.py); terms.kl holds it
            from fastkd.kernels.uld import uld_loss

            if logits is None:
                logits = head(h)[:, :self.vocab_size]
            terms = uld_loss(logits, y, topk_logprobs, tail, teacher_ids=topk_ids, ce_weight=cfg.ce_weight,
                             uld_weight=cfg.kl_weight, chunk_size=cfg.chunk_size)
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
    if path == "uld":
        return "loss: uld (logits [rows, V], CE + the L1 distance of sorted probabilities; --cross-tokenizer uld)"
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
    if config.lora_rank:
        model = add_lora(model, config)
    if config.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)     # transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


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
