"""--packing: packed plans cover every sequence once (seeded, resumable), packed batches keep teacher rows aligned
and attention inside each sequence (loss and every gradient equal the padded batch's, Qwen2 and Llama, sdpa, eager
and a flash-style varlen attention), over-long sequences are refused, and training resumes exactly."""

import numpy as np
import pytest
import torch

from fastkd.errors import UserError
from fastkd.loader import IGNORE_INDEX, PlanMaker, collate, epoch_plan, make_loader
from fastkd.packing import check_packed_attention, collate_packed, unpack
from fastkd.plans import best_fit_decreasing
from fastkd.train_config import TrainConfig
from helpers import assert_resume_is_exact, quiet, write_cache

pytestmark = pytest.mark.usefixtures("one_thread")


def cache_like(rng, vocab, lengths, k=8, width=16, first_in_loss=(), no_loss=()):
    """Random sequences with cache-like teacher rows (sorted top-k log-probs, exact tail, hidden rows of a layer)."""
    from helpers import random_sequence, synthetic_settings

    settings = synthetic_settings(vocab_size=vocab, k=k, layers=(1,), widths=(width,))
    out = []
    for i, n in enumerate(lengths):
        loss = 0 if i in no_loss else int(rng.integers(n // 2, n))
        s = random_sequence(rng, 100 + i, settings, length=n, num_loss=loss)
        if i in first_in_loss:  # a first token in the response: nothing before it in its sequence predicts it
            s.loss_mask[0] = 1
        out.append(s)
    return out


# ----------------------------------------------------------------------------- the plan

def test_best_fit_decreasing_fills_rows_and_refuses_a_sequence_longer_than_a_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, size=300)
    rows = best_fit_decreasing(np.arange(300), lengths, 64)
    assert sorted(np.concatenate(rows).tolist()) == list(range(300))
    assert all(lengths[r].sum() <= 64 for r in rows)
    assert len(rows) <= np.ceil(lengths.sum() / 64) * 11 / 9 + 1       # best-fit-decreasing's bound
    # the boundary: exactly a row fits, one token more is refused
    assert [r.tolist() for r in best_fit_decreasing(np.arange(3), np.array([64, 30, 34]), 64)] == [[0], [2, 1]]
    with pytest.raises(UserError, match="sequence 1 has 65 tokens"):
        best_fit_decreasing(np.arange(2), np.array([3, 65]), 64)


@pytest.mark.parametrize("min_rows", [1, 4])
def test_packed_plan_covers_every_sequence_once_is_seeded_and_fills_batches(min_rows):
    rng = np.random.default_rng(1)
    lengths = np.exp(rng.normal(3.0, 0.9, size=500)).astype(np.int64).clip(2, 120)   # long-tailed
    shards = [np.arange(s, min(s + 40, 500)) for s in range(0, 500, 40)]
    make = PlanMaker(lengths, shards, 6, seed=3, row_length=128, min_size=min_rows, shuffle_buffer=50,
                     group_batches=3)
    plan = make(0)
    flat = np.concatenate([np.concatenate(list(b)) for b in plan])
    assert sorted(flat.tolist()) == list(range(500))
    assert all(lengths[row].sum() <= 128 for b in plan for row in b)
    assert sum(len(b) < 6 for b in plan) <= 1 and all(len(b) >= min_rows for b in plan)   # one partial: the end
    again, other = make(0), make(1)
    assert all(len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b)) for a, b in zip(plan, again))
    assert [np.concatenate(list(b)).tolist() for b in other] != [np.concatenate(list(b)).tolist() for b in plan]
    # an allowed subset (a held-out split) is respected
    allowed = np.arange(0, 500, 3)
    sub = PlanMaker(lengths, shards, 6, 3, allowed=allowed, row_length=128)(0)
    assert sorted(np.concatenate([np.concatenate(list(b)) for b in sub]).tolist()) == allowed.tolist()
    # padding: packed rows against today's length-grouped batches of as many sequences per step
    packed_padding = 1 - lengths.sum() / (128 * sum(len(b) for b in plan))
    grouped = epoch_plan(lengths, shards, 16, seed=3, epoch=0, group_batches=3)
    grouped_padding = 1 - lengths.sum() / sum(lengths[b].max() * len(b) for b in grouped)
    assert packed_padding < 0.1 < grouped_padding, (packed_padding, grouped_padding)


