"""Score a model, or saved predictions, on BIG-Bench Hard with the authors' recipe.

  fastkd eval-bbh --model DIR [--tasks nlp] [--prompt-format cot|direct|zeroshot|trained] [--chat-template]
  fastkd eval-bbh --predictions FILE.jsonl        (lines {task, idx, prediction}; no model)
  fastkd eval-bbh --compare RUN RUN ...           (side-by-side table of finished runs)

A run folder (--out) receives items.jsonl (one line per item: task, idx, prompt_sha256,
prompt_tokens, generation, answer, lenient_answer, target, correct, lenient_correct, finish),
results.json, report.md and scores.png; a folder already holding an evaluation is refused unless --overwrite, and
one holding a teacher cache or a training run always is.

results.json (schema "fastkd-bbh-results/1"; --compare reads it):
  name: str; created: ISO time; source: {model: str|null, predictions: str|null}
  config: the EvalConfig's fields (StageConfig.as_dict: `eval-bbh --config` reads it back)
  resolved: {tasks: [str], bbh_dir: str, stop: str, device: str|null, dtype: str|null}   (null: no model ran)
  tasks: {task: {n: int, group: "nlp"|"algorithmic", strict: float, lenient: float}}   (percent)
  summary: {n_items, n_tasks, strict: {micro, macro, nlp, algorithmic}, lenient: {same}}
           (percent; a group average is null when none of its tasks ran)
  finish: {stop|eos|length|given|given-cut (a saved prediction cut at the stop string): count};
  timing: {seconds, items_per_s, new_tokens} | null
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fastkd import bbh, paths
from fastkd.bbh_results import (EvalError, compare_runs, existing_evaluation, item_row, load_results, summary_line,
                                write_run)
from fastkd.config import CHAT_TEMPLATE, DEVICE, DTYPE, PROGRESS, StageConfig, option

@dataclass
class EvalConfig(StageConfig):
    """Every option of `fastkd eval-bbh`; exactly one of model (generate), predictions (score) or compare (a table)."""

    model: str | None = option(None, "model folder or hub name to generate with (loaded with from_pretrained)")
    predictions: str | None = option(None, "score existing generations: JSONL lines {task, idx, prediction}; no model",
                                     metavar="FILE")
    compare: list[str] | None = option(None, "print a side-by-side table of finished runs (folders or results.json "
                                             "files); the first is the baseline", metavar="RUN")
    tokenizer: str | None = option(None, "tokenizer folder or name, if not the model's")
    bbh_dir: str | None = option(None, "BBH folder (with bbh/<task>.json and cot-prompts/); default "
                                       f"{paths.BBH_DIR_LOOKUP}, then the hub when online")
    tasks: str = option("all", "all | nlp (12 natural-language tasks) | algorithmic (15) | comma list of task names")
    limit: int | None = option(None, "first N items of each task", minimum=1, metavar="N")
    prompt_format: str = option(
        "cot", "cot: published 3-shot CoT prompts; direct: same 3 exemplars, answers only; zeroshot: 'Q: ..\\nA: "
               "Let's think step by step.'; trained: fastkd's own CoT training template (Q: ..\\nA: Let's think step "
               "by step.), zero-shot, stops at EOS; trained-direct: its answer-only template (Q: ..\\nA:), for "
               "students distilled on answers. Every format also stops at '\\n\\nQ:'", choices=list(bbh.PROMPT_FORMATS))
    chat_template: bool = CHAT_TEMPLATE()
    max_new_tokens: int = option(1024, "generation budget per item (1024, as lm-eval's bbh_cot_fewshot: the longest "
                                       "published CoT answers, geometric_shapes and formal_fallacies, run past 512)",
                                 minimum=1)
    batch_size: int = option(8, "prompts per generation batch (length-sorted, left-padded)", minimum=1)
    device: str = DEVICE()
    dtype: str = DTYPE()
    out: str | None = option(None, "run folder for the outputs (default runs/eval-bbh/<name>-<format>-<time>); with "
                                   "--compare, where compare.md goes")
    overwrite: bool = option(False, "delete the evaluation already in --out (its items.jsonl, results.json, report.md, "
                                    "scores.png) and start over; without it a folder holding one is refused",
                             once=True)
    name: str | None = option(None, "run name shown in reports and --compare tables (default: the model folder or "
                                    "predictions file name)")
    metric: str = option("strict", "with --compare: which score to tabulate", choices=["strict", "lenient"])
    plot: bool = option(True, "draw the PNG bar chart (scores.png)")
    progress: bool = PROGRESS()

    def validate(self) -> "EvalConfig":
        """One mode; a run's name and folder are resolved here, so the config saved with it is complete."""
        given = [f"--{mode}" for mode in ("model", "predictions", "compare") if getattr(self, mode)]
        if len(given) != 1:
            extra = f", not {' and '.join(given)}" if given else ""
            raise EvalError(f"give one of --model, --predictions or --compare{extra}")
        if not self.compare:
            self.name = self.name or Path(self.model or self.predictions).name.removesuffix(".jsonl")
            self.out = self.out or str(Path("runs", "eval-bbh", f"{self.name}-{self.prompt_format}-"
                                                                f"{datetime.now():%Y%m%d-%H%M%S}"))
        return self


