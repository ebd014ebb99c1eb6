"""Conversation records (messages form): validation, and loss masks from chat templates of the kinds real
models ship, each checked against hand-written or independently computed assistant texts."""

import json

import numpy as np
import pytest

from fastkd.chat_masks import check_student_template, describe, template_sha256
from fastkd.errors import UserError
from fastkd.records import DataError, FieldMap
from fastkd.templates import BuildReport, Template, build_example, build_examples

# ----------------------------------------------------------------------------- templates, in their models' style

# ChatML as Qwen2.5 writes it: a default system prompt when none is given, tool calls as <tool_call> JSON, tool
# results in a user turn; the reasoning (when given) in a <think> block. GEN_OPEN / GEN_CLOSE become
# {% generation %} / {% endgeneration %} in the marked variant and nothing in the other: both render the same text.
CHATML = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}GEN_OPEN"
    "{%- if message.reasoning_content %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + tool_call.arguments | tojson"
    " + '}\\n</tool_call>' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>' }}GEN_CLOSE{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CHATML_PLAIN = CHATML.replace("GEN_OPEN", "").replace("GEN_CLOSE", "")
CHATML_MARKED = CHATML.replace("GEN_OPEN", "{% generation %}").replace("GEN_CLOSE", "{% endgeneration %}")

# Qwen3's way: the reasoning (reasoning_content, or a <think> block opening the content) is shown only for the
# assistant turns after the last user turn; the last turn always gets a <think> block (empty when it has none).
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- set ns = namespace(last_query=-1) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + tool_call.arguments | tojson"
    " + '}\\n</tool_call>' }}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Llama 3.1's way: BOS, a system header always present (with a knowledge-date line), header tokens per turn,
# content trimmed, a tool call as the whole assistant message (one call only: more is the template's own error).
LLAMA3 = (
    "{{- bos_token }}{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{%- if message.tool_calls | length != 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + call.name + '\", \"parameters\": ' }}"
    "{{- call.arguments | tojson + '}<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")

# DeepSeek-R1's way: every assistant turn's <think> block is cut from the content, and the generation prompt
# opens one (so it is not the header the turns are rendered with).
DEEPSEEK_R1 = (
    "{{- bos_token }}{%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{{- '<\uff5cUser\uff5c>' + message.content }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content or '' %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<\uff5cAssistant\uff5c>' + content + '<\uff5cend\u2581of\u2581sentence\uff5c>' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<\uff5cAssistant\uff5c><think>\\n' }}{%- endif %}")

# Mistral's first way: no generation prompt at all (the assistant's text follows [/INST] directly), user and
# assistant turns only, strictly alternating (anything else is the template's own error).
MISTRAL = (
    "{{- bos_token }}{%- for message in messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message.role == 'user' %}{{- '[INST] ' + message.content + ' [/INST]' }}"
    "{%- elif message.role == 'assistant' %}{{- message.content + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}{%- endfor %}")

# Phi-3's way: EOS after a conversation rendered without a generation prompt. The end of the turns before an
# assistant turn is then unlike its start in the whole conversation, so only generation markers can place it.
PHI3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|' + message.role + '|>\n' }}"
        "{%- if message.role == 'assistant' %}{% generation %}{{- message.content + '<|end|>' }}{% endgeneration %}"
        "{%- else %}{{- message.content + '<|end|>' }}{%- endif %}{{- '\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- else %}{{- eos_token }}{%- endif %}")

# A template that ends the last turn unlike the others: no span found turn by turn is consistent with the whole.
INCONSISTENT = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}"
    "{%- if loop.last %}{{- '<|im_end|>' }}{%- else %}{{- '<|endoftext|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
           "<tool_response>", "</tool_response>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>",
           "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"]
