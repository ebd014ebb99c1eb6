"""boolean_expressions: `<8 tokens of True/False/not/and/or/brackets> is`, answer True or False.

Every BBH item is one of the 2,122 grammatical expressions of exactly 8 tokens, drawn
uniformly; the generator shuffles that whole set, so its distribution matches by construction."""

from __future__ import annotations

import functools
import random

from fastkd.synth.common import join_coarse, join_fine

NAME = "boolean_expressions"
LENGTH = 8  # tokens before the trailing "is" in every BBH item
VALUES = ("True", "False")


# ----------------------------------------------------------------------------- parsing

def tokens(text: str) -> list[str]:
    """The expression's tokens (without the trailing `is`); raises ValueError when malformed."""
    toks = text.split()
    if not toks or toks[-1] != "is":
        raise ValueError(f"boolean expression must end with ' is': {text!r}")
    toks = toks[:-1]
    bad = [t for t in toks if t not in ("True", "False", "not", "and", "or", "(", ")")]
    if bad:
        raise ValueError(f"unknown token {bad[0]!r} in {text!r}")
    return toks


def parse(text: str):
    """AST of nested tuples: ('val', bool) | ('not', e) | ('and'|'or', a, b); ValueError if malformed.

    Precedence from high to low: brackets, not, and, or (Python's), left-associative."""
    toks = tokens(text)
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take(expected=None):
        nonlocal pos
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise ValueError(f"expected {expected or 'a token'} at token {pos} of {text!r}")
        pos += 1
        return tok

    def or_expr():
        node = and_expr()
        while peek() == "or":
            take()
            node = ("or", node, and_expr())
        return node

    def and_expr():
        node = not_expr()
        while peek() == "and":
            take()
            node = ("and", node, not_expr())
        return node

    def not_expr():
        if peek() == "not":
            take()
            return ("not", not_expr())
        return atom()

    def atom():
        tok = take()
        if tok in VALUES:
            return ("val", tok == "True")
        if tok == "(":
            node = or_expr()
            take(")")
            return node
        raise ValueError(f"unexpected {tok!r} at token {pos - 1} of {text!r}")

    tree = or_expr()
    if pos != len(toks):
        raise ValueError(f"trailing tokens from token {pos} of {text!r}")
    return tree


def evaluate(node) -> bool:
    kind = node[0]
    if kind == "val":
        return node[1]
    if kind == "not":
        return not evaluate(node[1])
    left, right = evaluate(node[1]), evaluate(node[2])
    return (left and right) if kind == "and" else (left or right)


def solve(text: str) -> str:
    """`True` or `False`, the BBH target."""
    return str(evaluate(parse(text)))


# ----------------------------------------------------------------------------- generation

@functools.lru_cache(maxsize=None)
def _expressions(length: int) -> frozenset:
    """Every token tuple of exactly `length` tokens derivable from
    E := True | False | not E | E and E | E or E | ( E )."""
    out = set()
    if length == 1:
        out.update((v,) for v in VALUES)
    if length >= 2:
        out.update(("not",) + e for e in _expressions(length - 1))
    if length >= 3:
        out.update(("(",) + e + (")",) for e in _expressions(length - 2))
        for left_len in range(1, length - 1):
            for left in _expressions(left_len):
                for right in _expressions(length - 1 - left_len):
                    out.add(left + ("and",) + right)
                    out.add(left + ("or",) + right)
    return frozenset(out)


def all_inputs() -> list[str]:
    """All 2,122 inputs in BBH's format, sorted."""
    return sorted(" ".join(e) + " is" for e in _expressions(LENGTH))


def sample_input(rng: random.Random) -> str:
    return rng.choice(all_inputs())


# ----------------------------------------------------------------------------- rationales

def _innermost_group(toks: list[str]) -> tuple[int, int]:
    """(start, end) of the first bracket pair with no bracket inside, end exclusive and
    including the brackets; the whole list when there are no brackets."""
    opened = None
    for i, tok in enumerate(toks):
        if tok == "(":
            opened = i
        elif tok == ")":
            return opened, i + 1
    return 0, len(toks)


def reduce_once(toks: list[str]) -> tuple[str, str, list[str]]:
    """One evaluation step: (the sub-expression reduced, its value, the new token list).

    Inside the innermost bracket group (or the whole flat expression): a `not` applied to a
    value first, then the leftmost `and`, then the leftmost `or`; a group holding a single
    value loses its brackets."""
    start, end = _innermost_group(toks)
    bracketed = start < end and toks[start] == "(" and toks[end - 1] == ")"
    lo, hi = (start + 1, end - 1) if bracketed else (start, end)
    inner = toks[lo:hi]
    if len(inner) == 1:
        if not bracketed:
            raise ValueError("already reduced")
        return " ".join(toks[start:end]), inner[0], toks[:start] + inner + toks[end:]
    for i in range(len(inner) - 1):
        if inner[i] == "not" and inner[i + 1] in VALUES:
            value = str(inner[i + 1] == "False")
            return f"not {inner[i + 1]}", value, toks[:lo + i] + [value] + toks[lo + i + 2:]
    for op in ("and", "or"):
        for i in range(1, len(inner) - 1):
            if inner[i] == op:
                a, b = inner[i - 1] == "True", inner[i + 1] == "True"
                value = str((a and b) if op == "and" else (a or b))
                return " ".join(inner[i - 1:i + 2]), value, toks[:lo + i - 1] + [value] + toks[lo + i + 2:]
    raise ValueError(f"cannot reduce {' '.join(toks)!r}")


def reduction_steps(text: str) -> list[tuple[str, str, str]]:
    """The whole evaluation as (sub-expression, value, expression after the step) triples."""
    toks = tokens(text)
    steps = []
    while len(toks) > 1:
        part, value, toks = reduce_once(toks)
        steps.append((part, value, " ".join(toks)))
    return steps


def rationale(text: str, granularity: str) -> str:
    target = solve(text)
    expr = " ".join(tokens(text))
    if granularity == "coarse":
        return join_coarse(f'Evaluating brackets first, then "not", then "and", then "or", '
                           f"{expr} = {target}.", target)
    lines = ['Brackets go first; then "not", then "and", then "or".', f"Z = {expr}."]
    lines += [f"{part} = {value}, so Z = {after}." for part, value, after in reduction_steps(text)]
    return join_fine(lines, target)
