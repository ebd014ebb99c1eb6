"""Today's cache stage against a teacher that takes a fixed time per position (issue 30's baseline): how far
`cache_teacher`'s wall time is above the teacher's forward alone, and how long it takes to reach the first forward.

    python benchmarks/cache_pipeline.py [--records 2000] [--rate 12000] [--startup-records 2000,8000,32000]
                                        [--startup-ranks 1,3] [--batch-size 8] [--unit 256]

The teacher is a stand-in: `fastkd.teacher.load_hf` is replaced by a backend whose forward sleeps rows / --rate
seconds (no CPU) and hands over precomputed top-64 log-probs with their exact tail (a softmax of random logits
over V=151,936) and, with one hidden layer, fixed random float32 states of width 3,584; its manifest settings are
a fake 7B-like teacher identity. The tokenizer is the embedded teacher's (V=1,024), so the stand-in's ids are drawn
below len(tokenizer) = 1,024 (the writer checks them): id bytes per position are those of a V=1,024 cache, not of
a V=151,936 one (bytes/pos is printed). Each case runs in a fresh process: `peak RSS` is its ru_maxrss,
`peak at call` the same just before cache_teacher (imports, tokenizer, the stand-in's pool mapped from a file
built once by another process).

Columns: `wall s` = first forward to the end of cache_teacher; `total s` = the whole call; `forward s` = the
stand-in's sleeps; `wall/fwd` (issue 30's target <= 1.05); `start-up s` = the call to the first forward
(tokenising every record, settings, opening the cache; transformers is imported before); `cores/GPU*` =
(wall - forward) / forward, derived: the extra encoder cores that would hide the encoding at this rate.
Ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR on loopback, one thread each); the
start-up table stops each rank at its first forward (give at least --unit x ranks records: every rank needs a unit).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEACHER_V, K, WIDTH, POOL_ROWS = 151_936, 64, 3_584, 4_096
WORDS = ("True False and or not step steps Take Turn around forward left right always face the first second "
         "third person tells lies truth Alice Bob Claire swap ball book is are so we count parentheses close "
         "open sequence answer therefore because Yes No each one two three four").split()
FAKE_TEACHER = {"path": "stand-in/qwen2-7b-like", "config_sha256": "0" * 64, "model_type": "qwen2",
                "dtype": "bfloat16", "num_parameters": 7_615_616_512, "num_hidden_layers": 28, "hidden_size": WIDTH}


class FirstForward(Exception):
    """Raised by the stand-in at its first forward when only the start-up is measured."""


def write_records(path: Path, count: int, seed: int = 0) -> Path:
    """CoT-style JSONL records of a few hundred tokens each (a ~40-word question, a ~90-180-word rationale)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(count):
            fh.write(json.dumps({"source": " ".join(rng.choices(WORDS, k=rng.randint(25, 55))),
                                 "rationale": " ".join(rng.choices(WORDS, k=rng.randint(90, 180))),
                                 "target": rng.choice(["True", "False"]), "task": f"t{i % 5}"}) + "\n")
    return path


