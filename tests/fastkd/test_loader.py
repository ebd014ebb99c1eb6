"""The loader: seeded epoch plans, rank/micro-batch splits, worker order, resume skipping, row alignment."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastkd.loader import IGNORE_INDEX, PlanMaker, collate, epoch_plan, make_loader, rank_slice
from fastkd.plans import _buffer_shuffle
from fastkd.train_data import RecordSource, split_holdout


class FakeSource:
    """Sequences whose teacher row j holds (as top-1 id) the token it predicts, so alignment is checkable."""

    has_teacher = True

    def __init__(self, n=53, seed=0, per_shard=10, k=3, d=4):
        rng = np.random.default_rng(seed)
        self.items = []
        for i in range(n):
            length = int(rng.integers(4, 30))
            ids = rng.integers(5, 100, size=length).astype(np.int32)
            prompt = int(rng.integers(1, length - 1))
            mask = np.zeros(length, dtype=np.uint8)
            mask[prompt:] = 1
            targets = ids[mask.astype(bool)].astype(np.int64)
            n_rows = len(targets)
            topk = np.stack([targets] + [np.full(n_rows, -1 - j) for j in range(k - 1)], axis=1)
            self.items.append(SimpleNamespace(
                record_index=1000 + i, task="t", input_ids=ids, loss_mask=mask, topk_ids=topk,
                topk_logprobs=np.zeros((n_rows, k), np.float32), tail=np.full(n_rows, i, np.float32), counts=None,
                hidden={3: np.tile(targets[:, None].astype(np.float32), (1, d))}))
        self.lengths = np.array([len(s.input_ids) for s in self.items])
        self.shards = [np.arange(s, min(s + per_shard, n)) for s in range(0, n, per_shard)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[int(i)]


def test_buffer_shuffle_is_a_permutation():
    rng = np.random.default_rng(1)
    for n, size in [(0, 4), (1, 4), (10, 3), (100, 7), (50, 1000)]:
        stream = np.arange(n) * 3
        out = _buffer_shuffle(stream, size, rng)
        assert sorted(out.tolist()) == stream.tolist()


def test_epoch_plan_covers_each_position_once_and_is_seeded():
    src = FakeSource()
    plan = epoch_plan(src.lengths, src.shards, 8, seed=3, epoch=0, shuffle_buffer=5, group_batches=2)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(len(src)))
    again = epoch_plan(src.lengths, src.shards, 8, seed=3, epoch=0, shuffle_buffer=5, group_batches=2)
    assert all(np.array_equal(a, b) for a, b in zip(plan, again))
    other = epoch_plan(src.lengths, src.shards, 8, seed=3, epoch=1, shuffle_buffer=5, group_batches=2)
    assert not all(np.array_equal(a, b) for a, b in zip(plan, other))
    # an allowed subset (held-out split) is respected
    allowed = np.arange(0, len(src), 2)
    sub = np.concatenate(epoch_plan(src.lengths, src.shards, 8, seed=3, epoch=0, allowed=allowed))
    assert sorted(sub.tolist()) == allowed.tolist()


def test_length_grouping_reduces_padding():
    src = FakeSource(n=400, per_shard=50)

    def padding(plan):
        return sum(int(src.lengths[b].max()) * len(b) - int(src.lengths[b].sum()) for b in plan)

    grouped = epoch_plan(src.lengths, src.shards, 8, seed=0, epoch=0, group_batches=16)
    ungrouped = epoch_plan(src.lengths, src.shards, 8, seed=0, epoch=0, group_batches=1)
    assert padding(grouped) < 0.5 * padding(ungrouped)


def test_rank_slices_are_disjoint_and_cover():
    batch = np.arange(11)
    parts = [rank_slice(batch, r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), batch)


def test_collate_aligns_teacher_rows_with_labels():
    src = FakeSource(n=6)
    batch = collate([src[i] for i in (0, 3, 5)], pad_id=0)
    labelled = batch.labels[batch.labels != IGNORE_INDEX]
    assert batch.topk_ids.shape[0] == labelled.numel() == batch.num_rows
    assert torch.equal(batch.topk_ids[:, 0], labelled)
    assert torch.equal(batch.hidden[3][:, 0].long(), labelled)
    # the tail column carries the sequence number: rows stay in sequence order
    assert batch.tail.tolist() == sorted(batch.tail.tolist())


def test_collate_refuses_inconsistent_rows():
    src = FakeSource(n=2)
    bad = src[0]
    bad.topk_ids = bad.topk_ids[:-1]
    with pytest.raises(Exception, match="teacher rows"):
        collate([bad], pad_id=0)


def _records(loader):
    return [[b.record_indices for b in micro] for _, _, micro in loader]


def test_stream_order_independent_of_workers_and_resumes_exactly():
    src = FakeSource(n=40)
    plans = PlanMaker(src.lengths, src.shards, 6, seed=5, shuffle_buffer=7, group_batches=2)
    serial = make_loader(src, plans, 0, accum=2, epochs=2)
    items = [(e, p, [b.record_indices for b in m]) for e, p, m in serial]
    assert len(items) == 2 * len(plans(0))
    workers = make_loader(src, plans, 0, accum=2, epochs=2, num_workers=2)
    assert [(e, p, [b.record_indices for b in m]) for e, p, m in workers] == items
    # resume after 3 steps of epoch 1: exactly the remaining items
    first_epoch = len(plans(0))
    resumed = make_loader(src, plans, 0, accum=2, epoch=1, start=3, epochs=1)
    assert [(e, p, [b.record_indices for b in m]) for e, p, m in resumed] == items[first_epoch + 3:]


def test_ranks_and_micro_batches_partition_each_step():
    src = FakeSource(n=48)
    plans = PlanMaker(src.lengths, src.shards, 12, seed=2, min_size=4)
    whole = _records(make_loader(src, plans, 0, world=1, accum=1, epochs=1))
    per_rank = [_records(make_loader(src, plans, 0, rank=r, world=2, accum=2, epochs=1)) for r in range(2)]
    for step, (full,) in enumerate(whole):
        shares = [sum(per_rank[r][step], []) for r in range(2)]
        assert not set(shares[0]) & set(shares[1])
        assert shares[0] + shares[1] == full
        assert all(len(m) for r in range(2) for m in per_rank[r][step])


def test_split_holdout_is_seeded_and_disjoint():
    train, held = split_holdout(20, 5, seed=1)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 20
    assert np.array_equal(held, split_holdout(20, 5, seed=1)[1])
    with pytest.raises(Exception, match="eval-sequences"):
        split_holdout(3, 3, seed=0)


def test_record_source_mixes_cot_and_answer_only(tmp_path, tiny_tokenizer):
    from fastkd.templates import Template, build_example
    from fastkd.records import validate_record, FieldMap

    recs = [{"source": "1 + 1 is", "rationale": "1 plus 1 is 2.", "target": "2"},
            {"source": "2 + 2 is", "rationale": "2 plus 2 is 4.", "target": "4", "cot": False},
            {"source": "3 + 3 is", "target": "6", "cot": False}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    src = RecordSource(path, tiny_tokenizer, max_length=64)
    assert len(src) == 3 and [s.cot for s in src.sequences] == [True, False, False]
    for i, rec in enumerate(recs):
        template = Template(cot=rec.get("cot", True))
        expected = build_example(validate_record(rec, i, FieldMap(), "x", template.cot), i, tiny_tokenizer, template, 64)
        assert src[i].input_ids.tolist() == expected.input_ids
        assert src[i].loss_mask.tolist() == expected.loss_mask
    answer_only = tiny_tokenizer.decode(src[1].input_ids[src[1].loss_mask.astype(bool)])
    assert "plus" not in answer_only and "4" in answer_only


def test_cache_source_matches_the_reader_through_its_block_lru(tmp_path):
    """Random-order reads through CacheSource (small LRU, hidden layers skipped) equal CacheReader's."""
    from fastkd.cache_tools import CacheReader, CacheWriter
    from helpers import random_sequences, synthetic_settings
    from fastkd.loader import CacheSource

    settings = synthetic_settings()
    seqs = [s for s in random_sequences(0, 70, settings) if s.num_loss_positions > 0 and s.loss_mask[0] == 0]
    writer = CacheWriter(tmp_path / "c", settings, sequences_per_shard=16)
    for s in seqs:
        writer.add(s)
    writer.close()
    reader = CacheReader(tmp_path / "c")
    source = CacheSource(tmp_path / "c", layers=[], cached_blocks=2)
    assert len(source) == len(reader) == len(seqs)
    assert sorted(np.concatenate(source.shards).tolist()) == list(range(len(seqs)))
    order = np.random.default_rng(3).permutation(len(seqs))
    for p in np.concatenate([order, order[:20]]):
        got, want = source[p], reader[int(p)]
        assert got.record_index == want.record_index
        assert np.array_equal(got.topk_ids, want.topk_ids) and np.array_equal(got.tail, want.tail)
        assert got.hidden == {} and set(want.hidden) == {1, 3}
    assert len(source._blocks) <= 2


def test_records_sorted_by_task_are_mixed_from_the_first_step(tmp_path, tiny_tokenizer):
    """A records file written task by task (as `fastkd data synth` writes it) must not train one
    task at a time: with a shuffle buffer far smaller than the file, every stretch of the epoch
    still draws from every part of the file."""
    tasks = ["a", "b", "c", "d"]
    recs = [{"source": f"{t} {i} is", "rationale": f"{t} then {i}.", "target": t, "task": t}
            for t in tasks for i in range(150)]
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    src = RecordSource(path, tiny_tokenizer, max_length=64)
    plan = PlanMaker(src.lengths, src.shards, 16, 0, shuffle_buffer=32, group_batches=1)(0)
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(recs)))
    for quarter in np.array_split(np.arange(len(plan)), 4):
        seen = {src[p].task for b in quarter for p in plan[b]}
        assert seen == set(tasks), f"batches {quarter[0]}-{quarter[-1]} drew only from {sorted(seen)}"
    first = [src[p].task for p in plan[0]]
    assert len(set(first)) >= 3, first
