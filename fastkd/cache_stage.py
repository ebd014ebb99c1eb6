"""`fastkd cache-teacher`: the teacher run once over CoT records, its signal at the loss positions cached as shards +
manifest.json + config.yaml; the same command resumes a partial cache, on one process or many (docs/scale.md)."""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastkd.config import CHAT_TEMPLATE, DEVICE, DTYPE, PROGRESS, SEED, StageConfig
from fastkd.config import option as _opt
from fastkd.cache_tools.manifest_checks import CAPTURE_BY
from fastkd.errors import UserError
from fastkd.paths import check_out_folder
from fastkd.records import FieldMap
from fastkd.templates import LOSS_TURNS, Template
from fastkd.tokenizer_identity import tokenizer_identity


@dataclass
class CacheConfig(StageConfig):
    """Every option of `fastkd cache-teacher`: its flags, its --config YAML and the cache's config.yaml."""

    teacher: str | None = _opt(None, "teacher model: a local folder or a Hugging Face hub id", required=True)
    data: str | None = _opt(None, "records: .jsonl, .json (a list, or an id->record map as CoT-Collection), .parquet "
                                  "or a hub dataset", required=True)
    out: str | None = _opt(None, "cache folder to create, or a partial cache of the same settings to resume",
                           required=True)
    top_k: int = _opt(64, "teacher log-probs kept per position (the rest is one exact tail-mass bucket)")
    sample: int | None = _opt(None, "instead of the top-k, draw N ids with replacement from the teacher, stored as "
                                    "unique ids with counts (Random-Sampling KD)", minimum=1, metavar="N")
    layers: str | None = _opt(None, "teacher hidden states to keep, comma list (0 = embeddings, -1 = last block)")
    cot: bool = _opt(True, "response = rationale + 'So the answer is <target>.' (KD+CoT); --no-cot: the target alone")
    chat_template: bool = CHAT_TEMPLATE()
    max_length: int = _opt(2048, "longest sequence in tokens (prompt + response + EOS)", minimum=1)
    overflow: str = _opt("truncate", "longer records: truncate or skip (counted)", choices=["truncate", "skip"])
    batch_size: int = _opt(8, "sequences per teacher forward (length-sorted)", minimum=1)
    dtype: str = DTYPE("teacher")
    device: str = DEVICE()
    device_map: str | None = _opt(None, "spread a teacher bigger than one device (accelerate): auto, balanced, "
                                        "sequential, or JSON module -> device, e.g. '{\"lm_head\": 1}'", metavar="MAP")
    max_memory: str | None = _opt(None, "with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
                                  metavar="SPEC")
    offload_folder: str | None = _opt(None, "with --device-map: folder for weights offloaded to disk")
    backend: str = _opt("hf", "hf (transformers; hidden states, --sample) or vllm (prompt log-probs only; pip install "
                              "vllm)", choices=["hf", "vllm"])
    vllm_max_logprobs: int | None = _opt(None, "--backend vllm: the engine's max_logprobs (default: --top-k)",
                                         minimum=1, metavar="N")
    vllm_tensor_parallel: int = _opt(1, "--backend vllm: GPUs per engine (tensor parallel)", minimum=1, metavar="N")
    seed: int = SEED("--sample, the --hidden-project matrix and --capture-by random")
    skip_bad: bool = _opt(False, "skip bad records (counted per reason) instead of stopping at the first")
    split: str = _opt("train", "dataset split, for hub datasets")
    source_field: str = _opt("source", "record key holding the question")
    rationale_field: str = _opt("rationale", "record key holding the rationale")
    target_field: str = _opt("target", "record key holding the answer")
    task_field: str = _opt("task", "record key holding the task name (optional)")
    messages_field: str = _opt("messages", "record key holding a conversation (messages form: a list of {role, "
                                           "content} turns), used instead of source/rationale/target")
    loss_turns: str = _opt("all", "messages records: the assistant turns that carry loss: all, last (the final "
                                  "one), reasoning (their reasoning only) or answer (their answer only)",
                           choices=list(LOSS_TURNS))
    sequences_per_shard: int = _opt(256, "the work unit: consecutive records per shard, the unit of resume and of "
                                         "the split across ranks (a resume keeps the cache's own)", minimum=1)
    encode_threads: int = _opt(2, "threads per rank that encode and write shards while the teacher runs the next "
                                  "batches (0: in the main thread, after each forward)", minimum=0, metavar="N")
    hidden_codec: str | None = _opt(None, "hidden-state codec (docs/cache-format.md): kh:method=int8 (the default, "
                                          "block=128), kh:method=bf16 or kh:method=fp8, optionally with ,block=N")
    hidden_project: int | None = _opt(None, "store hidden states through a fixed random projection to width D (seed "
                                            "--seed, in the manifest); the student then projects to D", minimum=1,
                                      metavar="D")
    logits_codec: str | None = _opt(None, "top-k codec (docs/codec.md): kt:precision=fine (the default), "
                                          "kt:precision=small (fewer bytes, more KL) or kt:precision=exact (float32 "
                                          "bits); a --sample cache always uses ks")
    capture_share: float = _opt(1.0, "selective capture: the teacher's top-k at this share of each sequence's loss "
                                     "positions (e.g. 0.2), CE alone at the others", metavar="F")
    capture_by: str = _opt("entropy", "with --capture-share < 1: entropy (the highest-entropy positions) or random "
                                      "(seeded by --seed and the record)")
    progress: bool = PROGRESS()

    def validate(self) -> "CacheConfig":
        if self.top_k < 1 and not self.sample:
            raise UserError(f"--top-k must be >= 1, got {self.top_k}")
        if not 0.0 < self.capture_share <= 1.0:
            raise UserError(f"--capture-share must be in (0, 1] (the share of loss positions that keep the teacher), "
                            f"got {self.capture_share}")
        if self.capture_by not in CAPTURE_BY:
            raise UserError(f"--capture-by {self.capture_by!r}: choose one of {', '.join(CAPTURE_BY)}")
        if self.capture_share < 1.0 and self.sample:
            raise UserError("--capture-share < 1 works with top-k caches only (not with --sample)")
        if self.hidden_project and not self.layers:
            raise UserError("--hidden-project needs --layers (there are no hidden states to project)")
        from fastkd.cache_tools.codecs import normalize_codec
        from fastkd.cache_tools.errors import CodecError
        from fastkd.cache_tools.writing import CODEC_SETTINGS

        for flag, part in CODEC_SETTINGS:   # spelled wrong: refused now, not after the teacher has loaded
            try:
                normalize_codec(getattr(self, flag), part, "sample" if self.sample else "topk")
            except (KeyError, ValueError, CodecError) as err:
                raise UserError(f"--{flag.replace('_', '-')} {getattr(self, flag)!r}: {err.args[0]}") from None
        return self

    def template(self) -> Template:
        return Template(cot=self.cot, chat=self.chat_template, loss_turns=self.loss_turns)

    def field_map(self) -> FieldMap:
        return FieldMap(self.source_field, self.rationale_field, self.target_field, self.task_field,
                        self.messages_field)