WORDS = ["True", "False", "and", "or", "not", "the", "answer", "is", "Yes", "No", "step", "plus", "5", "It", "tool"]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE tokenizer with the templates' control tokens as special tokens, and a BOS."""
    from fastkd.tiny import DEFAULT_CORPUS, train_tokenizer

    tok = train_tokenizer(DEFAULT_CORPUS + [" ".join(WORDS), "You are a helpful assistant. Cutting Knowledge Date"])
    tok.add_tokens(SPECIAL, special_tokens=True)
    tok.bos_token = "<|begin_of_text|>"
    return tok


def using(tok, template: str):
    tok.chat_template = template
    return tok


def masked_texts(tok, ids, mask) -> list[str]:
    """The decoded runs of loss tokens."""
    runs, run = [], []
    for token, m in zip(list(ids) + [None], list(mask) + [0]):
        if m:
            run.append(token)
        elif run:
            runs.append(tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            run = []
    return runs


def example(tok, conversation, loss_turns="all", tmp_path=None, **kw):
    """One conversation through build_example (validated the way build_examples validates it)."""
    from fastkd.conversations import validate_conversation

    rec = validate_conversation({"messages": conversation}, 0, FieldMap(), "test.jsonl")
    return build_example(rec, 0, tok, Template(loss_turns=loss_turns), **kw)


CALL = {"type": "function", "id": "c1", "function": {"name": "add", "arguments": {"a": 5, "b": 1}}}
CONV = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "It is 5.", "reasoning_content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 5 plus 1?"},
    {"role": "assistant", "content": None, "reasoning_content": "Use the tool.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "6"},
    {"role": "assistant", "content": "<think>The tool says 6.</think>It is 6."},
]
CALL_TEXT = '<tool_call>\n{"name": "add", "arguments": {"a": 5, "b": 1}}\n</tool_call>'


# ----------------------------------------------------------------------------- masks against hand-written texts

CHATML_TURNS = ["<think>\n2 plus 3 is 5.\n</think>\n\nIt is 5.<|im_end|>",
                "<think>\nUse the tool.\n</think>\n\n" + CALL_TEXT + "<|im_end|>",
                "<think>The tool says 6.</think>It is 6.<|im_end|>"]
EXPECTED = {   # template -> loss_turns -> the assistant texts that carry loss
    "chatml": {"all": CHATML_TURNS, "last": CHATML_TURNS[2:],
               "reasoning": ["<think>\n2 plus 3 is 5.\n</think>\n\n", "<think>\nUse the tool.\n</think>\n\n",
                             "<think>The tool says 6.</think>"],
               "answer": ["It is 5.<|im_end|>", CALL_TEXT + "<|im_end|>", "It is 6.<|im_end|>"]},
    # the first turn's reasoning is dropped (a user turn follows it); the later two keep theirs
    "qwen3": {"all": ["It is 5.<|im_end|>", "<think>\nUse the tool.\n</think>\n\n" + CALL_TEXT + "<|im_end|>",
                      "<think>\nThe tool says 6.\n</think>\n\nIt is 6.<|im_end|>"],
              "last": ["<think>\nThe tool says 6.\n</think>\n\nIt is 6.<|im_end|>"],
              "reasoning": ["<think>\nUse the tool.\n</think>\n\n", "<think>\nThe tool says 6.\n</think>\n\n"],
              "answer": ["It is 5.<|im_end|>", CALL_TEXT + "<|im_end|>", "It is 6.<|im_end|>"]},
    # reasoning_content is not rendered at all; the <think> block in the content is, verbatim
    "llama3": {"all": ["It is 5.<|eot_id|>", '{"name": "add", "parameters": {"a": 5, "b": 1}}<|eot_id|>',
                       "<think>The tool says 6.</think>It is 6.<|eot_id|>"],
               "last": ["<think>The tool says 6.</think>It is 6.<|eot_id|>"],
               "reasoning": ["<think>The tool says 6.</think>"],
               "answer": ["It is 5.<|eot_id|>", '{"name": "add", "parameters": {"a": 5, "b": 1}}<|eot_id|>',
                          "It is 6.<|eot_id|>"]},
}
TEMPLATES = {"chatml": CHATML_PLAIN, "chatml-marked": CHATML_MARKED, "qwen3": QWEN3, "llama3": LLAMA3}


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("loss_turns", ["all", "last", "reasoning", "answer"])
def test_masks_are_the_assistant_texts(tok, name, loss_turns):
    using(tok, TEMPLATES[name])
    ex = example(tok, CONV, loss_turns)
    assert masked_texts(tok, ex.input_ids, ex.loss_mask) == EXPECTED[name.split("-")[0]][loss_turns]
    # the ids are the template's own tokenisation of the whole conversation
    assert ex.input_ids == tok.apply_chat_template(CONV, tokenize=True, return_dict=False)


