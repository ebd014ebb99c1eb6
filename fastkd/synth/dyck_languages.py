"""dyck_languages: a prefix of a word over ( ) [ ] { } < > with 1-3 brackets left open; the
answer is the closing brackets, innermost first, space-separated.

As in BBH: 2-99 tokens (short ones most common), 1-3 open brackets at the end, the open ones
separated by balanced words, and the depth rarely back at zero before the end."""

from __future__ import annotations

import random

from fastkd.synth.common import join_coarse, join_fine, weighted

NAME = "dyck_languages"
PROMPT = "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input: "
PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
CLOSERS = {v: k for k, v in PAIRS.items()}
OPEN_AT_END = {1: 81, 2: 97, 3: 72}
# input length in tokens, by bucket of five (0-4, 5-9, ...), as counted on BBH
LENGTH_BUCKETS = {0: 31, 5: 66, 10: 36, 15: 22, 20: 11, 25: 15, 30: 8, 35: 13, 40: 3, 45: 8, 50: 3, 55: 7,
                  60: 4, 65: 2, 70: 2, 75: 3, 80: 2, 85: 2, 90: 7, 95: 5}
MAX_LENGTH = 99
EARLY_WORD_SHARE = 0.2  # share of items with a balanced word before the first open bracket


def parse(text: str) -> list[str]:
    """The bracket tokens; ValueError unless it is a BBH input whose brackets match with some left open."""
    if not text.startswith(PROMPT):
        raise ValueError(f"not a dyck_languages question: {text[:80]!r}")
    toks = text[len(PROMPT):].split(" ")
    if any(t not in PAIRS and t not in CLOSERS for t in toks):
        raise ValueError(f"unknown token in {text!r}")
    if not open_stack(toks):
        raise ValueError(f"nothing left to close in {text!r}")
    return toks


def stacks(toks: list[str]) -> list[list[str]]:
    """The stack of open brackets after each token; ValueError on a mismatched closer."""
    stack: list[str] = []
    out = []
    for i, tok in enumerate(toks):
        if tok in PAIRS:
            stack.append(tok)
        elif not stack or stack.pop() != CLOSERS[tok]:
            raise ValueError(f"token {i + 1} ({tok}) closes nothing that is open")
        out.append(list(stack))
    return out


def open_stack(toks: list[str]) -> list[str]:
    return stacks(toks)[-1] if toks else []


def closing(stack: list[str]) -> str:
    return " ".join(PAIRS[t] for t in reversed(stack))


def solve(text: str) -> str:
    return closing(open_stack(parse(text)))


# ----------------------------------------------------------------------------- generation

def _balanced(rng: random.Random, length: int) -> list[str]:
    """A random balanced word of `length` (even) tokens."""
    out: list[str] = []
    stack: list[str] = []
    for left in range(length, 0, -1):
        if stack and (len(stack) == left or rng.random() < 0.5):
            out.append(PAIRS[stack.pop()])
        else:
            stack.append(rng.choice(tuple(PAIRS)))
            out.append(stack[-1])
    return out


def _split(rng: random.Random, pairs: int, slots: int) -> list[int]:
    """`pairs` split at random among `slots` (stars and bars)."""
    cuts = sorted(rng.randint(0, pairs) for _ in range(slots - 1))
    return [b - a for a, b in zip([0] + cuts, cuts + [pairs])]


def sample_input(rng: random.Random) -> str:
    left_open = weighted(rng, OPEN_AT_END)
    start = weighted(rng, LENGTH_BUCKETS)
    length = max(2, left_open, rng.randint(start, start + 4))
    if (length - left_open) % 2:
        length += 1 if length < MAX_LENGTH else -1
    sizes = _split(rng, (length - left_open) // 2, left_open + 1)
    if rng.random() >= EARLY_WORD_SHARE:  # usually nothing before the first open bracket
        sizes[1] += sizes[0]
        sizes[0] = 0
    toks = _balanced(rng, 2 * sizes[0])
    for size in sizes[1:]:
        toks.append(rng.choice(tuple(PAIRS)))
        toks += _balanced(rng, 2 * size)
    return PROMPT + " ".join(toks)


# ----------------------------------------------------------------------------- rationales

def rationale(text: str, granularity: str) -> str:
    toks = parse(text)
    history = stacks(toks)
    target = closing(history[-1])
    final = " ".join(history[-1])
    if granularity == "coarse":
        return join_coarse(f'Matching each closing bracket with the last open one, the brackets still open '
                           f'at the end are "{final}", so we close them from the innermost out.', target)
    lines = ["We process the input one token at a time and keep track of the stack.", "0: empty stack"]
    for i, (tok, stack) in enumerate(zip(toks, history), start=1):
        lines.append(f"{i}: {tok} ; stack: {' '.join(stack) if stack else 'empty'}")
    lines.append(f'At the end the stack is "{final}"; we close it from the top down: {target}.')
    return join_fine(lines, target)
