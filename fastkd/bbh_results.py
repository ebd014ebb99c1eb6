"""eval-bbh's run folder and what reads it: per-item rows, results.json (schema in fastkd.evaluate's docstring),
report.md, the score charts, and the --compare table of finished runs."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from fastkd import bbh
from fastkd.errors import UserError
from fastkd.paths import OUTPUT_MARKERS, check_out_folder

SCHEMA = "fastkd-bbh-results/1"
RUN_FILES = ("items.jsonl", "results.json", "report.md", "scores.png")   # what write_run writes into a run folder
AVERAGES = {"micro": "micro", "macro": "macro", "nlp": "NLP average", "algorithmic": "algorithmic average"}


class EvalError(UserError):
    """A predictions file or run folder that cannot be used as asked."""


def item_row(item: bbh.BBHItem, prompt: str | None, prompt_tokens: int | None, generation: str, finish: str) -> dict:
    s = bbh.score(generation, item.target)
    return {"task": item.task, "idx": item.idx,
            "prompt_sha256": hashlib.sha256(prompt.encode("utf-8")).hexdigest() if prompt is not None else None,
            "prompt_tokens": prompt_tokens, "generation": generation, "answer": s.answer,
            "lenient_answer": s.lenient_answer, "target": item.target, "correct": s.correct,
            "lenient_correct": s.lenient_correct, "finish": finish}


def results_from_rows(rows: list[dict]) -> dict:
    """Per-task accuracies (percent) of per-item rows and the micro (all items), macro (mean over tasks), NLP and
    algorithmic (macro within the group) averages, for both scores; the report is derived only from these."""
    per_task: dict[str, dict[str, list[bool]]] = {}
    for row in rows:
        slot = per_task.setdefault(row["task"], {"strict": [], "lenient": []})
        slot["strict"].append(bool(row["correct"]))
        slot["lenient"].append(bool(row["lenient_correct"]))
    tasks = {t: {"n": len(v["strict"]), "group": bbh.task_group(t),
                 "strict": _accuracy(v["strict"]), "lenient": _accuracy(v["lenient"])}
             for t, v in per_task.items()}
    summary = {"n_items": sum(v["n"] for v in tasks.values()), "n_tasks": len(tasks)}
    for metric in ("strict", "lenient"):
        flat = [x for v in per_task.values() for x in v[metric]]

        def macro(names):
            vals = [tasks[t][metric] for t in names if t in tasks]
            return sum(vals) / len(vals) if vals else None

        summary[metric] = {"micro": _accuracy(flat), "macro": macro(tasks),
                           "nlp": macro(bbh.NLP_TASKS), "algorithmic": macro(bbh.ALGORITHMIC_TASKS)}
    return {"tasks": tasks, "summary": summary}


def _accuracy(flags: list[bool]) -> float | None:
    return 100.0 * sum(flags) / len(flags) if flags else None


def existing_evaluation(out: Path, overwrite: bool) -> list[Path]:
    """Checked before anything is loaded: an --out holding an evaluation is refused unless `overwrite`, then its files
    are returned, to be deleted just before the new ones are written (never mixed with them)."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out}: exists and is not a folder (eval-bbh writes items.jsonl, results.json, "
                        "report.md into a folder)")
    check_out_folder(out, "BBH evaluation")   # nor a cache's or a training run's folder
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if not overwrite and any(p.name in OUTPUT_MARKERS["BBH evaluation"] for p in found):
        raise EvalError(f"--out {out} already holds an evaluation ({', '.join(p.name for p in found)}); delete it "
                        f"and start over with --overwrite, or choose another --out")
    return found if overwrite else []