def make_pool(id_vocab: int, hidden: bool, seed: int = 0) -> dict:
    """POOL_ROWS rows of what a teacher's device hands over after its own top-k: log-probs and exact tail from a
    softmax over V=151,936 (1,024 distinct rows, tiled), ids below `id_vocab`, and hidden states if asked."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    values, tails = [], []
    for _ in range(32):                                  # 32 x 32 distinct rows: chunks keep the peak RSS low
        logits = torch.randn(32, TEACHER_V, generator=gen) * 2.0
        logits[:, :8] += torch.linspace(16.0, 8.0, 8)   # a few likely tokens: a teacher-like tail (mean ~0.06)
        top = torch.log_softmax(logits, dim=-1).topk(K, dim=-1).values
        values.append(top)
        tails.append((1.0 - top.double().exp().sum(dim=1)).clamp(min=0.0).float())
    reps = POOL_ROWS // 1024
    ids = torch.stack([torch.randperm(id_vocab, generator=gen)[:K] for _ in range(POOL_ROWS)])
    pool = {"ids": ids, "logprobs": torch.cat(values).repeat(reps, 1), "tail": torch.cat(tails).repeat(reps)}
    if hidden:
        pool["hidden"] = torch.randn(POOL_ROWS, WIDTH, generator=gen)
    return pool


def stand_in(pool: dict, rate: float, clock: dict, stop_at_first: bool):
    """A replacement for fastkd.teacher.load_hf: the settings a real teacher gives, a forward that sleeps."""
    import torch

    from fastkd.teacher import Backend, TeacherSignal, parse_layers

    def load(config, tokenizer, env):
        layers = parse_layers(config.layers, FAKE_TEACHER["num_hidden_layers"])
        settings = {"teacher": dict(FAKE_TEACHER), "layers": layers, "hidden_widths": [WIDTH] * len(layers)}
        offset = [0]

        def signal(chunk, generator) -> TeacherSignal:
            clock.setdefault("first_forward", time.perf_counter())
            if stop_at_first:
                raise FirstForward
            rows = [sum(ex.loss_mask[1:]) for ex in chunk]     # position t predicts token t+1, as teacher_signal
            m = sum(rows)
            if m > POOL_ROWS:
                raise SystemExit(f"a batch of {m} rows is more than the pool's {POOL_ROWS}: lower --batch-size")
            start = offset[0] = (offset[0] + 997) % (POOL_ROWS - m + 1)
            part = slice(start, start + m)
            clock["forward"] = clock.get("forward", 0.0) + m / rate
            time.sleep(m / rate)
            hidden = {layer: pool["hidden"][part] for layer in layers}
            return TeacherSignal(pool["ids"][part], pool["logprobs"][part], pool["tail"][part], None, hidden, rows)

        return Backend(settings, signal, torch.device("cpu"))

    return load


def child(args) -> None:
    """One rank of one case: patch load_hf, run cache_teacher, print this rank's figures as one JSON line."""
    import fastkd.teacher
    from fastkd.cache_stage import cache_teacher
    from fastkd.paths import EMBEDDED_TEACHER
    from fastkd.teacher import load_tokenizer

    import torch

    vocab = len(load_tokenizer(str(EMBEDDED_TEACHER)))     # also imports transformers before the clock starts
    if not Path(args.pool).exists():     # built once in its own process: its transient peak stays out of the cases'
        torch.save(make_pool(vocab, hidden=True), args.pool)
        return
    pool = torch.load(args.pool, mmap=True)           # mapped: a logits-only case never touches the hidden states
    clock: dict = {}
    fastkd.teacher.load_hf = stand_in(pool, args.rate, clock, args.startup_only)
    config = {"teacher": str(EMBEDDED_TEACHER), "data": args.data, "out": args.out, "top_k": K, "device": "cpu",
              "layers": "-1" if args.hidden_layers else None, "batch_size": args.batch_size,
              "sequences_per_shard": args.unit, "progress": False}
    rss_at_call = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    called = time.perf_counter()
    summary = None
    try:
        summary = cache_teacher(config)
    except FirstForward:
        pass
    ended = time.perf_counter()
    first = clock.get("first_forward", ended)
    result = {"rank": int(os.environ.get("RANK", "0")), "startup": first - called, "wall": ended - first,
              "total": ended - called, "forward": clock.get("forward", 0.0),
              "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_at_call": rss_at_call}
    if summary is not None and summary.is_main:
        counts = json.loads((Path(args.out) / "manifest.json").read_text())["counts"]
        result.update(positions=summary.loss_positions, units_s=summary.seconds_units, bytes=counts["bytes"])
    print("RESULT " + json.dumps(result), flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(data: Path, out: Path, world: int, hidden_layers: int, args, startup_only: bool) -> list[dict]:
    """Start `world` ranks of the child (fresh processes) and return each rank's figures; the first call builds
    the stand-in's pool file next to the records."""
    pool = data.parent / "pool.pt"
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--out", str(out), "--rate", str(args.rate),
           "--pool", str(pool),
           "--hidden-layers", str(hidden_layers), "--batch-size", str(args.batch_size), "--unit", str(args.unit)]
    cmd += ["--startup-only"] if startup_only else []
    if not pool.exists():
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    port, procs = _port(), []
    for rank in range(world):
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, err = p.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise SystemExit(f"case with {world} rank(s) failed:\n{err[-3000:]}")
        results.append(json.loads(lines[-1][7:]))
    return results


