"""Score a model, or saved predictions, on BIG-Bench Hard with the authors' recipe.

  fastkd eval-bbh --model DIR [--tasks nlp] [--prompt-format cot|direct|zeroshot|trained] [--chat]
  fastkd eval-bbh --predictions FILE.jsonl        (lines {task, idx, prediction}; no model)
  fastkd eval-bbh --compare RUN RUN ...           (side-by-side table of finished runs)

A run folder (--out) receives items.jsonl (one line per item: task, idx, prompt_sha256,
prompt_tokens, generation, answer, lenient_answer, target, correct, lenient_correct, finish),
results.json, report.md and scores.png.

results.json (schema "fastkd-bbh-results/1"; --compare reads it):
  name: str; created: ISO time; source: {model: str|null, predictions: str|null}
  config: {prompt_format, chat, tasks: [str], limit, max_new_tokens, batch_size, stop, bbh_dir, device, dtype}
  tasks: {task: {n: int, group: "nlp"|"algorithmic", strict: float, lenient: float}}   (percent)
  summary: {n_items, n_tasks, strict: {micro, macro, nlp, algorithmic}, lenient: {same}}
           (percent; a group average is null when none of its tasks ran)
  finish: {stop|eos|length|given|given-cut (a saved prediction cut at the stop string): count};
  timing: {seconds, items_per_s, new_tokens} | null
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from fastkd import bbh, paths
from fastkd.errors import UserError

SCHEMA = "fastkd-bbh-results/1"


class EvalError(UserError):
    """A predictions file or run folder that cannot be used as asked."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="model folder or hub name to generate with (loaded with from_pretrained)")
    what.add_argument("--predictions", metavar="FILE", help="score existing generations: JSONL lines {task, idx, prediction}; no model")
    what.add_argument("--compare", nargs="+", metavar="RUN", help="print a side-by-side table of finished runs (folders or results.json files); the first is the baseline")
    parser.add_argument("--tokenizer", help="tokenizer folder or name, if not the model's")
    parser.add_argument("--bbh-dir", help=f"BBH folder (with bbh/<task>.json and cot-prompts/); default {paths.BBH_DIR_LOOKUP}, then the hub when online")
    parser.add_argument("--tasks", default="all", help="all | nlp (12 natural-language tasks) | algorithmic (15) | comma list of task names")
    parser.add_argument("--limit", type=_positive_int, default=None, help="first N items of each task")
    parser.add_argument("--prompt-format", choices=bbh.PROMPT_FORMATS, default="cot",
                        help="cot: published 3-shot CoT prompts; direct: same 3 exemplars, answers only; zeroshot: "
                             "'Q: ..\\nA: Let's think step by step.'; trained: fastkd's own CoT training template (Q: ..\\nA: Let's think step by step.), zero-shot, "
                             "stops at EOS; trained-direct: its answer-only template (Q: ..\\nA:), for students distilled on answers. Every format also stops at '\\n\\nQ:'")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template (user turn + generation prompt)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=1024,
                        help="generation budget per item (1024, as lm-eval's bbh_cot_fewshot: the longest published CoT "
                             "answers, geometric_shapes and formal_fallacies, run past 512)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generation batch (length-sorted, left-padded)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="model weights dtype; auto = bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", help="run folder for the outputs (default runs/eval-bbh/<name>-<format>-<time>); with --compare, where compare.md goes")
    parser.add_argument("--name", help="run name shown in reports and --compare tables (default: the model folder or predictions file name)")
    parser.add_argument("--metric", choices=["strict", "lenient"], default="strict", help="with --compare: which score to tabulate")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG bar chart")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        table = compare_runs([load_results(r) for r in args.compare], args.metric)
        print(table)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "compare.md").write_text(table + "\n", encoding="utf-8")
        return 0
    if args.limit is not None and args.limit < 1:
        raise EvalError("--limit must be at least 1")
    tasks = bbh.select_tasks(args.tasks)
    if args.predictions:
        given = read_predictions(args.predictions)
        if args.tasks in bbh.GROUPS:
            absent = [t for t in tasks if t not in given]
            tasks = [t for t in tasks if t in given]
            if absent and tasks:
                print(f"eval-bbh: warning: {args.predictions} has no predictions for {len(absent)} task(s) of "
                      f"{args.tasks!r} ({', '.join(absent)}): the averages cover the other {len(tasks)} only",
                      file=sys.stderr)
        missing = [t for t in tasks if t not in given]
        if missing or not tasks:
            raise EvalError(f"{args.predictions}: no predictions for task(s) {', '.join(missing) or args.tasks}")
    items, root = bbh.load_tasks(tasks, args.bbh_dir, args.limit)
    name = args.name or Path(args.model or args.predictions).name.removesuffix(".jsonl")
    out = Path(args.out) if args.out else Path("runs") / "eval-bbh" / f"{name}-{args.prompt_format}-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a folder (eval-bbh writes items.jsonl, results.json, "
                        "report.md into a folder)")
    config = {"prompt_format": args.prompt_format, "chat": args.chat, "tasks": tasks, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "stop": bbh.STOP_STRING,
              "bbh_dir": root, "device": None, "dtype": None}
    if args.predictions:
        rows, timing = predictions_rows(args.predictions, given, items, root, args.prompt_format, args.limit), None
    else:
        rows, timing = generate_rows(args, items, root, config)
    results = write_run(out, rows, name, config, {"model": args.model, "predictions": args.predictions}, timing,
                        plot=not args.no_plot)
    s = results["summary"]
    print(f"{name}: {s['n_items']} items, {s['n_tasks']} tasks; strict micro {_pct(s['strict']['micro'])} "
          f"macro {_pct(s['strict']['macro'])}; lenient micro {_pct(s['lenient']['micro'])} -> {out}")
    return 0


