"""Conversation records (messages form of TRL / OpenAI, or ShareGPT turns) -> validated turns.

A record whose messages field (--messages-field, default `messages`) is present and not null is a
conversation; fastkd.chat_masks renders it with the tokenizer's chat template. The rules are docs/data.md's
("Form 2", "What is refused"); every refusal is a DataError naming the file, the record, the field and the turn.
"""

from __future__ import annotations

import re

from fastkd.records import DataError, FieldMap, check_text, check_unique_keys, describe_kind, read_task, short_repr

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}
REASONING_KEYS = ("reasoning_content", "thinking")
_THINK = re.compile(r"\A(\s*<think>)(.*?)(</think>)(.*)\Z", re.DOTALL)
# what may follow a turn of each role (None: the start of the conversation)
_NEXT = {None: ("system", "user"), "system": ("user",), "user": ("assistant",),
         "assistant": ("user", "tool"), "tool": ("tool", "assistant", "user")}


def validate_conversation(record: dict, index: int, fields: FieldMap, origin: str, where: str | None = None) -> dict:
    """{"messages", "tools", "task", "where"} of a conversation record, or a DataError naming file, record,
    field and turn (docs/data.md). `where` (the record's label) is kept for later errors."""
    loc = f"{origin}: {where or f'record {index}'}"

    def refuse(message: str, reason: str):
        raise DataError(f"{loc}: {message}", reason=reason)

    def fail(message: str, reason: str):
        refuse(f"field {fields.messages!r}{message}", reason)

    check_unique_keys(record, refuse)
    turns = record[fields.messages]
    if not isinstance(turns, list):
        fail(f" is {describe_kind(turns)}, not a list of turns", "not a list")
    if not turns:
        fail(" is an empty list (no assistant turn)", "no assistant turn")
    messages = [_turn(turn, k, fail) for k, turn in enumerate(turns)]
    _check_order(messages, fail)
    tools = record.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        refuse(f"field 'tools' is {describe_kind(tools)}, not a list of tool definitions (objects)", "bad tools")
    task = read_task(record, fields, refuse)
    return {"messages": messages, "tools": tools or None, "task": task, "where": loc}


def _turn(turn: object, k: int, fail) -> dict:
    """One turn checked and put in messages form (ShareGPT's from/value become role/content)."""
    label = f", turn {k}"
    if not isinstance(turn, dict):
        fail(f"{label} is {describe_kind(turn)}, not an object", "expected an object")
    check_unique_keys(turn, lambda message, reason: fail(f"{label}: {message}", reason))
    out = dict(turn)
    both = [a for a, b in (("role", "from"), ("content", "value")) if a in out and b in out]
    if both:   # which one the turn means is a guess: neither is dropped silently
        fail(f"{label} has both {both[0]!r} and its ShareGPT twin {dict(role='from', content='value')[both[0]]!r}; "
             f"give one form per turn", "ambiguous turn")
    if "role" not in out and "from" in out:     # ShareGPT
        speaker = out.pop("from")
        role = SHAREGPT_ROLES.get(speaker, speaker) if isinstance(speaker, str) else speaker
        out = {"role": role, **({"content": out.pop("value")} if "value" in out else {}), **out}
    role = out.get("role")
    if not isinstance(role, str):
        fail(f"{label} has no role" if role is None else f"{label}: role is {describe_kind(role)}, not a string",
             "unknown role")
    if role not in ROLES:
        fail(f"{label}: unknown role {short_repr(role)} (roles: {', '.join(ROLES)}; ShareGPT 'from': "
             f"{', '.join(SHAREGPT_ROLES)})", "unknown role")
    for key in ("content",) + REASONING_KEYS:
        if out.get(key) is not None:
            check_text(out[key], key, lambda message, reason: fail(f"{label} ({role}): {message}", reason))
    calls = out.get("tool_calls")
    if calls is not None:
        if not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
            fail(f"{label}: tool_calls is {describe_kind(calls)}, not a list of objects", "bad tool_calls")
        if calls and role != "assistant":
            fail(f"{label} ({role}) has tool_calls; only assistant turns make tool calls", "roles out of order")
    if out.get("content") is None:
        if role != "assistant" or not (calls or reasoning_of(out)[0]):
            fail(f"{label} ({role}) has no content" + (" (null)" if "content" in out else "")
                 + (" and neither tool_calls nor reasoning" if role == "assistant" else ""), "missing")
    elif role == "assistant" and not out["content"].strip() and not calls and not reasoning_of(out)[0]:
        fail(f"{label} (assistant) is empty: no answer, reasoning or tool calls", "empty response")
    return out


def _check_order(messages: list[dict], fail) -> None:
    """Roles in an order chat templates accept; every tool turn answers a call made before it."""
    previous, pending, call_ids = None, 0, set()
    for k, turn in enumerate(messages):
        role = turn["role"]
        if role == "tool" and pending == 0:
            fail(f", turn {k}: a tool turn with no tool call before it to answer (the assistant turn before it needs "
                 f"tool_calls, one per tool turn)", "tool turn without a call")
        if role not in _NEXT[previous]:
            what = "the conversation starts with" if previous is None else \
                f"{_a(previous)} turn (turn {k - 1}) is followed by"
            fail(f", turn {k}: roles out of order: {what} {_a(role)} turn (only the first turn may be a system turn; "
                 f"user and assistant turns alternate; tool turns answer an assistant turn's tool calls)",
                 "roles out of order")
        if role == "assistant":
            calls = turn.get("tool_calls") or []
            pending, call_ids = len(calls), {c.get("id") for c in calls if isinstance(c.get("id"), str)}
        elif role == "tool":
            answers = turn.get("tool_call_id")
            if isinstance(answers, str) and call_ids and answers not in call_ids:
                fail(f", turn {k}: tool_call_id {short_repr(answers)} answers no call of the assistant turn before "
                     f"it (its calls: {', '.join(sorted(call_ids))})", "tool turn without a call")
            pending -= 1
        else:
            pending, call_ids = 0, set()
        previous = role
    if not any(turn["role"] == "assistant" for turn in messages):
        fail(" has no assistant turn (nothing to learn)", "no assistant turn")


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def _reasoning_key(turn: dict) -> str | None:
    """The field (reasoning_content or thinking) holding an assistant turn's reasoning, None when neither does."""
    return next((key for key in REASONING_KEYS if isinstance(turn.get(key), str) and turn[key].strip()), None)


def reasoning_of(turn: dict) -> tuple[str | None, str]:
    """(reasoning, answer) of an assistant turn: its reasoning field or opening <think> block; (None, content)."""
    content = turn.get("content") or ""
    key = _reasoning_key(turn)
    if key is not None:
        return turn[key], content
    match = _THINK.match(content)
    if match and match.group(2).strip():
        return match.group(2), match.group(4)
    return None, content


def with_answer(turn: dict, answer: str) -> dict:
    """A copy of an assistant turn whose answer (its content after any <think> block) is `answer`."""
    content = turn.get("content") or ""
    match = None if _reasoning_key(turn) is not None else _THINK.match(content)
    return dict(turn, content=(content[:match.start(4)] + answer) if match else answer)


def with_reasoning(turn: dict, reasoning: str) -> dict:
    """A copy of an assistant turn whose reasoning (field or <think> block, as the turn holds it) is `reasoning`."""
    key = _reasoning_key(turn)
    if key is not None:
        return dict(turn, **{key: reasoning})
    content = turn.get("content") or ""
    match = _THINK.match(content)
    return dict(turn, content=content[:match.start(2)] + reasoning + content[match.end(2):]) if match else dict(turn)
