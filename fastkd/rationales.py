"""Have the teacher write the rationales: n sampled chains of thought per record, kept when their final
answer matches the record's target (the answer extraction of eval-bbh), written as records that
`fastkd cache-teacher` reads as they are.

  fastkd generate-rationales --teacher T --data answers.jsonl --out records.jsonl --n 4 --temperature 0.7

Every sample, kept or rejected (and why), is logged with its provenance (teacher, settings, sample
index) in <out>.provenance.jsonl; a killed run resumes from that log with the same outputs (each
sample draws from its own seeded generator). The prompt is the CoT template of fastkd.templates, the one
the student is trained and evaluated with.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from fastkd.errors import UserError

LOG_SUFFIX = ".provenance.jsonl"


@dataclass(frozen=True)
class RationaleSettings:
    """What decides the samples: a resume with other settings is refused."""

    teacher: str
    data_sha256: str
    n: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0
    chat: bool = False
    backend: str = "hf"


def data_digest(data: str) -> str:
    """sha256 of the records file."""
    from fastkd.integrity import file_digest

    path = Path(data)
    if not path.exists():
        raise UserError(f"--data {data}: no such file")
    return file_digest(path)[0]


def vllm_engine(teacher: str, dtype: str, max_new_tokens: int):
    """A vLLM engine for sampling rationales, or a clear error saying how to install vllm."""
    from fastkd.teacher_vllm import require_vllm

    vllm = require_vllm()
    return vllm.LLM(model=teacher, dtype=dtype, seed=0)


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


# ----------------------------------------------------------------------------- the resumable log

def read_log(path: Path, settings: RationaleSettings) -> dict[tuple[int, int], dict]:
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
    if header != asdict(settings):
        diffs = [f"{k}: log {header.get(k)!r}, now {v!r}" for k, v in asdict(settings).items() if header.get(k) != v]
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


def write_records(out: Path, done: dict[tuple[int, int], dict]) -> int:
    """The kept samples as records (in record, then sample order), written atomically."""
    from fastkd.synth import write_jsonl

    kept = [done[key]["record"] for key in sorted(done) if done[key]["kept"]]
    write_jsonl(out, kept)
    return len(kept)


# ----------------------------------------------------------------------------- the run

def generate_rationales(teacher: str, data: str, out: str, *, n: int = 4, temperature: float = 0.7,
                        top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 256, batch_size: int = 8,
                        seed: int = 0, chat: bool = False, device: str = "auto", dtype: str = "auto",
                        backend: str = "hf", skip_bad: bool = False, progress: bool = True, engine=None) -> dict:
    """Sample, judge and log; returns the per-task summary. `engine`: a vLLM-like engine (tests, vllm)."""
    from fastkd.records import FieldMap, read_records, validate_record
    from fastkd.templates import Template

    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise UserError("--n, --batch-size and --max-new-tokens must be >= 1")
    out_path = Path(out)
    log_path = out_path.with_name(out_path.name + LOG_SUFFIX)
    if out_path.resolve() == Path(data).resolve():
        raise UserError(f"--out {out} is the input --data file; write the records somewhere else")
    settings = RationaleSettings(teacher=str(teacher), data_sha256=data_digest(data), n=n, temperature=temperature,
                                 top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed, chat=chat,
                                 backend=backend)
    done = read_log(log_path, settings)

    template = Template(cot=True, chat=chat)
    records, bad = [], 0
    for index, raw in read_records(data):
        try:
            rec = validate_record(raw, index, FieldMap(), str(data), cot=False)
        except UserError:
            if not skip_bad:
                raise
            bad += 1
            continue
        records.append((index, rec))
    if not records:
        raise UserError(f"{data}: no usable records")
    todo = [(index, rec, k) for index, rec in records for k in range(n) if (index, k) not in done]

    tok = model = None
    if todo and engine is None:
        if backend == "vllm":
            engine = vllm_engine(teacher, dtype, max_new_tokens)
        else:
            from fastkd.teacher import load_causal_lm, load_tokenizer, resolve_device

            tok = load_tokenizer(teacher)
            model = load_causal_lm(teacher, dtype=dtype, device=str(resolve_device(device))).eval()
    # inputs read and the teacher loaded: only now is anything written (a refusal leaves no empty files)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not log_path.exists():
        append_lines(log_path, [{"settings": asdict(settings)}])
    write_records(out_path, done)  # the view of the log: consistent again after a kill
    from tqdm.auto import tqdm

    chunk = batch_size * 4  # samples per chunk written to the log (a kill loses at most one chunk)
    with tqdm(total=len(todo), unit="sample", desc="rationales", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            texts = _sample(part, template, settings, batch_size, tok, model, engine)
            entries = []
            for (index, rec, k), (text, finish) in zip(part, texts):
                kept, reason = judge(text, rec["target"], finish)
                rationale = text.strip()
                record = {"source": rec["source"], "rationale": rationale, "target": rec["target"], "task": rec["task"],
                          "provenance": {"teacher": str(teacher), "record_index": index, "sample": k}}
                entries.append({"record_index": index, "sample": k, "task": rec["task"], "kept": kept,
                                "reason": reason, "finish": finish, "record": record})
            append_lines(log_path, entries)
            for entry in entries:
                done[(entry["record_index"], entry["sample"])] = entry
            write_records(out_path, done)
            bar.update(len(part))
    summary = summarise(done, n)
    summary["bad_records_skipped"] = bad
    return summary


def _sample(part, template, settings: RationaleSettings, batch_size, tok, model, engine):
    """(text, finish) per (record, sample) of `part`."""
    from fastkd import bbh

    seeds = [sample_seed(settings.seed, index, k) for index, _, k in part]
    if engine is not None:
        prompts = [template.prompt(rec["source"]) for _, rec, _ in part]
        return engine_samples(engine, prompts, seeds, settings)
    from fastkd.templates import prompt_ids
    from fastkd.generate import Sampling, greedy_generate

    sampling = Sampling(settings.temperature, settings.top_p, settings.top_k)
    prompts = [prompt_ids(tok, template, rec["source"]) for _, rec, _ in part]
    gens = greedy_generate(model, tok, prompts, settings.max_new_tokens, stop_strings=(bbh.STOP_STRING,),
                           batch_size=batch_size, sampling=sampling, seeds=seeds)
    return [(g.text, g.finish) for g in gens]


def engine_samples(engine, prompts: list[str], seeds: list[int], settings: RationaleSettings):
    """Through a vLLM-like engine: one request per sample, its own seed, stopped at eval-bbh's stop string."""
    from fastkd import bbh

    try:
        from vllm import SamplingParams
    except ImportError:
        SamplingParams = None
    params = []
    for seed in seeds:
        kwargs = dict(n=1, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k or -1,
                      max_tokens=settings.max_new_tokens, seed=seed, stop=[bbh.STOP_STRING])
        params.append(SamplingParams(**kwargs) if SamplingParams is not None else kwargs)
    outputs = engine.generate(prompts, params)
    results = []
    for output in outputs:
        best = output.outputs[0]
        finish = {"stop": "stop", "length": "length"}.get(getattr(best, "finish_reason", None), "eos")
        results.append((best.text, finish))
    return results


