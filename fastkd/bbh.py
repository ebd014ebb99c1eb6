"""BIG-Bench Hard: task files, task groups, prompts for every mode, answer extraction and scores, strict (the authors'
recipe, ../shared/DESIGN.md "BBH") and lenient (format forgiven); no torch, so saved predictions need no model."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from fastkd import paths
from fastkd.paths import BBHError, resolve_bbh_dir
from fastkd.records import DataError, read_records
from fastkd.templates import ANSWER_PHRASE, COT_TRIGGER

NLP_TASKS = (
    "causal_judgement", "date_understanding", "disambiguation_qa", "formal_fallacies", "hyperbaton",
    "movie_recommendation", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding",
)
ALGORITHMIC_TASKS = (
    "boolean_expressions", "dyck_languages", "geometric_shapes", "logical_deduction_three_objects",
    "logical_deduction_five_objects", "logical_deduction_seven_objects", "multistep_arithmetic_two",
    "navigate", "object_counting", "temporal_sequences", "tracking_shuffled_objects_three_objects",
    "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects", "web_of_lies",
    "word_sorting",
)
ALL_TASKS = tuple(sorted(NLP_TASKS + ALGORITHMIC_TASKS))
GROUPS = {"all": ALL_TASKS, "nlp": NLP_TASKS, "algorithmic": ALGORITHMIC_TASKS}

STOP_STRING = "\n\nQ:"  # never a bare "Q": answers can be "(Q)"
PROMPT_FORMATS = ("cot", "direct", "zeroshot", "trained", "trained-direct")


@dataclass(frozen=True)
class BBHItem:
    """One BBH question: idx is its position in the task file (as in the reference outputs)."""

    task: str
    idx: int
    input: str
    target: str


def task_group(task: str) -> str:
    return "nlp" if task in NLP_TASKS else "algorithmic"


def select_tasks(spec: str) -> list[str]:
    """`all`, `nlp`, `algorithmic` (alphabetical) or a comma list of task names (as given, deduplicated)."""
    spec = (spec or "all").strip()
    if spec in GROUPS:
        return sorted(GROUPS[spec])
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_TASKS]
    if unknown or not names:
        raise BBHError(f"unknown BBH task(s) {', '.join(unknown) or repr(spec)}; use all, nlp, algorithmic "
                       f"or a comma list of: {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(names))


def load_tasks(tasks: list[str], bbh_dir: str | Path | None = None,
               limit: int | None = None) -> tuple[dict[str, list[BBHItem]], str]:
    """{task: items} (the first `limit` of each) and where they came from: a folder, else the hub when online."""
    root = resolve_bbh_dir(bbh_dir, tasks)
    if root is not None:
        return {t: _load_file(paths.bbh_task_file(root, t), t, limit) for t in tasks}, str(root)
    tried = [str(p) for p in paths.bbh_candidates(bbh_dir)]
    if os.environ.get("HF_DATASETS_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        raise BBHError(f"BBH data not found (looked in {', '.join(tried)}; the hub is off since HF_DATASETS_OFFLINE "
                       f"is set); {paths.bbh_get_hint()}")
    try:
        return {t: _load_hub(t, limit) for t in tasks}, f"hub:{paths.BBH_HUB_DATASET}"
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; one clear message
        raise BBHError(f"BBH data not found (looked in {', '.join(tried)}) and loading {paths.BBH_HUB_DATASET} from "
                       f"the hub failed ({type(err).__name__}: {err}); {paths.bbh_get_hint()}") from None


def _load_file(path: Path, task: str, limit: int | None) -> list[BBHItem]:
    items = []
    for idx, rec in read_records(path):
        if limit is not None and idx >= limit:
            break
        if not isinstance(rec, dict) or not isinstance(rec.get("input"), str) or not isinstance(rec.get("target"), str):
            raise DataError(f"{path}: example {idx}: expected string fields 'input' and 'target'")
        items.append(BBHItem(task, idx, rec["input"], rec["target"]))
    if not items:
        raise BBHError(f"{path}: no examples")
    return items


def _load_hub(task: str, limit: int | None) -> list[BBHItem]:
    import datasets

    ds = datasets.load_dataset(paths.BBH_HUB_DATASET, task, split="test")
    rows = ds if limit is None else ds.select(range(min(limit, len(ds))))
    return [BBHItem(task, i, r["input"], r["target"]) for i, r in enumerate(rows)]


@dataclass(frozen=True)
class FewShot:
    """A cot-prompt file, split: the text after `-----`, its task description and exemplars
    as (question, CoT answer) pairs, the answer starting at `Let's think step by step.`"""

    text: str
    description: str
    exemplars: tuple[tuple[str, str], ...]


def load_cot_prompt(root: str | Path | None, task: str) -> FewShot:
    """cot-prompts/<task>.txt: what follows its `-----` line, split into the task description and exemplars."""
    path = Path(root) / "cot-prompts" / f"{task}.txt" if root and not str(root).startswith("hub:") else None
    if path is None or not path.is_file():
        raise BBHError(f"{path or 'cot-prompts/' + task + '.txt'}: no CoT prompt file; the few-shot prompt formats "
                       f"need the BBH folder's cot-prompts/ (or use --prompt-format zeroshot or trained); "
                       f"{paths.bbh_get_hint()}")
    raw = path.read_text(encoding="utf-8")
    head, sep, text = raw.partition("\n-----\n")
    if not sep:
        raise BBHError(f"{path}: no '-----' line separating the canary from the prompt")
    chunks = text.split("\n\nQ: ")
    pairs = []
    for n, chunk in enumerate(chunks[1:], 1):
        question, sep, answer = chunk.partition("\nA: ")
        if not sep:
            raise BBHError(f"{path}: exemplar {n} has no '\\nA: ' line")
        pairs.append((question, answer))
    return FewShot(text, chunks[0], tuple(pairs))


def build_prompt(fmt: str, item_input: str, few_shot: FewShot | None = None) -> str:
    """Prompt text of cot (the published 3-shot prompt + `\\n\\nQ: {input}\\nA: ` + COT_TRIGGER), direct (its
    exemplars with answers only, ending `\\nA:`) or zeroshot (`Q: {input}\\nA: ` + COT_TRIGGER); trained: templates."""
    if fmt == "cot":
        return few_shot.text + "\n\nQ: " + item_input + "\nA: " + COT_TRIGGER
    if fmt == "direct":
        shots = "".join(f"\n\nQ: {q}\nA: {extract_answer(a)}" for q, a in few_shot.exemplars)
        return few_shot.description + shots + "\n\nQ: " + item_input + "\nA:"
    if fmt == "zeroshot":
        return "Q: " + item_input + "\nA: " + COT_TRIGGER
    raise ValueError(f"no text prompt for format {fmt!r}; choose one of {PROMPT_FORMATS[:3]}")


def cut_at_stop(text: str) -> str:
    """The generation up to (not including) the first stop string."""
    return text.split(STOP_STRING, 1)[0]


def extract_answer(generation: str) -> str:
    """The authors' extraction: text after the LAST `So the answer is `, stripped, one
    trailing `.` removed; without the phrase, the whole stripped generation."""
    k = generation.rfind(ANSWER_PHRASE)
    answer = (generation[k + len(ANSWER_PHRASE):] if k >= 0 else generation).strip()
    return answer.removesuffix(".")


_LENIENT_PHRASE = re.compile(r"\banswer is(?![\w'’])\s*:?\s*", re.IGNORECASE)  # not "answer isn't"
NEGATIONS = {"not", "never", "isn", "isnt"}
_CHOICE_TARGET = re.compile(r"^\(([A-Z])\)$")
_NUMBER_TARGET = re.compile(r"^-?\d+(\.\d+)?$")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?")
LABELS = ({"yes", "no"}, {"true", "false"}, {"valid", "invalid"})


def target_kind(target: str) -> str:
    """choice (`(B)`), number, label (yes/no, True/False, valid/invalid) or text."""
    if _CHOICE_TARGET.match(target):
        return "choice"
    if _NUMBER_TARGET.match(target):
        return "number"
    if any(target.lower() in group for group in LABELS):
        return "label"
    return "text"


def lenient_answer(generation: str, target: str) -> str | None:
    """The answer read leniently for the target's kind, normalised; None when there is none
    or it is ambiguous (a hedge such as `(A) or (B)` earns nothing).

    Span: what follows the last case-insensitive `answer is` (optional colon); without that
    phrase, the first line if it is an answer-only line (at most 5 words, starting with the
    answer), else nothing: a reasoning that never concludes is not a format failure. Then:
    choice -> the one `(X)` in the span (`(x)` too) or a leading bare letter; number -> the last
    number after the phrase (the leading one on an answer-only line), commas dropped, a typographic
    minus read as `-`; label -> the one yes/no (true/false, valid/invalid) word, none when a label
    word follows a negation (`not valid`); text -> lower case, whitespace collapsed,
    one trailing `.` removed."""
    matches = list(_LENIENT_PHRASE.finditer(generation))
    if matches:
        span = generation[matches[-1].end():].strip()
    else:  # an answer-only line: it must start with the answer
        lines = [ln.strip() for ln in generation.strip().splitlines() if ln.strip()]
        span = lines[0] if lines and len(lines[0].split()) <= 5 else ""
    if not span:
        return None
    kind = target_kind(target)
    if kind == "choice":
        letters = {x.upper() for x in re.findall(r"\(([A-Za-z])\)", span)}
        bare = re.match(r"^\(?([A-Z])(?:[).:,]|$)", span)
        if not matches and not bare:
            return None
        if len(letters) == 1:
            return f"({letters.pop()})"
        return f"({bare.group(1)})" if bare and not letters else None
    if kind == "number":
        span = span.replace("\u2212", "-")  # a typographic minus keeps its sign
        nums = list(_NUMBER.finditer(span))
        if not nums or (not matches and nums[0].start() != 0):
            return None
        try:
            return _format_number(float(nums[-1 if matches else 0].group().replace(",", "")))
        except ValueError:
            return None
    if kind == "label":
        group = next(g for g in LABELS if target.lower() in g)
        words = re.findall(r"[A-Za-z]+", span.lower())
        if any(w in group and i and words[i - 1] in NEGATIONS for i, w in enumerate(words)):
            return None  # "not valid", "not True": the opposite, or unclear; lenient forgives format, not content
        hits = {w for w in words if w in group}
        if not matches and (not words or words[0] not in group):
            return None
        return hits.pop() if len(hits) == 1 else None
    return _normalise_text(span)


def _normalise_text(text: str) -> str:
    text = " ".join(text.split()).lower()
    return text.removesuffix(".").strip()


def _format_number(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def normalise_target(target: str) -> str:
    """The target in the form `lenient_answer` produces for it."""
    kind = target_kind(target)
    if kind == "number":
        return _format_number(float(target))
    if kind == "label":
        return target.lower()
    if kind == "text":
        return _normalise_text(target)
    return target


@dataclass(frozen=True)
class ItemScore:
    answer: str
    correct: bool
    lenient_answer: str | None
    lenient_correct: bool


def score(generation: str, target: str) -> ItemScore:
    """Strict (the recipe) and lenient correctness of one generation; lenient >= strict."""
    answer = extract_answer(generation)
    strict = answer == target
    loose = lenient_answer(generation, target)
    return ItemScore(answer, strict, loose, strict or (loose is not None and loose == normalise_target(target)))
