"""The cache stage against a teacher that takes a fixed time per position (issue 30): how far `cache_teacher`'s
wall time is above the teacher's forward alone, with the shards encoded after each unit in the main thread
(--encode-threads 0, the sequential path) and on worker threads while the next forward runs (the default, 2), how
many encoder cores that takes per GPU, and how long a rank takes to reach its first forward.

    python benchmarks/cache_pipeline.py [--records 2000] [--rate 12000] [--threads 0,2] [--repeats 3]
                                        [--startup-records 2000,8000,32000] [--startup-ranks 1,3]
                                        [--batch-size 8] [--unit 256] [--gil-blocks 64]

The teacher is a stand-in: `fastkd.teacher.load_hf` is replaced by a backend whose forward sleeps rows / --rate
seconds (no CPU) and hands over precomputed top-64 log-probs with their exact tail (a softmax of random logits
over V=151,936) and, with one hidden layer, fixed random float32 states of width 3,584; its manifest settings are
a fake 7B-like teacher identity. The tokenizer is the embedded teacher's (V=1,024), so the stand-in's ids are drawn
below len(tokenizer) = 1,024 (the writer checks them): id bytes per position are those of a V=1,024 cache, not of
a V=151,936 one (bytes/pos is printed). Each run is a fresh process: `peak RSS` is its ru_maxrss (the stand-in's
pool is a file mapped read-only, built once by another process).

Columns: `wall/fwd` = (first forward to the end of cache_teacher) / (the stand-in's sleeps), median of --repeats
runs with their range (issue 30's target <= 1.05); `positions/s` over that wall time; `encode us/pos` = CPU
seconds the encoding threads spent (checks, codecs, digests, shard and receipt writes; the main thread's with
--encode-threads 0) per loss position; `cores/GPU` = encode us/pos x --rate: the cores that keep up with one
teacher at this rate; `start-up s` = the call to the first forward. The GIL line encodes --gil-blocks hidden-state
blocks on 1 thread, 2 threads and 2 processes: 2 threads as fast as 2 processes means the codec releases the GIL
(threads suffice); 2 threads twice as fast as 1 needs 2 idle cores.
Ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR on loopback, one thread each); the
start-up table stops each rank at its first forward (give at least --unit x ranks records: every rank needs a
unit) and, beside it, times on rank 0 after its start-up what every rank did before issue 30, tokenising every
record, and what each rank does now besides its own units: reading every record (JSON parsed, not validated nor
tokenised) and, rank 0 alone, the SHA-256 of the --data file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

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
    """One rank of one run: patch load_hf, run cache_teacher, print this rank's figures as one JSON line."""
    import fastkd.teacher
    from fastkd.cache_stage import cache_teacher
    from fastkd.paths import EMBEDDED_TEACHER
    from fastkd.teacher import load_tokenizer

    import torch

    tokenizer = load_tokenizer(str(EMBEDDED_TEACHER))      # also imports transformers before the clock starts
    if not Path(args.pool).exists():     # built once in its own process: its transient peak stays out of the runs'
        torch.save(make_pool(len(tokenizer), hidden=True), args.pool)
        return
    pool = torch.load(args.pool, mmap=True)           # mapped: a logits-only run never touches the hidden states
    clock: dict = {}
    fastkd.teacher.load_hf = stand_in(pool, args.rate, clock, args.startup_only)
    config = {"teacher": str(EMBEDDED_TEACHER), "data": args.data, "out": args.out, "top_k": K, "device": "cpu",
              "layers": "-1" if args.hidden_layers else None, "batch_size": args.batch_size,
              "sequences_per_shard": args.unit, "progress": False, "encode_threads": args.encode_threads}
    called = time.perf_counter()
    summary = None
    try:
        summary = cache_teacher(config)
    except FirstForward:
        pass
    ended = time.perf_counter()
    first = clock.get("first_forward", ended)
    result = {"rank": int(os.environ.get("RANK", "0")), "startup": first - called, "wall": ended - first,
              "forward": clock.get("forward", 0.0),
              "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if summary is not None and summary.is_main:
        counts = json.loads((Path(args.out) / "manifest.json").read_text())["counts"]
        result.update(positions=summary.loss_positions, bytes=counts["bytes"], encode=summary.seconds_encode)
    if args.startup_only and result["rank"] == 0:     # what every rank did before issue 30: tokenise every record
        from fastkd.cache_pipeline import records_identity
        from fastkd.templates import Template, build_examples

        for key, work in (("tokenise_all", lambda: build_examples(args.data, tokenizer, Template(), max_length=2048)),
                          ("read_all", lambda: build_examples(args.data, tokenizer, Template(), keep=lambda i: False)),
                          ("digest", lambda: records_identity(args.data, "train"))):
            t0 = time.perf_counter()
            out = work()
            result[key] = time.perf_counter() - t0
            if key == "tokenise_all":
                result["tokens"] = sum(len(e.input_ids) for e in out)
    print("RESULT " + json.dumps(result), flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(data: Path, out: Path, world: int, hidden_layers: int, threads: int, args, startup_only: bool) -> list:
    """Start `world` ranks of the child (fresh processes) and return each rank's figures; the first call builds
    the stand-in's pool file next to the records."""
    pool = data.parent / "pool.pt"
    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--out", str(out), "--rate", str(args.rate),
           "--pool", str(pool), "--hidden-layers", str(hidden_layers), "--batch-size", str(args.batch_size),
           "--unit", str(args.unit), "--encode-threads", str(threads)]
    cmd += ["--startup-only"] if startup_only else []
    base = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not pool.exists():
        subprocess.run(cmd, check=True, env=base)
    shutil.rmtree(out, ignore_errors=True)
    port, procs = _port(), []
    for rank in range(world):
        env = dict(base)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, err = p.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise SystemExit(f"run with {world} rank(s) failed:\n{err[-3000:]}")
        results.append(json.loads(lines[-1][7:]))
    return results


def pipeline_rows(work: Path, args) -> list[dict]:
    """One row per case (logits only; one hidden layer) and encode-thread count, 1 rank, --records records; the
    runs of a row are interleaved with the other rows' (repeat r of every row, then repeat r + 1), so a change
    of the machine's load spreads over all rows."""
    data = write_records(work / "records.jsonl", args.records)
    rows = {(layers, t): [] for layers in (0, 1) for t in _ints(args.threads)}
    for _ in range(args.repeats):
        for (layers, threads), runs in rows.items():
            runs.append(run_case(data, work / "cache", 1, layers, threads, args, startup_only=False)[0])
    return [{"case": "logits only" if not layers else f"1 hidden layer, d={WIDTH:,}", "threads": threads,
             "runs": runs} for (layers, threads), runs in rows.items()]


def startup_rows(work: Path, args) -> list[dict]:
    """Start-up seconds (call -> first forward) per records count and rank count; the slowest rank counts."""
    rows = []
    for count in _ints(args.startup_records):
        data = write_records(work / f"records-{count}.jsonl", count)
        for world in _ints(args.startup_ranks):
            results = run_case(data, work / "startup", world, 0, 2, args, startup_only=True)
            rows.append(dict({key: results[0][key] for key in ("tokenise_all", "tokens", "read_all", "digest")},
                             records=count,
                             ranks=world, startup=max(r["startup"] for r in results),
                             rss_mib=max(r["rss_mib"] for r in results), mb=data.stat().st_size / 1e6))
    return rows


_GIL_X = None


def _gil_init() -> None:
    global _GIL_X
    import numpy as np

    _GIL_X = np.random.default_rng(0).standard_normal((260, WIDTH), dtype=np.float32)


def _gil_work(blocks: int) -> int:
    from fastkd.cache_tools.hidden_codec import encode_hidden

    for _ in range(blocks):
        encode_hidden(_GIL_X, "int8")
    return blocks


def gil_check(blocks: int) -> dict:
    """Seconds to encode `blocks` hidden-state blocks (260 rows of d=3,584, int8) on 1 thread, 2 threads and 2
    processes (warm pools): threads as fast as processes means the codec releases the GIL."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    _gil_init()
    times = {}
    for name, kind, workers in (("1 thread", ThreadPoolExecutor, 1), ("2 threads", ThreadPoolExecutor, 2),
                                ("2 processes", ProcessPoolExecutor, 2)):
        kw = {"initializer": _gil_init} if kind is ProcessPoolExecutor else {}
        with kind(workers, **kw) as pool:
            list(pool.map(_gil_work, [1] * workers))
            t0 = time.perf_counter()
            list(pool.map(_gil_work, [blocks // workers] * workers))
            times[name] = time.perf_counter() - t0
    return times


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def format_pipeline(rows: list[dict], rate: float) -> str:
    head = ("| case | encode threads | loss positions | wall/fwd median | wall/fwd range | positions/s | "
            "peak RSS MiB | start-up s | bytes/pos | encode us/pos | cores/GPU |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for row in rows:
        runs = row["runs"]
        ratios = [r["wall"] / r["forward"] for r in runs]
        pos = runs[0]["positions"]
        encode_us = median([r["encode"] / r["positions"] * 1e6 for r in runs])
        lines.append(f"| {row['case']} | {row['threads']} | {pos:,} | {median(ratios):.3f} | "
                     f"{min(ratios):.3f}-{max(ratios):.3f} | {pos / median([r['wall'] for r in runs]):,.0f} | "
                     f"{max(r['rss_mib'] for r in runs):,.0f} | {median([r['startup'] for r in runs]):.2f} | "
                     f"{runs[0]['bytes'] / pos:,.1f} | {encode_us:.1f} | {encode_us * 1e-6 * rate:.2f} |")
    lines.append(f"\n{len(rows[0]['runs'])} runs per row; cores/GPU = encode us/pos x {rate:,.0f} positions/s; "
                 f"bytes/pos with ids below 1,024")
    return "\n".join(lines)


def format_startup(rows: list[dict]) -> str:
    lines = ["| records | MB | ranks | start-up s (slowest rank) | peak RSS MiB (largest rank) | tokenising every "
             "record s (each rank, before issue 30) | tokens per record | reading every record s | SHA-256 of the "
             "file s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['records']:,} | {r['mb']:.1f} | {r['ranks']} | {r['startup']:.2f} | {r['rss_mib']:,.0f} | "
              f"{r['tokenise_all']:.2f} | {r['tokens'] / r['records']:.0f} | {r['read_all']:.2f} | "
              f"{r['digest']:.3f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000, help="records of the pipeline table")
    ap.add_argument("--rate", type=float, default=12_000.0, help="the stand-in teacher's loss positions per second")
    ap.add_argument("--threads", default="0,2", help="comma list of cache-teacher --encode-threads ('' skips)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row of the pipeline table")
    ap.add_argument("--batch-size", type=int, default=8, help="cache-teacher --batch-size")
    ap.add_argument("--unit", type=int, default=256, help="cache-teacher --sequences-per-shard (the work unit)")
    ap.add_argument("--startup-records", default="2000,8000,32000", help="comma list of records counts ('' skips)")
    ap.add_argument("--startup-ranks", default="1,3", help="comma list of rank counts for the start-up table")
    ap.add_argument("--gil-blocks", type=int, default=64, help="blocks of the GIL check (0 skips)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--hidden-layers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--encode-threads", type=int, default=2, help=argparse.SUPPRESS)
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
        if args.threads:
            print(f"\n{args.records:,} records, batch {args.batch_size}, work unit {args.unit}, 1 rank\n")
            print(format_pipeline(pipeline_rows(Path(tmp), args), args.rate))
        if args.gil_blocks:
            t = gil_check(args.gil_blocks)
            load = os.getloadavg()[0]
            print(f"\nGIL: {args.gil_blocks} int8 hidden blocks (260 x {WIDTH:,}) encode in "
                  + ", ".join(f"{v:.2f} s on {k}" for k, v in t.items())
                  + f" (2 threads / 2 processes: {t['2 threads'] / t['2 processes']:.2f}; load average {load:.2f})")
        if args.startup_records:
            print("\nstart-up: the call to the first forward (reading every record, tokenising this rank's units, "
                  "settings, opening the cache)\n")
            print(format_startup(startup_rows(Path(tmp), args)))
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
