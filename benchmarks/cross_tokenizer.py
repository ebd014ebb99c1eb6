"""Cross-tokenizer KD from the cache vs SFT, for a student with its own tokenizer (CPU, reduced scale).

    python benchmarks/cross_tokenizer.py --work runs/cross-tokenizer --threads 1   # about 35 min on 1 core

The embedded teacher (tokenizer: 1,024 ids) is cached once over synthetic records of the four demo tasks
(top-64 + exact tail, with rationales). A new byte-level BPE tokenizer (--student-vocab ids, trained on the
records' text) gets a 0.55M-parameter Llama student (the demo's shape), one initialisation per seed shared
by the arms: SFT (CE on the records' rationales and answers, in its own tokens), ULD (`--cross-tokenizer
uld`: CE + the sorted-probability L1) and exact (`--cross-tokenizer exact`: CE + tail-mode KL at aligned
positions). Scored on the real BBH items (first --limit per task) with eval-bbh --prompt-format trained.
Also: mean CE per student token on held-out generated records (neither BBH nor training items), the same
text in the same student tokens for every arm. Writes <work>/results.json and <work>/table.md (paired
differences method - SFT with 95% t intervals over seeds). Every stage resumes: rerun after a kill and finished students and scores are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from replication import evaluate, table, train_student  # benchmarks/replication.py: same recipe and scoring

from fastkd.demo import DEMO_TASKS, write_records
from fastkd.paths import EMBEDDED_TEACHER
from fastkd.tiny import STUDENT_SHAPE

ARMS = ("SFT", "ULD", "exact")
PAIRS = (("ULD", "SFT"), ("exact", "SFT"), ("exact", "ULD"))


def student_tokenizer(records: Path, out: Path, vocab: int) -> Path:
    """A byte-level BPE tokenizer of its own, trained on the records' text (made once)."""
    from fastkd.tiny import pin_tokenizer_class, train_tokenizer

    if (out / "tokenizer.json").exists():
        return out
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    corpus = [f"Q: {r['source']}\nA: Let's think step by step. {r['rationale']} So the answer is {r['target']}."
              for r in rows[::4]]
    tok = train_tokenizer(corpus, vocab_size=vocab)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    pin_tokenizer_class(out)
    return out


def student_init(tokenizer_dir: Path, out: Path, seed: int) -> Path:
    from fastkd.teacher import load_tokenizer
    from fastkd.tiny import build_model, pin_tokenizer_class

    if (out / "config.json").exists():
        return out
    tok = load_tokenizer(str(tokenizer_dir))
    model = build_model(tok, arch="llama", seed=seed, max_positions=1024, **STUDENT_SHAPE)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    pin_tokenizer_class(out)
    return out


def heldout_records(work: Path, records: Path, per_task: int) -> Path:
    """Generated items of the tasks that are neither BBH items nor training records (made once)."""
    from fastkd import synth

    path = work / "heldout.jsonl"
    if path.exists():
        return path
    seen = {synth.normalise(json.loads(line)["source"]) for line in records.read_text().splitlines()}
    rows = []
    for task in DEMO_TASKS:
        rows += synth.generate(task, per_task, seed=300, exclude=synth.real_inputs(task) | seen)
    synth.write_jsonl(path, rows)
    return path


def heldout_ce(model_dir: Path, heldout: Path) -> float:
    """Mean CE per response token (the student's own tokens) over the held-out records' rationale + answer."""
    import torch

    from fastkd.templates import Template, build_examples
    from fastkd.batching import labels_from_mask, pad_batch
    from fastkd.teacher import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype="float32", device="cpu", role="student").eval()
    examples = build_examples(heldout, tok, Template(), max_length=512)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 16):
            chunk = examples[i:i + 16]
            ids, attn, mask = pad_batch([e.input_ids for e in chunk], tok.pad_token_id, "right", [e.loss_mask for e in chunk])
            labels = labels_from_mask(ids, mask)
            logits = model(input_ids=ids, attention_mask=attn).logits
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                                           reduction="sum"))
            count += int((labels != -100).sum())
    return nll / max(count, 1)