@dataclass
class CacheSummary:
    """What one run did: counts and throughput, printed at the end and stored in the manifest."""

    sequences_written: int = 0
    sequences_resumed: int = 0
    loss_positions: int = 0
    report: dict = field(default_factory=dict)
    seconds_total: float = 0.0
    seconds_teacher: float = 0.0
    seconds_write: float = 0.0     # main-thread time outside the teacher's forward (what the device waits for)
    seconds_encode: float = 0.0    # CPU seconds spent checking, encoding and writing shards (worker threads)
    seconds_units: float = 0.0     # wall time from the first unit to the last rank's end (rank 0; startup excluded)
    world_size: int = 1
    per_rank: list = field(default_factory=list)   # rank 0 of a torchrun: each rank's counts and seconds
    is_main: bool = True                            # rank 0 (prints the summary); not stored

    def as_dict(self) -> dict:
        """What the manifest stores: not is_main, nor the skipped records' messages (they quote the data)."""
        out = {key: value for key, value in self.__dict__.items() if key != "is_main"}
        out["report"] = {key: value for key, value in self.report.items() if key != "first_errors"}
        return out


def cache_teacher(config: CacheConfig | dict, *, vllm_engine=None) -> CacheSummary:
    """The whole stage (a CacheConfig, or a dict of its fields): records -> this rank's examples -> teacher backend
    -> work units -> summary. Under torchrun every rank calls it. `vllm_engine` stands in for vllm.LLM (tests)."""
    from fastkd.cache_pipeline import read_plan, tokenise_own_units, write_units
    from fastkd.cache_tools.storage import refuse_url_for_writing
    from fastkd.runtime import join_ranks
    from fastkd.teacher import capturing, load_hf, load_tokenizer

    config = CacheConfig.make(overrides=config) if isinstance(config, dict) else config.validate()
    refuse_url_for_writing(config.out)  # before any model is loaded: a URL would become a local folder named s3:
    check_out_folder(config.out, "teacher cache")   # nor a file, a training run's or an evaluation's folder
    started = time.perf_counter()
    env = join_ranks(config.device, backend="gloo", timeout_hours=24)   # ranks wait only at the start and the end
    try:
        if not config.progress or not env.is_main:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        tokenizer = load_tokenizer(config.teacher, "--teacher")
        template = config.template()
        plan = read_plan(config, env)
        own = tokenise_own_units(config, tokenizer, template, plan, env)   # this rank's units only
        if not own.report["kept"] and not plan.done:
            raise UserError(f"{config.data}: no usable records ({own.report})")
        if config.backend == "vllm":
            from fastkd.teacher_vllm import load_vllm

            backend = load_vllm(config, tokenizer, env.world, vllm_engine)
        else:
            backend = load_hf(config, tokenizer, env)
        if config.capture_share < 1.0:
            backend = capturing(backend, config.capture_share, config.capture_by, config.seed)
        settings, cut = _settings(config, backend, tokenizer, template, own, plan, env)
        summary = CacheSummary(report=own.report, is_main=env.is_main)
        writer, done = _open_writer(config, settings, cut, env, summary)
        try:
            if env.is_main:
                config.save(Path(config.out) / "config.yaml")
            t_units = time.perf_counter()
            empty = write_units(config, writer, own, done, backend, summary, env, lambda: _after_unit())
            env.barrier()                                   # every rank's units are on disk with their receipts
            summary.seconds_units = time.perf_counter() - t_units
            _finish(writer, summary, empty, env)
            env.barrier()   # ranks leave together: one leaving the process group early can abort another's teardown
        except BaseException:
            writer.abort()      # finished units stay with their receipts; re-running the command resumes
            raise
        summary.seconds_total = time.perf_counter() - started
        return summary
    except OSError as err:
        if not err.filename:    # a full disk met while writing or closing a file: the message names the cache
            err.filename = str(config.out)
        raise
    finally:
        env.close()


