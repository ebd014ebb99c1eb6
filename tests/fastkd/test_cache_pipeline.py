"""The cache stage's pipeline (issue 30): shards encoded on worker threads while the teacher runs are the bytes of
the sequential path; an error or an interrupt in the middle leaves only whole units and a re-run resumes exactly;
each rank reads and tokenises only its own work units, cut on the raw records."""

import json
import threading

import numpy as np
import pytest

from fastkd.cache_stage import format_summary
from fastkd.cache_tools import CacheError, CacheReader
from fastkd.cache_tools.encode_pool import EncodePool
from fastkd.cache_tools.units import RecordCut, UnitWriter
from fastkd.cache_tools.verify import verify_cache
from fastkd.cli import main as cli_main
from helpers import random_records, random_sequence, run_cache, synthetic_settings

pytestmark = pytest.mark.usefixtures("one_thread")
HEX = "ab" * 32
VOLATILE = ("created", "updated", "summary", "self_sha256")


def cache_bytes(root) -> dict:
    """Every shard file's bytes, and the manifest without its times, summary and seal."""
    manifest = json.loads((root / "manifest.json").read_text())
    files = {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}
    return {"manifest": {k: v for k, v in manifest.items() if k not in VOLATILE}, "shards": files}


def assert_same_bytes(a, b):
    one, two = cache_bytes(a), cache_bytes(b)
    assert one["manifest"] == two["manifest"]
    assert one["shards"].keys() == two["shards"].keys() and one["shards"]
    for name in one["shards"]:
        assert one["shards"][name] == two["shards"][name], name


# ----------------------------------------------------------------------------- the pool alone (synthetic units)

def synthetic_units(seed: int, settings: dict, count: int, skipped=()):
    """Random sequences for records 0..count-1 but `skipped`; one with no loss position; odd lengths."""
    rng = np.random.default_rng(seed)
    seqs = []
    for i in range(count):
        if i in skipped:
            continue
        length = int(rng.integers(3, 30))
        seqs.append(random_sequence(rng, i, settings, length=length, num_loss=0 if i == 2 else None))
    return seqs


def pool_write(root, settings, seqs, cut, threads, order_seed=None, **writer_kw):
    """Every unit of `cut` through an EncodePool, each unit's sequences in a shuffled order (threads=None: each unit
    written whole by UnitWriter.write_unit, the reference)."""
    writer = UnitWriter.open(root, settings, cut, **writer_kw)
    if threads is None:
        units = {u: [s for s in seqs if s.record_index in cut.span(u)] for u in cut.numbers}
        for number, unit in units.items():
            if unit:
                writer.write_unit(number, unit)
        assert writer.finish(empty=[u for u, unit in units.items() if not unit])
        return root
    pool = EncodePool(writer, threads)
    rng = np.random.default_rng(order_seed)
    empty = []
    try:
        for number in cut.numbers:
            unit = [s for s in seqs if s.record_index in cut.span(number)]
            if not unit:
                empty.append(number)
                continue
            pool.begin(number, [s.record_index for s in unit], [len(s.input_ids) for s in unit],
                       [s.num_loss_positions for s in unit])
            for j in (rng.permutation(len(unit)) if order_seed is not None else range(len(unit))):
                pool.add(unit[j])
            pool.committed()
        pool.drain()
    except BaseException:
        pool.close()
        writer.abort()
        raise
    pool.close()
    assert writer.finish(empty=empty)
    return root


