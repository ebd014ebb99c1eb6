"""Fault campaign: kill, corrupt, truncate, fill the disk, race and poison fastkd, and count how
often it does the right thing. One row per kind of fault; every row must read 100%.

    python benchmarks/reliability.py                 # the full campaign, writes docs/reliability.md
    python benchmarks/reliability.py --quick         # a few cases per row (what tests/test_reliability.py runs)

"Right" means, for each row: the run resumes to the same result (kills, disk full), or it stops
with a clear error (exit status 2, one line `fastkd <command>: error: ...`, no traceback) that
names the file and, where there is one, the shard, block, record or field, and it never uses a
byte that fails its digest; `fastkd cache verify` exits 1 naming the shard (and block). The
models are tiny ones built from configs (fastkd.tiny), so the campaign runs on a laptop CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


# ----------------------------------------------------------------------------- bookkeeping

@dataclass
class Row:
    """One kind of fault: how many cases were handled as required, and what went wrong."""

    name: str
    required: str
    passed: int = 0
    total: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, ok: bool, case: str) -> None:
        self.total += 1
        self.passed += bool(ok)
        if not ok:
            self.failures.append(case)

    @property
    def percent(self) -> float:
        return 100.0 * self.passed / self.total if self.total else 0.0


@dataclass
class Outcome:
    """What an in-process CLI call did: exit status, output, and a traceback if one escaped."""

    rc: int | str
    out: str
    err: str

    def clear_error(self, command: str, *needles: str) -> bool:
        """Exit 2, the error on one `fastkd <command>: error:` line naming every needle, no traceback."""
        lines = [line for line in self.err.strip().splitlines() if line.startswith(f"fastkd {command}: error:")]
        return self.rc == 2 and len(lines) == 1 and "Traceback" not in self.err and all(n in lines[0] for n in needles)


def cli(*argv) -> Outcome:
    """Run `fastkd ARGV` in this process (the same code path as the command line)."""
    import torch

    from fastkd.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exit_:
            rc = exit_.code
        except BaseException as exc:  # noqa: BLE001 - the finding: something escaped as a traceback
            import traceback

            traceback.print_exc(file=err)
            rc = f"traceback ({type(exc).__name__})"
    torch.set_num_threads(threads)
    return Outcome(rc, out.getvalue(), err.getvalue())


def cli_process(*argv, timeout: float = 600, limit_bytes: int | None = None, extra_env: dict | None = None):
    """Run `python -m fastkd ARGV` as a child process (optionally with RLIMIT_FSIZE); Outcome."""
    def limits():
        if limit_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG, like a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    run = subprocess.run([sys.executable, "-m", "fastkd", *map(str, argv)], cwd=str(ROOT), capture_output=True,
                         text=True, timeout=timeout, env=dict(ENV, **(extra_env or {})), preexec_fn=limits)
    return Outcome(run.returncode, run.stdout, run.stderr)


# ----------------------------------------------------------------------------- the world

@dataclass
class World:
    """Tiny teacher and student with one tokenizer, records, and a clean reference cache."""

    work: Path
    teacher: Path
    student: Path
    records: Path
    cache: Path
    cache_args: list
    train_args: list
    num_records: int


def write_records(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(json.dumps({"source": f"{a} + {b} is", "rationale": f"{a} plus {b} makes {a + b}.",
                                 "target": str(a + b), "task": ["add", "sum"][i % 2]}) + "\n")
    path.write_text("".join(lines))
    return path


def build_world(work: Path, records: int) -> World:
    from fastkd.tiny import save_tiny, train_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    teacher = save_tiny(work / "teacher", "llama", tokenizer=tokenizer, hidden=64, layers=2, heads=4, kv_heads=2)
    student = save_tiny(work / "student", "llama", tokenizer=tokenizer, hidden=32, layers=1, heads=4, kv_heads=2, seed=1)
    data = write_records(work / "records.jsonl", records)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "cases", ignore_errors=True)
    cache_args = ["--teacher", teacher, "--data", data, "--top-k", 16, "--layers", 1, "--batch-size", 8,
                  "--sequences-per-shard", 16, "--no-progress"]
    done = cli("cache-teacher", *cache_args, "--out", cache)
    assert done.rc == 0, done.err
    train_args = ["--student", student, "--no-progress", "--no-tensorboard", "--batch-size", 8, "--epochs", 1,
                  "--no-save-final", "--lr", "3e-3"]
    return World(work, teacher, student, data, cache, cache_args, train_args, records)


def contents(cache: Path) -> dict:
    from fastkd.cache_tools import CacheReader

    return {s.record_index: s for s in CacheReader(cache)}


def same_cache(a: Path, b: Path) -> tuple[bool, str]:
    """Every record exactly once in both, with equal tokens, ids and values (to the codec's
    storage step, since resumed batches group sequences differently)."""
    from fastkd.cache_tools import CacheReader

    ra, rb = CacheReader(a), CacheReader(b)
    if len(rb) != len(set(int(r) for r in rb.record_indices)):
        return False, "a record is stored twice"
    ca, cb = contents(a), contents(b)
    if sorted(ca) != sorted(cb):
        return False, f"records differ: {len(ca)} vs {len(cb)}"
    for r, x in ca.items():
        y = cb[r]
        if not (np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.loss_mask, y.loss_mask)
                and np.array_equal(x.topk_ids, y.topk_ids)):
            return False, f"record {r}: tokens or ids differ"
        if np.abs(x.topk_logprobs - y.topk_logprobs).max(initial=0) > 2e-3 or np.abs(x.tail - y.tail).max(initial=0) > 1e-4:
            return False, f"record {r}: values differ"
    return True, ""


def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte range of every tensor of a safetensors file, read from its header."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    return {k: (8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def copy_cache(world: World, name: str) -> Path:
    target = world.work / "cases" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(world.cache, target)
    return target


def poke(path: Path, offset: int, value: int | None = None, rng: random.Random | None = None) -> None:
    """Overwrite one byte (with `value`, or a different random byte)."""
    data = bytearray(path.read_bytes())
    old = data[offset]
    data[offset] = value if value is not None else (old + (rng or random).randint(1, 255)) % 256
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- rows

def slow_cache_teacher(seconds: float) -> list[str]:
    """`fastkd cache-teacher` as a command that pauses `seconds` after each work unit, so a kill or a second
    writer lands mid-run (the pause is patched in here; the product reads no test setting)."""
    code = ("import sys, time; import fastkd.cache_stage as stage; "
            f"stage._after_unit = lambda: time.sleep({seconds}); from fastkd.cli import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, "cache-teacher"]


def row_kill_cache_teacher(world: World, n: int, rng: random.Random) -> Row:
    row = Row("SIGKILL cache-teacher at random moments (half near the end), then rerun",
              "every rerun's cache equal to an uninterrupted one, each record once")
    shards = -(-world.num_records // 16)
    for case in range(n):
        out = world.work / "cases" / f"kill-cache-{case}"
        shutil.rmtree(out, ignore_errors=True)
        near_end = case % 2 == 1
        proc = subprocess.Popen([*slow_cache_teacher(0.01), *map(str, world.cache_args),
                                 "--out", str(out)], cwd=str(ROOT), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if near_end:
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                listed = len(json.loads((out / "manifest.json").read_text())["shards"]) \
                    if (out / "manifest.json").exists() else 0
                if listed >= shards - 1:
                    break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.08))
        else:
            time.sleep(rng.uniform(2.0, 6.0))   # start-up (imports, model load) is most of this
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rerun = cli("cache-teacher", *world.cache_args, "--out", out)
        ok, why = same_cache(world.cache, out) if rerun.rc == 0 else (False, rerun.err[-300:])
        row.record(ok, f"case {case} ({'near end' if near_end else 'random'}): {why}")
        shutil.rmtree(out, ignore_errors=True)
    return row


def _final_state(run: Path) -> dict:
    from fastkd.checkpoint import load_checkpoint

    return load_checkpoint(run)["model"]


def row_kill_train(world: World, n: int, rng: random.Random) -> Row:
    row = Row("SIGKILL train after a checkpoint, then --resume", "final weights identical to an uninterrupted run")
    args = ["--cache", world.cache, *world.train_args, "--save-every", 2, "--log-every", 1, "--seed", 3]
    straight = world.work / "cases" / "train-straight"
    shutil.rmtree(straight, ignore_errors=True)
    done = cli("train", *args, "--out", straight)
    assert done.rc == 0, done.err
    reference = _final_state(straight)
    steps = json.loads((straight / "checkpoint" / "progress.json").read_text())["step"]
    for case in range(n):
        run = world.work / "cases" / f"kill-train-{case}"
        shutil.rmtree(run, ignore_errors=True)
        target = rng.randrange(2, max(3, steps - 1), 2)
        proc = subprocess.Popen([sys.executable, "-m", "fastkd", "train", *map(str, args), "--out", str(run)],
                                cwd=str(ROOT), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        progress = run / "checkpoint" / "progress.json"
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            try:
                if json.loads(progress.read_text())["step"] >= target:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = cli("train", *args, "--out", run, "--resume")
        if resumed.rc != 0:
            row.record(False, f"case {case}: resume failed: {resumed.err[-300:]}")
            continue
        got = _final_state(run)
        diff = max(float((got[k].float() - reference[k].float()).abs().max()) for k in reference)
        row.record(diff <= 1e-6, f"case {case} (killed after step {target}): max weight difference {diff:.2e}")
    return row


def _block_flip_cases(world: World, n: int, rng: random.Random):
    """(shard file, block, absolute offset) of n random bytes inside block tensors."""
    from fastkd.cache_tools import CacheReader

    entries = CacheReader(world.cache).manifest["shards"]
    for _ in range(n):
        entry = rng.choice(entries)
        ranges = {k: v for k, v in tensor_ranges(world.cache / entry["file"]).items()
                  if k.startswith("block.") and v[1] > v[0]}
        name = rng.choice(sorted(ranges))
        lo, hi = ranges[name]
        yield entry["file"], int(name.split(".")[1]), rng.randrange(lo, hi)


def rows_block_flips(world: World, n: int, rng: random.Random) -> list[Row]:
    verify = Row("single-byte changes in shard data blocks, then `fastkd cache verify`", "caught, shard and block named")
    train = Row("the same changes, then `fastkd train` on the cache", "refused, naming shard and block; never trained on")
    for case, (shard, block, offset) in enumerate(_block_flip_cases(world, n, rng)):
        cache = copy_cache(world, f"flip-{case}")
        poke(cache / shard, offset, rng=rng)
        v = cli("cache", "verify", cache, "--no-progress")
        verify.record(v.rc == 1 and f"BAD {cache}: shard {shard} block {block}:" in v.out,
                      f"{shard} byte {offset}: rc {v.rc} {v.out[-200:]}")
        t = cli("train", "--cache", cache, *world.train_args, "--out", world.work / "cases" / f"run-flip-{case}", "--overwrite")
        train.record(t.clear_error("train", f"shard {shard} block {block}"),
                     f"{shard} byte {offset}: rc {t.rc} {t.err.strip()[-300:]}")
        shutil.rmtree(cache)
        shutil.rmtree(world.work / "cases" / f"run-flip-{case}", ignore_errors=True)
    return [verify, train]


def row_header_and_truncation(world: World, n: int, rng: random.Random) -> Row:
    row = Row("byte changes in shard headers and index, and truncated shards: verify and train",
              "verify exits 1 naming the shard; train refuses naming it")
    from fastkd.cache_tools import CacheReader

    entries = CacheReader(world.cache).manifest["shards"]
    for case in range(n):
        cache = copy_cache(world, f"head-{case}")
        shard = rng.choice(entries)["file"]
        path = cache / shard
        ranges = tensor_ranges(path)
        header_end = min(lo for lo, _ in ranges.values())
        kind = ["header", "index", "truncate"][case % 3]
        if kind == "header":
            poke(path, rng.randrange(0, header_end), rng=rng)
        elif kind == "index":
            lo, hi = ranges[rng.choice(sorted(k for k in ranges if k.startswith("index.")))]
            poke(path, rng.randrange(lo, hi), rng=rng)
        else:
            path.write_bytes(path.read_bytes()[: rng.randrange(0, path.stat().st_size)])
        v = cli("cache", "verify", cache, "--no-progress")
        t = cli("train", "--cache", cache, *world.train_args, "--out", world.work / "cases" / f"run-head-{case}", "--overwrite")
        ok = v.rc == 1 and f"shard {shard}" in v.out and t.clear_error("train", f"shard {shard}")
        row.record(ok, f"{kind} {shard}: verify rc {v.rc}; train rc {t.rc} {t.err.strip()[-300:]}")
        shutil.rmtree(cache)
        shutil.rmtree(world.work / "cases" / f"run-head-{case}", ignore_errors=True)
    return row


def row_manifest(world: World, n: int, rng: random.Random) -> Row:
    row = Row("byte changes and truncations in manifest.json: verify and train",
              "a clear error naming manifest.json, or (whitespace only) the same manifest read")
    original = (world.cache / "manifest.json").read_bytes()
    parsed = json.loads(original)
    for case in range(n):
        cache = copy_cache(world, f"manifest-{case}")
        path = cache / "manifest.json"
        if case % 4 == 3:
            path.write_bytes(original[: rng.randrange(0, len(original))])
        else:
            poke(path, rng.randrange(0, len(original)), rng=rng)
        try:
            unchanged = json.loads(path.read_bytes()) == parsed
        except ValueError:
            unchanged = False
        v = cli("cache", "verify", cache, "--no-progress")
        t = cli("train", "--cache", cache, *world.train_args, "--max-steps", 1,
                "--out", world.work / "cases" / f"run-manifest-{case}", "--overwrite")
        if unchanged:
            ok = v.rc == 0 and t.rc == 0
        else:
            ok = v.clear_error("cache", "manifest.json") and t.clear_error("train", "manifest.json")
        row.record(ok, f"case {case}: verify rc {v.rc} {v.err.strip()[-200:]}; train rc {t.rc} {t.err.strip()[-200:]}")
        shutil.rmtree(cache)
        shutil.rmtree(world.work / "cases" / f"run-manifest-{case}", ignore_errors=True)
    return row


HOSTILE = [
    ("shard name with ..", lambda m: m["shards"][0].update(file="shards/../../../etc/passwd"), "shards[0].file"),
    ("absolute shard name", lambda m: m["shards"][0].update(file="/etc/passwd"), "shards[0].file"),
    ("shard listed twice", lambda m: m["shards"].append(dict(m["shards"][0])), ".unit'"),   # units strictly increase
    ("huge k", lambda m: m.update(k=1 << 40), "'k'"),
    ("huge hidden width", lambda m: m.update(hidden_widths=[1 << 40]), "hidden_widths"),
    ("huge sequence count", lambda m: m["shards"][0].update(num_sequences=1 << 60), "num_sequences"),
    ("negative size", lambda m: m["shards"][0].update(bytes=-1), "bytes"),
    ("huge vocabulary", lambda m: m["tokenizer"].update(vocab_size=1 << 62), "vocab_size"),
    ("wrong type", lambda m: m.update(layers="all"), "layers"),
    ("k disagrees with the shards", lambda m: m.update(k=m["k"] // 2), "'k'"),
]


def row_hostile(world: World, n: int, rng: random.Random) -> Row:
    """Values a hostile or buggy writer could put in a manifest and seal (so the seal passes)."""
    from fastkd.cache_tools.shard import INDEX_DTYPES  # noqa: F401 - the index names below
    from fastkd.cache_tools.integrity import digest_bytes, seal

    row = Row("hostile manifest and index values (huge shapes, `..` shard names), sealed with valid digests",
              "refused with a clear error naming the field; no huge allocation, no file outside the cache read")
    cases = [(name, edit, needle) for name, edit, needle in HOSTILE]
    cases.append(("huge index lengths", None, "would decode to"))
    for case in range(n):
        name, edit, needle = cases[case % len(cases)]
        cache = copy_cache(world, f"hostile-{case}")
        manifest = json.loads((cache / "manifest.json").read_text())
        if edit is not None:
            edit(manifest)
        else:  # a shard whose index claims absurd sizes, with every digest recomputed to match
            from safetensors import safe_open
            from safetensors.numpy import save_file

            entry = manifest["shards"][0]
            path = cache / entry["file"]
            with safe_open(str(path), "numpy") as fh:
                tensors = {k: fh.get_tensor(k).copy() for k in fh.keys()}
                meta = fh.metadata()
            tensors["index.length"][0] = tensors["index.num_loss"][0] = 2 ** 31 - 1
            meta["digests"] = json.dumps({k: digest_bytes(v.tobytes(), "xxh3-128") for k, v in tensors.items()})
            save_file(tensors, str(path), metadata=meta)
            data = path.read_bytes()
            size = struct.unpack("<Q", data[:8])[0]
            entry.update(bytes=len(data), sha256=digest_bytes(data), header_sha256=digest_bytes(data[: 8 + size]))
        (cache / "manifest.json").write_text(json.dumps(seal(manifest)))
        v = cli("cache", "verify", cache, "--no-progress")
        t = cli("train", "--cache", cache, *world.train_args, "--max-steps", 1,
                "--out", world.work / "cases" / f"run-hostile-{case}", "--overwrite")
        verify_ok = (v.rc == 1 and needle in v.out) or v.clear_error("cache", needle)
        row.record(verify_ok and t.clear_error("train", needle),
                   f"{name}: verify rc {v.rc} {(v.out + v.err).strip()[-200:]}; train rc {t.rc} {t.err.strip()[-200:]}")
        shutil.rmtree(cache)
        shutil.rmtree(world.work / "cases" / f"run-hostile-{case}", ignore_errors=True)
    return row


def row_disk_full(world: World, n: int, rng: random.Random) -> Row:
    """The file-size limit (RLIMIT_FSIZE) makes writes fail part-way like a full disk."""
    row = Row("disk full (RLIMIT_FSIZE) during cache-teacher and train, then a rerun with space",
              "a clear error, nothing finished lost, the rerun resumes to the uninterrupted result")
    manifest_size = (world.cache / "manifest.json").stat().st_size
    for case in range(n):
        if case % 2 == 0:
            out = world.work / "cases" / f"full-cache-{case}"
            shutil.rmtree(out, ignore_errors=True)
            limit = rng.randrange(manifest_size // 4, manifest_size)   # the growing manifest hits it part-way
            first = cli_process("cache-teacher", *world.cache_args, "--out", out, limit_bytes=limit)
            second = cli("cache-teacher", *world.cache_args, "--out", out)
            ok = first.clear_error("cache-teacher") and second.rc == 0 and same_cache(world.cache, out)[0]
            row.record(ok, f"cache-teacher, limit {limit} B: rc {first.rc} {first.err.strip()[-200:]}; rerun {second.rc}")
        else:
            run = world.work / "cases" / f"full-train-{case}"
            shutil.rmtree(run, ignore_errors=True)
            args = ["--cache", world.cache, *world.train_args, "--save-every", 2, "--seed", 3]
            straight = world.work / "cases" / "train-straight"
            if not (straight / "checkpoint").exists():
                assert cli("train", *args, "--out", straight).rc == 0
            limit = rng.randrange(2_000, 20_000)        # the checkpoint's tensors do not fit
            first = cli_process("train", *args, "--out", run, limit_bytes=limit)
            resumed = cli("train", *args, "--out", run, "--resume" if (run / "checkpoint").exists() else "--overwrite")
            if resumed.rc != 0:
                row.record(False, f"train, limit {limit} B: rerun failed {resumed.err.strip()[-200:]}")
                continue
            a, b = _final_state(run), _final_state(straight)
            diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
            row.record(first.clear_error("train") and diff <= 1e-6,
                       f"train, limit {limit} B: rc {first.rc} {first.err.strip()[-200:]}; weights differ by {diff:.1e}")
    return row


def row_two_writers(world: World, n: int, rng: random.Random) -> Row:
    row = Row("two cache-teacher runs writing one cache at once", "the second refused naming the first's pid; the cache whole")
    for case in range(n):
        out = world.work / "cases" / f"two-{case}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen([*slow_cache_teacher(0.5), *map(str, world.cache_args),
                                 "--out", str(out)], cwd=str(ROOT), env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while not (out / ".lock").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is not None:
            row.record(False, f"case {case}: the first run ended before the second started (make it slower)")
            continue
        second = cli("cache-teacher", *world.cache_args, "--out", out)
        proc.wait(timeout=600)
        ok = second.clear_error("cache-teacher", f"pid {proc.pid}") and proc.returncode == 0 and same_cache(world.cache, out)[0]
        row.record(ok, f"case {case}: second rc {second.rc} {second.err.strip()[-200:]}; first rc {proc.returncode}")
    return row


def row_nan_teacher(world: World, n: int, rng: random.Random) -> Row:
    """A teacher whose embedding row of one token is NaN: records holding it poison the forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = Row("NaN teacher (NaN embedding rows: some records' outputs are NaN)",
              "cache-teacher stops naming the record and field; no NaN in the cache; earlier shards kept")
    tokenizer = AutoTokenizer.from_pretrained(world.teacher)
    for case in range(n):
        folder = world.work / "cases" / f"nan-teacher-{case}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(world.teacher, folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        digit = str(rng.randrange(10))
        with torch.no_grad():
            for tid in {i for t, i in tokenizer.get_vocab().items() if digit in t}:
                model.get_input_embeddings().weight[tid] = float("nan")
        model.save_pretrained(folder)
        out = world.work / "cases" / f"nan-cache-{case}"
        shutil.rmtree(out, ignore_errors=True)
        args = [a if a != world.teacher else folder for a in world.cache_args]
        result = cli("cache-teacher", *args, "--out", out)
        clean = True
        if (out / "manifest.json").exists() and json.loads((out / "manifest.json").read_text())["shards"]:
            verify = cli("cache", "verify", out, "--no-progress")
            clean = verify.rc == 0 and all(np.isfinite(s.topk_logprobs[s.topk_ids >= 0]).all() for s in contents(out).values())
        row.record(result.clear_error("cache-teacher", "record", "field") and clean,
                   f"digit {digit}: rc {result.rc} {result.err.strip()[-200:]}; cache clean {clean}")
    return row


