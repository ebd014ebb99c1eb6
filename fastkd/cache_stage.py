"""Run the teacher once over a CoT dataset and cache its signal at the response positions.

For every record: template (with or without the rationale) -> token ids -> teacher forward in
length-sorted batches -> top-k log-probs with the exact tail mass (or, with --sample N, N ids
drawn from the teacher with their counts) and the hidden states of the chosen layers, at loss
positions only -> compressed safetensors shards + manifest.json. Re-running the same command
on a partial cache resumes it; a cache made with other settings is refused.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastkd.data import BuildReport, FieldMap, Template, build_examples, length_sorted_batches, pad_batch, tokenizer_identity
from fastkd.errors import UserError


@dataclass
class CacheSummary:
    """What one run did: counts and throughput, printed at the end and stored in the manifest."""

    sequences_written: int = 0
    sequences_resumed: int = 0
    loss_positions: int = 0
    report: dict = field(default_factory=dict)
    seconds_total: float = 0.0
    seconds_teacher: float = 0.0
    seconds_write: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """`--layers` as a comma list of hidden-state indices (0 = embeddings, L = last block);
    negative values count from the end (-1 = last)."""
    if not text:
        return []
    layers = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"--layers {text!r}: {part!r} is not an integer") from None
        index = value if value >= 0 else num_layers + 1 + value
        if not 0 <= index <= num_layers:
            raise UserError(f"--layers {text!r}: layer {value} is out of range for a teacher with "
                            f"{num_layers} blocks (valid: 0..{num_layers} or -1..-{num_layers + 1})")
        layers.append(index)
    return sorted(set(layers))


def cache_teacher(teacher: str, data: str, out: str, *, k: int = 64, layers: str | None = None, cot: bool = True,
                  chat: bool = False, max_length: int = 2048, overflow: str = "truncate", batch_size: int = 8,
                  dtype: str = "auto", device: str | None = None, sample_n: int | None = None, seed: int = 0,
                  fields: FieldMap = FieldMap(), skip_bad: bool = False, sequences_per_shard: int = 256,
                  hidden_codec: str | None = None, logits_codec: str | None = None, split: str = "train",
                  hidden_project: int | None = None, progress: bool = True) -> CacheSummary:
    """The whole stage as a function (the CLI and the demo call this)."""
    import torch
    from tqdm.auto import tqdm

    from fastkd.cache_tools import CachedSequence, CacheWriter
    from fastkd.teacher import load_causal_lm, load_tokenizer, model_identity, teacher_signal

    if k < 1 and not sample_n:
        raise UserError(f"--top-k must be >= 1, got {k}")
    if sample_n is not None and sample_n < 1:
        raise UserError(f"--sample must be >= 1, got {sample_n}")
    started = time.perf_counter()
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(teacher)
    template = Template(cot=cot, chat=chat)
    report = BuildReport()
    examples = build_examples(data, tokenizer, template, fields, max_length, overflow, skip_bad, split, report)
    if not examples:
        raise UserError(f"{data}: no usable records ({report.as_dict()})")
    model = load_causal_lm(teacher, dtype=dtype, device=device)
    num_layers = int(getattr(model.config, "num_hidden_layers", 0))
    layer_list = parse_layers(layers, num_layers)
    vocab = len(tokenizer)
    settings = {
        "teacher": model_identity(model, teacher),
        "tokenizer": tokenizer_identity(tokenizer),
        "template": template.describe(),
        "mode": "sample" if sample_n else "topk",
        "k": int(sample_n or k),
        "sample_n": sample_n,
        "seed": seed if sample_n else None,
        "layers": layer_list,
        "hidden_widths": [int(hidden_project or model.config.hidden_size)] * len(layer_list),
        "max_length": max_length,
        "overflow": overflow,
        "fields": fields.__dict__,
        "data": str(data),
    }
    projection = None
    if hidden_project:
        from fastkd.cache_tools.hidden_codec import random_projection

        if not layer_list:
            raise UserError("--hidden-project needs --layers (there are no hidden states to project)")
        d_in = int(model.config.hidden_size)
        settings["hidden_projection"] = {"kind": "rademacher-splitmix64", "d_in": d_in, "d_out": hidden_project, "seed": seed}
        projection = torch.from_numpy(random_projection(d_in, hidden_project, seed)).to(model.device)
    if hidden_codec:
        settings["hidden_codec"] = hidden_codec
    if logits_codec:
        settings["logits_codec"] = logits_codec

    summary = CacheSummary(report=report.as_dict())
    writer = CacheWriter(out, settings, sequences_per_shard=sequences_per_shard, resume=True)
    try:
        todo = [ex for ex in examples if ex.record_index not in writer.done]
        summary.sequences_resumed = len(examples) - len(todo)
        batches = length_sorted_batches([len(ex.input_ids) for ex in todo], batch_size)
        generator = torch.Generator(device=model.device).manual_seed(seed) if sample_n else None
        throttle = float(os.environ.get("FASTKD_SLOW_WRITE_SECONDS", "0"))  # tests: make a kill land mid-run
        bar = tqdm(total=len(todo), unit="seq", desc="cache-teacher", disable=not progress,
                   initial=0, postfix={"resumed": summary.sequences_resumed})
        for batch in batches:
            chunk = [todo[i] for i in batch]
            ids, attn, loss = pad_batch([ex.input_ids for ex in chunk], tokenizer.pad_token_id, "right",
                                        [ex.loss_mask for ex in chunk])
            t0 = time.perf_counter()
            sig = teacher_signal(model, ids.to(model.device), attn.to(model.device), loss.to(model.device),
                                 k=k, layers=tuple(layer_list), sample_n=sample_n, vocab_size=vocab,
                                 generator=generator)
            if projection is not None:       # fixed random projection: smaller hidden part, seed in the manifest
                sig.hidden = {layer: h @ projection for layer, h in sig.hidden.items()}
            t1 = time.perf_counter()
            _write_batch(writer, chunk, sig, CachedSequence)
            summary.seconds_teacher += t1 - t0
            summary.seconds_write += time.perf_counter() - t1
            summary.sequences_written += len(chunk)
            summary.loss_positions += sum(sig.rows_per_sequence)
            bar.update(len(chunk))
            if throttle:
                time.sleep(throttle)
            bar.set_postfix(tok_s=f"{summary.loss_positions / max(summary.seconds_teacher + summary.seconds_write, 1e-9):.0f}")
        bar.close()
        t_close = time.perf_counter()
        writer.close(summary=summary.as_dict())
        summary.seconds_write += time.perf_counter() - t_close
        summary.seconds_total = time.perf_counter() - started
    except BaseException:
        writer.abort()          # finished shards stay; re-running the command resumes
        raise
    return summary


def _write_batch(writer, chunk, sig, CachedSequence) -> None:
    """Split a batch's rows back into sequences (row-major order) and hand them to the writer."""
    import numpy as np

    ids = sig.topk_ids.cpu().numpy()
    logprobs = sig.topk_logprobs.cpu().numpy()
    tail = sig.tail.cpu().numpy()
    counts = sig.counts.cpu().numpy() if sig.counts is not None else None
    hidden = {layer: h.cpu().numpy() for layer, h in sig.hidden.items()}
    start = 0
    for ex, rows in zip(chunk, sig.rows_per_sequence):
        end = start + rows
        writer.add(CachedSequence(
            record_index=ex.record_index, task=ex.task,
            input_ids=np.asarray(ex.input_ids, dtype=np.int32), loss_mask=np.asarray(ex.loss_mask, dtype=np.uint8),
            topk_ids=ids[start:end], topk_logprobs=logprobs[start:end], tail=tail[start:end],
            counts=counts[start:end] if counts is not None else None,
            hidden={layer: h[start:end] for layer, h in hidden.items()}))
        start = end


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher model: a local folder or a Hugging Face hub id (AutoModelForCausalLM)")
    p.add_argument("--data", required=True, help="records: .jsonl, .json (list or id->record map, as CoT-Collection), .parquet, or a hub dataset name")
    p.add_argument("--out", required=True, help="cache folder to create, or to resume if it holds a partial cache with the same settings")
    p.add_argument("--top-k", type=int, default=64, help="teacher log-probs kept per position (the rest is one exact tail-mass bucket)")
    p.add_argument("--sample", type=int, default=None, metavar="N",
                   help="instead of the top-k, draw N ids with replacement from the teacher and store unique ids with counts (Random-Sampling KD)")
    p.add_argument("--layers", default=None, help="teacher hidden states to keep, comma list (0 = embeddings, -1 = last block); default none")
    cot = p.add_mutually_exclusive_group()
    cot.add_argument("--cot", dest="cot", action="store_true", default=True, help="response = rationale + 'So the answer is <target>.' (KD+CoT)")
    cot.add_argument("--no-cot", dest="cot", action="store_false", help="response = the target alone (KD on answers)")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-length", type=int, default=2048, help="longest sequence in tokens (prompt + response + EOS)")
    p.add_argument("--overflow", choices=["truncate", "skip"], default="truncate", help="what to do with longer records (counted in the report)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per teacher forward (length-sorted)")
    p.add_argument("--dtype", default="auto", help="teacher dtype: auto (fp32 on CPU, checkpoint dtype on GPU), bfloat16, float16, float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted per reason) instead of stopping at the first")
    p.add_argument("--split", default="train", help="dataset split, for hub datasets")
    p.add_argument("--source-field", default="source", help="record key holding the question")
    p.add_argument("--rationale-field", default="rationale", help="record key holding the rationale")
    p.add_argument("--target-field", default="target", help="record key holding the answer")
    p.add_argument("--task-field", default="task", help="record key holding the task name (optional)")
    p.add_argument("--sequences-per-shard", type=int, default=256, help="sequences per shard file (a shard is the unit of resume)")
    p.add_argument("--hidden-codec", default=None, help="hidden-state codec (see `fastkd cache inspect`); default: the format's default")
    p.add_argument("--hidden-project", type=int, default=None, metavar="D",
                   help="store hidden states through a fixed random projection to width D (its seed, --seed, goes in the manifest; "
                        "the student's learned projection then targets width D)")
    p.add_argument("--logits-codec", default=None, help="top-k codec; default: the format's default")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    fields = FieldMap(args.source_field, args.rationale_field, args.target_field, args.task_field)
    s = cache_teacher(args.teacher, args.data, args.out, k=args.top_k, layers=args.layers, cot=args.cot,
                      chat=args.chat_template, max_length=args.max_length, overflow=args.overflow,
                      batch_size=args.batch_size, dtype=args.dtype, device=args.device, sample_n=args.sample,
                      seed=args.seed, fields=fields, skip_bad=args.skip_bad,
                      sequences_per_shard=args.sequences_per_shard, hidden_codec=args.hidden_codec,
                      logits_codec=args.logits_codec, split=args.split, hidden_project=args.hidden_project,
                      progress=not args.quiet)
    print(format_summary(s, args.out))
    return 0


