"""The data side of training: the cache (or records + a live teacher) opened and checked against the
tokenizer, the held-out split, and the endless step stream a run resumes from a saved position."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from dataclasses import dataclass, replace

import numpy as np
from torch import nn

from fastkd.chat_masks import check_student_template
from fastkd.errors import UserError
from fastkd.loader import Batch, CacheSource, PlanMaker, collate, make_loader
from fastkd.packing import check_rows_fit, collate_packed, unpack
from fastkd.records import DataError, FieldMap
from fastkd.runtime import Env
from fastkd.templates import BuildReport, Template, build_examples
from fastkd.tokenizer_identity import check_tokenizer, tokenizer_identity
from fastkd.train_config import TrainConfig


class RecordSource:
    """Records tokenised with fastkd.templates, a data source beside the cache; a record with `"cot": false` is
    built with Template(cot=False), so CoT and answer-only records mix in one file."""

    has_teacher = False
    manifest = None

    def __init__(self, data, tokenizer, *, cot: bool = True, chat: bool = False, max_length: int | None = None,
                 fields=None, loss_turns: str = "all"):
        self.path, self.report = str(data), BuildReport()
        examples = build_examples(data, tokenizer, Template(cot=cot, chat=chat, loss_turns=loss_turns),
                                  fields or FieldMap(), max_length, report=self.report)
        # templates.Examples (no teacher signal: SFT, online KD) holding their tokens as numpy arrays
        self.sequences = [replace(ex, input_ids=np.asarray(ex.input_ids, dtype=np.int32),
                                  loss_mask=np.asarray(ex.loss_mask, dtype=np.uint8)) for ex in examples]
        if not self.sequences:
            raise UserError(f"{self.path}: no usable records ({self.report.as_dict()})")
        self.lengths = np.array([len(s.input_ids) for s in self.sequences], dtype=np.int64)
        # records sit in memory, so each is its own shard: an epoch is a full permutation (files are
        # often sorted by task, and a streaming shuffle buffer would train on one task at a time)
        self.shards = list(np.arange(len(self.sequences), dtype=np.int64).reshape(-1, 1))

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, position: int):
        return self.sequences[int(position)]


def split_holdout(num: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, held-out positions): `holdout` positions chosen with a seeded draw."""
    if holdout < 0 or holdout >= num:
        raise UserError(f"--eval-sequences {holdout}: must be between 0 and {num - 1} (the source holds {num} "
                        f"sequences)")
    rng = np.random.default_rng([seed, 0xE7A1])
    held = np.sort(rng.choice(num, size=holdout, replace=False)) if holdout else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(num), held), held


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


def build_data(config: TrainConfig, tokenizer, env: Env) -> DataSide:
    """Open the cache (checking tokenizer and mode) or tokenise the records (+ load a live teacher)."""
    excluded, teacher, evaluation = np.zeros(0, dtype=np.int64), None, None
    if config.cache:
        layers = None if config.hidden_weight else []          # skip decoding hidden states nobody uses
        if not config.verify_cache and env.is_main:
            warnings.warn(f"--no-verify-cache: blocks of cache {config.cache} are decoded without checking their "
                          f"digests; corrupt bytes would be trained on", stacklevel=2)
        train = CacheSource(config.cache, layers=layers, verify=config.verify_cache)
        if config.skip_corrupt_blocks:
            excluded = skip_corrupt(train, config.cache, config, env)
        train.cached_blocks = blocks_spanned(train, config, env)
        manifest = train.manifest
        train = student_view(train, tokenizer, config, f"cache {config.cache}")
        cached_mode = manifest.get("mode", "topk")
        if (cached_mode == "sample") != (config.mode == "sampled"):
            hint = "--mode sampled" if cached_mode == "sample" else "--mode tail or --mode renorm"
            held = 'sampled ids with counts' if cached_mode == 'sample' else 'top-k log-probs'
            raise UserError(f"cache {config.cache} holds {held} "
                            f"(manifest mode {cached_mode!r}) but --mode is {config.mode!r}; use {hint}")
        layers = [int(x) for x in manifest.get("layers", [])]
        widths = [int(x) for x in manifest.get("hidden_widths", [])]
        depth = int(manifest.get("teacher", {}).get("num_hidden_layers") or 0)
        if config.hidden_weight and not layers:
            raise UserError(f"--hidden-weight {config.hidden_weight}: cache {config.cache} holds no hidden states "
                            f"(make it with `fastkd cache-teacher --layers ...`)")
        if config.eval_cache:
            evaluation = student_view(CacheSource(config.eval_cache, layers=layers, verify=config.verify_cache),
                                      tokenizer, config, f"eval cache {config.eval_cache}")
    else:
        rec = dict(cot=config.cot, chat=config.chat_template, max_length=config.max_length,
                   fields=FieldMap(messages=config.messages_field), loss_turns=config.loss_turns)
        train = RecordSource(config.data, tokenizer, **rec)
        evaluation = RecordSource(config.eval_data, tokenizer, **rec) if config.eval_data else None
        layers, widths, depth = [], [], 0
        if config.teacher:
            from fastkd.teacher import load_causal_lm, load_tokenizer

            check_tokenizer(tokenizer_identity(load_tokenizer(config.teacher, "--teacher")), tokenizer, f"teacher {config.teacher}")
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
        train_positions = np.setdiff1d(np.arange(len(train)) if train_positions is None else train_positions, excluded)
        eval_positions = None if eval_positions is None else np.setdiff1d(eval_positions, excluded)
        if not len(train_positions):
            raise UserError(f"cache {config.cache}: every block fails its digests; nothing is left to train on")
    if config.packing:
        check_rows_fit(train, train_positions, config.max_length, f"--packing: cache {config.cache}" if config.cache
                       else f"--packing: {config.data}")
    return DataSide(train, train_positions, evaluation, eval_positions, layers, widths, depth, teacher)


