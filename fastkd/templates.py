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
from fastkd.conversations import validate_conversation
from fastkd.records import DataError, FieldMap, scan_records, validate_record

ANSWER_PHRASE = "So the answer is "
COT_TRIGGER = "Let's think step by step."
LOSS_TURNS = chat_masks.LOSS_TURNS     # --loss-turns choices (cache-teacher, train)


@dataclass(frozen=True)
class Template:
    """How a record becomes prompt and response text (docs/data.md's table: CoT, answer-only, chat template);
    loss_turns picks the assistant parts of conversation records that carry loss."""

    cot: bool = True
    chat: bool = False
    loss_turns: str = "all"     # messages records: which assistant turns carry loss (LOSS_TURNS)

    def __post_init__(self):
        if self.loss_turns not in LOSS_TURNS:
            raise ValueError(f"loss_turns must be one of {', '.join(LOSS_TURNS)}, not {self.loss_turns!r}")

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
        prompt = "{source}" if self.chat else self.prompt("{source}").replace("\n", "\\n")
        response = self.response("{rationale}", "{target}")
        described = {"cot": self.cot, "chat": self.chat, "prompt": prompt, "response": response}
        return dict(described, messages=conversations) if conversations else described


def strip_answer_phrase(rationale: str, target: str) -> str:
    """The rationale without a trailing `So the answer is <target>.` (CoT-Collection's sometimes have one),
    so the template adds it exactly once."""
    text = rationale.strip()
    pattern = re.compile(r"\s*(So|so|Therefore|therefore|Thus|thus),?\s+the answer is\s*"
                         + re.escape(target.strip()) + r"\s*\.?\s*$")
    return pattern.sub("", text).strip()


@dataclass
class Example:
    """One tokenised record; loss_mask[t] = 1 where token t is one the model learns to predict (response, EOS)."""

    input_ids: list[int]
    loss_mask: list[int]
    record_index: int
    task: str = ""
    truncated: bool = False
    cot: bool = True          # built with the CoT template (False: answer-only response)


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
        return {"kept": self.kept, "truncated": self.truncated, "skipped": dict(self.skipped),
                "first_errors": list(self.first_errors)}


def text_prompt_ids(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a ready prompt string: as is (BOS when the tokenizer adds one), or as one
    user turn of the chat template followed by the generation prompt."""
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True, return_dict=True,
                                                  add_generation_prompt=True)["input_ids"])
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
    """Tokenise one validated record (or conversation); None when it is skipped (_tokenise says why)."""
    ex = _tokenise(record, index, tokenizer, template, max_length, overflow)
    return ex if isinstance(ex, Example) else None


def _tokenise(record: dict, index: int, tokenizer, template: Template, max_length: int | None,
              overflow: str) -> Example | str:
    """An Example, or why it is skipped: "no loss tokens" or "too long" (none left after the cut at max_length,
    or any cut under overflow="skip"). `"cot": false` gets the answer-only response under a CoT template."""
    if "messages" in record:
        ids, mask = chat_masks.conversation_ids(tokenizer, record, template.loss_turns)
        cot = template.loss_turns != "answer"
        if 1 not in mask[1:]:          # the first token is never predicted
            return "no loss tokens"
    else:
        if template.cot and record.get("cot") is False:
            template = Template(cot=False, chat=template.chat)
        p = prompt_ids(tokenizer, template, record["source"])
        r = response_ids(tokenizer, template, record.get("rationale"), record["target"])
        ids, mask, cot = p + r, [0] * len(p) + [1] * len(r), template.cot
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        if overflow == "skip" or 1 not in mask[1:max_length]:
            return "too long"
        ids, mask = ids[:max_length], mask[:max_length]
    return Example(ids, mask, index, record.get("task", ""), truncated, cot)


def build_examples(source: str | Path, tokenizer, template: Template, fields: FieldMap = FieldMap(),
                   max_length: int | None = None, overflow: str = "truncate", skip_bad: bool = False,
                   split: str = "train", report: BuildReport | None = None, keep=None) -> list[Example]:
    """Read, validate and tokenise the records of `source` that keep(index) picks (all by default), counting
    into `report`. The first bad record raises a DataError; skip_bad counts per-record problems under their
    reason and skips them (a whole-file problem still raises). report.conversations is set by the first
    conversation read, kept or not, so every rank records the same."""
    if overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow must be 'truncate' or 'skip', not {overflow!r}")
    report = report if report is not None else BuildReport()
    examples = []
    for index, where, raw, error in scan_records(source, split):
        conversation = error is None and isinstance(raw, dict) and raw.get(fields.messages) is not None
        if conversation and report.conversations is None:
            report.conversations = chat_masks.describe(tokenizer, template.loss_turns, f"{source}: {where}")
        if keep is not None and not keep(index):
            continue
        try:
            if error is not None:
                raise error
            if conversation:
                rec = validate_conversation(raw, index, fields, str(source), where=where)
                ex = _tokenise(rec, index, tokenizer, template, max_length, overflow)
            else:
                rec, ex = validate_record(raw, index, fields, str(source), template.cot, where=where), None
        except DataError as err:
            if not skip_bad:
                raise
            report.skipped[err.reason or "other"] += 1
            if len(report.first_errors) < report.MAX_ERRORS_KEPT:
                report.first_errors.append(str(err))
            continue
        if ex is None:          # tokenised outside the try: a tokenizer without EOS is no record's fault
            ex = _tokenise(rec, index, tokenizer, template, max_length, overflow)
        if isinstance(ex, str):
            report.skipped[ex] += 1
            continue
        report.kept += 1
        report.truncated += ex.truncated
        examples.append(ex)
    return examples