def ce_table(ces: dict[str, list[float]]) -> str:
    """Markdown: held-out CE per arm (mean ± sd) and paired differences with 95% t intervals."""
    import statistics

    from replication import mean_ci

    lines = ["### held-out CE (nats per student token, lower is better)", "", "| arm | runs | CE |", "|---|---|---|"]
    for arm, vals in ces.items():
        sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""
        lines.append(f"| {arm} | {len(vals)} | {statistics.mean(vals):.3f}{sd} |")
    lines += ["", "| pair | CE difference, mean [95% CI] |", "|---|---|"]
    for a, b in PAIRS:
        if a in ces and b in ces:
            m, h = mean_ci([x - y for x, y in zip(ces[a], ces[b])])
            lines.append(f"| {a} − {b} | {m:+.3f}" + ("" if h != h else f" [{m - h:+.3f}, {m + h:+.3f}]") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cross-tokenizer")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per student (batch 16)")
    ap.add_argument("--records-per-task", type=int, default=400)
    ap.add_argument("--student-vocab", type=int, default=640)
    ap.add_argument("--limit", type=int, default=60, help="real BBH items scored per task (the first ones)")
    ap.add_argument("--heldout-per-task", type=int, default=50, help="generated held-out records per task for the CE")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--bbh-dir", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from fastkd.cache_stage import cache_teacher

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    clock: dict = {}
    t0 = time.perf_counter()
    records = work / "records.jsonl"
    if not records.exists():
        write_records(records, DEMO_TASKS, args.records_per_task, seed=100)
    cache = work / "cache"
    cache_teacher(dict(teacher=str(EMBEDDED_TEACHER), data=str(records), out=str(cache), top_k=64, cot=True,
                       batch_size=32, max_length=512,
                       progress=False))          # resumes, or returns at once when complete
    tok_dir = student_tokenizer(records, work / "student-tokenizer", args.student_vocab)
    clock["records, cache, tokenizer"] = round(time.perf_counter() - t0)
    sources = {"SFT": dict(data=str(records), kl_weight=0.0),
               "ULD": dict(cache=str(cache), cross_tokenizer="uld"),
               "exact": dict(cache=str(cache), cross_tokenizer="exact")}
    arms = [a for a in ARMS if a in args.arms.split(",")]
    heldout = heldout_records(work, records, args.heldout_per_task)
    scores: dict = {"bbh": {}}
    heldout_ces: dict[str, list[float]] = {}
    per_student = {}
    for seed in range(args.seeds):
        init = student_init(tok_dir, work / f"init-{seed}", seed)
        for arm in arms:
            tag = f"{arm.lower()}-s{seed}"
            t1 = time.perf_counter()
            final = train_student(work / "students", tag, init, args.steps, seed, **sources[arm])
            t2 = time.perf_counter()
            scores["bbh"].setdefault(arm, []).append(evaluate(final, work / "eval" / tag, tag, args.bbh_dir,
                                                              "trained", args.limit))
            ce_file = work / "eval" / tag / "heldout_ce.json"
            if not ce_file.exists():
                ce_file.write_text(json.dumps({"ce": heldout_ce(final, heldout)}))
            heldout_ces.setdefault(arm, []).append(json.loads(ce_file.read_text())["ce"])
            per_student[tag] = {"train_s": round(t2 - t1), "eval_s": round(time.perf_counter() - t2)}
            print(f"seed {seed} {arm}: BBH micro {scores['bbh'][arm][-1]['micro']:.1f} {per_student[tag]}", flush=True)
    clock["students: train + eval"] = round(time.perf_counter() - t0 - clock["records, cache, tokenizer"])
    from fastkd.teacher import load_tokenizer

    teacher_tok, student_tok = load_tokenizer(str(EMBEDDED_TEACHER)), load_tokenizer(str(tok_dir))
    result = {"scores": scores, "heldout_ce": heldout_ces, "seconds": clock, "per_student": per_student, "args": vars(args),
              "vocab": {"teacher": len(teacher_tok), "student": len(student_tok)}}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    text = table(scores, PAIRS) + "\n" + ce_table(heldout_ces) + f"\nwall time (s): {clock}\n"
    (work / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