# ----------------------------------------------------------------------------- predictions

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
                raise EvalError(f"{path}: line {lineno}: invalid UTF-8 (byte {err.start} of the line: {err.reason})") from None
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


def predictions_rows(path, given, items, root, fmt, limit: int | None = None) -> list[dict]:
    """Per-item rows for saved predictions; every asked-for item must have one."""
    rows = []
    for task, task_items in items.items():
        preds = given[task]
        missing = [it.idx for it in task_items if it.idx not in preds]
        if missing:
            raise EvalError(f"{path}: task {task}: no prediction for {len(missing)} of {len(task_items)} items "
                            f"(first idx {missing[0]}); pass --limit N when the file covers the first N items")
        known = {it.idx for it in task_items}
        # beyond the items read: fine under --limit when idx >= 0 (the rest of the task), otherwise not BBH items
        stray = [row for idx, row in preds.items() if idx < 0 or (idx not in known and limit is None)]
        if stray:
            row = min(stray, key=lambda r: r["line"])
            raise EvalError(f"{path}: line {row['line']}: field 'idx' {row['idx']} is not an item of {task} "
                            f"(idx 0..{len(task_items) - 1}): a 1-based file, or another data version?")
        prompts = _text_prompts(task, task_items, root, fmt)
        for it, prompt in zip(task_items, prompts):
            row = preds[it.idx]
            if "target" in row and row["target"] != it.target:
                raise EvalError(f"{path}: line {row['line']}: field 'target' {row['target']!r} differs from "
                                f"{task} idx {it.idx} in the BBH data ({it.target!r}); wrong data version?")
            # the recipe's stop string applies to saved predictions too (a raw continuation from a server without
            # stop strings would otherwise be scored on the next, hallucinated question); cutting twice changes nothing
            cut = bbh.cut_at_stop(row["prediction"])
            rows.append(_item_row(it, prompt, None, cut, "given" if cut == row["prediction"] else "given-cut"))
    return rows


def _text_prompts(task, task_items, root, fmt) -> list[str | None]:
    """Prompt texts for hashing when they can be rebuilt without a tokenizer, else None."""
    try:
        if fmt.startswith("trained"):
            from fastkd.templates import Template

            return [Template(cot=fmt == "trained").prompt(it.input) for it in task_items]
        few = bbh.load_cot_prompt(root, task) if fmt in ("cot", "direct") else None
        return [bbh.build_prompt(fmt, it.input, few) for it in task_items]
    except bbh.BBHError:
        return [None] * len(task_items)


# ----------------------------------------------------------------------------- generation

def build_prompts(items: dict[str, list[bbh.BBHItem]], tokenizer, fmt: str, chat: bool, root: str) -> list[tuple[str, list[int]]]:
    """(prompt text, prompt ids) for every item, tasks in order, through fastkd.templates."""
    from fastkd.templates import Template, prompt_ids, text_prompt_ids

    out = []
    for task, task_items in items.items():
        if fmt.startswith("trained"):
            template = Template(cot=fmt == "trained", chat=chat)
            out += [(template.prompt(it.input), prompt_ids(tokenizer, template, it.input)) for it in task_items]
            continue
        few = bbh.load_cot_prompt(root, task) if fmt in ("cot", "direct") else None
        for it in task_items:
            text = bbh.build_prompt(fmt, it.input, few)
            out.append((text, text_prompt_ids(tokenizer, text, chat)))
    return out


