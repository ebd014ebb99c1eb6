"""Run the teacher once over a CoT dataset and cache its signal at the response positions.

For every record: template (with or without the rationale) -> token ids -> teacher forward in
length-sorted batches -> top-k log-probs with the exact tail mass (or, with --sample N, N ids
drawn from the teacher with their counts) and the hidden states of the chosen layers, at loss
positions only -> compressed safetensors shards + manifest.json. Re-running the same command
on a partial cache resumes it; a cache made with other settings or other records is refused.

Many processes: `torchrun --nproc-per-node N -m fastkd cache-teacher ...` (gloo between ranks,
one GPU per rank); the records are cut into fixed work units (--sequences-per-shard), each rank
writes its share, rank 0 merges them; any N can resume a cache begun with any other N.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastkd.templates import BuildReport, Template, build_examples
from fastkd.records import FieldMap
from fastkd.batching import length_sorted_batches, pad_batch
from fastkd.tokenizer_identity import tokenizer_identity
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
    seconds_units: float = 0.0     # wall time from the first unit to the last rank's end (rank 0; startup excluded)
    world_size: int = 1
    per_rank: list = field(default_factory=list)   # rank 0 of a torchrun: each rank's counts and seconds

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


class _Ranks:
    """This process's place among torchrun's ranks (WORLD_SIZE, RANK, LOCAL_RANK); gloo collectives
    for the few small messages the cache stage exchanges (the forward itself needs none)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started = False
        if self.world > 1:
            import datetime

            import torch.distributed as dist

            if not dist.is_initialized():   # ranks wait for each other only at the start and the end
                dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
                self.started = True

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False


def records_digest(examples) -> dict:
    """Count and sha256 of the tokenised records (what a resume must be given again)."""
    from fastkd.cache_tools.units import make_units

    return make_units(examples, max(len(examples), 1))[1]


