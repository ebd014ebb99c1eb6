"""Conversations -> the tokenizer's own chat template -> token ids and a loss mask over the assistant's turns.

The spans come from the template's `{% generation %}` blocks, else turn by turn (docs/data.md says how).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np

from fastkd.conversations import reasoning_of, with_answer, with_reasoning
from fastkd.errors import UserError
from fastkd.records import DataError, short_repr

LOSS_TURNS = ("all", "last", "reasoning", "answer")     # the assistant parts select_spans can pick
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# two stand-in answers whose first characters differ: where the renderings first differ, the answer starts
_STAND_INS = ("\u2460", "\u2461")
_FIX = ("add {% generation %} ... {% endgeneration %} around the assistant's output in the chat template "
        "(docs/data.md shows how), so that the template itself says which tokens are the assistant's")


@dataclass(frozen=True)
class Turn:
    """An assistant turn in the rendered text: [start, end) runs from after its header through its end of
    turn; [start, answer) is its reasoning as rendered (empty when none is), [answer, end) its answer."""

    start: int
    answer: int
    end: int


def template_text(tokenizer) -> str | None:
    """The tokenizer's chat template (named templates as one canonical JSON text), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return json.dumps(template, sort_keys=True)
    return template if isinstance(template, str) and template.strip() else None