@pytest.mark.parametrize("mode", ["topk", "sample", "captured"])
@pytest.mark.parametrize("threads", [0, 1, 3])
def test_pool_writes_the_bytes_of_the_sequential_path(tmp_path, mode, threads):
    extra = {"capture": {"share": 0.5, "by": "entropy", "seed": None}} if mode == "captured" else {}
    settings = synthetic_settings(vocab_size=300, k=8, mode="sample" if mode == "sample" else "topk", **extra)
    settings.update(work_unit=5, records={"count": 23, "sha256": HEX, "digest": "file"})
    seqs = synthetic_units(4, settings, 23, skipped={5, 6, 7, 8, 9, 13})      # unit 1 all skipped, unit 2 shorter
    if mode == "captured":   # some rows without the teacher, as selective capture leaves them
        for s in seqs[::2]:
            s.topk_ids[::2], s.topk_logprobs[::2], s.tail[::2] = -1, -np.inf, 1.0
    cut = RecordCut(23, 5)
    kw = dict(block_bytes=2_000, max_block_sequences=3)    # several blocks per unit, of uneven sizes
    serial = pool_write(tmp_path / "serial", settings, seqs, cut, threads=None, **kw)
    pooled = pool_write(tmp_path / "pooled", settings, seqs, cut, threads=threads, order_seed=threads, **kw)
    assert_same_bytes(serial, pooled)
    manifest = json.loads((pooled / "manifest.json").read_text())
    assert [e["unit"] for e in manifest["shards"]] == [0, 2, 3, 4] and manifest["complete"]
    assert [e["num_sequences"] for e in manifest["shards"]] == [5, 4, 5, 3]
    assert verify_cache(pooled).ok
    by_record = {s.record_index: s for s in seqs}
    for got in CacheReader(pooled):                        # decoded against the inputs, not only the other path
        want = by_record[got.record_index]
        np.testing.assert_array_equal(got.input_ids, want.input_ids)
        order_got, order_want = np.argsort(got.topk_ids, 1), np.argsort(want.topk_ids, 1)   # kt stores rows by id
        np.testing.assert_array_equal(np.take_along_axis(got.topk_ids, order_got, 1),
                                      np.take_along_axis(want.topk_ids, order_want, 1))


@pytest.mark.parametrize("threads", [0, 2])
def test_pool_error_reaches_the_caller_and_only_whole_units_stay(tmp_path, threads):
    settings = synthetic_settings(vocab_size=300, k=8)
    settings.update(work_unit=4, records={"count": 16, "sha256": HEX, "digest": "file"})
    seqs = synthetic_units(7, settings, 16)
    bad = [s for s in seqs if s.record_index == 9][0]
    good_lp = bad.topk_logprobs.copy()
    bad.topk_logprobs[-1, 0] = np.nan
    cut = RecordCut(16, 4)
    with pytest.raises(CacheError, match=r"record 9: field topk_logprobs holds NaN") as err:
        pool_write(tmp_path / "c", settings, seqs, cut, threads=threads, order_seed=0, max_block_sequences=2)
    assert "\n" not in str(err.value)
    assert not [t for t in threading.enumerate() if t.name.startswith("fastkd-encode")]
    assert not list((tmp_path / "c").glob(".lock*"))       # abort released the lock
    receipts = sorted(p.name for p in (tmp_path / "c" / "units").glob("unit-*.json"))
    assert receipts and "unit-00002.json" not in receipts   # units finished before the error keep their receipts
    bad.topk_logprobs[:] = good_lp
    resumed = pool_write(tmp_path / "c", settings, seqs, cut, threads=threads, order_seed=1, max_block_sequences=2)
    reference = pool_write(tmp_path / "ref", settings, seqs, cut, threads=None, max_block_sequences=2)
    assert_same_bytes(reference, resumed)


def test_records_outside_their_unit_are_refused(tmp_path):
    settings = synthetic_settings(vocab_size=300, k=8)
    settings.update(work_unit=4, records={"count": 8, "sha256": HEX, "digest": "file"})
    seqs = synthetic_units(1, settings, 8)
    writer = UnitWriter.open(tmp_path / "c", settings, RecordCut(8, 4))
    try:
        with pytest.raises(CacheError, match=r"unit 0 holds other records than unit 0 may \(indices 0 to 3"):
            writer.write_unit(0, seqs[2:6])
        with pytest.raises(CacheError, match="names a unit"):
            writer.write_unit(2, seqs[:1])
    finally:
        writer.abort()


# ----------------------------------------------------------------------------- the cache stage

ARGS = dict(top_k=8, sequences_per_shard=5, batch_size=3, skip_bad=True)


@pytest.fixture(scope="module")
def recs(tmp_path_factory):
    """23 records, one of them bad (skipped), and a blank line: 24 record slots, unit 1 one record short."""
    records = random_records(23, seed=11)
    del records[6]["target"]
    lines = [json.dumps(r) for r in records]
    lines.insert(10, "")
    path = tmp_path_factory.mktemp("pipeline") / "recs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sequential(tiny_qwen_dir, recs, tmp_path_factory):
    """The sequential path (--encode-threads 0) with hidden states and with --sample."""
    root = tmp_path_factory.mktemp("sequential")
    for name, extra in (("hidden", dict(layers="1,-1")), ("sample", dict(sample=12))):
        run_cache(tiny_qwen_dir, recs, root / name, encode_threads=0, **ARGS, **extra)
    return root


