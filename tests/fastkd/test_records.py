"""Fuzzed and hand-written record files through build_examples: every bad record gives a
DataError naming the file and record (and JSONL line), or with skip_bad a counted skip; no other
exception; no invalid record accepted; no valid record rejected.

The generator mutates valid records (field types, missing fields, nulls, NaN, empty and
whitespace text, NUL, lone surrogates, duplicate keys, non-object records, a non-bool `cot`, a
non-string `task`, deep nesting, huge numbers, long strings) and the bytes of the JSONL file
(BOM, CRLF, truncation, trailing garbage, invalid UTF-8, raw NUL, a BOM mid-file, over-long
lines, blank and form-feed lines). Which records are valid is decided by `spec_valid` below: the
rules of fastkd.records written out once more, independently of its code.
"""

import json
import math
import random

import pytest

import fastkd.records as data
from fastkd.templates import BuildReport, Template, build_examples
from fastkd.records import DataError, FieldMap

SEED = 20240611
LINE_LIMIT = 512 << 10           # MAX_LINE_BYTES during these tests, so "giant" lines stay small

BASE_COT = (("source", "True or False is"), ("rationale", "True or False is True."), ("target", "True"),
            ("task", "boolean_expressions"))
BASE_ANSWER_ONLY = (("source", "2 + 2 is"), ("target", "4"), ("cot", False))


class Raw:
    """A JSON value written as given text (what json.dumps cannot write); `value` is what it
    parses to, `parses` whether Python's json parses it at all."""

    def __init__(self, text: str, value=None, parses: bool = True):
        self.text, self.value, self.parses = text, value, parses


class NotObject:
    """A record that is not a JSON object (a list, string, number, null, true)."""

    def __init__(self, value):
        self.value = value


def dump_value(v, ascii_only: bool) -> str:
    if isinstance(v, Raw):
        return v.text
    return json.dumps(v, ensure_ascii=ascii_only, allow_nan=True)


def dump_record(rec, ascii_only: bool = True) -> str:
    """A record (a list of key/value pairs, duplicates allowed, or a NotObject) as JSON text."""
    if isinstance(rec, NotObject):
        return dump_value(rec.value, ascii_only)
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ascii_only)}: {dump_value(v, ascii_only)}" for k, v in rec) + "}"


def _text_ok(s: str) -> bool:
    return "\x00" not in s and not any(0xD800 <= ord(c) <= 0xDFFF for c in s)


def spec_valid(rec, cot_mode: bool) -> bool:
    """The record rules, as documented in fastkd.records."""
    if isinstance(rec, NotObject):
        return False
    if any(isinstance(v, Raw) and not v.parses for _, v in rec):
        return False
    keys = [k for k, _ in rec]
    if len(set(keys)) != len(keys):
        return False
    d = {k: (v.value if isinstance(v, Raw) else v) for k, v in rec}
    flag = d.get("cot")
    if flag is not None and not isinstance(flag, bool):
        return False
    is_cot = cot_mode and flag is not False
    for key, required in (("source", True), ("target", True), ("rationale", is_cot)):
        v = d.get(key)
        if v is None:
            if required:
                return False
            continue
        if not isinstance(v, str) or not _text_ok(v):
            return False
    if not d["source"].strip() or not d["target"].strip():
        return False
    task = d.get("task")
    return task is None or (isinstance(task, str) and _text_ok(task))


# ----------------------------------------------------------------------------- record mutations

def deep(depth: int):
    text = "[" * depth + "]" * depth
    return Raw(text, value=[] if depth < 100 else None, parses=depth < 100)


VALUES = [
    None, "", " ", "\t\n ", "ok text", "True", "3", "x" * 20_000, "caf\u00e9 \U0001f600 \u2028 \u0301",
    "a\x00b", "\ud800", "tail \udfff", "\U0001f600", Raw('"\\ud83d\\ude00"', value="\U0001f600"),
    0, 3, -1, 1.5, float("nan"), float("inf"), float("-inf"), True, False,
    [], ["a"], {}, {"a": "b"}, [[["nested"]]],
    Raw("1" * 5000, parses=False),            # longer than Python's int conversion limit
    Raw("1e400", value=float("inf")),
    Raw("-0.0", value=-0.0),
]