def test_default_system_prompt_and_header_carry_no_loss(tok):
    """Qwen2.5's injected system prompt and Llama 3's system header (with BOS) are prompt, never loss."""
    conv = [{"role": "user", "content": "Yes or No"}, {"role": "assistant", "content": "Yes"}]
    for template, injected, turn in ((CHATML_PLAIN, "You are a helpful assistant.", "Yes<|im_end|>"),
                                     (LLAMA3, "Cutting Knowledge Date", "Yes<|eot_id|>")):
        ex = example(using(tok, template), conv)
        prompt = tok.decode(ex.input_ids[:ex.loss_mask.index(1)], skip_special_tokens=False)
        assert injected in prompt and prompt.endswith("assistant\n" if template == CHATML_PLAIN else "\n\n")
        assert masked_texts(tok, ex.input_ids, ex.loss_mask) == [turn]


def test_template_without_generation_prompt(tok, tmp_path):
    """Mistral's [INST] template has no assistant header: each turn starts where the turns before it end."""
    using(tok, MISTRAL)
    conv = [CONV[0], {"role": "assistant", "content": " It is 5."}, CONV[2], {"role": "assistant", "content": " 6"}]
    ex = example(tok, conv)
    assert masked_texts(tok, ex.input_ids, ex.loss_mask) == [" It is 5.<|endoftext|>", " 6<|endoftext|>"]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "s"}] + conv}])
    with pytest.raises(DataError, match="record 0 .line 1.: the chat template of .* failed to render this "
                                        "conversation: TemplateError: Conversation roles must alternate"):
        build_examples(path, tok, Template())


def test_template_that_drops_every_reasoning_and_opens_think_in_its_prompt(tok):
    """DeepSeek-R1's template: the turn header is the generation prompt up to its <think>; no reasoning is
    rendered, so --loss-turns reasoning leaves nothing (the record is skipped, counted)."""
    using(tok, DEEPSEEK_R1)
    conv = CONV[:3] + [{"role": "assistant", "content": "<think>R2</think>It is 6."}]
    eos = "<\uff5cend\u2581of\u2581sentence\uff5c>"
    ex = example(tok, conv, "all")
    assert masked_texts(tok, ex.input_ids, ex.loss_mask) == ["It is 5." + eos, "It is 6." + eos]
    assert example(tok, conv, "reasoning") is None


# ----------------------------------------------------------------------------- random conversations, a reference

def _words(rng, lo=1, hi=8) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi))))


def _assistant(rng, content, calls=None) -> dict:
    turn = {"role": "assistant", "content": content}
    kind = rng.integers(3)      # no reasoning, a reasoning_content field, a <think> block opening the content
    if kind == 1 or (kind == 2 and content is None):
        turn["reasoning_content"] = _words(rng)
    elif kind == 2:
        turn["content"] = f"<think>{_words(rng)}</think>{content}"
    if calls:
        turn["tool_calls"] = calls
    return turn


def random_conversation(rng) -> list[dict]:
    """A system turn or not, 1-3 user questions each answered after 0-2 rounds of 1-2 tool calls."""
    messages = [{"role": "system", "content": _words(rng)}] if rng.random() < 0.5 else []
    for q in range(int(rng.integers(1, 4))):
        messages.append({"role": "user", "content": _words(rng)})
        for r in range(int(rng.integers(0, 3))):
            calls = [{"type": "function", "id": f"c{q}{r}{j}",
                      "function": {"name": "add", "arguments": {"a": int(rng.integers(9)), "b": int(rng.integers(9))}}}
                     for j in range(int(rng.integers(1, 3)))]
            messages.append(_assistant(rng, _words(rng) if rng.random() < 0.5 else None, calls))
            messages += [{"role": "tool", "tool_call_id": c["id"], "content": _words(rng)} for c in calls]
        messages.append(_assistant(rng, _words(rng)))
    return messages


