"""Shared pieces of the synthetic-data generators: BBH folder lookup, the answer phrase,
and the loop that draws unique inputs that are not BBH test items."""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path
from typing import Callable, Iterable

from fastkd.errors import UserError

LEAD_IN = "Let's think step by step."
GRANULARITIES = ("fine", "coarse")
BBH_DIR_ENV = "FASTKD_BBH_DIR"


class SynthError(UserError, ValueError):
    """A request the generators cannot serve (unknown task, missing BBH folder, bad option)."""


class SynthShortfallWarning(UserWarning):
    """Fewer unique inputs exist (outside BBH) than were asked for; the message says how many."""


def normalise(text: str) -> str:
    """Whitespace-normalised input, the key for overlap and duplicate checks."""
    return " ".join(text.split())


def answer_sentence(target: str) -> str:
    """The closing sentence every rationale ends with, in the phrase fastkd.data strips."""
    return f"So the answer is {target}."


def join_fine(lines: Iterable[str], target: str) -> str:
    """A fine rationale: the lead-in, one line per step, then the answer sentence."""
    return "\n".join([LEAD_IN, *lines, answer_sentence(target)])


def join_coarse(sentence: str, target: str) -> str:
    """A coarse rationale: the lead-in, one summarising sentence, the answer sentence."""
    return f"{LEAD_IN} {sentence} {answer_sentence(target)}"


# ----------------------------------------------------------------------------- BBH items

def _candidates() -> list[Path]:
    """Where the real BBH task files may lie when no folder is given."""
    repo = Path(__file__).resolve().parents[2]
    return [repo.parent / "shared" / "bbh", Path.cwd().parent / "shared" / "bbh", Path.cwd() / "bbh"]


def resolve_bbh_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The folder that holds `<task>.json` files: the argument, else $FASTKD_BBH_DIR, else
    ../shared/bbh next to the repository; a folder with a `bbh/` subfolder is accepted too.
    None when nothing is found (an explicit path that does not exist raises)."""
    explicit = path if path is not None else os.environ.get(BBH_DIR_ENV) or None
    options = [Path(explicit)] if explicit else _candidates()
    for base in options:
        for folder in (base, base / "bbh"):
            if folder.is_dir() and any(folder.glob("*.json")):
                return folder
    if explicit:
        raise SynthError(f"{explicit}: no BBH task files (<task>.json) in this folder or its bbh/ subfolder")
    return None


def load_real_items(task: str, bbh_dir: str | os.PathLike | None = None) -> list[dict]:
    """The real BBH items of a task as a list of {input, target}; raises if absent."""
    folder = resolve_bbh_dir(bbh_dir)
    if folder is None:
        raise SynthError(f"no BBH folder found (set --bbh-dir or ${BBH_DIR_ENV}); it is needed "
                         f"to reject generated inputs that equal BBH test items")
    path = folder / f"{task}.json"
    if not path.exists():
        raise SynthError(f"{path}: no such file (the BBH items of {task})")
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