def mutate_record(rng: random.Random, base) -> tuple[object, str]:
    rec = list(base)
    notes = []
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(["set", "set", "set", "delete", "extra", "duplicate", "deep", "not_object", "rename"])
        if op == "not_object":
            value = rng.choice([[1, "a"], [{"source": "s"}], "a string", 7, None, True, [], 2.5])
            return NotObject(value), "+".join(notes + [f"not_object:{type(value).__name__}"])
        key = rng.choice(["source", "target", "rationale", "task", "cot"])
        if op == "set":
            value = rng.choice(VALUES + [True, False, None] * (key == "cot"))
            rec = [(k, v) for k, v in rec if k != key] + [(key, value)]
            notes.append(f"set:{key}={_short(value)}")
        elif op == "delete":
            rec = [(k, v) for k, v in rec if k != key]
            notes.append(f"delete:{key}")
        elif op == "rename":
            rec = [(k + "_x" if k == key else k, v) for k, v in rec]
            notes.append(f"rename:{key}")
        elif op == "extra":
            value = rng.choice(VALUES)
            rec.append(("type", value))
            notes.append(f"extra={_short(value)}")
        elif op == "duplicate" and rec:
            k, v = rng.choice(rec)
            rec.append((k, rng.choice([v, "other"])))
            notes.append(f"duplicate:{k}")
        elif op == "deep":
            depth = rng.choice([3, 50, 100_000])
            rec.append(("meta", deep(depth)))
            notes.append(f"deep:{depth}")
    return rec, "+".join(notes)


def _short(v) -> str:
    return (v.text[:12] if isinstance(v, Raw) else repr(v)[:12])


# ----------------------------------------------------------------------------- byte mutations