def row_checkpoints(world: World, n: int, rng: random.Random) -> Row:
    """A pickle planted as an old checkpoint, and byte changes in a new one."""
    import torch

    row = Row("a checkpoint holding a pickle (code in __reduce__), and byte changes in checkpoint files; train --resume",
              "refused with a clear error; the pickle's code never runs")
    base = world.work / "cases" / "ckpt-base"
    args = ["--cache", world.cache, *world.train_args, "--max-steps", 2, "--seed", 3]
    shutil.rmtree(base, ignore_errors=True)
    assert cli("train", *args, "--out", base).rc == 0
    for case in range(n):
        run = world.work / "cases" / f"ckpt-{case}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        marker = run / "code-ran"
        kind = ["pickle", "tensors", "index"][case % 3]
        folder = run / "checkpoint"
        if kind == "pickle":
            shutil.rmtree(folder)
            folder.mkdir()
            torch.save({"model": {}, "step": 1, "payload": _Payload(str(marker))}, folder / "state.pt")
            needle = "never unpickles"
        else:
            name = "state.safetensors" if kind == "tensors" else "checkpoint.json"
            poke(folder / name, rng.randrange(0, (folder / name).stat().st_size), rng=rng)
            needle = "checkpoint"
        t = cli("train", *args, "--out", run, "--resume")
        row.record(t.clear_error("train", needle) and not marker.exists(),
                   f"{kind}: rc {t.rc} {t.err.strip()[-200:]}; code ran: {marker.exists()}")
    return row