def test_the_last_batch_gives_every_rank_and_micro_batch_a_row():
    lengths = np.array([10, 10, 10])   # one row holds all three
    plan = PlanMaker(lengths, [np.arange(3)], 4, 0, min_size=3, row_length=40)(0)
    assert len(plan) == 1 and len(plan[0]) == 3
    assert PlanMaker(lengths[:2], [np.arange(2)], 4, 0, min_size=3, row_length=40)(0) == []


# ----------------------------------------------------------------------------- packed batches

def test_packed_batch_aligns_teacher_rows_positions_and_flash_boundaries(tiny_tokenizer):
    from transformers.masking_utils import find_packed_sequence_indices
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    rng = np.random.default_rng(2)
    seqs = cache_like(rng, len(tiny_tokenizer), [10, 14, 20, 3, 1, 7], first_in_loss=(1, 3))
    rows = [[seqs[0], seqs[1]], [seqs[2], seqs[3], seqs[4]], [seqs[5]]]    # 24 = a full row, 24, 7 + padding
    packed = collate_packed(rows, pad_id=0)
    padded = collate([s for row in rows for s in row], pad_id=0)
    assert packed.input_ids.shape == (3, 24) and packed.num_tokens == padded.num_tokens == 55
    # the same loss rows in the same order: labels, teacher rows and hidden rows
    assert torch.equal(packed.labels.reshape(-1)[packed.loss_index], padded.labels.reshape(-1)[padded.loss_index])
    for name in ("topk_ids", "topk_logprobs", "tail"):
        assert torch.equal(getattr(packed, name), getattr(padded, name))
    assert torch.equal(packed.hidden[1], padded.hidden[1]) and packed.record_indices == padded.record_indices
    # a sequence's last token never predicts the next sequence's first token (which is in the response here)
    assert packed.labels[0, 9].item() == IGNORE_INDEX and seqs[1].loss_mask[0] == 1
    assert packed.position_ids[0].tolist() == list(range(10)) + list(range(14))
    assert packed.position_ids[2].tolist() == list(range(7)) + list(range(17))
    # the boundaries transformers finds from the position ids, and those it would give flash attention
    assert find_packed_sequence_indices(packed.position_ids)[1].tolist() == [0] * 20 + [1] * 3 + [2]
    (cu, _), (longest, _) = prepare_fa_kwargs_from_position_ids(packed.position_ids)
    assert torch.equal(packed.cu_seqlens, cu) and packed.max_seqlen == int(longest) == 20
    # unpacked again (the online teacher's view): each sequence on its own row
    ids, attn, loss = unpack(packed)
    assert [ids[i, :len(s.input_ids)].tolist() for i, s in enumerate(seqs[:5])] == \
        [s.input_ids.tolist() for s in seqs[:5]]
    assert torch.equal(attn.sum(1), torch.tensor([10, 14, 20, 3, 1, 7]))


# ----------------------------------------------------------------------------- packed = padded, loss and gradients

def _varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      max_length_q=None, **kwargs):
    """A flash-style attention on CPU: causal attention inside each [start, end) of cu_seq_lens over the flattened
    rows, as flash_attn_varlen_func computes it; it never sees a mask."""
    assert cu_seq_lens_q is not None and max_length_q is not None and attention_mask is None
    b, h, t, d = query.shape
    flat = [x.repeat_interleave(h // x.shape[1], dim=1).transpose(1, 2).reshape(b * t, h, d)
            for x in (query, key, value)]
    out = torch.empty_like(flat[0])
    bounds = cu_seq_lens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[start:end].transpose(0, 1) for x in flat)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                          scale=scaling).transpose(0, 1)
    return out.reshape(b, t, h, d), None


def _module(tokenizer, arch, impl, weights, seed):
    from fastkd.kernels import HiddenProjector
    from fastkd.student import StudentWithLoss
    from fastkd.tiny import build_model

    student = build_model(tokenizer, arch, hidden=32, layers=2, heads=4, kv_heads=2, seed=seed).float()
    student.config.use_cache = False
    if impl == "fastkd_flash_varlen":   # transformers would look for a flash kernel of that name: set it as is
        student.config._attn_implementation = impl
    else:
        student.set_attn_implementation(impl)
    config = quiet(cache="unused", student="unused", loss_impl="auto", **weights)
    projector = HiddenProjector(32, [16]) if weights.get("hidden_weight") else None
    torch.manual_seed(seed)
    if projector is not None:
        torch.nn.init.normal_(projector.projections[0].weight, std=0.3)
    return StudentWithLoss(student, len(tokenizer), config, student_layers=[1] if projector else [],
                           projector=projector)