def template_sha256(tokenizer) -> str | None:
    """SHA-256 of template_text (None: no chat template), recorded in caches so a student can be checked."""
    text = template_text(tokenizer)
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_name(tokenizer) -> str:
    """The tokenizer's name or path, for messages."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def require_template(tokenizer, where: str) -> str:
    """The chat template conversation records need (a fast tokenizer too: spans map to tokens by offsets)."""
    text = template_text(tokenizer)
    if text is None:
        raise UserError(f"{where}: conversation records are rendered with the tokenizer's chat template, and the "
                        f"tokenizer {tokenizer_name(tokenizer)} has none: set tokenizer.chat_template (a Jinja string, "
                        f"or chat_template.jinja beside tokenizer.json) to the model's template")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{where}: conversation records need a fast tokenizer (its character offsets map the "
                        f"template's assistant spans to tokens); {tokenizer_name(tokenizer)} is "
                        f"{type(tokenizer).__name__}: save it with tokenizer.json")
    return text


def describe(tokenizer, loss_turns: str, where: str = "conversation records") -> dict:
    """What a cache records about how its conversations became masks (compared on resume; a student is
    checked against it by check_student_template)."""
    text = require_template(tokenizer, where)
    return {"kind": "messages", "loss_turns": loss_turns,
            "spans": "generation markers" if GENERATION_MARKER.search(text) else "turn by turn"}


def check_student_template(settings_template: dict | None, tokenizer, where: str) -> None:
    """Refuse a student whose chat template is not the one the cache's conversations (or --chat-template
    prompts) were rendered with: it would tokenise them differently. A cache no chat template made passes."""
    settings_template = settings_template or {}
    made = settings_template.get("messages") or {}
    # the digest sits beside the template's description (cache_stage._settings), one per cache
    theirs = settings_template.get("chat_template_sha256") if made or settings_template.get("chat") else None
    ours = template_sha256(tokenizer)
    if theirs is not None and ours != theirs:
        has = "no chat template" if ours is None else f"chat template sha256 {ours[:12]}..."
        what = "conversations" if made else "prompts"
        raise DataError(f"{where}: the cache's {what} were rendered with chat template sha256 "
                        f"{str(theirs)[:12]}..., the student's tokenizer ({tokenizer_name(tokenizer)}) has {has}, "
                        f"which would render them differently; give the student the teacher's chat template "
                        f"(tokenizer.chat_template, saved with save_pretrained), or re-create the cache with the "
                        f"student's", reason="chat template mismatch")


def conversation_ids(tokenizer, conversation: dict, loss_turns: str) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a validated conversation (fastkd.conversations): the template's rendering,
    tokenised as apply_chat_template does, with 1 on the tokens of the assistant parts `loss_turns` picks."""
    where = conversation.get("where", "conversation")
    template = require_template(tokenizer, where)
    messages = conversation["messages"]
    render = _renderer(tokenizer, conversation.get("tools"), where, len(messages))
    text = render(messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    assistants = [i for i, turn in enumerate(messages) if turn["role"] == "assistant"]
    if GENERATION_MARKER.search(template):
        turns = _marked_turns(tokenizer, conversation, text, ids, offsets, assistants, render)
    else:
        turns = _prefix_turns(render, messages, text, assistants, f"{where}: the chat template of "
                              f"{tokenizer_name(tokenizer)} gives no consistent span for assistant turn")
    return ids, _mask(offsets, select_spans(turns, loss_turns))


def select_spans(turns: list[Turn], loss_turns: str) -> list[tuple[int, int]]:
    """The character spans that carry loss: every assistant turn, the last one, or their reasoning or answer parts
    (loss_turns, one of LOSS_TURNS: templates.Template checks it)."""
    if loss_turns == "reasoning":
        return [(t.start, t.answer) for t in turns if t.answer > t.start]
    picked = turns[-1:] if loss_turns == "last" else turns
    return [(t.answer if loss_turns == "answer" else t.start, t.end) for t in picked]


def _mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> list[int]:
    """1 on every token whose characters overlap a span (a token of no characters counts as one character)."""
    mask = np.zeros(len(offsets), dtype=bool)
    if len(offsets):
        starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
        for start, end in spans:
            mask |= (starts < end) & (ends > start)
    return mask.astype(int).tolist()


def _renderer(tokenizer, tools, where: str, whole: int):
    """render(messages, generation_prompt=False) -> text; a template error is one DataError line (naming the
    prefix rendered when it is not the whole conversation of `whole` turns)."""
    def render(messages: list[dict], generation_prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except Exception as err:  # noqa: BLE001 - Jinja and the template's own raise_exception: one line
            part = "" if len(messages) == whole and not generation_prompt else f" (its first {len(messages)} turns)"
            detail = (str(err).strip().splitlines() or [""])[0][:200]
            raise DataError(f"{where}: the chat template of {tokenizer_name(tokenizer)} failed to render this "
                            f"conversation{part}: {type(err).__name__}: {detail}", reason="template failed") from None
    return render


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix of a and b (bisected on slice comparisons, which run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n          # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _answer_at(render, messages: list[dict], i: int, rendered: str) -> int | None:
    """Where turn i's answer starts in `rendered` (messages rendered): the first character the stand-in answers
    change, else just after the last one stand-in reasoning changes; None when neither shows (docs/data.md)."""
    def changed(edit) -> list[str] | None:
        try:
            others = [render(messages[:i] + [edit(messages[i], s)] + messages[i + 1:]) for s in _STAND_INS]
        except DataError:   # the template refuses the stand-in (e.g. content beside thinking and tool calls)
            return None
        return None if rendered in others else others

    others = changed(with_answer)
    if others is not None:
        return min(_common_prefix(rendered, other) for other in others)
    others = changed(with_reasoning) if reasoning_of(messages[i])[0] is not None else None
    if others is not None:
        return len(rendered) - min(_common_prefix(rendered[::-1], other[::-1]) for other in others)
    return None


def _marked_turns(tokenizer, conversation, text, ids, offsets, assistants, render) -> list[Turn]:
    """The template's {% generation %} spans, one per assistant turn, split where each turn's answer starts."""
    messages = conversation["messages"]
    out = tokenizer.apply_chat_template(messages, tools=conversation.get("tools"), tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    marked = np.asarray(out["assistant_masks"], dtype=np.int8)
    if list(out["input_ids"]) != ids or len(marked) != len(ids):
        raise DataError(f"{conversation.get('where')}: apply_chat_template tokenised this conversation differently "
                        f"from its own rendering; cannot place the generation spans", reason="template spans")
    edges = np.flatnonzero(np.diff(np.concatenate([[0], marked, [0]])))
    runs = [(int(offsets[a][0]), int(offsets[b - 1][1])) for a, b in zip(edges[::2], edges[1::2])]
    if len(runs) != len(assistants):
        raise DataError(f"{conversation.get('where')}: the chat template of {tokenizer_name(tokenizer)} marks "
                        f"{len(runs)} {{% generation %}} span(s) with text in this conversation, which has "
                        f"{len(assistants)} assistant turn(s); it must mark each assistant turn's output once",
                        reason="template spans")
    turns = []
    for (start, end), i in zip(runs, assistants):
        at = _answer_at(render, messages, i, text) if reasoning_of(messages[i])[0] is not None else None
        turns.append(Turn(start, start if at is None else min(max(at, start), end), end))
    return turns


def _prefix_turns(render, messages: list[dict], text: str, assistants: list[int], refusal: str) -> list[Turn]:
    """Each assistant turn's text as rendered after the turns before it, found in the whole rendering `text`
    after the previous turn (or from its answer on, when `text` drops its reasoning); docs/data.md, step 2."""
    def refuse(k: int, why: str):
        raise DataError(f"{refusal} {k} of this conversation ({why}); {_FIX}", reason="template spans")

    turns, cursor = [], 0
    for k, i in enumerate(assistants):
        before, prompt, alone = render(messages[:i]), render(messages[:i], True), render(messages[:i + 1])
        if not (prompt.startswith(before) and alone.startswith(before)):
            refuse(k, "rendering the turns before it, with or without the generation prompt, or then the turn "
                      "itself, does not extend the same text")
        head = len(before) + _common_prefix(prompt[len(before):], alone[len(before):])
        header, piece = alone[len(before):head], alone[head:]
        answer_at = _answer_at(render, messages[:i + 1], i, alone)
        answer_at = 0 if answer_at is None else answer_at - head
        if not 0 <= answer_at <= len(piece):
            refuse(k, "its answer does not start inside its own text")
        candidates = [(piece, answer_at)] + ([(piece[answer_at:], 0)] if 0 < answer_at < len(piece) else [])
        if len(before) >= cursor and text.startswith(before):      # the turn's place is known
            found = [(len(before), body, answer) for body, answer in candidates
                     if text.startswith(header + body, len(before))][:1]
        elif header:
            found = sorted(((pos, body, answer) for body, answer in candidates
                            if (pos := text.find(header + body, cursor)) >= 0), key=lambda f: (f[0], -len(f[1])))
        else:
            refuse(k, "the template adds no generation prompt (add_generation_prompt) to mark where an assistant "
                      "turn starts, and the turns before it render differently inside the whole conversation")
        if not found:
            refuse(k, f"its text {short_repr(header + piece, 80)} (and without what precedes its answer) is not "
                      f"in the whole conversation's rendering where it should be")
        pos, body, answer = found[0]
        start = pos + len(header)
        end = start + len(body.rstrip())     # the newlines a template puts between turns are not the assistant's
        reasoning = reasoning_of(messages[i])[0] is not None
        turns.append(Turn(start, min(start + answer, end) if reasoning else start, end))
        cursor = start + len(body)
    return turns