class _Payload:
    """Unpickling this writes a marker file: the code a hostile checkpoint would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def row_tokenizers(world: World, n: int, rng: random.Random) -> Row:
    """Students whose tokenizer has the same vocabulary but tokenises differently, and one whose
    embedding is smaller than the cache's ids."""
    from fastkd.tiny import pin_tokenizer_class

    row = Row("student tokenizer with the same vocabulary but other merges / pre-tokenizer / normaliser / added "
              "tokens, and a student embedding smaller than the cache's ids",
              "refused before training, saying what differs")
    tokenizer_json = json.loads((world.student / "tokenizer.json").read_text())

    def merges(t):
        t["model"]["merges"] = t["model"]["merges"][::-1]

    def prefix(t):
        t["pre_tokenizer"]["add_prefix_space"] = not t["pre_tokenizer"].get("add_prefix_space", False)

    def lowercase(t):
        t["normalizer"] = {"type": "Lowercase"}

    def added(t):
        t["added_tokens"].append({"id": max(a["id"] for a in t["added_tokens"]) + 1, "content": "<|extra|>",
                                  "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                                  "special": True})

    variants = [("merges", merges, "merges"), ("pre-tokenizer", prefix, "pre"), ("normaliser", lowercase, "normali"),
                ("added token", added, "added"), ("smaller embedding", None, "vocab_size")]
    for case in range(n):
        what, edit, needle = variants[case % len(variants)]
        folder = world.work / "cases" / f"student-{case}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(world.student, folder)
        if edit is None:
            config = json.loads((folder / "config.json").read_text())
            config["vocab_size"] -= rng.randrange(1, 200)
            (folder / "config.json").write_text(json.dumps(config))
        else:
            t = json.loads(json.dumps(tokenizer_json))
            edit(t)
            (folder / "tokenizer.json").write_text(json.dumps(t))
            pin_tokenizer_class(folder)
        args = [a if a != world.student else folder for a in world.train_args]
        result = cli("train", "--cache", world.cache, *args, "--max-steps", 1,
                     "--out", world.work / "cases" / f"run-student-{case}", "--overwrite")
        row.record(result.clear_error("train", needle), f"{what}: rc {result.rc} {result.err.strip()[-300:]}")
    return row


def row_import_path(world: World, n: int, rng: random.Random) -> Row:
    row = Row("python started in the checkout root: `import transformers.models.llama` (+ a model class)",
              "works from any directory")
    code = "import transformers.models.llama.modeling_llama\nfrom transformers import LlamaForCausalLM\n"
    for case, cwd in enumerate([ROOT, ROOT / "kernels", Path(tempfile.gettempdir())][: max(1, n)]):
        run = subprocess.run([sys.executable, "-c", code], cwd=str(cwd), capture_output=True, text=True, env=ENV,
                             timeout=300)
        row.record(run.returncode == 0, f"cwd {cwd}: {run.stderr.strip()[-200:]}")
    return row


# ----------------------------------------------------------------------------- fuzzed records

VALID_RECORD = {"source": "3 + 4 is", "rationale": "3 plus 4 makes 7.", "target": "7", "task": "add"}


def record_variants(rng: random.Random, n: int) -> list[tuple[str, bytes, str]]:
    """(label, file bytes, expected) with expected 'valid', 'invalid' or 'either' (only: no traceback).
    The rules (fastkd/records.py): a record is a JSON object with string source and target (non-empty
    after stripping), a string rationale in CoT mode, an optional string task and boolean cot."""
    def line(obj) -> bytes:
        return (json.dumps(obj) + "\n").encode()

    good = line(VALID_RECORD)
    fixed = [
        ("valid", good, "valid"),
        ("extra fields", line({**VALID_RECORD, "meta": {"a": [1, 2]}, "id": 5}), "valid"),
        ("unicode", line({**VALID_RECORD, "source": "3 + 4 ist ß ✓ 数"}), "valid"),
        ("answer-only record", line({"source": "3 + 4 is", "target": "7", "cot": False}), "valid"),
        ("no task", line({k: v for k, v in VALID_RECORD.items() if k != "task"}), "valid"),
        ("null task", line({**VALID_RECORD, "task": None}), "valid"),
        ("UTF-8 BOM at the start of the file", b"\xef\xbb\xbf" + good, "valid"),
        ("UTF-8 BOM inside the file (files concatenated)", b"\xef\xbb\xbf" + good, "invalid"),
        ("CRLF", good.replace(b"\n", b"\r\n"), "valid"),
        ("blank lines", b"\n\n" + good + b"\n  \n", "valid"),
        ("not JSON", b"{source: 3}\n", "invalid"),
        ("truncated JSON", good[: len(good) // 2] + b"\n", "invalid"),
        ("a list", line([VALID_RECORD]), "invalid"),
        ("a number", b"42\n", "invalid"),
        ("a string", b'"3 + 4 is"\n', "invalid"),
        ("null", b"null\n", "invalid"),
        ("invalid UTF-8", good.replace(b"3 + 4", b"3 \xff 4"), "invalid"),
        ("trailing garbage", good.rstrip(b"\n") + b" xyz\n", "invalid"),
        ("deep nesting", (b'{"source": "s", "target": "t", "rationale": "r", "x": ' + b"[" * 100_000
                          + b"]" * 100_000 + b"}\n"), "invalid"),
        ("NaN in a text field", b'{"source": NaN, "target": "7", "rationale": "r"}\n', "invalid"),
        ("cot not a bool", line({**VALID_RECORD, "cot": "no"}), "invalid"),
        ("task a dict", line({**VALID_RECORD, "task": {"name": "add"}}), "invalid"),
    ]
    for key in ("source", "target", "rationale"):
        fixed += [(f"{key} missing", line({k: v for k, v in VALID_RECORD.items() if k != key}), "invalid"),
                  (f"{key} null", line({**VALID_RECORD, key: None}), "invalid"),
                  (f"{key} a number", line({**VALID_RECORD, key: 7}), "invalid"),
                  (f"{key} a list", line({**VALID_RECORD, key: ["7"]}), "invalid"),
                  (f"{key} an object", line({**VALID_RECORD, key: {"text": "7"}}), "invalid"),
                  (f"{key} a bool", line({**VALID_RECORD, key: True}), "invalid")]
    fixed += [("target empty", line({**VALID_RECORD, "target": ""}), "invalid"),
              ("target blank", line({**VALID_RECORD, "target": " \t "}), "invalid"),
              ("source empty", line({**VALID_RECORD, "source": ""}), "invalid"),
              ("NUL character", line({**VALID_RECORD, "rationale": "3 plus\u0000 4"}), "either"),
              ("lone surrogate", b'{"source": "3 + 4 is \\ud800", "target": "7", "rationale": "r"}\n', "either"),
              ("duplicate keys", b'{"source": "a", "source": "3 + 4 is", "target": "7", "rationale": "r"}\n', "either")]
    out = list(fixed)
    while len(out) < n:   # random byte-level mutations of a valid line: anything but a traceback
        data = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.4:
                data[pos] = rng.randrange(256)
            elif op < 0.7:
                del data[pos]
            else:
                data.insert(pos, rng.randrange(256))
        out.append((f"mutation {len(out)}", bytes(data), "either"))
    return out[:max(n, len(fixed))] if n >= len(fixed) else rng.sample(out, n)


def row_records(world: World, n: int, rng: random.Random) -> Row:
    from fastkd.templates import BuildReport, Template, build_examples
    from fastkd.errors import UserError
    from fastkd.teacher import load_tokenizer

    row = Row("fuzzed JSONL record files (types, missing fields, nulls, BOM, CRLF, giant and deep lines, bytes)",
              "an error naming file, line and field, or with --skip-bad a counted skip; 0 tracebacks, 0 silent")
    tokenizer = load_tokenizer(str(world.teacher))
    folder = world.work / "cases" / "records"
    folder.mkdir(parents=True, exist_ok=True)
    for case, (label, data, expected) in enumerate(record_variants(rng, n)):
        path = folder / f"r{case}.jsonl"
        # the record under test sits on line 2, between two good ones (a file's start: line 1)
        at_start = "start of the file" in label
        path.write_bytes(data + good_line() * 2 if at_start else good_line() + data + good_line())
        outcomes = []
        for skip in (False, True):
            report = BuildReport()
            try:
                examples = build_examples(path, tokenizer, Template(cot=True), skip_bad=skip, report=report)
                outcomes.append(("ok", len(examples), sum(report.skipped.values()), ""))
            except UserError as err:
                outcomes.append(("error", 0, 0, str(err)))
            except BaseException as err:  # noqa: BLE001 - the finding
                outcomes.append(("traceback", 0, 0, f"{type(err).__name__}: {err}"[:200]))
        (strict, kept, _, message), (lenient, lkept, skipped, lmessage) = outcomes
        if "traceback" in (strict, lenient):
            ok = False
        elif expected == "valid":
            ok = strict == "ok" and kept >= 3 and lenient == "ok" and skipped == 0
        elif expected == "invalid":
            ok = (strict == "error" and str(path) in message and ("line 2" in message or "record 1" in message)
                  and lenient == "ok" and lkept == 2 and skipped >= 1)
        else:
            ok = strict == "ok" or str(path) in message
        row.record(ok, f"{label}: strict {strict} {message[:160]}; skip-bad {lenient} kept {lkept} skipped {skipped} {lmessage[:100]}")
    return row


def good_line() -> bytes:
    return (json.dumps(VALID_RECORD) + "\n").encode()


# ----------------------------------------------------------------------------- the campaign

def campaign(work: Path, quick: bool, seed: int = 0, only: set[str] | None = None,
             records: int | None = None) -> dict[str, list[Row]]:
    """Row key -> its rows (block-flips gives two), with a few cases each (quick) or the full counts."""
    rng = random.Random(seed)
    world = build_world(work, records or (48 if quick else 200))
    plan = [  # (key, function, quick cases, full cases)
        ("kill-cache", row_kill_cache_teacher, 1, 40),
        ("kill-train", row_kill_train, 1, 5),
        ("block-flips", rows_block_flips, 4, 102),
        ("headers", row_header_and_truncation, 3, 30),
        ("manifest", row_manifest, 6, 60),
        ("hostile", row_hostile, 11, 33),
        ("disk-full", row_disk_full, 2, 10),
        ("two-writers", row_two_writers, 1, 5),
        ("nan-teacher", row_nan_teacher, 1, 5),
        ("checkpoints", row_checkpoints, 3, 15),
        ("tokenizers", row_tokenizers, 5, 10),
        ("records", row_records, 60, 300),
        ("import-path", row_import_path, 1, 3),
    ]
    rows: dict[str, list[Row]] = {}
    for key, fn, quick_n, full_n in plan:
        if only and key not in only:
            continue
        started = time.perf_counter()
        result = fn(world, quick_n if quick else full_n, rng)
        rows[key] = result if isinstance(result, list) else [result]
        for row in rows[key]:
            row.seconds = time.perf_counter() - started
            print(f"{row.percent:6.1f}%  {row.passed}/{row.total}  {row.name}", file=sys.stderr, flush=True)
            for failure in row.failures[:5]:
                print(f"        FAILED: {failure}", file=sys.stderr)
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| fault | required | result |", "| --- | --- | ---: |"]
    lines += [f"| {r.name} | {r.required} | {r.passed}/{r.total} ({r.percent:.0f}%) |" for r in rows]
    return "\n".join(lines)


DOC_HEAD = """# Reliability: the fault campaign

`python benchmarks/reliability.py` runs every row below against tiny models built from configs
(a 2-layer Llama teacher, a 1-layer Llama student, one BPE tokenizer) and a {records}-record
cache, and writes this file. `tests/test_reliability.py` runs the same rows with a few cases each
(`--quick`). What each row checks, and what counts as handled, is in the docstrings of
`benchmarks/reliability.py`; in short: a kill or a full disk must resume to the uninterrupted
result, everything else must stop with exit status 2 and one line naming the file and the
shard, block, record or field, without a traceback, and nothing failing a digest is ever used.

Run: `{command}` ({seconds:.0f} s on this machine).

"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few cases per row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--records", type=int, default=None, help="records in the test cache (default 200; 48 with --quick)")
    ap.add_argument("--only", default=None, help="comma list of row keys (kill-cache, block-flips, records, ...)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"), help="where the table goes ('-': stdout only)")
    args = ap.parse_args()
    os.environ.update({k: v for k, v in ENV.items() if k not in os.environ or k.endswith("OFFLINE")})
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fastkd-reliability-"))
    try:
        found = campaign(work, args.quick, args.seed, set(args.only.split(",")) if args.only else None, args.records)
        rows = [row for group in found.values() for row in group]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rows)
    print(text)
    if args.out != "-" and not args.only:
        command = "python benchmarks/reliability.py" + (" --quick" if args.quick else "")
        Path(args.out).write_text(DOC_HEAD.format(records=args.records or (48 if args.quick else 200), command=command,
                                                  seconds=time.perf_counter() - started) + text + "\n")
    sys.exit(0 if all(r.passed == r.total for r in rows) else 1)


if __name__ == "__main__":
    main()
