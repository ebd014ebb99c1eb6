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
    """A record that cannot be used; the message names the file, record and field. `reason` is
    the short key build_examples(skip_bad=True) counts it under (None: derived from the text)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


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
    first_errors: list = field(default_factory=list)   # the first few skip messages, for the log

    MAX_ERRORS_KEPT = 5

    def as_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated, "skipped": dict(self.skipped)}


# ----------------------------------------------------------------------------- reading
#
# Rules for record files (every refusal is a DataError naming the file, the record and, for a
# JSONL file, its line; with skip_bad the per-record ones are counted per reason and skipped):
#
# - Bytes: UTF-8. A byte order mark at the very start of a file is accepted (utf-8-sig); one at
#   the start of a later JSONL line (files concatenated) is an error for that line. Invalid
#   UTF-8 (including encoded surrogates) is an error naming the line and byte offset; for a
#   whole-file .json it is an error for the whole file.
# - JSONL: one JSON object per line, lines split on "\n" only; "\r\n" endings are accepted.
#   Lines holding only JSON whitespace (space, tab, CR) are skipped and not counted; record
#   numbers are 0-based line numbers, so `record 4 (line 5)`. A line longer than
#   MAX_LINE_BYTES is not read into memory: it is an error for that line. Per line, invalid
#   JSON (truncated, trailing garbage, raw control characters, an integer longer than Python
#   converts), nesting so deep that the parser gives up, and a value that is not an object are
#   errors for that record, skippable.
# - .json: a list of records, {"examples": [...]}, or an id -> record mapping (CoT-Collection).
#   The file is parsed whole, so a file that does not parse is one error for the whole file,
#   never skipped; so are duplicate ids in the mapping and an object none of whose values is
#   an object (a single record, not a mapping of records). A value of the list or mapping that
#   is not an object is an error for that record.
# - parquet and Hugging Face datasets: each row is a record, checked by validate_record.
# - NaN, Infinity and -Infinity (which Python's json accepts) are numbers: in a field that must
#   be a string they are an error like any number; elsewhere they are left alone.
# - Keys that appear twice in one record are an error (which value is meant depends on the
#   parser).
#
# Field rules (validate_record): source, target (and rationale for a CoT record) must be
# present, non-null strings; target and source must be non-empty after strip. A CoT record's
# rationale may be empty (as before: the response is then `So the answer is <target>.` alone;
# an answer-only record says "cot": false and needs no rationale); a rationale that is present
# in an answer-only record must still be a string or null. `cot`,
# when present and not null, must be true or false. `task`, when present and not null, must be
# a string (absent or null -> ""). Text fields may not hold a NUL character or a lone
# surrogate (a JSON escape such as "\ud800" with no partner): the tokenizer cannot encode
# the latter, and the former marks binary or mis-decoded data. Other keys are ignored.

MAX_LINE_BYTES = 64 << 20
"""The longest JSONL line read (bytes, without the newline); a longer one is an error for that
line. Read at call time, so it can be changed on the module."""

_BOM = b"\xef\xbb\xbf"
_JSON_BLANK = b" \t\r\n"
_SURROGATE = re.compile("[\ud800-\udfff]")
_NESTING_RUN = re.compile(r"(?:[\[{][ \t\r\n]*){200,}")
_LONG_NUMBER = re.compile(r"(?<![\w\".])-?\d{4301,}")


class _JSONObject(dict):
    """A parsed JSON object that remembers keys it saw twice (json keeps the last value)."""

    __slots__ = ("duplicates",)


def _object_pairs(pairs: list) -> dict:
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        obj.duplicates = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
    return obj


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "...'"


def _kind(value: object) -> str:
    """A value's type for a message, without echoing a possibly huge value."""
    if isinstance(value, float) and value != value:
        return "float (NaN)"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"float ({'-' if value < 0 else ''}Infinity)"
    return "dict" if isinstance(value, dict) else type(value).__name__


def _parse_json(text: str):
    """json.loads with duplicate-key tracking; ValueError/RecursionError come out as (reason, message)."""
    try:
        return json.loads(text, object_pairs_hook=_object_pairs), None
    except json.JSONDecodeError as err:
        msg = err.msg[:-3] if err.msg.endswith(" at") else err.msg
        if err.pos >= len(text.rstrip()):  # the text ran out: say so, not the position past its last line
            return None, ("invalid JSON", f"invalid JSON: {msg} at the end of the text (the JSON value is incomplete)")
        return None, ("invalid JSON", f"invalid JSON: {msg} (line {err.lineno}, column {err.colno})")
    except RecursionError:
        return None, ("too deeply nested", "invalid JSON: nested too deeply to parse")
    except ValueError as err:  # e.g. an integer literal longer than int() converts
        return None, ("invalid JSON", f"invalid JSON: {str(err).splitlines()[0][:200]}")