def load_model(name: str, tokenizer_name: str | None, device: str, dtype: str):
    """Tokenizer and eval-mode model on the device; pad falls back to EOS."""
    from fastkd.teacher import load_causal_lm, load_tokenizer, resolve_device

    device = str(resolve_device(device))
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    tokenizer = load_tokenizer(tokenizer_name or name, "--tokenizer" if tokenizer_name else "--model")
    return tokenizer, load_causal_lm(name, dtype=dtype, device=device, role="--model"), device, dtype


def generate_rows(args, items, root, config) -> tuple[list[dict], dict]:
    """Generate for every item and score it; the config gets the device and dtype used."""
    from tqdm.auto import tqdm

    from fastkd.generate import greedy_generate

    tokenizer, model, config["device"], config["dtype"] = load_model(args.model, args.tokenizer, args.device, args.dtype)
    prompts = build_prompts(items, tokenizer, args.prompt_format, args.chat, root)
    flat = [it for task_items in items.values() for it in task_items]
    limit = getattr(model.config, "max_position_embeddings", None)
    too_long = sum(len(ids) + args.max_new_tokens > limit for _, ids in prompts) if limit else 0
    if too_long:
        print(f"eval-bbh: warning: {too_long} of {len(prompts)} prompts plus --max-new-tokens {args.max_new_tokens} "
              f"exceed the model's {limit} positions; their generations may degrade", file=sys.stderr)
    start = time.perf_counter()
    with tqdm(total=len(flat), unit="item", desc="eval-bbh", dynamic_ncols=True) as bar:
        gens = greedy_generate(model, tokenizer, [ids for _, ids in prompts], args.max_new_tokens,
                               stop_strings=(bbh.STOP_STRING,), batch_size=args.batch_size, on_batch=bar.update)
    seconds = time.perf_counter() - start
    rows = [_item_row(it, text, len(ids), g.text, g.finish) for it, (text, ids), g in zip(flat, prompts, gens)]
    timing = {"seconds": round(seconds, 3), "items_per_s": round(len(flat) / seconds, 3) if seconds else None,
              "new_tokens": sum(len(g.token_ids) for g in gens)}
    return rows, timing


def _item_row(item: bbh.BBHItem, prompt: str | None, prompt_tokens: int | None, generation: str, finish: str) -> dict:
    s = bbh.score(generation, item.target)
    return {"task": item.task, "idx": item.idx,
            "prompt_sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest() if prompt is not None else None,
            "prompt_tokens": prompt_tokens, "generation": generation, "answer": s.answer,
            "lenient_answer": s.lenient_answer, "target": item.target, "correct": s.correct,
            "lenient_correct": s.lenient_correct, "finish": finish}


# ----------------------------------------------------------------------------- outputs

def results_from_rows(rows: list[dict]) -> dict:
    """Per-task and summary scores from per-item rows (the report is derived only from these)."""
    per_task: dict[str, dict[str, list[bool]]] = {}
    for row in rows:
        slot = per_task.setdefault(row["task"], {"strict": [], "lenient": []})
        slot["strict"].append(bool(row["correct"]))
        slot["lenient"].append(bool(row["lenient_correct"]))
    return bbh.summarise(per_task)