def _loss_and_grads(module, batch, layers):
    from fastkd.student import batch_inputs

    module.zero_grad(set_to_none=True)
    terms = module(**batch_inputs(batch, layers))
    terms.total.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return terms, grads


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "eager", "varlen"])
@pytest.mark.parametrize("weights", [dict(kl_weight=0.0), dict(kl_weight=1.0, hidden_weight=0.5)],
                         ids=["ce", "ce+kl+hidden"])
def test_packed_loss_and_gradients_equal_the_padded_batch(tiny_tokenizer, arch, impl, weights):
    from transformers import AttentionInterface

    AttentionInterface.register("fastkd_flash_varlen", _varlen_attention)   # "flash" in the name: gets cu_seqlens
    seed = int(np.random.SeedSequence().generate_state(1)[0] % 10_000)       # fresh inputs on every run
    rng = np.random.default_rng(seed)
    seqs = cache_like(rng, len(tiny_tokenizer), [9, 23, 17, 2, 5, 31, 1, 12], first_in_loss=(1, 3, 6), no_loss=(4,))
    rows = [[seqs[0], seqs[1]], [seqs[2], seqs[3], seqs[4]], [seqs[5], seqs[6]], [seqs[7]]]   # rows 32/24/32/12
    packed, padded = collate_packed(rows, 0), collate([s for row in rows for s in row], 0)
    assert packed.num_rows == padded.num_rows > 20
    if not weights["kl_weight"]:   # CE only: batches without a teacher signal, as SFT on records
        for batch in (packed, padded):
            batch.topk_ids = batch.topk_logprobs = batch.tail = None
            batch.hidden = {}
    layers = [1] if weights.get("hidden_weight") else []
    module = _module(tiny_tokenizer, arch, "fastkd_flash_varlen" if impl == "varlen" else impl, weights, seed)
    got, got_grads = _loss_and_grads(module, packed, layers)
    module.student.set_attn_implementation("sdpa")     # the reference: today's padded path
    want, want_grads = _loss_and_grads(module, padded, layers)
    for term in ("total", "ce", "kl", "hidden"):
        a, b = getattr(got, term).item(), getattr(want, term).item()
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (seed, term, a, b)
    assert got.kl.item() > 0.1 and got.hidden.item() > 0.1 if weights["kl_weight"] else got.kl.item() == 0.0
    assert got_grads.keys() == want_grads.keys() and len(want_grads) > 10
    for name, g in want_grads.items():
        scale = g.abs().max().item()
        assert (got_grads[name] - g).abs().max().item() <= 1e-5 * max(scale, 1e-3), (seed, name)


def test_the_probe_passes_real_attention_and_refuses_one_that_crosses_sequences(tiny_tokenizer):
    from contextlib import nullcontext

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def leaky(module, query, key, value, attention_mask, **kwargs):   # plain causal: ignores the packed mask
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("fastkd_leaky", leaky)
    from fastkd.tiny import build_model

    model = build_model(tiny_tokenizer, "llama", hidden=32, layers=2, seed=0)
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        check_packed_attention(model, "cpu", nullcontext(), "student s")
    model.set_attn_implementation("fastkd_leaky")
    with pytest.raises(UserError, match="attends across packed sequences with attention implementation 'fastkd_leaky'"):
        check_packed_attention(model, "cpu", nullcontext(), "student s")


# ----------------------------------------------------------------------------- training with --packing

def test_resume_mid_epoch_under_packing_is_exact(tmp_path, tiny_tokenizer, tiny_llama_dir):
    from fastkd.loader import CacheSource

    cache = write_cache(tmp_path / "cache", tiny_tokenizer, count=40, seed=4)
    source = CacheSource(cache)
    steps = len(PlanMaker(source.lengths, source.shards, 2, seed=2, row_length=40)(0))
    assert 4 < steps < 20     # the run stops and resumes inside the first epoch, on packed steps of 2 rows
    assert_resume_is_exact(tmp_path, cache=str(cache), student=str(tiny_llama_dir), packing=True, max_length=40,
                           batch_size=2, lr=3e-3, schedule="constant", seed=2, hidden_weight=0.5)