def read_records(source: str | Path, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield (record number, record) from JSONL, JSON (list or id->record mapping, as
    CoT-Collection ships), parquet, or a Hugging Face dataset name when online.

    The first problem a file has (see the rules above this function) raises a DataError that
    names the file, record and line; build_examples(skip_bad=True) skips per-record problems
    instead. Records are yielded as read: validate_record checks their fields."""
    for index, _where, record, error in _scan_records(source, split):
        if error is not None:
            raise error
        yield index, record


def _scan_records(source: str | Path, split: str = "train") -> Iterator[tuple[int, str, object, DataError | None]]:
    """(index, location label, record or None, per-record DataError or None) for every record.
    Problems that spoil the whole file are raised, not yielded."""
    path = Path(source)
    if not path.is_file():
        looks_local = path.suffix.lower() in (".jsonl", ".ndjson", ".json", ".parquet") or str(source).startswith((".", "/"))
        if looks_local and not path.exists():
            raise DataError(f"{source}: no such file", reason="no such file")
        for index, record in _read_hub(str(source), split):
            yield index, f"record {index}", record, None
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _scan_jsonl(path)
    elif suffix == ".json":
        yield from _scan_json(path)
    elif suffix == ".parquet":
        yield from _scan_parquet(path)
    else:
        raise DataError(f"{path}: unknown record format {suffix!r}; use .jsonl, .json or .parquet", reason="unknown format")


def _scan_jsonl(path: Path):
    limit = int(MAX_LINE_BYTES)
    try:
        fh = path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})", reason="unreadable") from None
    with fh:
        lineno = -1
        while True:
            try:
                raw = fh.readline(limit + 1)
            except OSError as err:
                raise DataError(f"{path}: line {lineno + 2}: cannot read ({err.strerror or err})", reason="unreadable") from None
            if not raw:
                return
            lineno += 1
            where = f"record {lineno} (line {lineno + 1})"

            def bad(reason: str, message: str):
                return lineno, where, None, DataError(f"{path}: {where}: {message}", reason=reason)

            if len(raw) > limit and not raw.endswith(b"\n"):   # over the limit: skip to the next newline
                size = len(raw)
                while not raw.endswith(b"\n"):
                    raw = fh.readline(1 << 20)
                    if not raw:
                        break
                    size += len(raw)
                size -= raw.endswith(b"\n")
                yield bad("line too long", f"line is {size} bytes, over the limit of {limit} bytes "
                                           f"(fastkd.data.MAX_LINE_BYTES); not read")
                continue
            if raw.startswith(_BOM):
                if lineno == 0:
                    raw = raw[len(_BOM):]
                else:
                    yield bad("invalid JSON", "UTF-8 byte order mark at the start of the line "
                                              "(files concatenated?); only the file's first line may have one")
                    continue
            if not raw.strip(_JSON_BLANK):
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                hint = " (the file looks like UTF-16; re-save it as UTF-8)" if lineno == 0 and raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
                yield bad("invalid UTF-8", f"invalid UTF-8 at byte {err.start} of the line ({err.reason}){hint}")
                continue
            record, problem = _parse_json(text)
            if problem is not None:
                reason, message = problem
                if reason == "invalid JSON":
                    message = re.sub(r" \(line 1, column", " (column", message).replace(
                        "end of the text (the JSON value is incomplete)",
                        "end of the line (a JSONL line holds one whole JSON object)")
                yield bad(reason, message)
                continue
            yield lineno, where, record, None


def _scan_json(path: Path):
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})", reason="unreadable") from None
    bom = len(_BOM) if data.startswith(_BOM) else 0
    data = data[bom:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: invalid UTF-8 at line {line} (byte {err.start + bom} "
                        f"of the file: {err.reason}); a .json file is read whole, so it cannot be skipped per record",
                        reason="invalid UTF-8") from None
    obj, problem = _parse_json(text)
    if problem is not None:
        message = problem[1]
        if "(line " not in message:   # no position from json: point at the likely place
            hit = _NESTING_RUN.search(text) if problem[0] == "too deeply nested" else _LONG_NUMBER.search(text)
            if hit:
                message += f" (at or near line {text.count(chr(10), 0, hit.start()) + 1})"
        raise DataError(f"{path}: {message}; a .json file is parsed whole, so it cannot be skipped per record "
                        f"(JSONL can)", reason=problem[0])
    if isinstance(obj, dict) and getattr(obj, "duplicates", None):
        raise DataError(f"{path}: the top-level object has duplicate ids/keys {', '.join(_short(k) for k in obj.duplicates[:5])}; "
                        f"only the last record of each would be kept", reason="duplicate key")
    if isinstance(obj, dict) and isinstance(obj.get("examples"), list):
        obj = obj["examples"]
    if isinstance(obj, list):
        for index, record in enumerate(obj):
            yield index, f"record {index}", record, None
    elif isinstance(obj, dict):
        if obj and not any(isinstance(v, dict) for v in obj.values()):
            raise DataError(f"{path}: expected a JSON list of records or an id -> record mapping, got one object whose "
                            f"values are not objects (keys {', '.join(_short(k, 30) for k in list(obj)[:5])}); "
                            f"a single record goes in a list: [{{...}}]", reason="expected an object")
        for index, (key, record) in enumerate(obj.items()):
            yield index, f"record {index} (id {_short(key)})", record, None
    else:
        raise DataError(f"{path}: expected a JSON list of records or an id -> record mapping, got {_kind(obj)}",
                        reason="expected an object")


def _scan_parquet(path: Path):
    try:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several kinds for a bad file
        raise DataError(f"{path}: not a readable parquet file ({type(err).__name__}: {str(err)[:200]})", reason="unreadable") from None
    index = 0
    try:
        for batch in table.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                yield index, f"record {index}", record, None
                index += 1
    except (OSError, ValueError) as err:  # pyarrow's ArrowException types derive from these
        raise DataError(f"{path}: record {index}: cannot read the parquet file from here on "
                        f"({type(err).__name__}: {str(err)[:200]})", reason="unreadable") from None


def _read_hub(name: str, split: str) -> Iterator[tuple[int, dict]]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; one clear message
        raise DataError(f"{name}: not a local file, and loading it from the Hugging Face hub "
                        f"failed ({type(err).__name__}: {err})", reason="unreadable") from None
    yield from enumerate(ds)


def validate_record(record: object, index: int, fields: FieldMap, origin: str, cot: bool,
                    where: str | None = None) -> dict:
    """Return {cot, source, rationale, target, task} or raise DataError naming file, record
    (`where`, default `record <index>`) and field. The rules are listed above read_records.

    `cot` is the template's mode; a record with `"cot": false` is answer-only even under a CoT
    template (and then needs no rationale)."""
    loc = f"{origin}: {where or f'record {index}'}"

    def fail(message: str, reason: str):
        raise DataError(f"{loc}: {message}", reason=reason)

    if not isinstance(record, dict):
        fail(f"expected an object, got {_kind(record)}", "expected an object")
    duplicates = getattr(record, "duplicates", None)
    if duplicates:
        fail(f"duplicate key(s) {', '.join(_short(k) for k in duplicates[:5])}: which value is meant is ambiguous",
             "duplicate key")
    flag = record.get("cot")
    if flag is not None and not isinstance(flag, bool):
        fail(f"field 'cot' is {_kind(flag)}, not true or false", "bad cot")
    out = {"cot": bool(cot) and flag is not False}
    for role, key in (("source", fields.source), ("target", fields.target), ("rationale", fields.rationale)):
        value = record.get(key)
        if value is None:
            if role != "rationale" or out["cot"]:
                fail(f"field {key!r} is missing" + (" (null)" if key in record else ""), "missing")
            value = ""
        elif not isinstance(value, str):
            fail(f"field {key!r} is {_kind(value)}, not a string", "not a string")
        else:
            _check_text(value, key, fail)
        out[role] = value
    if not out["target"].strip():
        fail(f"field {fields.target!r} is empty (empty response)", "empty response")
    if not out["source"].strip():
        fail(f"field {fields.source!r} is empty", "empty source")
    task = record.get(fields.task)
    if task is None:
        task = ""
    elif not isinstance(task, str):
        fail(f"field {fields.task!r} is {_kind(task)}, not a string", "bad task")
    else:
        _check_text(task, fields.task, fail)
    out["task"] = task
    return out


def _check_text(value: str, key: str, fail) -> None:
    nul = value.find("\x00")
    if nul >= 0:
        fail(f"field {key!r} holds a NUL character (at character {nul}): binary or mis-decoded text", "invalid text")
    lone = _SURROGATE.search(value)
    if lone:
        fail(f"field {key!r} holds a lone surrogate \\u{ord(lone.group()):04x} (at character {lone.start()}): "
             f"not valid Unicode text", "invalid text")


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
    """Read, validate and tokenise every record of `source`; counts go into `report`.

    Without skip_bad the first bad record raises a DataError naming the file, record (and JSONL
    line) and field. With skip_bad every per-record problem (a bad field, and for JSONL also a
    line that is not valid UTF-8 or JSON, or is too long) is counted in report.skipped under a
    short reason and skipped; problems that spoil a whole file (a .json that does not parse, an
    unreadable parquet) still raise."""
    if overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow must be 'truncate' or 'skip', not {overflow!r}")
    report = report if report is not None else BuildReport()
    examples = []
    for index, where, raw, error in _scan_records(source, split):
        try:
            if error is not None:
                raise error
            rec = validate_record(raw, index, fields, str(source), template.cot, where=where)
        except DataError as err:
            if not skip_bad:
                raise
            report.skipped[err.reason or _reason(str(err))] += 1
            if len(report.first_errors) < report.MAX_ERRORS_KEPT:
                report.first_errors.append(str(err))
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
#
# What is hashed, and why. A cache holds the teacher's distribution over token ids for token
# sequences made by one tokenizer; a student is only trained correctly on it when its tokenizer
# turns every text into the same ids. So the identity covers what decides text -> ids, one
# SHA-256 per part (canonical JSON, sorted keys), so a refusal says which part differs:
#
#   vocab_sha256     the vocabulary with ids (get_vocab(), added tokens included; as before)
#   merges           the BPE merge list, in rank order (the two spellings tokenizers has used,
#                    "a b" and ["a", "b"], hash the same)
#   model            the model's other settings: type, unk token, byte fallback, fuse_unk,
#                    subword prefix / suffix ("" and null hash the same), dropout, ignore_merges;
#                    for a Unigram model also its scored vocabulary
#   normalizer, pre_tokenizer, post_processor
#                    the tokenizer.json parts (the post-processor is where BOS/EOS are added);
#                    `trim_offsets` is dropped (it changes offsets, never ids) and a Sequence of
#                    one part hashes as that part (none: as null)
#   added_tokens     every added token: id, content and its flags (special, single_word,
#                    lstrip, rstrip, normalized), sorted by id
#   special_tokens   bos/eos/pad/unk strings and ids as transformers reports them
#   probe            the ids of a fixed set of texts, with and without special tokens: catches
#                    anything the parts above miss (e.g. a transformers-level add_bos_token);
#                    left out for a BPE model with dropout, whose ids vary from call to call
#
# Not hashed: the decoder (it maps ids back to text; which ids a text becomes, and so the cached
# targets, do not depend on it, and eval decodes with the student's own tokenizer),
# truncation/padding (per-call runtime settings) and the class name (kept for reading: two
# classes that load the same tokenizer.json tokenise alike; where they do not, the parts show it).
# A tokenizer without a `tokenizers` backend (a slow tokenizer) gets a partial identity:
# vocabulary, added and special tokens, the class with its tokenisation flags, the
# sentencepiece model when it has one, and the probe; merges, normaliser, pre-tokenizer and
# post-processor cannot be read and are listed as unchecked.
#
# Manifests written before this (keys vocab_size, vocab_sha256, eos_token_id, pad_token_id,
# class only) are still checked on what they hold, with a warning that the rest could not be.

IDENTITY_VERSION = 2

_COMPONENTS = {          # name -> what a refusal says
    "merges": "merges differ",
    "model": "tokenizer model settings differ (type, unk token, byte fallback, subword affixes, dropout)",
    "normalizer": "normalizer differs",
    "pre_tokenizer": "pre-tokenizer differs",
    "post_processor": "post-processor differs (the template that adds BOS/EOS)",
    "added_tokens": "added tokens differ (content or flags)",
    "special_tokens": "special tokens differ",
    "slow_settings": "tokenizer class or its tokenisation flags differ",
    "sentencepiece": "sentencepiece model differs",
    "probe": "probe texts tokenise differently",
}
_BACKEND_ONLY = ("merges", "model", "normalizer", "pre_tokenizer", "post_processor")

_PROBES = (
    "Q: not ( True ) and ( False ) is\nA: Let's think step by step. So the answer is False.",
    "Hello World HELLO world hello",
    "  two  spaces,\ttab\n\nnewlines\r\n  and trailing   ",
    "12345 3.14159 -42 1,000,000 2024-01-01",
    "caf\u00e9 cafe\u0301 na\u00efve \u212b \ufb01 \uff21",        # composed / decomposed / compatibility forms
    "\u4f60\u597d\u4e16\u754c \u3053\u3093\u306b\u3061\u306f \u0645\u0631\u062d\u0628\u0627 \U0001f600",
    "it's don't I'M we'LL (A) [b] {c} <d> e/f g\\h #$%&*+=@^_`|~",
    "x",
)

_SLOW_FLAGS = ("do_lower_case", "add_prefix_space", "add_bos_token", "add_eos_token", "legacy", "strip_accents",
               "tokenize_chinese_chars", "split_special_tokens", "sp_model_kwargs", "errors")


def _sha(obj) -> str:
    import hashlib

    text = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical_part(obj):
    """A tokenizer.json part without what never changes ids, in one spelling."""
    if isinstance(obj, list):
        return [_canonical_part(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    obj = {k: _canonical_part(v) for k, v in obj.items() if k != "trim_offsets"}
    if obj.get("type") == "Sequence" and len(obj) == 2:
        items = next((v for k, v in obj.items() if k != "type"), None)
        if isinstance(items, list) and len(items) <= 1:
            return items[0] if items else None
    return obj


def _canonical_merges(merges) -> list:
    out = []
    for m in merges or []:
        if isinstance(m, str):
            parts = m.split(" ")
            out.append(parts if len(parts) == 2 else [m])
        else:
            out.append(list(m))
    return out


def _special_tokens(tokenizer) -> dict:
    out = {}
    for name in ("bos", "eos", "pad", "unk"):
        try:
            token, token_id = getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)
        except Exception:  # noqa: BLE001 - some tokenizers raise for an unset special token
            token, token_id = None, None
        out[f"{name}_token"] = None if token is None else str(token)
        out[f"{name}_token_id"] = None if token_id is None else int(token_id)
    return out


def _probe(tokenizer):
    try:
        return [[list(tokenizer(text, add_special_tokens=special)["input_ids"]) for text in _PROBES]
                for special in (False, True)]
    except Exception:  # noqa: BLE001 - an exotic tokenizer that cannot encode these: no probe
        return None


def _vocab_sha256(tokenizer) -> str:
    """The vocabulary hash as the first manifests stored it (kept byte for byte: old caches compare)."""
    import hashlib

    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()).hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    """What must match between the cache's tokenizer and a student's (stored in the manifest):
    size, vocabulary hash, special ids (the first identity's keys), then one hash per part that
    decides tokenisation under `components` (see the notes above). Deterministic across
    save_pretrained / from_pretrained."""
    special = _special_tokens(tokenizer)
    ident = {"vocab_size": len(tokenizer), "vocab_sha256": _vocab_sha256(tokenizer),
             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
             "class": type(tokenizer).__name__, "identity_version": IDENTITY_VERSION}
    parts: dict = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = None
    if backend is not None:
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # noqa: BLE001 - a backend that cannot serialise: fall back to the partial identity
            spec = None
    if spec is not None:
        model = dict(spec.get("model") or {})
        parts["merges"] = _canonical_merges(model.pop("merges", None))
        if isinstance(model.get("vocab"), dict):     # BPE / WordPiece / WordLevel: covered by vocab_sha256
            model.pop("vocab")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) == "":
                model[key] = None
        parts["model"] = model
        for key in ("normalizer", "pre_tokenizer", "post_processor"):
            parts[key] = _canonical_part(spec.get(key))
        added = [dict(t) for t in spec.get("added_tokens") or []]
        parts["added_tokens"] = sorted(added, key=lambda t: (t.get("id", -1), str(t.get("content"))))
    else:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        parts["added_tokens"] = sorted(
            ({"id": int(i), "content": str(getattr(t, "content", t)),
              **{flag: getattr(t, flag, None) for flag in ("single_word", "lstrip", "rstrip", "normalized", "special")}}
             for i, t in dict(decoder).items()), key=lambda t: (t["id"], t["content"]))
        parts["slow_settings"] = {"class": type(tokenizer).__name__,
                                  **{f: getattr(tokenizer, f) for f in _SLOW_FLAGS if hasattr(tokenizer, f)}}
        sp = getattr(tokenizer, "sp_model", None)
        if sp is not None and hasattr(sp, "serialized_model_proto"):
            import hashlib

            parts["sentencepiece"] = hashlib.sha256(sp.serialized_model_proto()).hexdigest()
    parts["special_tokens"] = special
    stochastic = spec is not None and bool((spec.get("model") or {}).get("dropout"))   # BPE dropout: ids vary per call
    probe = None if stochastic else _probe(tokenizer)
    if probe is not None:
        parts["probe"] = probe
    ident["components"] = {name: _sha(value) for name, value in parts.items()}
    ident["special_tokens"] = special
    ident["added_token_count"] = len(parts["added_tokens"])
    ident["partial"] = spec is None
    if spec is None:
        ident["unchecked"] = [name for name in _BACKEND_ONLY if name not in parts]
    return ident


def check_tokenizer(expected: dict, tokenizer, where: str) -> None:
    """Refuse a tokenizer whose identity differs from `expected` (a manifest's), saying which
    parts differ. What `expected` lacks (a manifest from before the full identity, or a partial
    identity of a slow tokenizer) is not refused: a warning says what could not be checked."""
    import warnings

    actual = tokenizer_identity(tokenizer)
    expected = expected if isinstance(expected, dict) else {}
    theirs = "teacher" if where.startswith("teacher") else "cache"
    diffs = [f"{key}: {theirs} has {expected.get(key)!r}, tokenizer has {actual[key]!r}"
             for key in ("vocab_size", "eos_token_id") if expected.get(key) != actual[key]]
    if expected.get("vocab_sha256") != actual["vocab_sha256"]:
        diffs.append(f"vocab_sha256: the vocabularies differ ({theirs} {_abbrev(expected.get('vocab_sha256'))}, "
                     f"student {_abbrev(actual['vocab_sha256'])})")
    theirs_parts = expected.get("components")
    unchecked = []
    if not isinstance(theirs_parts, dict):
        unchecked = ["merges", "model settings", "normalizer", "pre-tokenizer", "post-processor", "added tokens",
                     "special tokens other than EOS"]
        note = f"the {theirs}'s tokenizer identity predates fastkd's full identity (it holds only size, vocabulary and special ids)"
    else:
        note = "one of the two tokenizers has no `tokenizers` backend (a partial identity)"
        for name, label in _COMPONENTS.items():
            a, b = theirs_parts.get(name), actual["components"].get(name)
            if a is None and b is None:
                continue
            if a is None or b is None:
                unchecked.append(name)
            elif a != b:
                diffs.append(label + _detail(name, expected, actual) + f" ({name}: {theirs} {_abbrev(a)}, student {_abbrev(b)})")
    if diffs:
        raise DataError(f"{where}: the tokenizer does not match the one the {theirs} was made with ({'; '.join(diffs)})",
                        reason="tokenizer mismatch")
    if unchecked:
        compared = ("vocabulary size, vocabulary and EOS id were compared; re-create the cache to check the rest"
                    if not isinstance(theirs_parts, dict) else "the other parts were compared and match")
        warnings.warn(f"{where}: {note}: {', '.join(unchecked)} could not be checked; {compared}",
                      TokenizerIdentityWarning, stacklevel=2)


class TokenizerIdentityWarning(UserWarning):
    """A tokenizer check that could compare only part of the identity (old manifest, slow tokenizer)."""


def _abbrev(digest) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) else repr(digest)


def _detail(name: str, expected: dict, actual: dict) -> str:
    if name == "special_tokens" and isinstance(expected.get("special_tokens"), dict):
        a, b = expected["special_tokens"], actual["special_tokens"]
        keys = [k for k in b if a.get(k) != b.get(k)]
        return ": " + ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys) if keys else ""
    if name == "added_tokens" and isinstance(expected.get("added_token_count"), int) \
            and expected["added_token_count"] != actual["added_token_count"]:
        return f": {expected['added_token_count']} vs {actual['added_token_count']} added tokens"
    return ""