def _call(call) -> str:
    f = call["function"]
    return '<tool_call>\n{"name": "' + f["name"] + '", "arguments": ' + json.dumps(f["arguments"]) + "}\n</tool_call>"


def _split_think(turn):
    """(reasoning, answer) as the record holds them (the templates' own reading of a <think> block)."""
    content = turn.get("content") or ""
    if turn.get("reasoning_content"):
        return turn["reasoning_content"], content
    if "</think>" in content:
        return content.split("</think>")[0].split("<think>")[-1], content.split("</think>")[-1]
    return "", content


def reference_render(kind: str, messages: list[dict]):
    """The text the CHATML or QWEN3 template renders, written in Python from their rules, and each assistant
    turn's (start, answer, end) character span."""
    text, turns = "", []
    last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
    if messages[0]["role"] == "system":
        text += f"<|im_start|>system\n{messages[0]['content']}<|im_end|>\n"
    elif kind == "chatml":
        text += "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for i, m in enumerate(messages):
        if m["role"] == "user" or (m["role"] == "system" and i):
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        elif m["role"] == "tool":
            text += "<|im_start|>user" if messages[i - 1]["role"] != "tool" else ""
            text += f"\n<tool_response>\n{m['content']}\n</tool_response>"
            text += "<|im_end|>\n" if i == len(messages) - 1 or messages[i + 1]["role"] != "tool" else ""
        elif m["role"] == "assistant":
            text += "<|im_start|>assistant\n"
            start = len(text)
            reasoning, answer = _split_think(m)
            if kind == "chatml":
                if m.get("reasoning_content"):
                    text += f"<think>\n{reasoning}\n</think>\n\n"
                elif reasoning:
                    text += f"<think>{reasoning}</think>"
                content = answer
            else:
                content = answer
                if i > last_query and (i == len(messages) - 1 or reasoning):
                    text += f"<think>\n{reasoning}\n</think>\n\n"
            at = len(text) if reasoning and len(text) > start else start
            text += content
            for j, call in enumerate(m.get("tool_calls") or []):
                text += ("\n" if content or j else "") + _call(call)
            text += "<|im_end|>"
            turns.append((start, at, len(text)))
            text += "\n"
    return text, turns


def expected_texts(text, turns, loss_turns) -> list[str]:
    if loss_turns == "last":
        turns = turns[-1:]
    if loss_turns == "reasoning":
        return [text[s:a] for s, a, e in turns if a > s]
    return [text[a if loss_turns == "answer" else s:e] for s, a, e in turns]


@pytest.mark.parametrize("name, kind", [("chatml", "chatml"), ("chatml-marked", "chatml"), ("qwen3", "qwen3")])
def test_random_conversations_match_the_reference_renderer(tok, name, kind):
    """Fresh random conversations (tool rounds, reasoning as a field or a <think> block, a system turn or
    not): the text and every loss_turns mask agree with the Python renderer's spans."""
    using(tok, TEMPLATES[name])
    rng = np.random.default_rng()
    for _ in range(12):
        conversation = random_conversation(rng)
        text, turns = reference_render(kind, conversation)
        assert tok.apply_chat_template(conversation, tokenize=False) == text
        for loss_turns in ("all", "last", "reasoning", "answer"):
            ex = example(tok, conversation, loss_turns)
            want = expected_texts(text, turns, loss_turns)
            got = masked_texts(tok, ex.input_ids, ex.loss_mask) if ex is not None else []
            assert got == want, (conversation, loss_turns)