@pytest.mark.parametrize("name,extra", [("hidden", dict(layers="1,-1")), ("sample", dict(sample=12))])
def test_encode_threads_write_the_bytes_of_the_sequential_path(tiny_qwen_dir, recs, sequential, tmp_path, name,
                                                               extra):
    summary = run_cache(tiny_qwen_dir, recs, tmp_path / "c", encode_threads=2, **ARGS, **extra)
    assert_same_bytes(sequential / name, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["records"]["count"] == 24 and manifest["records"]["digest"] == "file"
    assert [e["num_sequences"] for e in manifest["shards"]] == [5, 4, 4, 5, 4]   # record 6 skipped, line 10 blank
    assert summary.report["skipped"] == {"missing": 1} and summary.seconds_encode > 0


def broken_teacher(monkeypatch, when):
    """load_hf whose backend calls `when(call number, chunk, signal)` after each forward."""
    import fastkd.teacher as teacher

    real, calls = teacher.load_hf, [0]

    def load(config, tokenizer, env):
        backend = real(config, tokenizer, env)

        def signal(chunk, generator):
            sig = backend.signal(chunk, generator)
            calls[0] += 1
            when(calls[0], chunk, sig)
            return sig

        return teacher.Backend(backend.settings, signal, backend.device)

    monkeypatch.setattr(teacher, "load_hf", load)


def test_an_error_in_the_pool_stops_the_run_and_a_rerun_resumes_exactly(tiny_qwen_dir, recs, sequential, tmp_path,
                                                                          monkeypatch, capsys):
    def nan_at_record_17(_, chunk, sig):
        rows = 0
        for ex, n in zip(chunk, sig.rows_per_sequence):
            if ex.record_index == 17:
                sig.topk_logprobs[rows] = float("nan")
            rows += n

    broken_teacher(monkeypatch, nan_at_record_17)
    out = tmp_path / "c"
    args = ["cache-teacher", "--teacher", str(tiny_qwen_dir), "--data", str(recs), "--out", str(out), "--top-k", "8",
            "--layers", "1,-1", "--sequences-per-shard", "5", "--batch-size", "3", "--skip-bad", "--no-progress",
            "--encode-threads", "2"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "record 17: field topk_logprobs holds NaN" in err and len(err.strip().splitlines()) == 1
    assert not list(out.glob(".lock*")) and not json.loads((out / "manifest.json").read_text())["complete"]
    monkeypatch.undo()
    summary = run_cache(tiny_qwen_dir, recs, out, encode_threads=2, layers="1,-1", **ARGS)
    assert summary.sequences_resumed > 0 and summary.sequences_resumed + summary.sequences_written == 22
    assert_same_bytes(sequential / "hidden", out)


def test_an_interrupt_leaves_whole_units_and_no_lock(tiny_qwen_dir, recs, sequential, tmp_path, monkeypatch):
    def interrupt(call, chunk, sig):
        if call == 5:
            raise KeyboardInterrupt

    broken_teacher(monkeypatch, interrupt)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        run_cache(tiny_qwen_dir, recs, out, encode_threads=2, layers="1,-1", **ARGS)
    assert not [t for t in threading.enumerate() if t.name.startswith("fastkd-encode")]
    assert not list(out.glob(".lock*"))
    monkeypatch.undo()
    summary = run_cache(tiny_qwen_dir, recs, out, encode_threads=2, layers="1,-1", **ARGS)
    assert summary.sequences_resumed > 0 and summary.sequences_written > 0
    assert_same_bytes(sequential / "hidden", out)


class CountingTokenizer:
    """A tokenizer that remembers every text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self._tokenizer, self.texts = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.texts.append(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_each_rank_tokenises_only_its_own_units(tiny_tokenizer, tmp_path):
    from fastkd.cache_pipeline import Plan, own_records, unit_rank
    from fastkd.cache_stage import CacheConfig
    from fastkd.templates import BuildReport

    records = [dict(r, source=f"marker{i}x {r['source']}") for i, r in enumerate(random_records(23, seed=5))]
    del records[12]["rationale"], records[12]["target"]           # bad: counted on the rank that owns unit 2
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = CacheConfig.make(overrides=dict(teacher="t", data=str(path), out=str(tmp_path / "c"), skip_bad=True,
                                             sequences_per_shard=5))
    plan = Plan(5, [1])                                            # unit 1 is in the cache already
    union, skipped = [], 0
    for rank in range(3):
        tok = CountingTokenizer(tiny_tokenizer)
        own = own_records(config, tok, config.template(), plan, rank, 3, BuildReport())
        mine = {u for u in range(5) if u != 1 and unit_rank(u, [1], 3) == rank}
        assert set(own.units) == mine and own.count == 23
        indices = sorted(ex.record_index for exs in own.units.values() for ex in exs)
        assert all(i // 5 in mine for i in indices) and all(own.units[i // 5] for i in indices)
        touched = sorted({int(t.split("marker")[1].split("x")[0]) for t in tok.texts if "marker" in t})
        assert touched == indices                                  # no other record reached the tokenizer
        union += indices
        skipped += sum(own.report["skipped"].values())
    assert sorted(union) == [i for i in range(23) if i // 5 != 1 and i != 12] and skipped == 1
    assert [unit_rank(u, [1], 3) for u in (0, 2, 3, 4)] == [0, 1, 2, 0]


def test_skipped_records_leave_units_shorter_or_empty(tiny_qwen_dir, tmp_path):
    records = random_records(14, seed=8)
    for i in (3, 4, 5, 7):                                         # unit 1 has no usable record; unit 2 one fewer
        del records[i]["target"]
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "c"
    summary = run_cache(tiny_qwen_dir, path, out, top_k=4, sequences_per_shard=3, skip_bad=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(e["unit"], e["num_sequences"]) for e in manifest["shards"]] == [(0, 3), (2, 2), (3, 3), (4, 2)]
    first = summary.report.pop("first_errors")
    assert manifest["complete"] and summary.report == {"kept": 10, "truncated": 0, "skipped": {"missing": 4}}
    assert [m.split(": ")[1] for m in first] == [f"record {i} (line {i + 1})" for i in (3, 4, 5, 7)]
    assert all(m.startswith(str(path)) and "target" in m for m in first)   # named: file, record, field
    summary.report["first_errors"] = first
    assert manifest["summary"]["report"] == {"kept": 10, "truncated": 0, "skipped": {"missing": 4}}  # no data quoted
    printed = format_summary(summary, str(out))
    assert all(f"skipped: {m}" in printed for m in first)
    again = run_cache(tiny_qwen_dir, path, out, top_k=4, sequences_per_shard=3, skip_bad=True)
    assert again.sequences_written == 0 and again.sequences_resumed == 10
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_every_ranks_first_skips_merge_in_record_order():
    from fastkd.cache_pipeline import _record_number

    messages = [f"/d/r: 1.jsonl: record {i} (line {i + 1}): missing 'target'" for i in (12, 3, 40, 7)]
    assert sorted(messages, key=_record_number) == [messages[1], messages[3], messages[0], messages[2]]


def test_the_records_digest_is_the_file_bytes(tiny_qwen_dir, tmp_path, monkeypatch):
    from fastkd.cache_tools.integrity import seal

    records = random_records(6, seed=1)
    path = tmp_path / "recs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "c"
    run_cache(tiny_qwen_dir, path, out, top_k=4, sequences_per_shard=4)
    path.write_text("".join(json.dumps(r, indent=None, separators=(",", ":")) + "\n" for r in records))
    with pytest.raises(CacheError, match=r"cannot resume on other data: the records differ .*6 records"):
        run_cache(tiny_qwen_dir, path, out, top_k=4, sequences_per_shard=4)   # the same records, other bytes
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["records"] = {"count": 6, "sha256": manifest["records"]["sha256"]}    # as an earlier fastkd wrote it
    (out / "manifest.json").write_text(json.dumps(seal({k: v for k, v in manifest.items() if k != "self_sha256"})))
    import fastkd.teacher

    monkeypatch.setattr(fastkd.teacher, "load_hf", None)     # refused before the teacher is loaded
    with pytest.raises(CacheError, match=r"begun by an earlier fastkd, which identified the records by their token"):
        run_cache(tiny_qwen_dir, path, out, top_k=4, sequences_per_shard=4)


def test_a_hub_dataset_is_identified_by_its_records(monkeypatch):
    import fastkd.cache_pipeline as pipeline

    rows = [{"source": "a", "target": "b", "n": 1}, {"source": "c", "target": "d", "n": 2}]
    monkeypatch.setattr(pipeline, "scan_records", lambda source, split: (
        (i, f"record {i}", r, None) for i, r in enumerate(rows)))
    first = pipeline.records_identity("org/dataset", "train")
    assert first["digest"] == "records" and len(first["sha256"]) == 64
    rows[1] = {"n": 2, "target": "d", "source": "c"}                      # the same record, keys in another order
    assert pipeline.records_identity("org/dataset", "train") == first
    rows[1]["target"] = "e"
    assert pipeline.records_identity("org/dataset", "train") != first
