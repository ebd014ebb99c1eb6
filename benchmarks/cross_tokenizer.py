"""Cross-tokenizer KD from the cache vs SFT, for a student with its own tokenizer (CPU, reduced scale).

    python benchmarks/cross_tokenizer.py --work runs/cross-tokenizer --threads 1   # about 35 min on 1 core

The embedded teacher (tokenizer: 1,024 ids) is cached once over synthetic records of the four demo tasks
(top-64 + exact tail, with rationales). A new byte-level BPE tokenizer (--student-vocab ids, trained on the
records' text) gets a 0.55M-parameter Llama student (the demo's shape), one initialisation per seed shared
by the arms: SFT (CE on the records' rationales and answers, in its own tokens), ULD (`--cross-tokenizer
uld`: CE + the sorted-probability L1) and exact (`--cross-tokenizer exact`: CE + tail-mode KL at aligned
positions). Scored on the real BBH items (first --limit per task) with eval-bbh --prompt-format trained.
Writes <work>/results.json and <work>/table.md (paired differences method - SFT with 95% t intervals over
seeds). Every stage resumes: rerun after a kill and finished students and scores are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from replication import evaluate, table, train_student  # benchmarks/replication.py: same recipe and scoring

from fastkd.demo import DEMO_TASKS, EMBEDDED_TEACHER, STUDENT_SHAPE, write_records

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/cross-tokenizer")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps per student (batch 16)")
    ap.add_argument("--records-per-task", type=int, default=400)
    ap.add_argument("--student-vocab", type=int, default=640)
    ap.add_argument("--limit", type=int, default=60, help="real BBH items scored per task (the first ones)")
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
    cache_teacher(str(EMBEDDED_TEACHER), str(records), str(cache), k=64, cot=True, batch_size=32, max_length=512,
                  progress=False)          # resumes, or returns at once when complete
    tok_dir = student_tokenizer(records, work / "student-tokenizer", args.student_vocab)
    clock["records, cache, tokenizer"] = round(time.perf_counter() - t0)
    sources = {"SFT": dict(data=str(records), kl_weight=0.0),
               "ULD": dict(cache=str(cache), cross_tokenizer="uld"),
               "exact": dict(cache=str(cache), cross_tokenizer="exact")}
    arms = [a for a in ARMS if a in args.arms.split(",")]
    scores: dict = {"bbh": {}}
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
            per_student[tag] = {"train_s": round(t2 - t1), "eval_s": round(time.perf_counter() - t2)}
            print(f"seed {seed} {arm}: BBH micro {scores['bbh'][arm][-1]['micro']:.1f} {per_student[tag]}", flush=True)
    clock["students: train + eval"] = round(time.perf_counter() - t0 - clock["records, cache, tokenizer"])
    from fastkd.teacher import load_tokenizer

    teacher_tok, student_tok = load_tokenizer(str(EMBEDDED_TEACHER)), load_tokenizer(str(tok_dir))
    result = {"scores": scores, "seconds": clock, "per_student": per_student, "args": vars(args),
              "vocab": {"teacher": len(teacher_tok), "student": len(student_tok)}}
    (work / "results.json").write_text(json.dumps(result, indent=2))
    text = table(scores, PAIRS) + f"\nwall time (s): {clock}\n"
    (work / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