def test_marked_and_turn_by_turn_spans_agree(tok):
    """The same template with and without {% generation %}: the two ways of finding spans give one mask."""
    rng = np.random.default_rng()
    for _ in range(8):
        conversation = random_conversation(rng)
        for loss_turns in ("all", "reasoning", "answer"):
            masks = [example(using(tok, t), conversation, loss_turns) for t in (CHATML_PLAIN, CHATML_MARKED)]
            assert (masks[0] is None and masks[1] is None) or masks[0].loss_mask == masks[1].loss_mask


# ----------------------------------------------------------------------------- templates that cannot be used

def test_inconsistent_template_is_refused_naming_it_and_the_fix(tok, tmp_path):
    using(tok, INCONSISTENT)
    tok.name_or_path = "org/odd-template"
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV[:3] + [{"role": "assistant", "content": "Yes"}]}])
    with pytest.raises(DataError) as err:
        build_examples(path, tok, Template())
    message = str(err.value)
    assert f"{path}: record 0 (line 1)" in message and "org/odd-template" in message and "assistant turn 0" in message
    assert "{% generation %}" in message and "\n" not in message


def test_template_that_ends_conversations_with_eos_needs_generation_markers(tok, tmp_path):
    conv = CONV[:3] + [{"role": "assistant", "content": "It is 6."}]
    ex = example(using(tok, PHI3), conv)
    assert masked_texts(tok, ex.input_ids, ex.loss_mask) == ["It is 5.<|end|>", "It is 6.<|end|>"]
    unmarked = PHI3.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    with pytest.raises(DataError, match="assistant turn 0 .*add {% generation %}"):
        example(using(tok, unmarked), conv)


def test_template_that_raises_is_one_line_naming_template_and_record(tok, tmp_path):
    """Llama 3's template refuses two tool calls in one turn (its own raise_exception)."""
    using(tok, LLAMA3)
    tok.name_or_path = "meta/llama-like"
    two_calls = CONV[:3] + [{"role": "assistant", "content": None, "tool_calls": [CALL, dict(CALL, id="c2")]},
                            {"role": "tool", "content": "6"}, {"role": "tool", "content": "6"},
                            {"role": "assistant", "content": "It is 6."}]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}, {"messages": two_calls}])
    with pytest.raises(DataError) as err:
        build_examples(path, tok, Template())
    assert str(err.value).startswith(f"{path}: record 1 (line 2): the chat template of meta/llama-like failed")
    assert "single tool-calls" in str(err.value) and "\n" not in str(err.value)
    report = BuildReport()
    assert len(build_examples(path, tok, Template(), skip_bad=True, report=report)) == 1
    assert report.skipped == {"template failed": 1}


def test_tokenizer_without_chat_template_is_refused(tok, tmp_path):
    using(tok, None)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}])
    with pytest.raises(UserError, match="has none: set tokenizer.chat_template"):
        build_examples(path, tok, Template(), skip_bad=True)


# ----------------------------------------------------------------------------- records: forms, fields, bad input

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_conversations_from_jsonl_json_and_parquet_beside_the_other_form(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    using(tok, CHATML_PLAIN)
    records = [{"messages": CONV, "task": "add"}, {"source": "True or False is", "rationale": "or.", "target": "True"}]
    want = example(tok, CONV).input_ids
    write_jsonl(tmp_path / "c.jsonl", records)
    (tmp_path / "c.json").write_text(json.dumps(records))
    keys = ("messages", "task", "source", "rationale", "target")    # one schema: absent fields are null
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in records]), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.json", "c.parquet"):
        report = BuildReport()
        chat, cot = build_examples(tmp_path / name, tok, Template(), report=report)
        assert chat.input_ids == want and chat.task == "add" and cot.input_ids[:2] == tok("Q:")["input_ids"][:2]
        assert report.conversations == describe(tok, "all") and report.kept == 2


