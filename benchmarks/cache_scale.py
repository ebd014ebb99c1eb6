"""cache-teacher scale-out on CPU: positions/s for 1, 2 and 3 gloo ranks (one thread each) as a
ratio to 1 rank, then (if benchmarks/cache_scale_reader.py is there) reader throughput from URLs.

    python benchmarks/cache_scale.py [--ranks 1,2,3] [--records 240] [--hidden 256] [--layers 4] [--reps 1]

Every run writes a fresh cache of the same records with a small Qwen2 teacher built here
(fastkd.tiny, random weights), top-k 64, no hidden states. Ranks are started as torchrun starts
them (RANK, WORLD_SIZE, MASTER_ADDR on loopback). `positions/s` is loss positions over the
unit phase's wall time (rank 0: first unit to the barrier after the last rank's last unit;
startup, model load and tokenisation excluded); `wall s` is the whole command. A machine with
fewer cores than ranks cannot show a speed-up: the table prints the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def build(work: Path, records: int, hidden: int, layers: int) -> tuple[Path, Path]:
    """A teacher folder and a JSONL file of CoT-style records (fixed seed)."""
    import random

    from fastkd.tiny import save_tiny, train_tokenizer

    teacher = save_tiny(work / "teacher", "qwen2", tokenizer=train_tokenizer(), hidden=hidden, layers=layers,
                        heads=max(hidden // 64, 1), kv_heads=max(hidden // 128, 1))
    rng = random.Random(0)
    words = ["True", "False", "and", "or", "not", "(", ")", "step", "Take", "Yes", "No", "Turn", "around"]
    path = work / "records.jsonl"
    with open(path, "w") as fh:
        for i in range(records):
            fh.write(json.dumps({"source": " ".join(rng.choices(words, k=rng.randint(8, 30))),
                                 "rationale": " ".join(rng.choices(words, k=rng.randint(40, 120))),
                                 "target": rng.choice(["True", "False"]), "task": f"t{i % 4}"}) + "\n")
    return teacher, path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, teacher: Path, records: Path, out: Path, unit: int, batch: int) -> dict:
    """One cache-teacher run with `world` ranks; its manifest summary plus the command's wall time."""
    args = [sys.executable, "-m", "fastkd", "cache-teacher", "--teacher", str(teacher), "--data", str(records),
            "--out", str(out), "--top-k", "64", "--sequences-per-shard", str(unit), "--batch-size", str(batch),
            "--max-length", "512", "--no-progress"]
    port = _port()
    started = time.perf_counter()
    procs = []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"cache-teacher with {world} rank(s) failed:\n{err[-3000:]}")
    wall = time.perf_counter() - started
    summary = json.loads((out / "manifest.json").read_text())["summary"]
    return {"positions": summary["loss_positions"], "seconds": summary["seconds_units"], "wall": wall}


def scale_rows(ranks: list[int], records: int, hidden: int, layers: int, reps: int, unit: int, batch: int) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="fastkd-cache-scale-"))
    try:
        teacher, data = build(work, records, hidden, layers)
        rows, base = [], None
        for world in ranks:
            runs = []
            for rep in range(reps):
                out = work / f"cache-{world}-{rep}"
                runs.append(run(world, teacher, data, out, unit, batch))
                shutil.rmtree(out, ignore_errors=True)
            seconds = statistics.median(r["seconds"] for r in runs)
            rate = runs[0]["positions"] / seconds
            base = base or rate
            rows.append({"ranks": world, "positions": runs[0]["positions"], "seconds": seconds, "positions/s": rate,
                         "ratio vs 1 rank": rate / base, "wall s": statistics.median(r["wall"] for r in runs)})
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_scale(rows: list[dict]) -> str:
    lines = [f"{'ranks':>5}{'positions':>11}{'unit phase s':>14}{'positions/s':>13}{'vs 1 rank':>11}{'wall s':>9}"]
    for r in rows:
        lines.append(f"{r['ranks']:>5}{r['positions']:>11,}{r['seconds']:>14.2f}{r['positions/s']:>13,.0f}"
                     f"{r['ratio vs 1 rank']:>11.2f}{r['wall s']:>9.1f}")
    return "\n".join(lines)


def format_generic(rows: list[dict]) -> str:
    """Any list of dict rows as an aligned table (used for the reader rows if their module has no formatter)."""
    keys = list(rows[0])
    cell = lambda v: f"{v:,.3f}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    widths = [max(len(k), *(len(cell(r.get(k))) for r in rows)) for k in keys]
    lines = ["  ".join(k.rjust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(cell(r.get(k)).rjust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2,3", help="comma list of rank counts")
    ap.add_argument("--records", type=int, default=240)
    ap.add_argument("--hidden", type=int, default=256, help="teacher width")
    ap.add_argument("--layers", type=int, default=4, help="teacher blocks")
    ap.add_argument("--unit", type=int, default=16, help="--sequences-per-shard (the work unit)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=1, help="runs per rank count (median)")
    ap.add_argument("--no-reader", action="store_true", help="skip the reader-throughput table")
    args = ap.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    rows = scale_rows(ranks, args.records, args.hidden, args.layers, args.reps, args.unit, args.batch_size)
    print(f"cache-teacher on CPU, gloo ranks of one thread each ({os.cpu_count()} cores here); teacher Qwen2 "
          f"hidden {args.hidden}, {args.layers} blocks; {args.records} records, units of {args.unit}")
    print(format_scale(rows))
    if args.no_reader:
        return
    try:
        import cache_scale_reader
    except ImportError:
        return
    if hasattr(cache_scale_reader, "reader_rows"):
        reader = cache_scale_reader.reader_rows()
        print("\nreader throughput (benchmarks/cache_scale_reader.py)")
        fmt = getattr(cache_scale_reader, "format_rows", format_generic)
        print(fmt(reader) if reader else "(no rows)")


if __name__ == "__main__":
    main()