def student_view(source: CacheSource, tokenizer, config: TrainConfig, where: str):
    """A cache checked against the student's tokenizer, or (--cross-tokenizer) re-tokenised into the student's."""
    if not config.cross_tokenizer:
        check_cache_tokenizer(source.manifest, tokenizer, where)
        return source
    from fastkd.cross_tokenizer import wrap_cache

    return wrap_cache(source, tokenizer, config, where)


def blocks_spanned(source: CacheSource, config: TrainConfig, env: Env) -> int:
    """Decoded blocks to keep: enough for the shuffle buffer and one length-grouping window of the plan."""
    window = config.group_batches * config.batch_size * env.world * config.grad_accum  # sequences, or rows
    if config.packing:  # a window of rows holds about this many sequences (+ the carried rows)
        window = math.ceil((window + 1) * config.max_length / max(1.0, float(np.mean(source.lengths))))
    span = config.shuffle_buffer + window
    return 2 + math.ceil(span / max(1.0, len(source) / max(1, len(source.shards))))


def check_cache_tokenizer(manifest: dict, tokenizer, where: str) -> None:
    """The cache's tokenizer identity against the student's; a mismatch names --cross-tokenizer."""
    try:
        check_tokenizer(manifest.get("tokenizer", {}), tokenizer, where)
    except DataError as err:
        raise DataError(f"{err}; to distil into a student with its own tokenizer, add --cross-tokenizer uld "
                        f"(or exact)", reason=err.reason) from None
    check_student_template(manifest.get("template"), tokenizer, where)


def skip_corrupt(source: CacheSource, path: str, config: TrainConfig, env: Env) -> np.ndarray:
    """--skip-corrupt-blocks: check every block's digests once; the positions of the bad ones."""
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


def cache_vocab(data: "DataSide") -> int:
    """The vocabulary size the cache's ids were drawn from (0 without a cache)."""
    if getattr(data.train, "method", None) in ("uld", "exact"):   # --cross-tokenizer: ids are the student's own
        return 0
    manifest = getattr(data.train, "manifest", None) or {}
    return int((manifest.get("tokenizer") or {}).get("vocab_size") or 0)


def add_teacher_signal(batch: Batch, data: DataSide, config: TrainConfig, vocab_size: int) -> Batch:
    """Online KD: run the live teacher on the batch and attach the same signal a cache would hold."""
    if data.teacher is None or batch.topk_ids is not None:
        return batch
    from fastkd.teacher import teacher_signal

    ids, attn, loss = batch.input_ids, batch.attention_mask, batch.loss_mask
    if batch.position_ids is not None:  # packed: the teacher sees each sequence on its own row, in the same order
        ids, attn, loss = unpack(batch)
    sig = teacher_signal(data.teacher, ids, attn, loss, k=config.top_k, layers=tuple(data.teacher_layers),
                         vocab_size=vocab_size)
    batch.topk_ids, batch.topk_logprobs, batch.tail = sig.topk_ids, sig.topk_logprobs, sig.tail
    batch.hidden = dict(sig.hidden)
    return batch


def train_plans(data: DataSide, config: TrainConfig, env: Env):
    """epoch -> the epoch's global batches; one global batch = one optimizer step: batch_size x processes x
    grad_accum sequences, or with --packing that many rows of at most --max-length tokens."""
    return PlanMaker(data.train.lengths, data.train.shards, config.batch_size * env.world * config.grad_accum,
                     config.seed, min_size=env.world * config.grad_accum, shuffle_buffer=config.shuffle_buffer,
                     group_batches=config.group_batches, allowed=data.train_positions,
                     row_length=config.max_length if config.packing else None)


def step_stream(data: DataSide, config: TrainConfig, env: Env, pad_id: int, epoch: int, position: int):
    """Endless (epoch, position-after, micro-batches) over the training source from a saved position."""
    return iter(make_loader(data.train, train_plans(data, config, env), pad_id, rank=env.rank, world=env.world,
                            accum=config.grad_accum, epoch=epoch, start=position, num_workers=config.num_workers,
                            pin_memory=env.device.type == "cuda", prefetch=config.prefetch,
                            collate_fn=collate_packed if config.packing else collate))
