"""Record files -> validated records {cot, source, rationale, target, task} (conversations: fastkd.conversations).

JSONL, JSON (a list, or an id -> record map as CoT-Collection ships), parquet, or a Hugging Face
dataset name; every refusal names the file, the record and the field.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fastkd.errors import UserError


class DataError(UserError, ValueError):
    """A record that cannot be used; the message names the file, record and field. `reason` is
    the short key build_examples(skip_bad=True) counts it under (None: "other")."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FieldMap:
    """Which record keys hold the source, rationale, target and (optional) task, or a conversation (messages)."""

    source: str = "source"
    rationale: str = "rationale"
    target: str = "target"
    task: str = "task"
    messages: str = "messages"


# The rules for record files, each enforced here: docs/data.md, "Every rule".

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
    """json's object hook: a _JSONObject listing any keys seen twice."""
    obj = _JSONObject(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        obj.duplicates = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
    return obj


def short_repr(value: object, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 5] + "...'"


def describe_kind(value: object) -> str:
    """A value's type for a message, without echoing a possibly huge value."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float ({'NaN' if math.isnan(value) else '-Infinity' if value < 0 else 'Infinity'})"
    return "dict" if isinstance(value, dict) else type(value).__name__


def _parse_json(text: str, line: bool = False):
    """json.loads with duplicate-key tracking; ValueError/RecursionError come out as (reason, message).
    line: the text is one JSONL line (positions by column, an incomplete value named as such)."""
    try:
        return json.loads(text, object_pairs_hook=_object_pairs), None
    except json.JSONDecodeError as err:
        msg = err.msg[:-3] if err.msg.endswith(" at") else err.msg
        if err.pos >= len(text.rstrip()):  # the text ran out: say so, not the position past its last line
            end = "line (a JSONL line holds one whole JSON object)" if line else "text (the JSON value is incomplete)"
            return None, ("invalid JSON", f"invalid JSON: {msg} at the end of the {end}")
        at = "" if line and err.lineno == 1 else f"line {err.lineno}, "
        return None, ("invalid JSON", f"invalid JSON: {msg} ({at}column {err.colno})")
    except RecursionError:
        return None, ("too deeply nested", "invalid JSON: nested too deeply to parse")
    except ValueError as err:  # e.g. an integer literal longer than int() converts
        return None, ("invalid JSON", f"invalid JSON: {str(err).splitlines()[0][:200]}")


def read_records(source: str | Path, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield (record number, record) from a record file or dataset (docs/data.md, "Every rule"); the first problem
    raises a DataError naming file, record and line. validate_record checks the fields."""
    for index, _where, record, error in scan_records(source, split):
        if error is not None:
            raise error
        yield index, record


def scan_records(source: str | Path, split: str = "train") -> Iterator[tuple[int, str, object, DataError | None]]:
    """(index, location label, record or None, per-record DataError or None) for every record.
    Problems that spoil the whole file are raised, not yielded."""
    path = Path(source)
    suffix = path.suffix.lower()
    if not path.is_file():
        looks_local = suffix in _SCANNERS or str(source).startswith((".", "/"))
        if looks_local and not path.exists():
            raise DataError(f"{source}: no such file", reason="no such file")
        for index, record in _read_hub(str(source), split):
            yield index, f"record {index}", record, None
        return
    if suffix not in _SCANNERS:
        raise DataError(f"{path}: unknown record format {suffix!r}; use .jsonl, .json or .parquet", reason="unknown format")
    yield from _SCANNERS[suffix](path)


def _scan_jsonl(path: Path):
    limit = int(MAX_LINE_BYTES)
    try:
        fh = path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})", reason="unreadable") from None
    with fh:
        for lineno in itertools.count():
            try:
                raw = fh.readline(limit + 1)
            except OSError as err:
                raise DataError(f"{path}: line {lineno + 1}: cannot read ({err.strerror or err})", reason="unreadable") from None
            if not raw:
                return
            where = f"record {lineno} (line {lineno + 1})"

            def bad(reason: str, message: str):
                return lineno, where, None, DataError(f"{path}: {where}: {message}", reason=reason)

            if len(raw) > limit and not raw.endswith(b"\n"):   # over the limit: skip to the next newline
                size = len(raw)
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(1 << 20)
                    size += len(raw)
                size -= raw.endswith(b"\n")
                yield bad("line too long", f"line is {size} bytes, over the limit of {limit} bytes "
                                           f"(fastkd.records.MAX_LINE_BYTES); not read")
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
            record, problem = _parse_json(text, line=True)
            if problem is not None:
                yield bad(*problem)
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
        ids = ", ".join(short_repr(k) for k in obj.duplicates[:5])
        raise DataError(f"{path}: the top-level object has duplicate ids/keys {ids}; "
                        f"only the last record of each would be kept", reason="duplicate key")
    if isinstance(obj, dict) and isinstance(obj.get("examples"), list):
        obj = obj["examples"]
    if isinstance(obj, list):
        for index, record in enumerate(obj):
            yield index, f"record {index}", record, None
    elif isinstance(obj, dict):
        if obj and not any(isinstance(v, dict) for v in obj.values()):
            raise DataError(f"{path}: expected a JSON list of records or an id -> record mapping, got one object whose "
                            f"values are not objects (keys {', '.join(short_repr(k, 30) for k in list(obj)[:5])}); "
                            f"a single record goes in a list: [{{...}}]", reason="expected an object")
        for index, (key, record) in enumerate(obj.items()):
            yield index, f"record {index} (id {short_repr(key)})", record, None
    else:
        raise DataError(f"{path}: expected a JSON list of records or an id -> record mapping, got "
                        f"{describe_kind(obj)}", reason="expected an object")


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


