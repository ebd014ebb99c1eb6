"""Records -> templates -> token ids and loss masks -> padded batches.

The one place where text becomes tokens: `fastkd cache-teacher`, `fastkd train` and
`fastkd eval-bbh` all build prompts and batches here, so the three stages see the same bytes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

ANSWER_PHRASE = "So the answer is "


from fastkd.errors import UserError


class DataError(UserError, ValueError):
    """A record that cannot be used; the message names the file, record and field."""


@dataclass(frozen=True)
class FieldMap:
    """Which record keys hold the source, rationale, target and (optional) task."""

    source: str = "source"
    rationale: str = "rationale"
    target: str = "target"
    task: str = "task"


COT_TRIGGER = "Let's think step by step."


@dataclass(frozen=True)
class Template:
    """How a record becomes prompt text and response text.

    cot=True: prompt `Q: {source}\nA: Let's think step by step.` (the BBH authors' CoT frame),
    response = the rationale, then `So the answer is <target>.` (added once);
    cot=False: prompt `Q: {source}\nA:`, response = the target alone. The two prompts differ,
    so one model trained on both modes is told which one to use. chat=True puts the bare source
    in the tokenizer's chat template (user turn + generation prompt) and, with cot, starts the
    response with the trigger phrase instead.
    """

    cot: bool = True
    chat: bool = False

    def prompt(self, source: str) -> str:
        return f"Q: {source.strip()}\nA: {COT_TRIGGER}" if self.cot else f"Q: {source.strip()}\nA:"

    def response(self, rationale: str | None, target: str) -> str:
        target = target.strip()
        if not self.cot:
            return f" {target}"
        body = strip_answer_phrase(rationale or "", target)
        if body.startswith(COT_TRIGGER):
            body = body[len(COT_TRIGGER):].strip()
        if self.chat:
            body = f"{COT_TRIGGER} {body}".strip()
        return f" {body} {ANSWER_PHRASE}{target}." if body else f" {ANSWER_PHRASE}{target}."

    def describe(self) -> dict:
        if self.cot:
            prompt = "{source}" if self.chat else "Q: {source}\\nA: " + COT_TRIGGER
            response = (" " + COT_TRIGGER if self.chat else "") + " {rationale} So the answer is {target}."
        else:
            prompt, response = ("{source}" if self.chat else "Q: {source}\\nA:"), " {target}"
        return {"cot": self.cot, "chat": self.chat, "prompt": prompt, "response": response}


def strip_answer_phrase(rationale: str, target: str) -> str:
    """Remove a trailing `So the answer is <target>.` the rationale already has (CoT-Collection
    rationales sometimes restate the answer), so the template adds it exactly once."""
    text = rationale.strip()
    pattern = re.compile(r"\s*(So|so|Therefore|therefore|Thus|thus),?\s+the answer is\s*"
                         + re.escape(target.strip()) + r"\s*\.?\s*$")
    return pattern.sub("", text).strip()


@dataclass
class Example:
    """One tokenised record. loss_mask[t] = 1 where token t is a response token (or EOS)
    that the model is trained to predict from the tokens before it."""

    input_ids: list[int]
    loss_mask: list[int]
    record_index: int
    task: str = ""
    truncated: bool = False
    cot: bool = True          # built with the CoT template (False: answer-only response)

    @property
    def prompt_length(self) -> int:
        return self.loss_mask.index(1) if 1 in self.loss_mask else len(self.loss_mask)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class BuildReport:
    """Counts of what happened to the records: kept, truncated, skipped per reason."""

    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated, "skipped": dict(self.skipped)}


# ----------------------------------------------------------------------------- reading

def read_records(source: str | Path, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield (record number, record dict) from JSONL, JSON (list or id->record mapping, as
    CoT-Collection ships), parquet, or a Hugging Face dataset name when online."""
    path = Path(source)
    if not path.is_file():
        looks_local = path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".parquet") or str(source).startswith((".", "/"))
        if looks_local and not path.exists():
            raise DataError(f"{source}: no such file")
        yield from _read_hub(str(source), split)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: record {lineno} (line {lineno + 1}): invalid JSON: {err.msg}") from None
    elif suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
        if isinstance(obj, dict) and "examples" in obj and isinstance(obj["examples"], list):
            obj = obj["examples"]
        items = obj.values() if isinstance(obj, dict) else obj
        if not isinstance(items, (list, type({}.values()))):
            raise DataError(f"{path}: expected a JSON list of records or an id -> record mapping")
        yield from enumerate(items)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield i, rec
    else:
        raise DataError(f"{path}: unknown record format {suffix!r}; use .jsonl, .json or .parquet")