def cache_teacher(teacher: str, data: str, out: str, *, k: int = 64, layers: str | None = None, cot: bool = True,
                  chat: bool = False, max_length: int = 2048, overflow: str = "truncate", batch_size: int = 8,
                  dtype: str = "auto", device: str | None = None, sample_n: int | None = None, seed: int = 0,
                  fields: FieldMap = FieldMap(), skip_bad: bool = False, sequences_per_shard: int = 256,
                  hidden_codec: str | None = None, logits_codec: str | None = None, split: str = "train",
                  hidden_project: int | None = None, progress: bool = True, device_map=None, max_memory=None,
                  offload_folder: str | None = None, backend: str = "hf", vllm_max_logprobs: int | None = None,
                  vllm_tensor_parallel: int = 1, vllm_engine=None, capture_share: float = 1.0,
                  capture_by: str = "entropy") -> CacheSummary:
    """The whole stage as a function (the CLI and the demo call this). Under torchrun every rank
    calls it: each writes its own work units, rank 0 merges them into the manifest at the end."""
    import torch

    from fastkd.cache_tools.format import MANIFEST, read_manifest
    from fastkd.cache_tools.storage import refuse_url_for_writing

    refuse_url_for_writing(out)  # before any model is loaded: a URL would become a local folder named s3:
    from fastkd.cache_tools.units import make_units

    if k < 1 and not sample_n:
        raise UserError(f"--top-k must be >= 1, got {k}")
    if sample_n is not None and sample_n < 1:
        raise UserError(f"--sample must be >= 1, got {sample_n}")
    if backend not in ("hf", "vllm"):
        raise UserError(f"--backend {backend}: choose hf (transformers) or vllm")
    if sequences_per_shard < 1:
        raise UserError(f"--sequences-per-shard must be >= 1, got {sequences_per_shard}")
    _check_capture(capture_share, capture_by, sample_n)
    started = time.perf_counter()
    ranks = _Ranks()
    try:
        if not progress or ranks.rank > 0:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        tokenizer = load_tokenizer_for(teacher)
        template = Template(cot=cot, chat=chat)
        report = BuildReport()
        examples = build_examples(data, tokenizer, template, fields, max_length, overflow, skip_bad, split, report)
        if not examples:
            raise UserError(f"{data}: no usable records ({report.as_dict()})")
        vocab = len(tokenizer)
        forward, settings = _teacher_and_settings(
            teacher, tokenizer, template, ranks, k=k, layers=layers, max_length=max_length, overflow=overflow,
            dtype=dtype, device=device, sample_n=sample_n, seed=seed, fields=fields, data=data,
            hidden_codec=hidden_codec, logits_codec=logits_codec, hidden_project=hidden_project,
            device_map=device_map, max_memory=max_memory, offload_folder=offload_folder, backend=backend,
            vllm_max_logprobs=vllm_max_logprobs, vllm_tensor_parallel=vllm_tensor_parallel, vllm_engine=vllm_engine,
            vocab=vocab)
        if capture_share < 1.0:
            forward, settings = _capturing(forward, settings, capture_share, capture_by, seed)
        summary = CacheSummary(report=report.as_dict())
        existing = read_manifest(Path(out)) if (Path(out) / MANIFEST).exists() else None
        if existing is not None:  # a codec not asked for is the cache's own: a newer default must not strand it
            kept = {part: existing["codecs"][part] for flag, part in (("logits_codec", "topk"), ("hidden_codec", "hidden"))
                    if flag not in settings and part in (existing.get("codecs") or {})}
            if kept:
                settings["codecs"] = {**(settings.get("codecs") or {}), **kept}
        # the teacher tokenizer inside the cache (its files' sha256 in the manifest): cross-tokenizer students
        from fastkd.cross_tokenizer import with_teacher_tokenizer

        settings = with_teacher_tokenizer(settings, tokenizer, out, existing, write=ranks.rank == 0)
        if existing is not None and existing["shards"] and "work_unit" not in existing:
            if ranks.world > 1:
                raise UserError(f"cache {out}: begun by a fastkd without work units (one writer, shards in write "
                                f"order); finish it with one process (no torchrun), then add ranks for new caches")
            _cache_sequential(out, settings, examples, forward, tokenizer, summary, batch_size=batch_size,
                              sequences_per_shard=sequences_per_shard, seed=seed, sample_n=sample_n, progress=progress)
        else:
            work_unit = int(existing["work_unit"]) if existing is not None and "work_unit" in existing \
                else sequences_per_shard       # the cut into units belongs to the cache, not to this run
            units, records = make_units(examples, work_unit)
            settings = dict(settings, records=records, work_unit=work_unit)
            _cache_units(out, settings, examples, units, forward, tokenizer, summary, ranks, batch_size=batch_size,
                         seed=seed, sample_n=sample_n, progress=progress)
        summary.seconds_total = time.perf_counter() - started
        return summary
    finally:
        ranks.close()


def load_tokenizer_for(teacher: str):
    from fastkd.teacher import load_tokenizer

    return load_tokenizer(teacher)