def test_sharegpt_turns_and_another_field_name(tok, tmp_path):
    using(tok, CHATML_PLAIN)
    role = {"user": "human", "assistant": "gpt"}
    turns = CONV[:3] + [{"role": "assistant", "content": "No"}]
    sharegpt = [{"from": role[m["role"]], "value": m["content"]} for m in turns]
    path = write_jsonl(tmp_path / "c.jsonl", [{"conversations": sharegpt}])
    [ex] = build_examples(path, tok, Template(), FieldMap(messages="conversations"))
    assert masked_texts(tok, ex.input_ids, ex.loss_mask) == ["It is 5.<|im_end|>", "No<|im_end|>"]
    with pytest.raises(DataError, match="field 'source' is missing.*pass --messages-field conversations"):
        build_examples(path, tok, Template())


A, U = {"role": "assistant", "content": "Yes"}, {"role": "user", "content": "Yes or No"}
BAD = [
    ([], "no assistant turn", "is an empty list"),
    ([U], "no assistant turn", "has no assistant turn"),
    ([{"role": "system", "content": "s"}, A], "roles out of order",
     "turn 1: roles out of order: a system turn (turn 0) is followed by an assistant turn"),
    ([A, U, A], "roles out of order", "turn 0: roles out of order: the conversation starts with an assistant turn"),
    ([U, U, A], "roles out of order", "turn 1: roles out of order: a user turn (turn 0) is followed by a user turn"),
    ([U, A, A], "roles out of order", "turn 2: roles out of order: an assistant turn (turn 1) is followed by an"),
    ([U, A, U, {"role": "system", "content": "s"}, A], "roles out of order", "turn 3"),
    ([U, A, {"role": "tool", "content": "6"}], "tool turn without a call", "turn 2: a tool turn with no tool call"),
    ([U, dict(A, tool_calls=[CALL]), {"role": "tool", "content": "6"}, {"role": "tool", "content": "7"}, A],
     "tool turn without a call", "turn 3: a tool turn with no tool call"),
    ([U, dict(A, tool_calls=[CALL]), {"role": "tool", "tool_call_id": "zz", "content": "6"}, A],
     "tool turn without a call", "tool_call_id 'zz' answers no call"),
    ([U, {"role": "assistant", "content": [{"type": "text", "text": "Yes"}]}], "not a string",
     "turn 1 (assistant): content is list, not a string"),
    ([U, {"role": "assistant", "content": None}], "missing",
     "turn 1 (assistant) has no content (null) and neither tool_calls nor reasoning"),
    ([U, {"role": "assistant"}], "missing", "turn 1 (assistant) has no content and neither"),
    ([U, {"role": "assistant", "content": "  "}], "empty response", "turn 1 (assistant) is empty"),
    ([U, dict(A, reasoning_content=3)], "not a string", "reasoning_content is int"),
    ([{"role": "bot", "content": "x"}, A], "unknown role", "turn 0: unknown role 'bot'"),
    ([{"from": "robot", "value": "x"}, A], "unknown role", "unknown role 'robot'"),
    ([{"content": "x"}, A], "unknown role", "turn 0 has no role"),
    ([U, dict(A, **{"from": "gpt", "value": "No"})], "ambiguous turn", "turn 1 has both 'role' and its ShareGPT twin"),
    ([U, dict(A, value="No")], "ambiguous turn", "turn 1 has both 'content' and its ShareGPT twin 'value'"),
    ([U, dict(A, content="a\x00b")], "invalid text", "turn 1 (assistant): content holds a NUL"),
    ([dict(U, tool_calls=[CALL]), A], "roles out of order", "only assistant turns make tool calls"),
    ("not a list", "not a list", "is str, not a list of turns"),
    ([U, "text"], "expected an object", "turn 1 is str, not an object"),
]


@pytest.mark.parametrize("messages, reason, text", BAD)
def test_bad_conversation_names_file_record_field_and_turn(tok, tmp_path, messages, reason, text):
    using(tok, CHATML_PLAIN)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}, {"messages": messages}])
    with pytest.raises(DataError) as err:
        build_examples(path, tok, Template())
    assert str(err.value).startswith(f"{path}: record 1 (line 2): field 'messages'") and text in str(err.value)
    report = BuildReport()
    assert [e.record_index for e in build_examples(path, tok, Template(), skip_bad=True, report=report)] == [0]
    assert report.skipped == {reason: 1}


