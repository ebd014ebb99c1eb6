"""`fastkd generate-rationales`: n sampled chains of thought per record from the teacher (fastkd.templates' CoT prompt),
kept when eval-bbh's extraction gives the target, written as records cache-teacher reads (or conversations with
--messages); every sample is logged with its provenance in <out>.provenance.jsonl, which a killed run resumes from."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from fastkd.config import CHAT_TEMPLATE, DEVICE, DTYPE, PROGRESS, SEED, StageConfig, option
from fastkd.errors import UserError
from fastkd.paths import resolve_model

LOG_SUFFIX = ".provenance.jsonl"


@dataclass
class RationalesConfig(StageConfig):
    """Every option of `fastkd generate-rationales`."""

    teacher: str | None = option(None, "teacher model folder or hub id (writes the rationales)", required=True)
    data: str | None = option(None, "records with source and target (.jsonl/.json/.parquet); a rationale field, if "
                                    "any, is ignored", required=True)
    out: str | None = option(None, "records file to write (JSONL): one line per kept rationale", required=True)
    n: int = option(4, "rationales sampled per record", minimum=1)
    temperature: float = option(0.7, "sampling temperature", exclusive_minimum=0)
    top_p: float = option(0.95, "nucleus sampling mass", exclusive_minimum=0, maximum=1)
    top_k: int = option(0, "sample among the k most likely tokens (0 = off)", minimum=0)
    max_new_tokens: int = option(256, "longest rationale in tokens", minimum=1)
    batch_size: int = option(8, "sequences generated together (HF backend)", minimum=1)
    seed: int = SEED("every sample's generator")
    chat_template: bool = CHAT_TEMPLATE()
    backend: str = option("hf", "hf: transformers with the KV cache; vllm: the vLLM engine (pip install vllm)",
                          choices=["hf", "vllm"])
    device: str = DEVICE()
    dtype: str = DTYPE("teacher")
    skip_bad: bool = option(False, "skip (and count) malformed records instead of stopping")
    messages: bool = option(False, "write the kept rationales as conversations (messages form, docs/data.md: the "
                                   "rationale as reasoning_content) instead of source/rationale/target records")
    progress: bool = PROGRESS()


SAMPLE_SETTINGS = ("teacher", "n", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "backend")


def log_settings(config: RationalesConfig) -> dict:
    """What decides the samples (with the records' sha256), the log's first line: a resume with others is refused."""
    from fastkd.cache_tools.integrity import file_digest

    if not Path(config.data).exists():
        raise UserError(f"--data {config.data}: no such file")
    return {**{name: getattr(config, name) for name in SAMPLE_SETTINGS}, "chat": config.chat_template,
            "data_sha256": file_digest(Path(config.data))[0]}


def sample_seed(seed: int, record_index: int, sample: int) -> int:
    """A generator seed per (run seed, record, sample): the same text whatever the batch or the resume point."""
    digest = hashlib.sha256(f"{seed}:{record_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def judge(generation: str, target: str, finish: str) -> tuple[bool, str]:
    """(kept, reason): kept when eval-bbh's strict extraction gives the target."""
    from fastkd import bbh

    text = generation.strip()
    if not text:
        return False, "empty generation"
    if bbh.ANSWER_PHRASE not in text:
        return False, "no final answer" + (" (hit --max-new-tokens)" if finish == "length" else "")
    answer = bbh.extract_answer(text)
    if answer != target.strip():
        return False, f"wrong answer: {answer[:40]!r}"
    return True, "answer matches the target"


def read_log(path: Path, settings: dict) -> dict[tuple[int, int], dict]:
    """Samples already done, by (record index, sample); a partial last line (a kill mid-write) is dropped,
    and a log made with other settings is refused."""
    if not path.exists():
        return {}
    lines = path.read_bytes().split(b"\n")
    complete, done, header = [], {}, None
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except json.JSONDecodeError:
            if number == len(lines):  # the unfinished last line of a killed run
                break
            raise UserError(f"{path}: line {number} is not JSON; the provenance log is damaged (move it away to "
                            f"start over)") from None
        complete.append(raw)
        if header is None:
            header = entry.get("settings")
            if header is None:
                raise UserError(f"{path}: line 1 holds no settings; not a fastkd provenance log")
            continue
        done[(int(entry["record_index"]), int(entry["sample"]))] = entry
    if header is None:              # killed while its first line was written: nothing was logged yet
        head = next((r.strip() for r in lines if r.strip()), b"")   # none, or a cut-short header: what a kill leaves
        if head and not (head.startswith(b'{"settings"') or b'{"settings"'.startswith(head)):
            raise UserError(f"{path}: line 1 holds no settings; not a fastkd provenance log (move it away, or use "
                            f"another --out)")
        path.unlink()
        return {}
    if header != settings:
        diffs = [f"{k}: log {header.get(k)!r}, now {v!r}" for k, v in settings.items() if header.get(k) != v]
        raise UserError(f"{path}: made with other settings ({'; '.join(diffs)}); use the same ones to resume, or "
                        f"another --out")
    path.write_bytes(b"".join(raw + b"\n" for raw in complete))  # drop the partial line for good
    return done


def append_lines(path: Path, entries: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        for entry in entries:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def write_records(out: Path, done: dict[tuple[int, int], dict], messages: bool = False) -> int:
    """The kept samples as records (in record, then sample order; as conversations with `messages`), atomically."""
    from fastkd.synth import write_jsonl

    kept = [done[key]["record"] for key in sorted(done) if done[key]["kept"]]
    write_jsonl(out, [as_conversation(r) for r in kept] if messages else kept)
    return len(kept)


def as_conversation(record: dict) -> dict:
    """A kept record as a conversation, the form docs/data.md's "Conversations from generate-rationales" gives."""
    from fastkd.templates import ANSWER_PHRASE

    rationale = record["rationale"]
    cut = rationale.rfind(ANSWER_PHRASE)
    reasoning = (rationale[:cut] if cut >= 0 else rationale).strip()
    assistant = {"role": "assistant", **({"reasoning_content": reasoning} if reasoning else {}),
                 "content": f"{ANSWER_PHRASE}{record['target'].strip()}."}
    rest = {key: value for key, value in record.items() if key not in ("source", "rationale", "target")}
    return {"messages": [{"role": "user", "content": record["source"]}, assistant], **rest}


def generate_rationales(config: RationalesConfig, engine=None) -> dict:
    """Sample, judge and log; returns the per-task summary. `engine`: a vLLM-like engine (tests, vllm)."""
    from fastkd.templates import Template

    out_path = Path(config.out)
    log_path = out_path.with_name(out_path.name + LOG_SUFFIX)
    if out_path.resolve() == Path(config.data).resolve():
        raise UserError(f"--out {config.out} is the input --data file; write the records somewhere else")
    settings = log_settings(config)
    done = read_log(log_path, settings)
    if not log_path.exists() and out_path.exists() and (out_path.is_dir() or out_path.stat().st_size):
        raise UserError(f"--out {config.out}: already exists and was not written by generate-rationales (no "
                        f"{log_path.name} beside it), so it would be replaced; move it away or choose another --out")
    records, bad = read_inputs(config)
    todo = [(index, rec, k) for index, rec in records for k in range(config.n) if (index, k) not in done]
    tok = model = None
    if todo and engine is None:
        if config.backend == "vllm":
            from fastkd.teacher_vllm import require_vllm

            engine = require_vllm().LLM(model=resolve_model(config.teacher, "--teacher"), dtype=config.dtype, seed=0)
        else:
            from fastkd.teacher import load_causal_lm, load_tokenizer

            tok = load_tokenizer(config.teacher, "--teacher")
            model = load_causal_lm(config.teacher, dtype=config.dtype, device=config.device)
    # inputs read and the teacher loaded: only now is anything written (a refusal leaves no empty files)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not log_path.exists():
        append_lines(log_path, [{"settings": settings}])
    write_records(out_path, done, config.messages)  # the view of the log: consistent again after a kill
    from tqdm.auto import tqdm

    template = Template(cot=True, chat=config.chat_template)
    chunk = config.batch_size * 4  # samples per chunk written to the log (a kill loses at most one chunk)
    with tqdm(total=len(todo), unit="sample", desc="rationales", disable=not config.progress, file=sys.stderr) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            texts = _sample(part, template, config, tok, model, engine)
            entries = []
            for (index, rec, k), (text, finish) in zip(part, texts):
                kept, reason = judge(text, rec["target"], finish)
                provenance = {"teacher": config.teacher, "record_index": index, "sample": k}
                record = {"source": rec["source"], "rationale": text.strip(), "target": rec["target"],
                          "task": rec["task"], "provenance": provenance}
                entries.append({"record_index": index, "sample": k, "task": rec["task"], "kept": kept,
                                "reason": reason, "finish": finish, "record": record})
            append_lines(log_path, entries)
            done.update({(entry["record_index"], entry["sample"]): entry for entry in entries})
            write_records(out_path, done, config.messages)
            bar.update(len(part))
    return dict(summarise(done, config.n), bad_records_skipped=bad)


def read_inputs(config: RationalesConfig) -> tuple[list[tuple[int, dict]], int]:
    """(index, record) of every usable input record, and how many malformed ones --skip-bad skipped."""
    from fastkd.records import FieldMap, read_records, validate_record

    records, bad = [], 0
    for index, raw in read_records(config.data):
        try:
            records.append((index, validate_record(raw, index, FieldMap(), str(config.data), cot=False)))
        except UserError:
            if not config.skip_bad:
                raise
            bad += 1
    if not records:
        raise UserError(f"{config.data}: no usable records")
    return records, bad


def _sample(part, template, config: RationalesConfig, tok, model, engine):
    """(text, finish) per (record, sample) of `part`."""
    from fastkd import bbh

    seeds = [sample_seed(config.seed, index, k) for index, _, k in part]
    if engine is not None:
        prompts = [template.prompt(rec["source"]) for _, rec, _ in part]
        return engine_samples(engine, prompts, seeds, config)
    from fastkd.templates import prompt_ids
    from fastkd.generate import Sampling, greedy_generate

    sampling = Sampling(config.temperature, config.top_p, config.top_k)
    prompts = [prompt_ids(tok, template, rec["source"]) for _, rec, _ in part]
    gens = greedy_generate(model, tok, prompts, config.max_new_tokens, stop_strings=(bbh.STOP_STRING,),
                           batch_size=config.batch_size, sampling=sampling, seeds=seeds)
    return [(g.text, g.finish) for g in gens]


def engine_samples(engine, prompts: list[str], seeds: list[int], config: RationalesConfig):
    """Through a vLLM-like engine: one request per sample, its own seed, stopped at eval-bbh's stop string."""
    from fastkd import bbh

    try:
        from vllm import SamplingParams as make
    except ImportError:
        make = dict                 # a stand-in engine (tests) reads the plain settings
    params = [make(n=1, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or -1,
                   max_tokens=config.max_new_tokens, seed=seed, stop=[bbh.STOP_STRING]) for seed in seeds]
    finish = {"stop": "stop", "length": "length"}
    return [(out.outputs[0].text, finish.get(getattr(out.outputs[0], "finish_reason", None), "eos"))
            for out in engine.generate(prompts, params)]


def summarise(done: dict[tuple[int, int], dict], n: int) -> dict:
    """Keep rate per task: samples, kept, records with at least one kept rationale, and rejection reasons."""
    tasks: dict[str, list] = defaultdict(list)
    for (index, _), entry in done.items():
        tasks[entry["task"] or "(no task)"].append((index, entry))
    table = {}
    for task, items in sorted(tasks.items()):
        kept = [index for index, entry in items if entry["kept"]]
        table[task] = {"records": len({index for index, _ in items}), "samples": len(items), "kept": len(kept),
                       "keep_rate": len(kept) / len(items), "records_with_a_rationale": len(set(kept)),
                       "rejected": dict(Counter(e["reason"].split(":")[0] for _, e in items if not e["kept"]))}
    total = sum(v["samples"] for v in table.values())
    kept = sum(v["kept"] for v in table.values())
    return {"tasks": table, "samples": total, "kept": kept, "keep_rate": kept / total if total else 0.0,
            "samples_per_record": n}


def format_summary(summary: dict, out: str) -> str:
    lines = [f"{'task':42s} {'records':>8s} {'samples':>8s} {'kept':>6s} {'keep rate':>10s} {'covered':>8s}"]
    for task, v in summary["tasks"].items():
        lines.append(f"{task:42s} {v['records']:8d} {v['samples']:8d} {v['kept']:6d} {100 * v['keep_rate']:9.1f}% "
                     f"{v['records_with_a_rationale']:8d}")
    lines.append(f"{'all':42s} {'':8s} {summary['samples']:8d} {summary['kept']:6d} {100 * summary['keep_rate']:9.1f}%")
    lines.append(f"records: {out} (kept rationales; feed it to fastkd cache-teacher --data); "
                 f"every sample and why: {out}{LOG_SUFFIX}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    RationalesConfig.add_flags(p)


def run(args: argparse.Namespace) -> int:
    config = RationalesConfig.from_args(args)
    print(format_summary(generate_rationales(config), config.out))
    return 0