def _teacher_and_settings(teacher, tokenizer, template, ranks, *, k, layers, max_length, overflow, dtype, device,
                          sample_n, seed, fields, data, hidden_codec, logits_codec, hidden_project, device_map,
                          max_memory, offload_folder, backend, vllm_max_logprobs, vllm_tensor_parallel, vllm_engine,
                          vocab):
    """Load the teacher (transformers or vLLM) and the cache settings; returns (forward(chunk, generator), settings)."""
    import torch

    from fastkd.teacher import config_identity, input_device, load_causal_lm, model_identity, teacher_signal

    if backend == "vllm":
        from transformers import AutoConfig

        from fastkd.teacher_vllm import VllmTeacher, check_vllm_request

        check_vllm_request(bool(layers), sample_n, ranks.world)
        if hidden_project:
            raise UserError("--backend vllm: --hidden-project needs hidden states, which vLLM does not return")
        if vllm_engine is not None:
            vt = VllmTeacher(vllm_engine, k, int(vllm_max_logprobs or k))
        else:
            vt = VllmTeacher.load(teacher, k, dtype=dtype, max_logprobs=vllm_max_logprobs,
                                  tensor_parallel_size=vllm_tensor_parallel, max_length=max_length, seed=seed)
        try:
            config = AutoConfig.from_pretrained(teacher)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the teacher config {teacher!r}: {err}".splitlines()[0]) from None
        ident = dict(config_identity(config, teacher), backend="vllm", dtype=dtype)
        settings = _settings(ident, tokenizer, template, k=k, sample_n=None, seed=seed, layer_list=[], widths=[],
                             max_length=max_length, overflow=overflow, fields=fields, data=data)
        if hidden_codec:
            settings["hidden_codec"] = hidden_codec
        if logits_codec:
            settings["logits_codec"] = logits_codec
        return (lambda chunk, generator: vt.signal(chunk, vocab)), settings

    if ranks.world > 1 and device_map is None:   # one device per rank
        dev = device if device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
        if dev == "cuda":
            device = f"cuda:{ranks.local_rank}"
    if ranks.world > 1 and device_map == "auto" and max_memory is None and torch.cuda.is_available():
        per = max(torch.cuda.device_count() // int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)), 1)
        mine = range(ranks.local_rank * per, ranks.local_rank * per + per)   # this rank's share of the GPUs
        max_memory = {i: (torch.cuda.get_device_properties(i).total_memory if i in mine else 0)
                      for i in range(torch.cuda.device_count())}
        max_memory["cpu"] = "0GiB"
    model = load_causal_lm(teacher, dtype=dtype, device=device, device_map=device_map, max_memory=max_memory,
                           offload_folder=offload_folder)
    num_layers = int(getattr(model.config, "num_hidden_layers", 0))
    layer_list = parse_layers(layers, num_layers)
    widths = [int(hidden_project or model.config.hidden_size)] * len(layer_list)
    settings = _settings(model_identity(model, teacher), tokenizer, template, k=k, sample_n=sample_n, seed=seed,
                         layer_list=layer_list, widths=widths, max_length=max_length, overflow=overflow,
                         fields=fields, data=data)
    where = input_device(model)
    projection = None
    if hidden_project:
        from fastkd.cache_tools.hidden_codec import random_projection

        if not layer_list:
            raise UserError("--hidden-project needs --layers (there are no hidden states to project)")
        d_in = int(model.config.hidden_size)
        settings["hidden_projection"] = {"kind": "rademacher-splitmix64", "d_in": d_in, "d_out": hidden_project, "seed": seed}
        projection = torch.from_numpy(random_projection(d_in, hidden_project, seed))
    if hidden_codec:
        settings["hidden_codec"] = hidden_codec
    if logits_codec:
        settings["logits_codec"] = logits_codec

    def forward(chunk, generator):
        ids, attn, loss = pad_batch([ex.input_ids for ex in chunk], tokenizer.pad_token_id, "right",
                                    [ex.loss_mask for ex in chunk])
        sig = teacher_signal(model, ids.to(where), attn.to(where), loss.to(where), k=k, layers=tuple(layer_list),
                             sample_n=sample_n, vocab_size=vocab, generator=generator)
        if projection is not None:       # fixed random projection: smaller hidden part, seed in the manifest
            sig.hidden = {layer: h @ projection.to(h.device) for layer, h in sig.hidden.items()}
        return sig

    forward.device = where
    return forward, settings


def _check_capture(share: float, by: str, sample_n) -> None:
    from fastkd.teacher import check_capture

    check_capture(share, by)
    if share < 1.0 and sample_n:
        raise UserError("--capture-share < 1 works with top-k caches only (not with --sample)")


def _capturing(forward, settings: dict, share: float, by: str, seed: int):
    """Selective capture: the teacher's top-k kept at `share` of each sequence's loss positions,
    empty rows elsewhere (CE alone there); the choice is recorded in the manifest's settings."""
    from fastkd.teacher import capture_rows, drop_rows

    def captured(chunk, generator):
        sig = forward(chunk, generator)
        return drop_rows(sig, capture_rows(sig, [ex.record_index for ex in chunk], share, by, seed))

    captured.device = getattr(forward, "device", "cpu")
    return captured, dict(settings, capture={"share": float(share), "by": by, "seed": int(seed) if by == "random" else None})


def _settings(identity, tokenizer, template, *, k, sample_n, seed, layer_list, widths, max_length, overflow, fields,
              data) -> dict:
    return {
        "teacher": identity,
        "tokenizer": tokenizer_identity(tokenizer),
        "template": template.describe(),
        "mode": "sample" if sample_n else "topk",
        "k": int(sample_n or k),
        "sample_n": sample_n,
        "seed": seed if sample_n else None,
        "layers": layer_list,
        "hidden_widths": widths,
        "max_length": max_length,
        "overflow": overflow,
        "fields": fields.__dict__,
        "data": str(data),
    }


def _generator(forward, seed: int, sample_n):
    import torch

    if not sample_n:
        return None
    return torch.Generator(device=getattr(forward, "device", "cpu")).manual_seed(seed)


def _run_batches(todo, forward, generator, batch_size: int, summary: CacheSummary, bar, throttle: float):
    """Teacher forward over `todo` in length-sorted batches; yields (chunk, signal)."""
    for batch in length_sorted_batches([len(ex.input_ids) for ex in todo], batch_size):
        chunk = [todo[i] for i in batch]
        t0 = time.perf_counter()
        sig = forward(chunk, generator)
        summary.seconds_teacher += time.perf_counter() - t0
        yield chunk, sig
        summary.sequences_written += len(chunk)
        summary.loss_positions += sum(sig.rows_per_sequence)
        if bar is not None:
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{summary.loss_positions / max(summary.seconds_teacher + summary.seconds_write, 1e-9):.0f}")
        if throttle:
            time.sleep(throttle)


def _cache_units(out, settings, examples, units, forward, tokenizer, summary, ranks, *, batch_size, seed, sample_n,
                 progress) -> None:
    """Work-unit caching: rank 0 opens and merges, every rank writes its share of the unfinished units."""
    from tqdm.auto import tqdm

    from fastkd.cache_tools import CachedSequence
    from fastkd.cache_tools.units import UnitWriter

    writer, state = None, None
    if ranks.rank == 0:
        try:
            writer = UnitWriter.open(out, settings, units)
            state = {"error": None, "done": sorted(writer.done_units), "settings_sha256": writer.settings_sha256,
                     "settings": writer.settings, "warnings": writer.warnings}
        except UserError as err:
            state = {"error": str(err)}
            ranks.broadcast(state)
            raise
    state = ranks.broadcast(state)
    if state["error"]:
        raise UserError(state["error"])
    try:
        if writer is None:
            writer = UnitWriter.join(out, state["settings"], units, state["settings_sha256"], ranks.rank)
        if progress and ranks.rank == 0:
            for warning in state["warnings"]:
                print(f"fastkd cache-teacher: note: {warning}")
        done = set(state["done"])
        t_units = time.perf_counter()
        todo = [u for u in units if u.number not in done]
        mine = todo[ranks.rank::ranks.world]           # deterministic, disjoint; any N finishes the same units
        work_unit = settings["work_unit"]
        summary.sequences_resumed = sum(len(u.records) for u in units if u.number in done)
        throttle = float(os.environ.get("FASTKD_SLOW_WRITE_SECONDS", "0"))  # tests: make a kill land mid-run
        bar = tqdm(total=sum(len(u.records) for u in mine), unit="seq", desc="cache-teacher",
                   disable=not progress or ranks.rank > 0, postfix={"resumed": summary.sequences_resumed})
        for unit in mine:
            todo_examples = examples[unit.number * work_unit: unit.number * work_unit + len(unit.records)]
            generator = _generator(forward, seed * 1_000_003 + unit.number, sample_n)   # per unit: N-independent
            seqs = {}
            for chunk, sig in _run_batches(todo_examples, forward, generator, batch_size, summary, bar, 0.0):
                t1 = time.perf_counter()
                for seq in _sequences(chunk, sig, CachedSequence):
                    seqs[seq.record_index] = seq
                summary.seconds_write += time.perf_counter() - t1
            t1 = time.perf_counter()
            writer.write_unit(unit.number, [seqs[r] for r in unit.records])
            if ranks.rank == 0:
                writer.merge(clean=False)              # the partial cache stays readable while ranks run
            summary.seconds_write += time.perf_counter() - t1
            if throttle:
                time.sleep(throttle)
        bar.close()
        ranks.barrier()                                 # every rank's units are on disk with their receipts
        summary.seconds_units = time.perf_counter() - t_units
        keys = ("sequences_written", "loss_positions", "seconds_teacher", "seconds_write")
        parts = ranks.gather({key: getattr(summary, key) for key in keys})
        if ranks.rank == 0:
            summary.world_size = ranks.world
            if ranks.world > 1:
                summary.per_rank = parts
                summary.sequences_written = sum(p["sequences_written"] for p in parts)
                summary.loss_positions = sum(p["loss_positions"] for p in parts)
            t_close = time.perf_counter()
            writer.finish(summary=summary.as_dict())
            summary.seconds_write += time.perf_counter() - t_close
        else:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.abort()          # finished units stay with their receipts; re-running the command resumes
        raise


def _cache_sequential(out, settings, examples, forward, tokenizer, summary, *, batch_size, sequences_per_shard, seed,
                      sample_n, progress) -> None:
    """A cache begun before work units: one writer, shards in write order (as that fastkd wrote them)."""
    from tqdm.auto import tqdm

    from fastkd.cache_tools import CachedSequence, CacheWriter

    writer = CacheWriter(out, settings, sequences_per_shard=sequences_per_shard, resume=True)
    try:
        todo = [ex for ex in examples if ex.record_index not in writer.done]
        summary.sequences_resumed = len(examples) - len(todo)
        throttle = float(os.environ.get("FASTKD_SLOW_WRITE_SECONDS", "0"))
        bar = tqdm(total=len(todo), unit="seq", desc="cache-teacher", disable=not progress,
                   postfix={"resumed": summary.sequences_resumed})
        for chunk, sig in _run_batches(todo, forward, _generator(forward, seed, sample_n), batch_size, summary, bar,
                                       throttle):
            t1 = time.perf_counter()
            for seq in _sequences(chunk, sig, CachedSequence):
                writer.add(seq)
            summary.seconds_write += time.perf_counter() - t1
        bar.close()
        t_close = time.perf_counter()
        writer.close(summary=summary.as_dict())
        summary.seconds_write += time.perf_counter() - t_close
    except BaseException:
        writer.abort()          # finished shards stay; re-running the command resumes
        raise


def _sequences(chunk, sig, CachedSequence):
    """Split a batch's rows back into sequences (row-major order)."""
    import numpy as np

    ids = sig.topk_ids.cpu().numpy()
    logprobs = sig.topk_logprobs.cpu().numpy()
    tail = sig.tail.cpu().numpy()
    counts = sig.counts.cpu().numpy() if sig.counts is not None else None
    hidden = {layer: h.cpu().numpy() for layer, h in sig.hidden.items()}
    start = 0
    out = []
    for ex, rows in zip(chunk, sig.rows_per_sequence):
        end = start + rows
        out.append(CachedSequence(
            record_index=ex.record_index, task=ex.task,
            input_ids=np.asarray(ex.input_ids, dtype=np.int32), loss_mask=np.asarray(ex.loss_mask, dtype=np.uint8),
            topk_ids=ids[start:end], topk_logprobs=logprobs[start:end], tail=tail[start:end],
            counts=counts[start:end] if counts is not None else None,
            hidden={layer: h[start:end] for layer, h in hidden.items()}))
        start = end
    return out


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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (under torchrun: each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread a teacher bigger than one device (through accelerate): auto, "
                        "balanced, sequential, or a JSON object module -> device such as '{\"model.layers.0\": 0, \"lm_head\": 1}'")
    p.add_argument("--max-memory", default=None, metavar="SPEC",
                   help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: folder for weights offloaded to disk")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                   help="teacher engine: hf (transformers; hidden states, --sample) or vllm (prompt log-probs only; "
                        "pip install vllm)")
    p.add_argument("--vllm-max-logprobs", type=int, default=None, metavar="N",
                   help="--backend vllm: the engine's max_logprobs (default: --top-k); --top-k above it is refused")
    p.add_argument("--vllm-tensor-parallel", type=int, default=1, metavar="N",
                   help="--backend vllm: GPUs per engine (tensor parallel)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample")
    p.add_argument("--skip-bad", action="store_true", help="skip bad records (counted per reason) instead of stopping at the first")
    p.add_argument("--split", default="train", help="dataset split, for hub datasets")
    p.add_argument("--source-field", default="source", help="record key holding the question")
    p.add_argument("--rationale-field", default="rationale", help="record key holding the rationale")
    p.add_argument("--target-field", default="target", help="record key holding the answer")
    p.add_argument("--task-field", default="task", help="record key holding the task name (optional)")
    p.add_argument("--sequences-per-shard", type=int, default=256, help="sequences per shard file: the work unit, the unit of resume and of the split across ranks "
                        "(fixed when the cache is created; a resume uses the cache's value)")
    p.add_argument("--hidden-codec", default=None, help="hidden-state codec (see `fastkd cache inspect`); default: the format's default")
    p.add_argument("--hidden-project", type=int, default=None, metavar="D",
                   help="store hidden states through a fixed random projection to width D (its seed, --seed, goes in the manifest; "
                        "the student's learned projection then targets width D)")
    p.add_argument("--logits-codec", default=None, help="top-k codec; default: the format's default")
    p.add_argument("--capture-share", type=float, default=1.0, metavar="F",
                   help="selective capture: keep the teacher's top-k at this share of each sequence's loss positions "
                        "(e.g. 0.2); the other positions are stored empty and train on CE alone. Default 1 (all)")
    p.add_argument("--capture-by", choices=["entropy", "random"], default="entropy",
                   help="with --capture-share < 1: keep the highest-entropy positions (teacher top-k + tail entropy), or a "
                        "random choice seeded by --seed and the record")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    fields = FieldMap(args.source_field, args.rationale_field, args.target_field, args.task_field)
    s = cache_teacher(args.teacher, args.data, args.out, k=args.top_k, layers=args.layers, cot=args.cot,
                      chat=args.chat_template, max_length=args.max_length, overflow=args.overflow,
                      batch_size=args.batch_size, dtype=args.dtype, device=args.device, sample_n=args.sample,
                      seed=args.seed, fields=fields, skip_bad=args.skip_bad,
                      sequences_per_shard=args.sequences_per_shard, hidden_codec=args.hidden_codec,
                      logits_codec=args.logits_codec, split=args.split, hidden_project=args.hidden_project,
                      progress=not args.quiet, device_map=args.device_map, max_memory=args.max_memory,
                      offload_folder=args.offload_folder, backend=args.backend,
                      vllm_max_logprobs=args.vllm_max_logprobs, vllm_tensor_parallel=args.vllm_tensor_parallel,
                      capture_share=args.capture_share, capture_by=args.capture_by)
    if int(os.environ.get("RANK", "0")) == 0:
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
        f"  this run: {s.sequences_written} sequences, {s.loss_positions} loss positions written"
        f"{f' by {s.world_size} ranks' if s.world_size > 1 else ''}; {s.sequences_resumed} already cached",
        f"  total: {len(reader)} sequences, {counts.get('loss_positions', '?')} loss positions",
    ]
    payload = counts.get("payload_bytes", {})
    if payload:
        logits = payload.get("topk", 0) + payload.get("counts", 0) + payload.get("rows", 0)
        lines.append(f"  bytes per loss position: logits {logits / positions:.1f}, hidden {payload.get('hidden', 0) / positions:.1f}, "
                     f"all files {counts.get('bytes', 0) / positions:.1f}")
    if s.seconds_write > 0:
        lines.append(f"  throughput: {s.loss_positions / max(s.seconds_total, 1e-9):.0f} positions/s overall, "
                     f"{s.loss_positions / s.seconds_write:.0f} positions/s cache write (teacher forward excluded)")
    return "\n".join(lines)
