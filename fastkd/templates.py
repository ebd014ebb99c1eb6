"""Validated records -> prompt and response text -> token ids and loss masks (Example).

The one place where text becomes tokens: `fastkd cache-teacher`, `fastkd train` and
`fastkd eval-bbh` all build prompts here, so the three stages see the same bytes. Conversation
records (messages form) are read by fastkd.conversations and tokenised by fastkd.chat_masks.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fastkd import chat_masks
from fastkd.conversations import is_conversation, validate_conversation
from fastkd.records import DataError, FieldMap, scan_records, validate_record

ANSWER_PHRASE = "So the answer is "
COT_TRIGGER = "Let's think step by step."
LOSS_TURNS = chat_masks.LOSS_TURNS     # --loss-turns choices (cache-teacher, train)


@dataclass(frozen=True)
class Template:
    """How a record becomes prompt text and response text.

    cot=True: prompt `Q: {source}\nA: Let's think step by step.` (the BBH authors' CoT frame),
    response = the rationale, then `So the answer is <target>.` (added once);
    cot=False: prompt `Q: {source}\nA:`, response = the target alone. The two prompts differ,
    so one model trained on both modes is told which one to use. chat=True puts the bare source
    in the tokenizer's chat template (user turn + generation prompt) and, with cot, starts the
    response with the trigger phrase instead. Conversation records (messages form) always use the
    tokenizer's chat template; loss_turns picks their assistant parts that carry loss (docs/data.md).
    """

    cot: bool = True
    chat: bool = False
    loss_turns: str = "all"     # messages records: which assistant turns carry loss (LOSS_TURNS)

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

    def describe(self, conversations: dict | None = None) -> dict:
        """The template as a cache's settings record it; `conversations` (BuildReport.conversations: how
        conversation records were rendered and masked) is added under "messages" when there were any."""
        if self.cot:
            prompt = "{source}" if self.chat else "Q: {source}\\nA: " + COT_TRIGGER
            response = (" " + COT_TRIGGER if self.chat else "") + " {rationale} So the answer is {target}."
        else:
            prompt, response = ("{source}" if self.chat else "Q: {source}\\nA:"), " {target}"
        described = {"cot": self.cot, "chat": self.chat, "prompt": prompt, "response": response}
        return dict(described, messages=conversations) if conversations else described


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
    conversations: dict | None = None   # chat_masks.describe() when the records hold conversations

    MAX_ERRORS_KEPT = 5

    def as_dict(self) -> dict:
        return {"kept": self.kept, "truncated": self.truncated, "skipped": dict(self.skipped)}


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
    return None (`skip`). A prompt that leaves no room for one response token is skipped. A conversation (a record
    from validate_conversation) goes through conversation_example, None when it is skipped."""
    if "messages" in record:
        ex = conversation_example(record, index, tokenizer, template, max_length, overflow)
        return ex if isinstance(ex, Example) else None
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


def conversation_example(record: dict, index: int, tokenizer, template: Template, max_length: int | None = None,
                         overflow: str = "truncate") -> Example | str:
    """Tokenise one validated conversation with the tokenizer's chat template, loss on the assistant parts
    template.loss_turns picks; the end is cut at max_length (or the record skipped: `skip`). Returns the reason
    instead when it is skipped: "no loss tokens" (none picked) or "too long" (none left after the cut)."""
    ids, mask = chat_masks.conversation_ids(tokenizer, record, template.loss_turns)
    if 1 not in mask[1:]:          # the first token is never predicted
        return "no loss tokens"
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if overflow == "skip" or 1 not in mask[1:max_length]:
            return "too long"
        ids, mask, truncated = ids[:max_length], mask[:max_length], True
    return Example(ids, mask, index, record.get("task", ""), truncated, cot=template.loss_turns != "answer")


def build_examples(source: str | Path, tokenizer, template: Template, fields: FieldMap = FieldMap(),
                   max_length: int | None = None, overflow: str = "truncate", skip_bad: bool = False,
                   split: str = "train", report: BuildReport | None = None, keep=None) -> list[Example]:
    """Read, validate and tokenise every record of `source`; counts go into `report`.

    Without skip_bad the first bad record raises a DataError naming the file, record (and JSONL
    line) and field. With skip_bad every per-record problem (a bad field, and for JSONL also a
    line that is not valid UTF-8 or JSON, or is too long) is counted in report.skipped under a
    short reason and skipped; problems that spoil a whole file (a .json that does not parse, an
    unreadable parquet) still raise. keep(index) -> bool, when given, picks the records to validate and
    tokenise (a rank's own work units); the others are passed over unread and uncounted. A record holding
    `fields.messages` is a conversation (conversation_example); report.conversations then says how they were
    rendered and masked (the same for every rank: set by the first conversation read, kept or not)."""
    if overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow must be 'truncate' or 'skip', not {overflow!r}")
    if template.loss_turns not in LOSS_TURNS:
        raise ValueError(f"loss_turns must be one of {', '.join(LOSS_TURNS)}, not {template.loss_turns!r}")
    report = report if report is not None else BuildReport()
    examples = []
    for index, where, raw, error in scan_records(source, split):
        conversation = error is None and is_conversation(raw, fields)
        if conversation and report.conversations is None:
            report.conversations = chat_masks.describe(tokenizer, template.loss_turns, f"{source}: {where}")
        if keep is not None and not keep(index):
            continue
        try:
            if error is not None:
                raise error
            if conversation:
                rec = validate_conversation(raw, index, fields, str(source), where=where)
                ex = conversation_example(rec, index, tokenizer, template, max_length, overflow)
            else:
                rec, ex = validate_record(raw, index, fields, str(source), template.cot, where=where), None
        except DataError as err:
            if not skip_bad:
                raise
            report.skipped[err.reason or _reason(str(err))] += 1
            if len(report.first_errors) < report.MAX_ERRORS_KEPT:
                report.first_errors.append(str(err))
            continue
        if ex is None:
            ex = build_example(rec, index, tokenizer, template, max_length, overflow) or "too long"
        if isinstance(ex, str):
            report.skipped[ex] += 1
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