add_arguments = EvalConfig.add_flags


def run(args: argparse.Namespace) -> int:
    config = EvalConfig.from_args(args)
    print(compare(config) if config.compare else summary_line(evaluate_bbh(config), config.out))
    return 0


def evaluate_bbh(config: EvalConfig) -> dict:
    """Generate with config.model (or read config.predictions), score, write the run folder; returns its results."""
    if not (config.model or config.predictions):
        raise EvalError("evaluate_bbh scores --model or --predictions (a --compare table is compare(config))")
    out = Path(config.out)
    old = existing_evaluation(out, config.overwrite)   # refused here, before anything is read or loaded
    tasks = bbh.select_tasks(config.tasks)
    if config.predictions:
        given = read_predictions(config.predictions)
        tasks = _predicted_tasks(config, tasks, given)
    # saved predictions: every item, to tell an idx past --limit (not scored) from one past the task (refused)
    items, root = bbh.load_tasks(tasks, config.bbh_dir, None if config.predictions else config.limit)
    resolved = {"tasks": tasks, "bbh_dir": root, "stop": bbh.STOP_STRING, "device": None, "dtype": None}
    if config.predictions:
        rows = predictions_rows(config, given, items, root)
        timing = None
    else:
        rows, timing = generate_rows(config, items, root, resolved)
    for path in old:   # --overwrite: the old evaluation goes only now, so a failed run leaves it as it was
        path.unlink()
    return write_run(out, rows, config.name, config.as_dict(), resolved,
                     {"model": config.model, "predictions": config.predictions}, timing, plot=config.plot)


def _predicted_tasks(config: EvalConfig, tasks: list[str], given: dict) -> list[str]:
    """The asked-for tasks the predictions file covers: a group may miss some (with a warning), a list none."""
    if config.tasks in bbh.GROUPS:
        absent = [t for t in tasks if t not in given]
        tasks = [t for t in tasks if t in given]
        if absent and tasks:
            print(f"eval-bbh: warning: {config.predictions} has no predictions for {len(absent)} task(s) of "
                  f"{config.tasks!r} ({', '.join(absent)}): the averages cover the other {len(tasks)} only",
                  file=sys.stderr)
    missing = [t for t in tasks if t not in given]
    if missing or not tasks:
        raise EvalError(f"{config.predictions}: no predictions for task(s) {', '.join(missing) or config.tasks}")
    return tasks


def compare(config: EvalConfig) -> str:
    """The side-by-side table of the runs in config.compare, also written to <out>/compare.md when out is given."""
    table = compare_runs([load_results(r) for r in config.compare], config.metric)
    if config.out:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        (Path(config.out) / "compare.md").write_text(table + "\n", encoding="utf-8")
    return table