_SCANNERS = {".jsonl": _scan_jsonl, ".ndjson": _scan_jsonl, ".json": _scan_json, ".parquet": _scan_parquet}


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
    """{cot, source, rationale, target, task} of a record, or a DataError naming file, record (`where`) and
    field (docs/data.md, "Every rule"). `cot` is the template's mode; `"cot": false` overrides it."""
    loc = f"{origin}: {where or f'record {index}'}"

    def fail(message: str, reason: str):
        raise DataError(f"{loc}: {message}", reason=reason)

    if not isinstance(record, dict):
        fail(f"expected an object, got {describe_kind(record)}", "expected an object")
    check_unique_keys(record, fail)
    flag = record.get("cot")
    if flag is not None and not isinstance(flag, bool):
        fail(f"field 'cot' is {describe_kind(flag)}, not true or false", "bad cot")
    out = {"cot": bool(cot) and flag is not False}
    for role, key in (("source", fields.source), ("target", fields.target), ("rationale", fields.rationale)):
        value = record.get(key)
        if value is None:
            if role != "rationale" or out["cot"]:
                null = " (null)" if key in record else ""
                fail(f"field {key!r} is missing{null}{_conversation_hint(record, fields)}", "missing")
            value = ""
        check_text(value, f"field {key!r}", fail)
        out[role] = value
    if not out["target"].strip():
        fail(f"field {fields.target!r} is empty (empty response)", "empty response")
    if not out["source"].strip():
        fail(f"field {fields.source!r} is empty", "empty source")
    out["task"] = read_task(record, fields, fail)
    return out


def check_unique_keys(record: dict, fail) -> None:
    """Refuse a record that held a key twice (which value is meant depends on the parser)."""
    duplicates = getattr(record, "duplicates", None)
    if duplicates:
        fail(f"duplicate key(s) {', '.join(short_repr(k) for k in duplicates[:5])}: which value is meant is "
             f"ambiguous", "duplicate key")


def read_task(record: dict, fields: FieldMap, fail) -> str:
    """The record's task: a string, "" when absent or null."""
    task = record.get(fields.task)
    if task is not None:
        check_text(task, f"field {fields.task!r}", fail, "bad task")
    return task or ""


def _conversation_hint(record: dict, fields: FieldMap) -> str:
    """A note for a record that looks like a conversation under another key than --messages-field."""
    for key, value in record.items():
        if key != fields.messages and isinstance(value, list) and value and isinstance(value[0], dict) \
                and ("role" in value[0] or "from" in value[0]):
            return (f"; its field {short_repr(key, 40)} looks like a conversation: to read it as one, pass "
                    f"--messages-field {key}")
    return ""


def check_text(value: object, label: str, fail, reason: str = "not a string") -> None:
    """Refuse (through fail(message, reason)) a value that is not a string (under `reason`), or text the tokenizer
    cannot take: a NUL or a lone surrogate."""
    if not isinstance(value, str):
        fail(f"{label} is {describe_kind(value)}, not a string", reason)
    nul = value.find("\x00")
    if nul >= 0:
        fail(f"{label} holds a NUL character (at character {nul}): binary or mis-decoded text", "invalid text")
    lone = _SURROGATE.search(value)
    if lone:
        fail(f"{label} holds a lone surrogate \\u{ord(lone.group()):04x} (at character {lone.start()}): "
             f"not valid Unicode text", "invalid text")