def format_summary(s: CacheSummary, out: str) -> str:
    from fastkd.cache_tools import CacheReader

    reader = CacheReader(out)
    m = reader.manifest
    counts = m.get("counts", {})
    positions = max(int(counts.get("loss_positions", 0)), 1)
    lines = [
        f"cache: {Path(out)}",
        f"  records: {s.report.get('kept', 0)} kept, {s.report.get('truncated', 0)} truncated, skipped {s.report.get('skipped', {}) or 'none'}",
        f"  this run: {s.sequences_written} sequences, {s.loss_positions} loss positions written; {s.sequences_resumed} already cached",
        f"  total: {len(reader)} sequences, {counts.get('loss_positions', '?')} loss positions",
    ]
    payload = counts.get("payload_bytes", {})
    if payload:
        logits = payload.get("topk", 0) + payload.get("counts", 0)
        lines.append(f"  bytes per loss position: logits {logits / positions:.1f}, hidden {payload.get('hidden', 0) / positions:.1f}, "
                     f"all files {counts.get('bytes', 0) / positions:.1f}")
    if s.seconds_write > 0:
        lines.append(f"  throughput: {s.loss_positions / max(s.seconds_total, 1e-9):.0f} positions/s overall, "
                     f"{s.loss_positions / s.seconds_write:.0f} positions/s cache write (teacher forward excluded)")
    return "\n".join(lines)