def _has_surrogate(obj) -> bool:
    if isinstance(obj, str):
        return not _text_ok(obj.replace("\x00", ""))
    if isinstance(obj, NotObject):
        return _has_surrogate(obj.value)
    if isinstance(obj, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return any(_has_surrogate(v) for v in obj)
    return False


def encode_line(rec, rng, valid: bool) -> tuple[bytes, bool]:
    """JSON escapes (ASCII) or raw UTF-8; raw, a lone surrogate anywhere becomes invalid UTF-8."""
    ascii_only = rng.random() < 0.5
    if not ascii_only and _has_surrogate(rec):
        valid = False
    return dump_record(rec, ascii_only).encode("utf-8", "surrogatepass"), valid


def mutate_bytes(rng: random.Random, line: bytes, valid: bool) -> tuple[bytes, bool, str]:
    """One byte-level change to a record's line -> (line, still valid?, what was done)."""
    op = rng.choice(["none", "none", "truncate", "garbage", "bad_utf8", "nul_byte", "mid_bom", "trailing_ws",
                     "giant", "long_ok"])
    if op == "truncate" and len(line) >= 2:
        return line[:rng.randint(1, len(line) - 1)], False, op
    if op == "garbage":
        return line + rng.choice([b"x", b"}", b",", b" {}", b"]", b"\x00", b" \x0c"]), False, op
    if op == "bad_utf8":
        at = rng.randint(0, len(line))
        return line[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"]) + line[at:], False, op
    if op == "nul_byte":
        at = rng.randint(0, len(line))
        return line[:at] + b"\x00" + line[at:], False, op
    if op == "mid_bom":
        return b"\xef\xbb\xbf" + line, False, op
    if op == "trailing_ws":
        return line + b" \t ", valid, op
    if op == "giant":    # padding inside the object (JSON whitespace) past the line limit
        return b"{" + b" " * (LINE_LIMIT + rng.randint(0, 3000)) + line[1:], False, op
    if op == "long_ok" and line.startswith(b"{") and len(line) < LINE_LIMIT - 20_000:
        return b"{" + b" " * rng.randint(1000, LINE_LIMIT - len(line) - 10) + line[1:], valid, op
    return line, valid, "none"


def build_jsonl_variant(rng: random.Random, cot_mode: bool) -> tuple[bytes, list, str]:
    """-> (file bytes, [(line index, valid)] for each non-blank line, description)."""
    base = BASE_COT if (cot_mode and rng.random() < 0.7) else BASE_ANSWER_ONLY
    rec, note = mutate_record(rng, base) if rng.random() < 0.85 else (list(base), "unchanged")
    line, valid = encode_line(rec, rng, spec_valid(rec, cot_mode))
    line, valid, byte_note = mutate_bytes(rng, line, valid)
    valid = valid and len(line.rstrip(b"\n")) <= LINE_LIMIT    # the line limit is a rule too
    good = dump_record(list(BASE_COT if cot_mode else BASE_ANSWER_ONLY)).encode()
    lines = [(good, True), (line, valid), (good, True)]
    extra = rng.choice(["", "", "blank", "ws_line", "formfeed_line", "second_bad"])
    if extra == "blank":
        lines.insert(rng.randint(0, len(lines)), (b"", None))
    elif extra == "ws_line":
        lines.insert(rng.randint(0, len(lines)), (b" \t\r", None))
    elif extra == "formfeed_line":
        lines.insert(rng.randint(1, len(lines)), (b"\x0c", False))
    elif extra == "second_bad":
        lines.insert(rng.randint(1, len(lines)), (b'{"source": "x"}', False))
    eol = b"\r\n" if rng.random() < 0.3 else b"\n"
    body = eol.join(text for text, _ in lines) + (eol if rng.random() < 0.8 else b"")
    bom = rng.random() < 0.2
    if bom:
        body = b"\xef\xbb\xbf" + body
    expected = [(i, ok) for i, (_, ok) in enumerate(lines) if ok is not None]
    crlf = eol == b"\r\n"
    desc = f"jsonl cot={cot_mode} [{note}] bytes={byte_note} extra={extra} crlf={crlf} bom={bom}"
    return body, expected, desc


def build_json_variant(rng: random.Random, cot_mode: bool, mapping: bool) -> tuple[bytes, list, str]:
    base = BASE_COT if (cot_mode and rng.random() < 0.7) else BASE_ANSWER_ONLY
    rec, note = mutate_record(rng, base)
    good = list(BASE_COT if cot_mode else BASE_ANSWER_ONLY)
    recs = [good, rec, good]
    if mapping:
        text = "{" + ", ".join(f'"id{i}": {dump_record(r)}' for i, r in enumerate(recs)) + "}"
    else:
        text = "[" + ",\n".join(dump_record(r) for r in recs) + "]"
    expected = [(i, spec_valid(r, cot_mode)) for i, r in enumerate(recs)]
    fatal = not isinstance(rec, NotObject) and any(isinstance(v, Raw) and not v.parses for _, v in rec)
    return text.encode(), (None if fatal else expected), f"{'mapping' if mapping else 'list'} cot={cot_mode} [{note}]"


def variants():
    rng = random.Random(SEED)
    out = []
    for n in range(300):
        cot_mode = rng.random() < 0.75
        body, expected, desc = build_jsonl_variant(rng, cot_mode)
        out.append((".jsonl", body, expected, desc, cot_mode))
    for n in range(100):
        cot_mode = rng.random() < 0.75
        body, expected, desc = build_json_variant(rng, cot_mode, mapping=n % 2 == 0)
        out.append((".json", body, expected, desc, cot_mode))
    return out


def _names_location(message: str, suffix: str, index: int) -> bool:
    if suffix == ".jsonl":
        return f"record {index} (line {index + 1}): " in message
    return f"record {index}: " in message or f"record {index} (id " in message


def test_fuzzed_records(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", LINE_LIMIT)
    problems = []
    counts = {"valid": 0, "invalid": 0, "fatal": 0}
    for n, (suffix, body, expected, desc, cot_mode) in enumerate(variants()):
        path = tmp_path / f"v{n:03d}{suffix}"
        path.write_bytes(body)
        template = Template(cot=cot_mode)
        if expected is None:   # a .json file that does not parse: refused whole, skip_bad or not
            counts["fatal"] += 1
            for skip in (False, True):
                try:
                    build_examples(path, tiny_tokenizer, template, skip_bad=skip)
                    problems.append(f"{desc}: an unparsable .json accepted (skip_bad={skip})")
                except DataError as err:
                    if str(path) not in str(err) or not ("(line " in str(err) or "near line " in str(err)):
                        problems.append(f"{desc}: message does not name the file and line: {str(err)[:300]}")
                except Exception as err:  # noqa: BLE001
                    problems.append(f"{desc}: raw {type(err).__name__}: {str(err)[:200]}")
            continue
        valid_idx = [i for i, ok in expected if ok]
        invalid_idx = [i for i, ok in expected if not ok]
        counts["valid"] += len(valid_idx)
        counts["invalid"] += len(invalid_idx)
        # strict: all valid -> every record kept; else a DataError naming the file and the first bad record
        try:
            got = [e.record_index for e in build_examples(path, tiny_tokenizer, template, max_length=64)]
            if invalid_idx:
                problems.append(f"{desc}: accepted invalid record(s) {invalid_idx} silently")
            elif got != valid_idx:
                problems.append(f"{desc}: kept {got}, expected {valid_idx}")
        except DataError as err:
            msg = str(err)
            if not invalid_idx:
                problems.append(f"{desc}: valid records rejected: {msg[:300]}")
            elif str(path) not in msg or not _names_location(msg, suffix, invalid_idx[0]):
                problems.append(f"{desc}: message does not name {path.name} record {invalid_idx[0]}: {msg[:300]}")
        except Exception as err:  # noqa: BLE001 - the point of the test
            problems.append(f"{desc}: raw {type(err).__name__}: {str(err)[:200]}")
        # skip_bad: every valid record kept, every invalid one counted
        report = BuildReport()
        try:
            got = [e.record_index for e in build_examples(path, tiny_tokenizer, template, max_length=64,
                                                          skip_bad=True, report=report)]
            if got != valid_idx:
                problems.append(f"{desc}: skip_bad kept {got}, expected {valid_idx}")
            if sum(report.skipped.values()) != len(invalid_idx):
                problems.append(f"{desc}: skip_bad counted {dict(report.skipped)}, expected {len(invalid_idx)} skips")
            if "other" in report.skipped or "too long" in report.skipped:
                problems.append(f"{desc}: skip reasons {dict(report.skipped)}")
        except Exception as err:  # noqa: BLE001
            problems.append(f"{desc}: skip_bad raised {type(err).__name__}: {str(err)[:200]}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:30])
    assert counts["valid"] > 600 and counts["invalid"] > 200, counts   # the generator makes both kinds


def test_generator_covers_the_campaigns_variants():
    descs = " ".join(d for _, _, _, d, _ in variants())
    missing = [needle for needle in (
        "set:source=", "set:target=", "set:rationale=", "set:task=", "set:cot=", "=None", "=nan", "=inf", "=''", "=' '",
        "=3", "=1.5", "=True", "=[]", "={}", "='xxxxxxxxxxx", "='a\\x00b'", "='\\ud800'", "=111111111111", "delete:",
        "rename:", "duplicate:", "deep:100000", "deep:50", "not_object:list", "not_object:str", "not_object:NoneType",
        "bytes=truncate", "bytes=garbage", "bytes=bad_utf8", "bytes=nul_byte", "bytes=mid_bom", "bytes=giant",
        "bytes=long_ok", "bytes=trailing_ws", "extra=blank", "extra=ws_line", "extra=formfeed_line", "extra=second_bad",
        "crlf=True", "bom=True", "mapping", "list") if needle not in descs]
    assert not missing


# ----------------------------------------------------------------------------- hand-written cases

REC = {"source": "True or False is", "rationale": "True or False is True.", "target": "True", "task": "t"}
R = json.dumps(REC).encode()


def _rec(**changes) -> bytes:
    rec = dict(REC)
    for k, v in changes.items():
        if v is _DROP:
            rec.pop(k, None)
        else:
            rec[k] = v
    return json.dumps(rec, allow_nan=True).encode()


_DROP = object()

RAISE = "raise"   # skip_bad cannot skip it: the whole file is refused

# (id, suffix, file bytes, template cot, error substring or None, kept with skip_bad, skipped with skip_bad or RAISE)
CASES = [
    ("bom_at_start", ".jsonl", b"\xef\xbb\xbf" + R + b"\n" + R + b"\n", True, None, [0, 1], {}),
    ("crlf", ".jsonl", R + b"\r\n" + R + b"\r\n", True, None, [0, 1], {}),
    ("no_final_newline", ".jsonl", R + b"\n" + R, True, None, [0, 1], {}),
    ("empty_file", ".jsonl", b"", True, None, [], {}),
    ("blank_and_ws_lines", ".jsonl", R + b"\n\n \t\r\n" + R + b"\n", True, None, [0, 3], {}),
    ("bom_on_line_2", ".jsonl", R + b"\n\xef\xbb\xbf" + R + b"\n" + R, True,
     "record 1 (line 2): UTF-8 byte order mark at the start of the line", [0, 2], {"invalid JSON": 1}),
    ("invalid_utf8", ".jsonl", R + b'\n{"source": "a\xffb", "rationale": "r", "target": "t"}\n' + R, True,
     "record 1 (line 2): invalid UTF-8 at byte 13 of the line", [0, 2], {"invalid UTF-8": 1}),
    ("encoded_surrogate", ".jsonl", R + b'\n{"source": "\xed\xa0\x80", "rationale": "r", "target": "t"}\n', True,
     "record 1 (line 2): invalid UTF-8", [0], {"invalid UTF-8": 1}),
    ("utf16_file", ".jsonl", (json.dumps(REC) + "\n").encode("utf-16"), True,
     "record 0 (line 1): invalid UTF-8 at byte 0 of the line (invalid start byte) (the file looks like UTF-16", [], None),
    ("non_object_line", ".jsonl", R + b"\n[1, 2]\n" + R, True, "record 1 (line 2): expected an object, got list",
     [0, 2], {"expected an object": 1}),
    ("null_line", ".jsonl", R + b"\nnull\n", True, "record 1 (line 2): expected an object, got NoneType", [0], {"expected an object": 1}),
    ("nan_target", ".jsonl", _rec(target=float("nan")), True, "record 0 (line 1): field 'target' is float (NaN), not a string",
     [], {"not a string": 1}),
    ("infinity_source", ".jsonl", _rec(source=float("inf")), True, "field 'source' is float (Infinity), not a string", [], {"not a string": 1}),
    ("nan_in_extra_field", ".jsonl", _rec(score=float("nan")), True, None, [0], {}),
    ("number_target", ".jsonl", _rec(target=3), True, "field 'target' is int, not a string", [], {"not a string": 1}),
    ("bool_source", ".jsonl", _rec(source=True), True, "field 'source' is bool, not a string", [], {"not a string": 1}),
    ("list_rationale", ".jsonl", _rec(rationale=["a", "b"]), True, "field 'rationale' is list, not a string", [], {"not a string": 1}),
    ("cot_string", ".jsonl", _rec(cot="false"), True, "record 0 (line 1): field 'cot' is str, not true or false", [], {"bad cot": 1}),
    ("cot_int", ".jsonl", _rec(cot=0), True, "field 'cot' is int, not true or false", [], {"bad cot": 1}),
    ("cot_null_is_absent", ".jsonl", _rec(cot=None), True, None, [0], {}),
    ("cot_false_needs_no_rationale", ".jsonl", _rec(cot=False, rationale=_DROP), True, None, [0], {}),
    ("task_dict", ".jsonl", _rec(task={"name": "x"}), True, "field 'task' is dict, not a string", [], {"bad task": 1}),
    ("task_number", ".jsonl", _rec(task=5), True, "field 'task' is int, not a string", [], {"bad task": 1}),
    ("task_null", ".jsonl", _rec(task=None), True, None, [0], {}),
    ("task_absent", ".jsonl", _rec(task=_DROP), True, None, [0], {}),
    ("target_missing", ".jsonl", _rec(target=_DROP), True, "field 'target' is missing", [], {"missing": 1}),
    ("source_null", ".jsonl", _rec(source=None), True, "field 'source' is missing (null)", [], {"missing": 1}),
    ("target_whitespace", ".jsonl", _rec(target=" \n"), True, "field 'target' is empty (empty response)", [], {"empty response": 1}),
    ("source_empty", ".jsonl", _rec(source=""), True, "field 'source' is empty", [], {"empty source": 1}),
    ("rationale_empty_cot", ".jsonl", _rec(rationale="  "), True, None, [0], {}),   # allowed, as before
    ("rationale_empty_no_cot", ".jsonl", _rec(rationale=""), False, None, [0], {}),
    ("rationale_missing_no_cot", ".jsonl", _rec(rationale=_DROP), False, None, [0], {}),
    ("rationale_number_no_cot", ".jsonl", _rec(rationale=5), False, "field 'rationale' is int, not a string", [], {"not a string": 1}),
    ("duplicate_keys", ".jsonl", b'{"source": "s", "target": "a", "rationale": "r", "target": "b"}', True,
     "record 0 (line 1): duplicate key(s) 'target'", [], {"duplicate key": 1}),
    ("trailing_garbage", ".jsonl", R + b" x\n" + R, True, "record 0 (line 1): invalid JSON: Extra data (column", [1], {"invalid JSON": 1}),
    ("truncated", ".jsonl", R[:-5] + b"\n" + R, True, "record 0 (line 1): invalid JSON", [1], {"invalid JSON": 1}),
    ("two_objects_one_line", ".jsonl", R + b" " + R, True, "invalid JSON: Extra data", [], {"invalid JSON": 1}),
    ("deep_nesting", ".jsonl", R + b'\n{"source": "s", "target": "t", "rationale": "r", "m": ' + b"[" * 200_000 + b"]" * 200_000 + b"}\n" + R,
     True, "record 1 (line 2): invalid JSON: nested too deeply to parse", [0, 2], {"too deeply nested": 1}),
    ("moderate_nesting_ok", ".jsonl", b'{"source": "s", "target": "t", "rationale": "r", "m": ' + b"[" * 40 + b"]" * 40 + b"}", True,
     None, [0], {}),
    ("huge_integer", ".jsonl", b'{"source": "s", "target": "t", "rationale": "r", "n": ' + b"9" * 5000 + b"}", True,
     "record 0 (line 1): invalid JSON: Exceeds the limit (4300 digits)", [], {"invalid JSON": 1}),
    ("lone_surrogate", ".jsonl", b'{"source": "a\\ud800", "rationale": "r", "target": "t"}', True,
     "field 'source' holds a lone surrogate \\ud800 (at character 1)", [], {"invalid text": 1}),
    ("surrogate_pair_ok", ".jsonl", b'{"source": "smile \\ud83d\\ude00", "rationale": "r", "target": "t"}', True, None, [0], {}),
    ("nul_escape", ".jsonl", b'{"source": "s", "rationale": "a\\u0000b", "target": "t"}', True,
     "field 'rationale' holds a NUL character (at character 1)", [], {"invalid text": 1}),
    ("nul_escape_in_task", ".jsonl", _rec(task="a\x00"), True, "field 'task' holds a NUL character", [], {"invalid text": 1}),
    ("raw_nul_byte", ".jsonl", b'{"source": "a\x00b", "rationale": "r", "target": "t"}', True,
     "invalid JSON: Invalid control character (column 14)", [], {"invalid JSON": 1}),
    ("formfeed_line", ".jsonl", R + b"\n\x0c\n" + R, True, "record 1 (line 2): invalid JSON", [0, 2], {"invalid JSON": 1}),
    ("long_string_ok", ".jsonl", _rec(rationale="x " * 100_000), True, None, [0], {}),
    ("custom_fields", ".jsonl", b'{"q": "s", "why": "r", "a": "t"}', True, None, [0], {}),
    # whole-file JSON
    ("json_list", ".json", b"[" + R + b", " + R + b"]", True, None, [0, 1], {}),
    ("json_bom", ".json", b"\xef\xbb\xbf[" + R + b"]", True, None, [0], {}),
    ("json_examples", ".json", b'{"examples": [' + R + b"]}", True, None, [0], {}),
    ("json_empty_list", ".json", b"[]", True, None, [], {}),
    ("json_list_non_dict", ".json", b"[" + R + b', "text", ' + R + b"]", True, "record 1: expected an object, got str",
     [0, 2], {"expected an object": 1}),
    ("json_list_duplicate_keys", ".json", b'[{"source": "s", "source": "t", "rationale": "r", "target": "t"}, ' + R + b"]", True,
     "record 0: duplicate key(s) 'source'", [1], {"duplicate key": 1}),
    ("mapping", ".json", b'{"a": ' + R + b', "b": ' + R + b"}", True, None, [0, 1], {}),
    ("mapping_non_dict", ".json", b'{"a": ' + R + b', "b": 5, "c": ' + R + b"}", True, "record 1 (id 'b'): expected an object, got int",
     [0, 2], {"expected an object": 1}),
    ("mapping_bad_field", ".json", b'{"a": ' + R + b', "b": ' + _rec(target=None) + b"}", True,
     "record 1 (id 'b'): field 'target' is missing (null)", [0], {"missing": 1}),
    ("mapping_duplicate_ids", ".json", b'{"a": ' + R + b', "a": ' + R + b"}", True, "duplicate ids/keys 'a'", [], RAISE),
    ("single_record_object", ".json", R, True, "got one object whose values are not objects", [], RAISE),
    ("json_scalar", ".json", b"3", True, "expected a JSON list of records or an id -> record mapping, got int", [], RAISE),
    ("json_invalid", ".json", b"[" + R + b", " + R[:-3], True,
     "invalid JSON: Unterminated string starting (line 1, column", [], RAISE),
    ("json_invalid_utf8", ".json", b"[" + R + b",\n" + R.replace(b"True", b"Tr\xffue", 1) + b"]", True,
     "invalid UTF-8 at line 2", [], RAISE),
    ("json_deep", ".json", b"[" + R + b",\n" + b"[" * 200_000 + b"]" * 200_000 + b"]", True,
     "invalid JSON: nested too deeply to parse (at or near line 2)", [], RAISE),
    ("json_huge_integer", ".json", b"[" + R + b",\n\n" + _rec(n=0).replace(b"0}", b"7" * 5000 + b"}") + b"]", True,
     "for integer string conversion: value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit "
     "(at or near line 3)", [], RAISE),
    ("json_nan_target", ".json", b"[" + _rec(target=float("nan")) + b"]", True, "record 0: field 'target' is float (NaN)", [],
     {"not a string": 1}),
    ("unknown_suffix", ".txt", R, True, "unknown record format '.txt'", [], RAISE),
    ("corrupt_parquet", ".parquet", b"PAR1 not really parquet", True, "not a readable parquet file", [], RAISE),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hand_written_case(case, tmp_path, tiny_tokenizer):
    name, suffix, body, cot, error, kept, skipped = case
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(body)
    template = Template(cot=cot)
    fields = FieldMap("q", "why", "a") if name == "custom_fields" else FieldMap()
    if error is None:
        assert [e.record_index for e in build_examples(path, tiny_tokenizer, template, fields)] == kept
    else:
        with pytest.raises(DataError) as err:
            build_examples(path, tiny_tokenizer, template, fields)
        assert error in str(err.value) and str(path) in str(err.value), str(err.value)[:500]
    report = BuildReport()
    if skipped == RAISE:
        with pytest.raises(DataError, match="."):
            build_examples(path, tiny_tokenizer, template, fields, skip_bad=True, report=report)
        return
    got = build_examples(path, tiny_tokenizer, template, fields, skip_bad=True, report=report)
    assert [e.record_index for e in got] == kept
    if skipped is not None:
        assert dict(report.skipped) == skipped
    else:   # utf-16: every line is bad, each counted
        assert sum(report.skipped.values()) >= 1 and report.kept == 0


def test_utf16_lines_all_counted(tmp_path, tiny_tokenizer):
    path = tmp_path / "u.jsonl"
    path.write_bytes((json.dumps(REC) + "\n" + json.dumps(REC) + "\n").encode("utf-16"))
    report = BuildReport()
    assert build_examples(path, tiny_tokenizer, Template(), skip_bad=True, report=report) == []
    assert report.kept == 0 and sum(report.skipped.values()) == 3   # two lines, and the newline's trailing NUL byte
    assert all(str(path) in m and "(line " in m for m in report.first_errors)


def test_giant_line_is_not_read_and_the_next_one_is(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "g.jsonl"
    giant = b'{"source": "' + b"x" * 5000 + b'", "rationale": "r", "target": "t"}'
    path.write_bytes(R + b"\n" + giant + b"\n" + R + b"\n")
    with pytest.raises(DataError, match=rf"record 1 \(line 2\): line is {len(giant)} bytes, over the limit of 1000 bytes"):
        build_examples(path, tiny_tokenizer, Template())
    report = BuildReport()
    assert [e.record_index for e in build_examples(path, tiny_tokenizer, Template(), skip_bad=True, report=report)] == [0, 2]
    assert report.skipped == {"line too long": 1}
    exact = tmp_path / "exact.jsonl"   # a line of exactly the limit is read
    line = _rec(rationale="r" * (1000 - len(_rec(rationale=""))))
    assert len(line) == 1000
    exact.write_bytes(line + b"\n" + line)
    assert len(build_examples(exact, tiny_tokenizer, Template())) == 2


def test_default_line_limit_is_64_mib():
    assert data.MAX_LINE_BYTES == 64 * 1024 * 1024


def test_parquet_rows_go_through_validate_record(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "r.parquet"
    pq.write_table(pa.Table.from_pylist([dict(REC, cot=None), dict(REC, target=None), dict(REC, task=None), dict(REC, cot=False, rationale=None)]), path)
    with pytest.raises(DataError, match=r"r\.parquet: record 1: field 'target' is missing \(null\)"):
        build_examples(path, tiny_tokenizer, Template())
    report = BuildReport()
    got = build_examples(path, tiny_tokenizer, Template(), skip_bad=True, report=report)
    assert [e.record_index for e in got] == [0, 2, 3] and report.skipped == {"missing": 1}
    assert got[1].task == "" and got[2].cot is False
    typed = tmp_path / "typed.parquet"
    pq.write_table(pa.Table.from_pylist([dict(REC, target=1), dict(REC, target=2)]), typed)
    with pytest.raises(DataError, match="record 0: field 'target' is int, not a string"):
        build_examples(typed, tiny_tokenizer, Template())
    cots = tmp_path / "cot.parquet"
    pq.write_table(pa.Table.from_pylist([dict(REC, cot="no")]), cots)
    with pytest.raises(DataError, match="field 'cot' is str, not true or false"):
        build_examples(cots, tiny_tokenizer, Template())
    nan = tmp_path / "nan.parquet"
    pq.write_table(pa.Table.from_pylist([dict(REC, target=math.nan)]), nan)
    with pytest.raises(DataError, match=r"field 'target' is float \(NaN\)"):
        build_examples(nan, tiny_tokenizer, Template())


def test_read_records_raises_at_the_first_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(R + b"\n{oops\n" + R)
    records = data.read_records(path)
    assert next(records)[0] == 0
    with pytest.raises(DataError, match=r"record 1 \(line 2\): invalid JSON"):
        next(records)


def test_skip_report_keeps_the_first_messages(tmp_path, tiny_tokenizer):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\n".join([b"[]"] * 8 + [R]))
    report = BuildReport()
    assert len(build_examples(path, tiny_tokenizer, Template(), skip_bad=True, report=report)) == 1
    assert report.skipped == {"expected an object": 8} and len(report.first_errors) == 5
    assert report.first_errors[0] == f"{path}: record 0 (line 1): expected an object, got list"
