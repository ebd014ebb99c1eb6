"""Build the embedded default teacher (fastkd/assets/teacher) with fastkd's own commands.

    python benchmarks/build_teacher.py --work runs/teacher [--install]

1. the held-out synthetic split (fastkd.demo.write_held_out: 2,000 items per task, 250 for
   boolean_expressions) is written first and excluded, as are the BBH test items;
2. `fastkd data synth`: boolean_expressions, navigate, tracking_shuffled_objects_three_objects
   and web_of_lies, 5,000 records per task (boolean_expressions has only 1,622 inputs left, so
   its records are repeated 3 times), fine rationales, 20% answer-only records (so the teacher
   also has an answer-only mode, the one the KD baseline distils);
3. a byte-level BPE tokenizer (1,024 tokens) trained on half of those records, and a Llama
   config (hidden 160, 6 layers, 5 heads, MLP 480: 2.3M parameters, 9.3 MB in fp32);
4. `fastkd train` from records (SFT: CE only), 1,800 steps of 32 sequences, lr 1e-3 with 100
   warmup steps and cosine decay, every batch mixing the tasks;
5. with --install, the final model and tokenizer are copied to fastkd/assets/teacher.

A rerun of the same command resumes step 4 from its last checkpoint (every 100 steps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

TASKS = "boolean_expressions,navigate,tracking_shuffled_objects_three_objects,web_of_lies"
ROOT = Path(__file__).resolve().parent.parent


def fastkd(*args: str) -> None:
    print("$ fastkd " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "fastkd", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/teacher", help="work folder")
    ap.add_argument("--records-per-task", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=160, help="model width (MLP: 3x)")
    ap.add_argument("--layers", type=int, default=6, help="transformer blocks")
    ap.add_argument("--heads", type=int, default=5, help="attention heads (width / heads = head size)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay)")
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--group-batches", type=int, default=1,
                    help="length-grouping window in batches; 1 mixes the tasks in every batch (the tasks differ in length, "
                         "so a wide window makes most batches single-task and the loss spiky)")
    ap.add_argument("--oversample", default="boolean_expressions=3",
                    help="TASK=K[,TASK=K]: repeat a task's records K times (boolean_expressions has only ~1,600 "
                         "training inputs, a quarter of the others' count)")
    ap.add_argument("--install", action="store_true", help="copy the result to fastkd/assets/teacher")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from fastkd.demo import write_held_out

    held_out = work / "held-out"
    write_held_out(held_out, TASKS.split(","))   # the synthetic test split: never trained on
    records = work / "train.jsonl"
    fastkd("data", "synth", "--tasks", TASKS, "--n", str(args.records_per_task), "--answer-only-fraction", "0.2",
           "--seed", str(args.seed + 1), "--exclude", str(held_out), "--out", str(records))

    from fastkd.tiny import DEFAULT_CORPUS, save_tiny, train_tokenizer

    recs = [json.loads(line) for line in records.open()]
    repeat = {t: int(k) for t, k in (item.split("=") for item in args.oversample.split(",") if item)}
    mixed = work / "train-mixed.jsonl"
    with mixed.open("w", encoding="utf-8") as fh:
        for r in recs:
            fh.write((json.dumps(r) + "\n") * repeat.get(r["task"], 1))
    corpus = [f"Q: {r['source']}\nA: {r['rationale']} So the answer is {r['target']}." for r in recs[::2]]
    tokenizer = train_tokenizer(corpus + DEFAULT_CORPUS, vocab_size=1024)
    init = save_tiny(work / "init", "llama", tokenizer=tokenizer, hidden=args.hidden, layers=args.layers, heads=args.heads,
                     kv_heads=args.heads, intermediate=3 * args.hidden, max_positions=1024, seed=args.seed)
    fastkd("train", "--data", str(mixed), "--student-config", str(init), "--tokenizer", str(init), "--kl-weight", "0",
           "--max-steps", str(args.steps), "--batch-size", "32", "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
           "--group-batches", str(args.group_batches),
           "--schedule", "cosine", "--max-length", "512", "--save-every", "100", "--log-every", "10",
           "--seed", str(args.seed), "--out", str(work / "run"), "--no-progress", "--resume" if (work / "run" / "checkpoint").exists() else "--overwrite")
    final = work / "run" / "final"
    if args.install:
        dest = ROOT / "fastkd" / "assets" / "teacher"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(final, dest, ignore=shutil.ignore_patterns("projector.safetensors", "*.yaml"))
        print(f"installed {final} -> {dest}")


if __name__ == "__main__":
    main()