def _read_hub(name: str, split: str) -> Iterator[tuple[int, dict]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; one clear message
        raise DataError(f"{name}: not a local file, and loading it from the Hugging Face hub "
                        f"failed ({type(err).__name__}: {err})") from None
    yield from enumerate(ds)


def validate_record(record: object, index: int, fields: FieldMap, origin: str, cot: bool) -> dict:
    """Return {source, rationale, target, task} or raise DataError naming file, record, field."""
    if not isinstance(record, dict):
        raise DataError(f"{origin}: record {index}: expected an object, got {type(record).__name__}")
    out = {"cot": cot and record.get("cot", True) is not False}   # a record may ask for answer-only
    needed = [("source", fields.source), ("target", fields.target)]
    if out["cot"]:
        needed.append(("rationale", fields.rationale))
    for role, key in needed:
        if key not in record or record[key] is None:
            raise DataError(f"{origin}: record {index}: field {key!r} is missing")
        if not isinstance(record[key], str):
            raise DataError(f"{origin}: record {index}: field {key!r} is {type(record[key]).__name__}, not a string")
        out[role] = record[key]
    if not out["target"].strip():
        raise DataError(f"{origin}: record {index}: field {fields.target!r} is empty (empty response)")
    if not out["source"].strip():
        raise DataError(f"{origin}: record {index}: field {fields.source!r} is empty")
    out.setdefault("rationale", record.get(fields.rationale) if isinstance(record.get(fields.rationale), str) else "")
    task = record.get(fields.task, "")
    out["task"] = task if isinstance(task, str) else str(task)
    return out


# ----------------------------------------------------------------------------- tokenising

def text_prompt_ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a ready prompt string: as is (BOS when the tokenizer adds one), or as one
    user turn of the chat template followed by the generation prompt."""
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def prompt_ids(tokenizer, template: Template, source: str) -> list[int]:
    """Token ids of a record's prompt under the template (the chat template gets the bare source)."""
    return text_prompt_ids(tokenizer, source.strip() if template.chat else template.prompt(source), template.chat)


def response_ids(tokenizer, template: Template, rationale: str | None, target: str) -> list[int]:
    """Token ids of the response followed by EOS."""
    ids = list(tokenizer(template.response(rationale, target), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token")
    return ids + [tokenizer.eos_token_id]


def build_example(record: dict, index: int, tokenizer, template: Template, max_length: int | None = None,
                  overflow: str = "truncate") -> Example | None:
    """Tokenise one validated record (a record with `"cot": false` gets the answer-only
    response even under a CoT template: mixed teacher training). Over-long: truncate the response end (`truncate`) or
    return None (`skip`). A prompt that leaves no room for one response token is skipped."""
    if template.cot and record.get("cot") is False:
        template = Template(cot=False, chat=template.chat)
    p = prompt_ids(tokenizer, template, record["source"])
    r = response_ids(tokenizer, template, record.get("rationale"), record["target"])
    ids, mask, truncated = p + r, [0] * len(p) + [1] * len(r), False
    if max_length is not None and len(ids) > max_length:
        if overflow == "skip" or len(p) >= max_length:
            return None
        ids, mask, truncated = ids[:max_length], mask[:max_length], True
    return Example(ids, mask, index, record.get("task", ""), truncated, template.cot)


def build_examples(source: str | Path, tokenizer, template: Template, fields: FieldMap = FieldMap(),
                   max_length: int | None = None, overflow: str = "truncate", skip_bad: bool = False,
                   split: str = "train", report: BuildReport | None = None) -> list[Example]:
    """Read, validate and tokenise every record of `source`; counts go into `report`."""
    if overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow must be 'truncate' or 'skip', not {overflow!r}")
    report = report if report is not None else BuildReport()
    examples = []
    for index, raw in read_records(source, split):
        try:
            rec = validate_record(raw, index, fields, str(source), template.cot)
        except DataError as err:
            if not skip_bad:
                raise
            report.skipped[_reason(str(err))] += 1
            continue
        ex = build_example(rec, index, tokenizer, template, max_length, overflow)
        if ex is None:
            report.skipped["too long"] += 1
            continue
        report.kept += 1
        report.truncated += ex.truncated
        examples.append(ex)
    return examples


def _reason(message: str) -> str:
    for key in ("missing", "not a string", "empty response", "is empty", "expected an object", "invalid JSON"):
        if key in message:
            return key
    return "other"


# ----------------------------------------------------------------------------- batching

def length_sorted_batches(lengths: list[int], batch_size: int, descending: bool = True) -> list[list[int]]:
    """Group indices into batches of similar length (longest first, so OOM shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i] if descending else lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(sequences: Iterable[list[int]], pad_id: int, side: str = "right", masks: Iterable[list[int]] | None = None):
    """Pad token lists into (input_ids, attention_mask[, loss_mask]) LongTensors."""
    import torch

    seqs = [list(s) for s in sequences]
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.long) if masks is not None else None
    for row, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[row, sl] = torch.tensor(s, dtype=torch.long)
        attn[row, sl] = 1
    if masks is not None:
        for row, m in enumerate(masks):
            sl = slice(width - len(m), width) if side == "left" else slice(0, len(m))
            loss[row, sl] = torch.tensor(m, dtype=torch.long)
        return ids, attn, loss
    return ids, attn


def labels_from_mask(input_ids, loss_mask, ignore_index: int = -100):
    """Next-token labels for each position: labels[t] = input_ids[t+1] where loss_mask[t+1]."""
    import torch

    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = torch.where(loss_mask[:, 1:].bool(), input_ids[:, 1:], torch.full_like(input_ids[:, 1:], ignore_index))
    return labels


# ----------------------------------------------------------------------------- identity

def tokenizer_identity(tokenizer) -> dict:
    """What must match between the cache's tokenizer and a student's: size, vocabulary hash,
    special ids. Stored in the cache manifest."""
    import hashlib

    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()).hexdigest()
    return {"vocab_size": len(tokenizer), "vocab_sha256": digest, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "class": type(tokenizer).__name__}


def check_tokenizer(expected: dict, tokenizer, where: str) -> None:
    """Refuse a tokenizer whose identity differs from `expected` (a manifest's), saying what differs."""
    actual = tokenizer_identity(tokenizer)
    diffs = [f"{key}: cache has {expected.get(key)!r}, tokenizer has {actual[key]!r}"
             for key in ("vocab_size", "vocab_sha256", "eos_token_id") if expected.get(key) != actual[key]]
    if diffs:
        raise DataError(f"{where}: the tokenizer does not match the one the cache was made with ({'; '.join(diffs)})")