def _settings(config: CacheConfig, backend, tokenizer, template, own, plan, env) -> tuple[dict, object]:
    """The manifest's settings (the config's and the backend's) and the cut into work units; on a resume the
    cache's own codecs (when none is asked), teacher tokenizer and work unit are kept."""
    from fastkd.cache_tools.units import RecordCut
    from fastkd.cache_tools.writing import CODEC_SETTINGS, existing_manifest
    from fastkd.chat_masks import template_sha256
    from fastkd.cross_tokenizer import with_teacher_tokenizer

    described, digest = template.describe(own.conversations), template_sha256(tokenizer)
    if digest is not None:      # the chat template makes the text of chat and messages records
        described["chat_template_sha256"] = digest
    settings = {**backend.settings, "tokenizer": tokenizer_identity(tokenizer), "template": described,
                "mode": "sample" if config.sample else "topk", "k": int(config.sample or config.top_k),
                "sample_n": config.sample, "seed": config.seed if config.sample else None,
                "max_length": config.max_length, "overflow": config.overflow, "fields": config.field_map().__dict__,
                "data": str(config.data)}
    existing = existing_manifest(config.out)
    for flag, part in CODEC_SETTINGS:   # a codec not asked for is the cache's own: a newer default must not strand it
        if getattr(config, flag):
            settings[flag] = getattr(config, flag)
        elif part in ((existing or {}).get("codecs") or {}):
            settings.setdefault("codecs", {})[part] = existing["codecs"][part]
    # the teacher tokenizer inside the cache (its files' sha256 in the manifest): cross-tokenizer students
    settings = with_teacher_tokenizer(settings, tokenizer, config.out, existing, write=env.is_main)
    records = {"count": own.count}      # rank 0 adds the digest of the raw records (_open_writer)
    return dict(settings, records=records, work_unit=plan.work_unit), RecordCut(own.count, plan.work_unit)


def _after_unit() -> None:
    """Called after each unit a rank wrote; tests replace it to slow a run down so that a kill lands part-way."""