def write_run(out: Path, rows: list[dict], name: str, config: dict, resolved: dict, source: dict,
              timing: dict | None, plot: bool = True) -> dict:
    """items.jsonl, results.json, report.md (and scores.png) in `out`; returns the results. `config`: the EvalConfig's
    fields; `resolved`: what they came to (task list, data folder, stop string, device, dtype)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "items.jsonl").open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    results = {"schema": SCHEMA, "name": name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "source": source, "config": config, "resolved": resolved, **results_from_rows(rows),
               "finish": dict(Counter(r["finish"] for r in rows)), "timing": timing}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown(results), encoding="utf-8")
    if plot:
        plot_scores([results], out / "scores.png")
    return results


def summary_line(results: dict, out: str | Path) -> str:
    """One line: the run's name, counts and main scores, and where it was written."""
    s = results["summary"]
    return (f"{results['name']}: {s['n_items']} items, {s['n_tasks']} tasks; strict micro {_pct(s['strict']['micro'])} "
            f"macro {_pct(s['strict']['macro'])}; lenient micro {_pct(s['lenient']['micro'])} -> {out}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _ordered(tasks) -> list[str]:
    """Natural-language tasks first, then algorithmic, each alphabetical (the paper's order)."""
    return sorted(tasks, key=lambda t: (bbh.task_group(t) != "nlp", t))


def report_markdown(results: dict) -> str:
    cfg, s = results["config"], results["summary"]
    src = results["source"].get("model") or results["source"].get("predictions")
    chat = " (chat template)" if cfg.get("chat_template") else ""
    lines = [f"# BBH: {results['name']}", "",
             f"Source: `{src}`; prompt format `{cfg['prompt_format']}`{chat}; max new tokens {cfg['max_new_tokens']}; "
             f"limit {cfg['limit'] or 'none'}; data `{results['resolved']['bbh_dir']}`.",
             "Strict: the BBH authors' exact-match recipe. Lenient: option letter, case-insensitive labels, numbers.",
             "", "| task | group | n | strict | lenient |", "|---|---|---:|---:|---:|"]
    for task in _ordered(results["tasks"]):
        v = results["tasks"][task]
        lines.append(f"| {task} | {v['group']} | {v['n']} | {_pct(v['strict'])} | {_pct(v['lenient'])} |")
    n_nlp = sum(1 for t in results["tasks"] if bbh.task_group(t) == "nlp")
    counts = {"micro": f"{s['n_items']} items", "macro": f"{s['n_tasks']} tasks", "nlp": f"{n_nlp} tasks",
              "algorithmic": f"{s['n_tasks'] - n_nlp} tasks"}
    lines += ["", "| average | strict | lenient |", "|---|---:|---:|"]
    lines += [f"| {label} ({counts[k]}) | {_pct(s['strict'][k])} | {_pct(s['lenient'][k])} |"
              for k, label in AVERAGES.items() if s["strict"][k] is not None]
    if results.get("timing"):
        t = results["timing"]
        lines += ["", f"Generation: {t['seconds']} s, {t['items_per_s']} items/s, {t['new_tokens']} new tokens; "
                      f"finish reasons {results['finish']}."]
    return "\n".join(lines) + "\n"


def plot_scores(runs: list[dict], path: Path, title: str | None = None) -> None:
    """Horizontal bars per task: strict and lenient of one run (strict macro marked), or each run's strict score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = _ordered({t for r in runs for t in r["tasks"]})[::-1]
    if len(runs) == 1:
        bars = {m: [runs[0]["tasks"][t][m] for t in tasks] for m in ("lenient", "strict")}
    else:
        bars = {r["name"]: [r["tasks"].get(t, {}).get("strict") or 0.0 for t in tasks] for r in runs}
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.16 * len(bars) * len(tasks)))
    height = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars.items()):
        ax.barh([y + 0.4 - (i + 0.5) * height for y in range(len(tasks))], values, height=height, label=label)
    if len(runs) == 1:
        macro = runs[0]["summary"]["strict"]["macro"]
        ax.axvline(macro, color="#08519c", linestyle="--", linewidth=1, label=f"strict macro {_pct(macro)}")
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title or f"BBH: {runs[0]['name']} ({runs[0]['config']['prompt_format']})", loc="left", fontsize=10)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
        return [_pct(base)] + [_pct(v) + ("" if None in (v, base) else f" ({v - base:+.2f})") for v in values[1:]]

    for task in tasks:
        values = [r["tasks"].get(task, {}).get(metric) for r in runs]
        lines.append(f"| {task} | " + " | ".join(cells(values)) + " |")
    for key, label in AVERAGES.items():
        values = [r["summary"][metric][key] for r in runs]
        if any(v is not None for v in values):  # a group none of the runs scored gets no row
            lines.append(f"| **{label}** | " + " | ".join(cells(values)) + " |")
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