def test_a_cached_sequence_longer_than_a_row_is_refused_naming_it(tmp_path, tiny_tokenizer, tiny_llama_dir, capsys):
    from fastkd.cli import main
    from fastkd.loader import CacheSource

    cache = write_cache(tmp_path / "cache", tiny_tokenizer, count=24, seed=0)
    source = CacheSource(cache)
    longest = int(source.lengths.max())
    where = int(np.argmax(source.lengths))
    rc = main(["train", "--cache", str(cache), "--student", str(tiny_llama_dir), "--out", str(tmp_path / "r"),
               "--packing", "--max-length", str(longest - 1), "--no-progress", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"record {source[where].record_index} has {longest} tokens" in err and "--max-length" in err
    assert not (tmp_path / "r").exists()
    # exactly a row long: trained
    from fastkd.trainer import train

    result = train(quiet(cache=str(cache), student=str(tiny_llama_dir), out=str(tmp_path / "ok"), packing=True,
                         max_length=longest, batch_size=2, max_steps=2))
    assert result.steps == 2
    with pytest.raises(UserError, match="--packing with --cross-tokenizer"):
        quiet(cache=str(cache), student="s", packing=True, cross_tokenizer="uld")
    with pytest.raises(UserError, match="--packing .* give --max-length"):
        TrainConfig(cache=str(cache), student="s", packing=True, max_length=None).validate()   # `max_length: null`


def test_records_pack_and_the_online_teacher_sees_each_sequence_alone(tmp_path, tiny_tokenizer, tiny_llama_dir,
                                                                      tiny_qwen_dir):
    from fastkd.teacher import load_causal_lm
    from fastkd.train_data import DataSide, RecordSource, add_teacher_signal
    from fastkd.trainer import train
    from helpers import write_arith_records

    records = write_arith_records(tmp_path / "r.jsonl", n=40, seed=1)
    source = RecordSource(records, tiny_tokenizer, max_length=64)
    plan = PlanMaker(source.lengths, source.shards, 2, seed=0, row_length=64)(0)
    items = [[source[p] for p in row] for row in plan[0]]
    packed, padded = collate_packed(items, 0), collate([s for row in items for s in row], 0)
    teacher = load_causal_lm(str(tiny_qwen_dir), dtype="float32", device="cpu")
    data = DataSide(None, None, None, None, [], [], 0, teacher)
    cfg = quiet(data=str(records), student=str(tiny_llama_dir), teacher=str(tiny_qwen_dir), top_k=8, packing=True)
    a, b = add_teacher_signal(packed, data, cfg, len(tiny_tokenizer)), add_teacher_signal(padded, data, cfg,
                                                                                            len(tiny_tokenizer))
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
    for extra in (dict(kl_weight=0.0), dict(teacher=str(tiny_qwen_dir), top_k=8)):
        result = train(quiet(data=str(records), student=str(tiny_llama_dir), out=str(tmp_path / f"r{len(extra)}"),
                             packing=True, max_length=64, batch_size=2, max_steps=2, eval_sequences=4, **extra))
        assert result.steps == 2 and result.after["ce"] > 0
    # records longer than a row are truncated to it, as without --packing: each still fits a row of its own
    row = int(source.lengths.max()) - 2
    short = RecordSource(records, tiny_tokenizer, max_length=row)
    assert short.report.as_dict()["truncated"] > 0 and short.lengths.max() == row
    result = train(quiet(data=str(records), student=str(tiny_llama_dir), out=str(tmp_path / "short"), packing=True,
                         max_length=row, batch_size=2, max_steps=2, kl_weight=0.0))
    assert result.steps == 2


def test_packed_stream_resumes_from_any_position():
    rng = np.random.default_rng(5)
    seqs = cache_like(rng, 300, rng.integers(2, 30, size=60).tolist())

    class Source:
        lengths = np.array([len(s.input_ids) for s in seqs])
        shards = [np.arange(i, min(i + 8, 60)) for i in range(0, 60, 8)]

        def __getitem__(self, i):
            return seqs[int(i)]

    plans = PlanMaker(Source.lengths, Source.shards, 4, seed=1, row_length=48, min_size=2, shuffle_buffer=9,
                      group_batches=2)

    def run(**kw):
        return [(e, p, [b.record_indices for b in m]) for e, p, m in
                make_loader(Source(), plans, 0, accum=2, collate_fn=collate_packed, **kw)]

    items = run(epochs=2)
    assert sorted(r for e, _, m in items if e == 0 for b in m for r in b) == [100 + i for i in range(60)]
    assert run(epochs=2, num_workers=2) == items
    first = len(plans(0))
    assert run(epoch=1, start=2, epochs=1) == items[first + 2:]
