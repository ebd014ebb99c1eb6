"""Shared pieces of the synthetic-data generators: BBH folder lookup, the answer phrase,
and the loop that draws unique inputs that are not BBH test items."""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Iterable

from fastkd import paths
from fastkd.errors import UserError

LEAD_IN = "Let's think step by step."
GRANULARITIES = ("fine", "coarse")


class SynthError(UserError, ValueError):
    """A request the generators cannot serve (unknown task, missing BBH folder, bad option)."""


class SynthShortfallWarning(UserWarning):
    """Fewer unique inputs exist (outside BBH) than were asked for; the message says how many."""


def normalise(text: str) -> str:
    """Whitespace-normalised input, the key for overlap and duplicate checks."""
    return " ".join(text.split())


def answer_sentence(target: str) -> str:
    """The closing sentence every rationale ends with, in the phrase fastkd.templates strips."""
    return f"So the answer is {target}."


def join_fine(lines: Iterable[str], target: str) -> str:
    """A fine rationale: the lead-in, one line per step, then the answer sentence."""
    return "\n".join([LEAD_IN, *lines, answer_sentence(target)])


def join_coarse(sentence: str, target: str) -> str:
    """A coarse rationale: the lead-in, one summarising sentence, the answer sentence."""
    return f"{LEAD_IN} {sentence} {answer_sentence(target)}"


# ----------------------------------------------------------------------------- BBH items

def resolve_bbh_dir(path: str | os.PathLike | None = None, tasks=()) -> Path | None:
    """The BBH folder holding the task files (fastkd.paths.bbh_candidates says where it looks); None
    when nothing is found, an error when an explicit folder lacks them."""
    try:
        return paths.resolve_bbh_dir(path, tasks)
    except UserError as err:
        raise SynthError(str(err)) from None


def load_real_items(task: str, bbh_dir: str | os.PathLike | None = None) -> list[dict]:
    """The real BBH items of a task as a list of {input, target}; raises if absent."""
    folder = resolve_bbh_dir(bbh_dir, [task])
    if folder is None:
        raise SynthError(f"no BBH items of {task} found, which are needed to reject generated inputs that equal "
                         f"BBH test items; {paths.bbh_get_hint()}")
    path = paths.bbh_task_file(folder, task)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SynthError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    items = data.get("examples") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise SynthError(f"{path}: expected an object with an 'examples' list")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("input"), str) or not isinstance(item.get("target"), str):
            raise SynthError(f"{path}: example {i}: fields 'input' and 'target' must be strings")
    return items


# ----------------------------------------------------------------------------- unique draws

def draw_unique(task: str, n: int, rng: random.Random, sample: Callable[[random.Random], str],
                banned: set[str], universe: Callable[[], list[str]] | None = None,
                patience: int = 20000) -> list[str]:
    """n distinct inputs, none equal (after whitespace normalisation) to a banned one.

    With `universe` (every possible input, for small spaces) the result is a seeded shuffle
    of it; otherwise inputs are drawn until n are found or `patience` draws in a row bring
    nothing new. A shortfall is reported as a SynthShortfallWarning, never a silent loop."""
    if n <= 0:
        return []
    if universe is not None:
        pool = sorted({normalise(x): x for x in universe() if normalise(x) not in banned}.values())
        rng.shuffle(pool)
        if n > len(pool):
            warnings.warn(f"{task}: only {len(pool)} unique inputs exist outside the BBH test items; "
                          f"returning {len(pool)} of the {n} asked", SynthShortfallWarning, stacklevel=3)
        return pool[:n]
    seen: set[str] = set()
    out: list[str] = []
    misses = 0
    while len(out) < n and misses < patience:
        text = sample(rng)
        key = normalise(text)
        if key in seen or key in banned:
            misses += 1
            continue
        seen.add(key)
        out.append(text)
        misses = 0
    if len(out) < n:
        warnings.warn(f"{task}: found only {len(out)} unique inputs outside the BBH test items after "
                      f"{patience} fruitless draws in a row; returning {len(out)} of the {n} asked",
                      SynthShortfallWarning, stacklevel=3)
    return out


def weighted(rng: random.Random, weights: dict) -> object:
    """One key of `weights`, drawn with probability proportional to its value."""
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]