@pytest.mark.parametrize("extra, reason, text", [
    ({"task": 3}, "bad task", "field 'task' is int, not a string"),
    ({"task": "ad\ud800d"}, "invalid text", "field 'task' holds a lone surrogate \\ud800 (at character 2)"),
    ({"tools": "add"}, "bad tools", "field 'tools' is str, not a list of tool definitions")])
def test_bad_task_or_tools_beside_the_messages(tok, tmp_path, extra, reason, text):
    """The record's other fields follow the first form's rules, a task's text included."""
    using(tok, CHATML_PLAIN)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}, {"messages": CONV, **extra}])
    with pytest.raises(DataError) as err:
        build_examples(path, tok, Template())
    assert str(err.value).startswith(f"{path}: record 1 (line 2): {text}")
    report = BuildReport()
    assert [e.record_index for e in build_examples(path, tok, Template(), skip_bad=True, report=report)] == [0]
    assert report.skipped == {reason: 1}


def test_truncation_cuts_the_end_and_skips_what_has_no_loss_left(tok, tmp_path):
    using(tok, CHATML_PLAIN)
    full = example(tok, CONV)
    first_loss = full.loss_mask.index(1)
    cut = example(tok, CONV, max_length=first_loss + 3)
    assert cut.truncated and cut.input_ids == full.input_ids[:first_loss + 3] and cut.loss_mask[-3:] == [1, 1, 1]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONV}] * 2)
    for max_length, overflow, skipped in ((first_loss, "truncate", {"too long": 2}), (len(full.input_ids) - 1, "skip",
                                                                                     {"too long": 2})):
        report = BuildReport()
        assert build_examples(path, tok, Template(), max_length=max_length, overflow=overflow, report=report) == []
        assert report.skipped == skipped
    report = BuildReport()
    build_examples(path, tok, Template(loss_turns="reasoning"), report=report)
    assert report.kept == 2
    using(tok, LLAMA3)   # renders no reasoning_content, and this conversation has no <think> block
    build_examples(write_jsonl(tmp_path / "d.jsonl", [{"messages": CONV[:2]}]), tok, Template(loss_turns="reasoning"),
                   report=(report := BuildReport()))
    assert report.skipped == {"no loss tokens": 1}


# ----------------------------------------------------------------------------- what the cache records

def test_describe_and_the_student_template_check(tok):
    using(tok, CHATML_PLAIN)
    described = dict(Template().describe(describe(tok, "last")), chat_template_sha256=template_sha256(tok))
    assert described["messages"] == {"kind": "messages", "loss_turns": "last", "spans": "turn by turn"}
    assert "messages" not in Template().describe()
    assert describe(using(tok, CHATML_MARKED), "all")["spans"] == "generation markers"
    check_student_template(described, using(tok, CHATML_PLAIN), "cache c")
    check_student_template({"cot": True}, using(tok, QWEN3), "cache c")       # no conversations: nothing to check
    with pytest.raises(DataError) as err:
        check_student_template(described, tok, "cache c")
    assert str(err.value).startswith("cache c: the cache's conversations were rendered with chat template sha256 "
                                     f"{template_sha256(using(tok, CHATML_PLAIN))[:12]}")
    assert f"has chat template sha256 {template_sha256(using(tok, QWEN3))[:12]}" in str(err.value)
    with pytest.raises(DataError, match="has no chat template"):
        check_student_template(described, using(tok, None), "cache c")


def test_student_check_covers_chat_template_prompts_when_their_digest_is_recorded(tok):
    using(tok, CHATML_PLAIN)
    settings = dict(Template(chat=True).describe(), chat_template_sha256=template_sha256(tok))
    check_student_template(settings, tok, "cache c")
    check_student_template(dict(settings, chat=False), using(tok, QWEN3), "cache c")   # no chat text: not checked
    with pytest.raises(DataError, match="cache c: the cache's prompts were rendered with chat template sha256"):
        check_student_template(settings, tok, "cache c")