def pipeline_rows(work: Path, args) -> list[dict]:
    """One row per case (logits only; one hidden layer), 1 rank, --records records."""
    data = write_records(work / "records.jsonl", args.records)
    rows = []
    for layers in (0, 1):
        r = run_case(data, work / f"cache-h{layers}", 1, layers, args, startup_only=False)[0]
        rows.append(dict(r, case="logits only" if not layers else f"1 hidden layer, d={WIDTH:,}"))
    return rows


def startup_rows(work: Path, args) -> list[dict]:
    """Start-up seconds (call -> first forward) per records count and rank count; the slowest rank counts."""
    rows = []
    for count in [int(x) for x in args.startup_records.split(",") if x]:
        data = write_records(work / f"records-{count}.jsonl", count)
        for world in [int(x) for x in args.startup_ranks.split(",") if x]:
            results = run_case(data, work / f"startup-{count}-{world}", world, 0, args, startup_only=True)
            rows.append({"records": count, "ranks": world, "startup": max(r["startup"] for r in results),
                         "rss_mib": max(r["rss_mib"] for r in results)})
    return rows


def format_pipeline(rows: list[dict], rate: float) -> str:
    head = ("| case | loss positions | wall s | total s | forward s | wall/fwd | positions/s | peak RSS MiB | "
            "peak at call | start-up s | bytes/pos | cores/GPU* |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['positions']:,} | {r['wall']:.1f} | {r['total']:.1f} | {r['forward']:.1f} "
                     f"| {r['wall'] / r['forward']:.2f} | {r['positions'] / r['wall']:,.0f} | {r['rss_mib']:,.0f} "
                     f"| {r['rss_at_call']:,.0f} | {r['startup']:.2f} | {r['bytes'] / r['positions']:,.1f} "
                     f"| {(r['wall'] - r['forward']) / r['forward']:.2f} |")
    lines.append(f"\n*derived: (wall - forward) / forward at {rate:,.0f} positions/s; bytes/pos with ids below 1,024")
    return "\n".join(lines)


def format_startup(rows: list[dict]) -> str:
    lines = ["| records | ranks | start-up s (slowest rank) | peak RSS MiB (largest rank) |", "|---|---|---|---|"]
    lines += [f"| {r['records']:,} | {r['ranks']} | {r['startup']:.2f} | {r['rss_mib']:,.0f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000, help="records of the pipeline table")
    ap.add_argument("--rate", type=float, default=12_000.0, help="the stand-in teacher's loss positions per second")
    ap.add_argument("--batch-size", type=int, default=8, help="cache-teacher --batch-size")
    ap.add_argument("--unit", type=int, default=256, help="cache-teacher --sequences-per-shard (the work unit)")
    ap.add_argument("--startup-records", default="2000,8000,32000", help="comma list of records counts ('' skips)")
    ap.add_argument("--startup-ranks", default="1,3", help="comma list of rank counts for the start-up table")
    ap.add_argument("--no-pipeline", action="store_true", help="only the start-up table")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hidden-layers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--pool", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    load = os.getloadavg()
    print(f"cache_teacher with a stand-in teacher at {args.rate:,.0f} positions/s; {os.cpu_count()} cores, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start")
    with tempfile.TemporaryDirectory(prefix="fastkd-cache-pipeline-") as tmp:
        if not args.no_pipeline:
            print(f"\n{args.records:,} records, batch {args.batch_size}, work unit {args.unit}, 1 rank\n")
            print(format_pipeline(pipeline_rows(Path(tmp), args), args.rate))
        if args.startup_records:
            print("\nstart-up: the call to the first forward (tokenising every record, settings, opening the cache)\n")
            print(format_startup(startup_rows(Path(tmp), args)))
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
