"""Train a student with the Hugging Face Trainer from a fastkd teacher cache (fastkd as a library).

    python examples/hf_trainer.py                     # embedded teacher -> cache -> fresh student (CPU, ~1 min)
    python examples/hf_trainer.py --cache CACHE --student STUDENT --out runs/hf --max-steps 100

The pieces: `CacheDataset` (the cache as a torch Dataset, digests checked), `DistillCollator` (pads
the teacher targets beside input_ids/labels), `DistillTrainer` (a transformers.Trainer whose
compute_loss is fastkd's CE + sparse KL). Everything else is plain TrainingArguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_default(work: Path) -> tuple[Path, Path]:
    """A cache of the embedded teacher over synthetic BBH-style records, and a fresh student sharing its tokenizer."""
    from fastkd.cache_stage import cache_teacher
    from fastkd.demo import DEMO_TASKS, write_records
    from fastkd.paths import EMBEDDED_TEACHER
    from fastkd.tiny import make_student_init

    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    if not (cache / "manifest.json").exists():
        records = write_records(work / "records.jsonl", DEMO_TASKS, n=32, seed=0)
        cache_teacher(dict(teacher=str(EMBEDDED_TEACHER), data=str(records), out=str(cache), top_k=32,
                           max_length=512, progress=False))
    student = work / "student-init"
    if not (student / "config.json").exists():
        make_student_init(EMBEDDED_TEACHER, student, seed=0)
    return cache, student


def parse_args(argv=None) -> argparse.Namespace:
    """The options; parsed before transformers/torch are imported, so --help answers at once."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", help="fastkd cache folder or URL (default: build one from the embedded teacher)")
    ap.add_argument("--student", help="student folder (default: a fresh one sharing the embedded teacher's tokenizer)")
    ap.add_argument("--out", default="runs/hf-trainer", help="TrainingArguments.output_dir (default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=30, help="optimizer steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="per-device train batch size (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=3e-3, help="constant learning rate (default: %(default)s)")
    ap.add_argument("--kl-weight", type=float, default=1.0, help="weight of the KL to the teacher (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="TrainingArguments.seed (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)

    from transformers import AutoModelForCausalLM, TrainingArguments

    from fastkd.hf import CacheDataset, DistillCollator, DistillTrainer
    from fastkd.teacher import load_tokenizer

    cache, student = (args.cache, args.student)
    if not (cache and student):
        default_cache, default_student = build_default(Path(args.out) / "inputs")
        cache, student = cache or str(default_cache), student or str(default_student)
    tokenizer = load_tokenizer(str(student))
    train_set = CacheDataset(str(cache), layers=[], tokenizer=tokenizer)  # refuses a cache of another tokenizer
    model = AutoModelForCausalLM.from_pretrained(str(student))
    training_args = TrainingArguments(output_dir=args.out, max_steps=args.max_steps,
                                      per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                                      lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                                      report_to=[], seed=args.seed, remove_unused_columns=False,
                                      use_cpu=not __import__("torch").cuda.is_available(), disable_tqdm=True)
    trainer = DistillTrainer(model=model, args=training_args, train_dataset=train_set,
                             data_collator=DistillCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                             fastkd_config={"kl_weight": args.kl_weight})
    trainer.train()
    trainer.save_model(str(Path(args.out) / "final"))
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f} over {len(losses)} steps; student saved to "
          f"{Path(args.out) / 'final'}")
    return {"losses": losses, "final": Path(args.out) / "final"}


if __name__ == "__main__":
    main()
    sys.exit(0)