def _open_writer(config: CacheConfig, settings: dict, cut, env, summary: CacheSummary):
    """Rank 0 digests the raw records, opens the cache (lock, checks, earlier receipts merged) and tells the other
    ranks which units are done and under which settings (rank 0's are the cache's); returns (writer, done units)."""
    from fastkd.cache_pipeline import from_main, records_identity
    from fastkd.cache_tools.units import UnitWriter

    writer = None

    def open_cache() -> dict:
        nonlocal writer
        records = dict(settings["records"], **records_identity(config.data, config.split))
        writer = UnitWriter.open(config.out, dict(settings, records=records), cut)
        _clear_dead_staging(config.out)
        return {"done": sorted(writer.done_units), "settings_sha256": writer.settings_sha256,
                "settings": writer.settings, "resumed": sum(e["num_sequences"] for e in writer.manifest["shards"])}

    state = from_main(env, open_cache)
    if writer is None:
        writer = UnitWriter.join(config.out, state["settings"], cut, state["settings_sha256"], env.rank)
    elif config.progress:
        for warning in writer.warnings:
            print(f"fastkd cache-teacher: note: {warning}")
    summary.sequences_resumed = state["resumed"]
    return writer, set(state["done"])


def _clear_dead_staging(out: str) -> None:
    """Under the cache lock: remove the `.teacher_tokenizer.<pid>.tmp` folders of runs whose process is gone (one
    stopped while saving the teacher tokenizer leaves it), as the writer removes its own temporary files."""
    from fastkd.cache_tools.lock import pid_alive
    from fastkd.cross_tokenizer import TEACHER_TOKENIZER_DIR

    for path in Path(out).glob(f".{TEACHER_TOKENIZER_DIR}.*.tmp"):
        pid = path.name[len(TEACHER_TOKENIZER_DIR) + 2:-len(".tmp")]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _finish(writer, summary: CacheSummary, empty: list[int], env) -> None:
    """Rank 0 adds up every rank's counts, merges the last receipts and seals the manifest with the summary
    (complete when every unit is listed or was found to hold no kept record)."""
    keys = ("sequences_written", "loss_positions", "seconds_teacher", "seconds_write", "seconds_encode")
    parts = env.gather(dict({key: getattr(summary, key) for key in keys}, empty=empty))
    if not env.is_main:
        writer.finish()
        return
    summary.world_size = env.world
    if env.world > 1:
        summary.per_rank = [{key: p[key] for key in keys} for p in parts]
        summary.sequences_written = sum(p["sequences_written"] for p in parts)
        summary.loss_positions = sum(p["loss_positions"] for p in parts)
    t_close = time.perf_counter()
    writer.finish(summary=summary.as_dict(), empty={u for p in parts for u in p["empty"]})
    summary.seconds_write += time.perf_counter() - t_close


def add_arguments(p: argparse.ArgumentParser) -> None:
    CacheConfig.add_flags(p)


def run(args: argparse.Namespace) -> int:
    config = CacheConfig.from_args(args)
    summary = cache_teacher(config)
    if summary.is_main:
        print(format_summary(summary, config.out))
    return 0


def format_summary(s: CacheSummary, out: str) -> str:
    from fastkd.cache_tools.cli import cache_summary

    cache, report = cache_summary(out), s.report
    per = cache["bytes_per_loss_position"]
    lines = [
        f"cache: {Path(out)}",
        f"  records read this run: {report.get('kept', 0)} kept, {report.get('truncated', 0)} truncated, skipped "
        f"{report.get('skipped', {}) or 'none'}",
        *(f"    skipped: {message}" for message in report.get("first_errors", [])),
        f"  this run: {s.sequences_written} sequences, {s.loss_positions} loss positions written"
        f"{f' by {s.world_size} ranks' if s.world_size > 1 else ''}; {s.sequences_resumed} already cached",
        f"  total: {cache['sequences']} sequences, {cache['loss_positions']} loss positions",
    ]
    if cache["loss_positions"]:
        lines.append(f"  bytes per loss position: logits {per['logits']:.1f}, hidden {per['hidden']:.1f}, all files "
                     f"{per['total']:.1f}")
    if s.loss_positions:
        lines.append(f"  throughput: {s.loss_positions / max(s.seconds_total, 1e-9):.0f} positions/s overall; teacher "
                     f"forward {s.seconds_teacher:.1f} s, the rest of the unit loop {s.seconds_write:.1f} s, encoding "
                     f"{s.seconds_encode:.1f} CPU s ({1e6 * s.seconds_encode / s.loss_positions:.1f} us per position)")
    return "\n".join(lines)