def summarise(done: dict[tuple[int, int], dict], n: int) -> dict:
    """Keep rate per task: samples, kept, records with at least one kept rationale, and rejection reasons."""
    tasks: dict[str, dict] = defaultdict(lambda: {"records": set(), "samples": 0, "kept": 0, "covered": set(),
                                                  "reasons": Counter()})
    for (index, _), entry in done.items():
        slot = tasks[entry["task"] or "(no task)"]
        slot["records"].add(index)
        slot["samples"] += 1
        slot["kept"] += int(entry["kept"])
        if entry["kept"]:
            slot["covered"].add(index)
        else:
            slot["reasons"][entry["reason"].split(":")[0]] += 1
    table = {task: {"records": len(v["records"]), "samples": v["samples"], "kept": v["kept"],
                    "keep_rate": v["kept"] / v["samples"] if v["samples"] else 0.0,
                    "records_with_a_rationale": len(v["covered"]), "rejected": dict(v["reasons"])}
             for task, v in sorted(tasks.items())}
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
    p.add_argument("--teacher", required=True, help="teacher model folder or hub id (writes the rationales)")
    p.add_argument("--data", required=True, help="records with source and target (.jsonl/.json/.parquet); a rationale "
                                                  "field, if any, is ignored")
    p.add_argument("--out", required=True, help="records file to write (JSONL): one line per kept rationale")
    p.add_argument("--n", type=int, default=4, help="rationales sampled per record")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest rationale in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="sequences generated together (HF backend)")
    p.add_argument("--seed", type=int, default=0, help="seeds every sample's generator")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the teacher's chat template")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="hf: transformers with the KV cache; vllm: "
                                                                           "the vLLM engine (pip install vllm)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", help="teacher dtype: auto, bfloat16, float16, float32")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed records instead of stopping")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = generate_rationales(args.teacher, args.data, args.out, n=args.n, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                                  batch_size=args.batch_size, seed=args.seed, chat=args.chat, device=args.device,
                                  dtype=args.dtype, backend=args.backend, skip_bad=args.skip_bad,
                                  progress=args.progress)
    print(format_summary(summary, args.out))
    return 0