def read_predictions(path: str | Path) -> dict[str, dict[int, dict]]:
    """{task: {idx: row}} from a JSONL of {task, idx, prediction[, target]}; bad lines are errors."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such predictions file")
    found: dict[str, dict[int, dict]] = defaultdict(dict)
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is not an error
            except UnicodeDecodeError as err:
                raise EvalError(f"{path}: line {lineno}: invalid UTF-8 (byte {err.start} of the line: "
                                f"{err.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}: line {lineno}: invalid JSON: {err.msg}") from None
            for key, kind in (("task", str), ("idx", int), ("prediction", str)):
                if not isinstance(row, dict) or not isinstance(row.get(key), kind) or isinstance(row.get(key), bool):
                    raise EvalError(f"{path}: line {lineno}: field {key!r} missing or not {kind.__name__}")
            if row["task"] not in bbh.ALL_TASKS:
                raise EvalError(f"{path}: line {lineno}: field 'task': unknown BBH task {row['task']!r}")
            if row["idx"] in found[row["task"]]:
                raise EvalError(f"{path}: line {lineno}: duplicate prediction for {row['task']} idx {row['idx']}")
            found[row["task"]][row["idx"]] = dict(row, line=lineno)
    return dict(found)


def predictions_rows(config: EvalConfig, given, items, root) -> list[dict]:
    """Per-item rows for saved predictions of the first --limit of each task's `items` (all of them); every asked-for
    item must have one, and every idx must be an item of its task."""
    path, rows = config.predictions, []
    for task, every in items.items():
        preds, task_items = given[task], every[:config.limit]
        missing = [it.idx for it in task_items if it.idx not in preds]
        if missing:
            raise EvalError(f"{path}: task {task}: no prediction for {len(missing)} of {len(task_items)} items "
                            f"(first idx {missing[0]}); pass --limit N when the file covers the first N items")
        # past --limit but inside the task: not scored; outside the task: not BBH items, whatever --limit says
        stray = [row for idx, row in preds.items() if not 0 <= idx < len(every)]
        if stray:
            row = min(stray, key=lambda r: r["line"])
            raise EvalError(f"{path}: line {row['line']}: field 'idx' {row['idx']} is not an item of {task} "
                            f"(idx 0..{len(every) - 1}): a 1-based file, or another data version?")
        try:   # the prompt texts, hashed into the rows when they can be rebuilt without a tokenizer
            prompts = [text for text, _ in build_prompts({task: task_items}, None, config.prompt_format, False, root)]
        except bbh.BBHError:
            prompts = [None] * len(task_items)
        for it, prompt in zip(task_items, prompts):
            row = preds[it.idx]
            if "target" in row and row["target"] != it.target:
                raise EvalError(f"{path}: line {row['line']}: field 'target' {row['target']!r} differs from "
                                f"{task} idx {it.idx} in the BBH data ({it.target!r}); wrong data version?")
            # cut at the recipe's stop string too: a raw server continuation would run into a hallucinated next question
            cut = bbh.cut_at_stop(row["prediction"])
            rows.append(item_row(it, prompt, None, cut, "given" if cut == row["prediction"] else "given-cut"))
    return rows


def build_prompts(items: dict[str, list[bbh.BBHItem]], tokenizer, fmt: str, chat: bool,
                  root: str) -> list[tuple[str, list[int] | None]]:
    """(prompt text, prompt ids) for every item, tasks in order, through fastkd.templates (ids None without a
    tokenizer)."""
    from fastkd.templates import Template, prompt_ids, text_prompt_ids

    out, trained, template = [], fmt.startswith("trained"), Template(cot=fmt == "trained", chat=chat)
    for task, task_items in items.items():
        few = bbh.load_cot_prompt(root, task) if fmt in ("cot", "direct") else None
        for it in task_items:
            text = template.prompt(it.input) if trained else bbh.build_prompt(fmt, it.input, few)
            if tokenizer is None:
                out.append((text, None))
            else:
                out.append((text, prompt_ids(tokenizer, template, it.input) if trained else
                            text_prompt_ids(tokenizer, text, chat)))
    return out


def generate_rows(config: EvalConfig, items, root, resolved: dict) -> tuple[list[dict], dict]:
    """Generate for every item and score it; `resolved` (in results.json) gets the device and dtype used."""
    from tqdm.auto import tqdm

    from fastkd.generate import greedy_generate
    from fastkd.teacher import load_causal_lm, load_tokenizer, resolve_device

    device = resolved["device"] = str(resolve_device(config.device))
    auto = "bfloat16" if device.startswith("cuda") else "float32"
    dtype = resolved["dtype"] = auto if config.dtype == "auto" else config.dtype
    tokenizer = load_tokenizer(config.tokenizer or config.model, "--tokenizer" if config.tokenizer else "--model")
    model = load_causal_lm(config.model, dtype=dtype, device=device, role="--model")
    prompts = build_prompts(items, tokenizer, config.prompt_format, config.chat_template, root)
    flat = [it for task_items in items.values() for it in task_items]
    limit, budget = getattr(model.config, "max_position_embeddings", None), config.max_new_tokens
    too_long = sum(len(ids) + budget > limit for _, ids in prompts) if limit else 0
    if too_long:
        print(f"eval-bbh: warning: {too_long} of {len(prompts)} prompts plus --max-new-tokens {budget} "
              f"exceed the model's {limit} positions; their generations may degrade", file=sys.stderr)
    start = time.perf_counter()
    with tqdm(total=len(flat), unit="item", desc="eval-bbh", dynamic_ncols=True, disable=not config.progress) as bar:
        gens = greedy_generate(model, tokenizer, [ids for _, ids in prompts], budget, stop_strings=(bbh.STOP_STRING,),
                               batch_size=config.batch_size, on_batch=bar.update)
    seconds = time.perf_counter() - start
    rows = [item_row(it, text, len(ids), g.text, g.finish) for it, (text, ids), g in zip(flat, prompts, gens)]
    timing = {"seconds": round(seconds, 3), "items_per_s": round(len(flat) / seconds, 3) if seconds else None,
              "new_tokens": sum(len(g.token_ids) for g in gens)}
    return rows, timing