def write_run(out: Path, rows: list[dict], name: str, config: dict, source: dict, timing: dict | None,
              plot: bool = True) -> dict:
    """items.jsonl, results.json, report.md (and scores.png) in `out`; returns the results."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "items.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    results = {"schema": SCHEMA, "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "source": source, "config": config, **results_from_rows(rows),
               "finish": dict(Counter(r["finish"] for r in rows)), "timing": timing}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown(results), encoding="utf-8")
    if plot:
        plot_scores(results, out / "scores.png")
    return results


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ordered(tasks) -> list[str]:
    """Natural-language tasks first, then algorithmic, each alphabetical (the paper's order)."""
    return sorted(tasks, key=lambda t: (bbh.task_group(t) != "nlp", t))


def report_markdown(results: dict) -> str:
    cfg, s = results["config"], results["summary"]
    src = results["source"].get("model") or results["source"].get("predictions")
    lines = [f"# BBH: {results['name']}", "",
             f"Source: `{src}`; prompt format `{cfg['prompt_format']}`{' (chat template)' if cfg.get('chat') else ''}; "
             f"max new tokens {cfg['max_new_tokens']}; limit {cfg['limit'] or 'none'}; data `{cfg['bbh_dir']}`.",
             "Strict: the BBH authors' exact-match recipe. Lenient: option letter, case-insensitive labels, numbers.",
             "", "| task | group | n | strict | lenient |", "|---|---|---:|---:|---:|"]
    for task in _ordered(results["tasks"]):
        v = results["tasks"][task]
        lines.append(f"| {task} | {v['group']} | {v['n']} | {_pct(v['strict'])} | {_pct(v['lenient'])} |")
    n_nlp = sum(1 for t in results["tasks"] if bbh.task_group(t) == "nlp")
    labels = {"micro": f"micro ({s['n_items']} items)", "macro": f"macro ({s['n_tasks']} tasks)",
              "nlp": f"NLP average ({n_nlp} tasks)", "algorithmic": f"algorithmic average ({s['n_tasks'] - n_nlp} tasks)"}
    lines += ["", "| average | strict | lenient |", "|---|---:|---:|"]
    lines += [f"| {label} | {_pct(s['strict'][k])} | {_pct(s['lenient'][k])} |" for k, label in labels.items()
              if s["strict"][k] is not None]
    if results.get("timing"):
        t = results["timing"]
        lines += ["", f"Generation: {t['seconds']} s, {t['items_per_s']} items/s, {t['new_tokens']} new tokens; "
                      f"finish reasons {results['finish']}."]
    return "\n".join(lines) + "\n"


def plot_scores(results: dict, path: Path) -> None:
    """Horizontal bars per task (strict and lenient) with the macro averages marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _ordered(results["tasks"])[::-1]
    strict = [results["tasks"][t]["strict"] for t in tasks]
    lenient = [results["tasks"][t]["lenient"] for t in tasks]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.32 * len(tasks)))
    ys = range(len(tasks))
    ax.barh([y + 0.2 for y in ys], lenient, height=0.4, color="#9ecae1", label="lenient")
    ax.barh([y - 0.2 for y in ys], strict, height=0.4, color="#3182bd", label="strict")
    ax.axvline(results["summary"]["strict"]["macro"], color="#08519c", linestyle="--", linewidth=1,
               label=f"strict macro {_pct(results['summary']['strict']['macro'])}")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(tasks, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(f"BBH: {results['name']} ({results['config']['prompt_format']})", loc="left", fontsize=10)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- compare

def load_results(run: str | Path) -> dict:
    """results.json of a run folder (or the file itself)."""
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise EvalError(f"{run}: no results.json (pass a run folder written by fastkd eval-bbh)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        raise EvalError(f"{path}: field 'schema' is {results.get('schema') if isinstance(results, dict) else None!r}, "
                        f"not {SCHEMA!r}")
    absent = [key for key in ("tasks", "summary") if not isinstance(results.get(key), dict)]
    if absent:
        raise EvalError(f"{path}: field(s) {', '.join(absent)} missing or not objects: not a finished eval-bbh run")
    results.setdefault("name", path.parent.name)
    return results


def compare_runs(runs: list[dict], metric: str = "strict") -> str:
    """Markdown table: one row per task and per average, one column per run, with the
    difference from the first run in brackets."""
    names = _unique([r["name"] for r in runs])
    tasks = _ordered({t for r in runs for t in r["tasks"]})
    header = ["task"] + names
    lines = [f"BBH, {metric} accuracy (%); brackets: difference from {names[0]}.", "",
             "| " + " | ".join(header) + " |", "|---|" + "---:|" * len(names)]

    def cells(values):
        base = values[0]
        out = [_pct(base)]
        for v in values[1:]:
            diff = "" if v is None or base is None else f" ({v - base:+.2f})"
            out.append(_pct(v) + diff)
        return out

    for task in tasks:
        values = [r["tasks"].get(task, {}).get(metric) for r in runs]
        lines.append(f"| {task} | " + " | ".join(cells(values)) + " |")
    for key, label in (("micro", "**micro**"), ("macro", "**macro**"), ("nlp", "**NLP average**"),
                       ("algorithmic", "**algorithmic average**")):
        values = [r["summary"][metric][key] for r in runs]
        if any(v is not None for v in values):  # a group none of the runs scored gets no row
            lines.append(f"| {label} | " + " | ".join(cells(values)) + " |")
    sets = {tuple(sorted(r["tasks"])) for r in runs}
    limits = {r["config"].get("limit") for r in runs}
    if len(sets) > 1 or len(limits) > 1:
        lines += ["", "Note: the runs cover different tasks or item limits; their averages are not comparable."]
    return "\n".join(lines)


def _unique(names: list[str]) -> list[str]:
    seen: Counter = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out

