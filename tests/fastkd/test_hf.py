"""fastkd as a library (issue 17): the cache as Dataset/IterableDataset, the collator, the loss modules,
the Hugging Face Trainer subclass and its example, LoRA students, eval during training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


from fastkd.errors import UserError
from fastkd.trainer import train
from helpers import assert_resume_is_exact, build_teacher_and_cache, quiet

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kd(tmp_path_factory, tiny_qwen_dir):
    return build_teacher_and_cache(tmp_path_factory.mktemp("kd_lib"), tiny_qwen_dir)


# ----------------------------------------------------------------------------- datasets and collator

def test_cache_dataset_items_equal_the_reader(kd):
    from fastkd.cache_tools import CacheReader
    from fastkd.hf import CacheDataset

    ds = CacheDataset.from_pretrained(str(kd["cache"]))
    reader = CacheReader(kd["cache"])
    assert len(ds) == len(reader)
    for i in (0, 7, len(ds) - 1):
        a, b = ds[i], reader[i]
        assert a.record_index == b.record_index
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


def test_cache_dataset_refuses_another_tokenizer(kd, tmp_path):
    from fastkd.hf import CacheDataset
    from fastkd.tiny import train_tokenizer

    other = train_tokenizer(["completely different words here"] * 50, vocab_size=300)
    with pytest.raises(UserError, match="cache"):
        CacheDataset(str(kd["cache"]), tokenizer=other)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_iterable_dataset_shards_over_ranks_and_workers_and_resumes(kd, world):
    """Ranks (and DataLoader workers within a rank) see disjoint sequences that together make up the
    epoch once; a resumed dataset continues exactly after the consumed items."""
    from fastkd.hf import CacheIterableDataset

    def records(ds, workers=0):
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                             collate_fn=lambda s: s)
        return [s.record_index for s in loader]

    per_rank = [records(CacheIterableDataset(str(kd["cache"]), seed=3, rank=r, world_size=world), workers=2 if r == 0 else 0)
                for r in range(world)]
    flat = [x for part in per_rank for x in part]
    ds = CacheIterableDataset(str(kd["cache"]), seed=3, rank=0, world_size=1)
    assert sorted(flat) == sorted(s.record_index for s in ds) and len(flat) == len(set(flat)) == len(ds.source)
    # rank 0 with 2 workers keeps the order of rank 0 without workers
    assert per_rank[0] == records(CacheIterableDataset(str(kd["cache"]), seed=3, rank=0, world_size=world))
    # resume: after 5 items, the rest, and nothing else
    first = CacheIterableDataset(str(kd["cache"]), seed=3, rank=0, world_size=world)
    state = first.state_dict(consumed=5)
    again = CacheIterableDataset(str(kd["cache"]), seed=3, rank=0, world_size=world)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert records(again) == per_rank[0][5:]
    with pytest.raises(UserError, match="seed/rank/world"):
        CacheIterableDataset(str(kd["cache"]), seed=4, rank=0, world_size=world).load_state_dict(state)


def test_workers_take_whole_batches_so_a_resume_is_exact_and_set_epoch_reorders(kd):
    """DataLoader batches of 4 from 2 workers arrive in the plan's order (a batch came from one worker, and the
    workers used to take items in turn: a resume after 3 batches lost 2 sequences and repeated 2)."""
    from fastkd.hf import CacheIterableDataset

    def batches(ds, workers=2):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=lambda s: s)
        return [[s.record_index for s in batch] for batch in loader]

    plan = [s.record_index for s in CacheIterableDataset(str(kd["cache"]), seed=3)]
    got = batches(CacheIterableDataset(str(kd["cache"]), seed=3, batch_size=4))
    assert [x for b in got for x in b] == plan
    first = CacheIterableDataset(str(kd["cache"]), seed=3, batch_size=4)
    again = CacheIterableDataset(str(kd["cache"]), seed=3, batch_size=4)
    again.load_state_dict(first.state_dict(consumed=12))
    assert [x for b in batches(again) for x in b] == plan[12:]
    again.set_epoch(1)
    assert sorted(x for b in batches(again) for x in b) == sorted(plan) and \
        [x for b in batches(again) for x in b] != plan


def test_library_arguments_are_refused_in_one_line(kd):
    from fastkd.hf import CacheDataset, CacheIterableDataset, DistillCollator, DistillTrainer

    ds = CacheDataset(str(kd["cache"]))
    assert ds[-1].record_index == ds[len(ds) - 1].record_index
    with pytest.raises(IndexError, match="outside a cache of"):
        ds[len(ds)]
    for bad in (dict(layers=6), dict(tokenizer="a/path")):
        with pytest.raises(UserError, match="takes a"):
            CacheDataset(str(kd["cache"]), **bad)
    for bad in (dict(rank=1), dict(world_size=2), dict(start=-5), dict(batch_size=0)):
        with pytest.raises(UserError, match="CacheIterableDataset"):
            CacheIterableDataset(str(kd["cache"]), **bad)
    with pytest.raises(UserError, match="pad_token_id"):
        DistillCollator(None)
    with pytest.raises(UserError, match="hidden_weight"):
        DistillTrainer(model=torch.nn.Linear(2, 2), fastkd_config={"hidden_weight": 1.0})


def test_collator_rows_follow_the_labels(kd, tiny_llama_dir):
    """Row r of the teacher tensors belongs to the r-th label != -100, padding included."""
    from fastkd.hf import CacheDataset, DistillCollator
    from fastkd.teacher import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    ds = CacheDataset(str(kd["cache"]))
    seqs = [ds[i] for i in (0, 3, 11)]
    out = DistillCollator(tok.pad_token_id, teacher_layers=(1,))(seqs)
    counted = out["labels"] != -100
    assert int(counted.sum()) == out["topk_ids"].shape[0] == out["loss_index"].numel()
    assert torch.equal(out["labels"].reshape(-1)[out["loss_index"]], out["labels"][counted])
    row = 0
    for b, s in enumerate(seqs):
        n = len(s.topk_ids)
        np.testing.assert_array_equal(out["topk_ids"][row:row + n].numpy(), s.topk_ids)
        np.testing.assert_allclose(out["teacher_hidden"][0][row:row + n].numpy(), s.hidden[1])
        row += n
        assert int(counted[b].sum()) == n
    with pytest.raises(UserError, match="empty batch"):
        DistillCollator(tok.pad_token_id)([])


def test_packing_collator_gives_the_padded_collators_loss(tmp_path, tiny_tokenizer, tiny_llama_dir):
    """DistillCollator(pack_length=...) packs the micro-batch into rows (position ids restart per sequence):
    DistillTrainer's loss, plain and through a wrapper's full forward, equals the padded batch's."""
    from transformers import AutoModelForCausalLM, TrainingArguments

    from fastkd.hf import CacheDataset, DistillCollator, DistillTrainer
    from helpers import write_cache

    ds = CacheDataset(str(write_cache(tmp_path / "cache", tiny_tokenizer, count=12, seed=3)), layers=[])
    seqs = [ds[i] for i in range(8)]
    longest = max(len(s.input_ids) for s in seqs)
    packed = DistillCollator(tiny_tokenizer.pad_token_id, pack_length=2 * longest)(seqs)
    padded = DistillCollator(tiny_tokenizer.pad_token_id)(seqs)
    assert packed["input_ids"].shape[0] < len(seqs) and "position_ids" in packed and "position_ids" not in padded
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    trainer = DistillTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "hf"), report_to=[],
                                                                 use_cpu=True),
                             train_dataset=ds, data_collator=DistillCollator(0, pack_length=64),
                             processing_class=tiny_tokenizer, fastkd_config={"kl_weight": 0.5})
    module = trainer.loss_module(model)
    with torch.no_grad():
        want = module(**padded).total.item()
        got = trainer.compute_loss(model, packed).item()
        wrapped = module(**packed, runner=model).total.item()      # the full forward: logits from the wrapper
    assert got == pytest.approx(want, rel=1e-5) and wrapped == pytest.approx(want, rel=1e-5)
    with pytest.raises(UserError, match=f"has {longest} tokens, longer than the packed row length {longest - 1}"):
        DistillCollator(0, pack_length=longest - 1)(seqs)


def test_linear_loss_module_equals_the_logits_loss():
    from fastkd.kernels import DistillLoss, LinearDistillLoss, LossSpec
    from loss_cases import make_case, teacher_of

    g = torch.Generator().manual_seed(5)
    case = make_case(n=12, v=97, k=6, seed=5)
    h = torch.randn(12, 16, generator=g, dtype=torch.float64)
    w = torch.randn(97, 16, generator=g, dtype=torch.float64) * 0.3
    args = (case["labels"], teacher_of(case))
    hl, wl = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ours = LinearDistillLoss(LossSpec(temperature=1.5, kl_weight=0.7))(hl, wl, *args)
    ours.total.backward()
    hz, wz = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref = DistillLoss(LossSpec(temperature=1.5, kl_weight=0.7))(hz @ wz.t(), *args)
    ref.total.backward()
    assert float(ours.total.detach()) == pytest.approx(float(ref.total.detach()), rel=1e-10)
    torch.testing.assert_close(hl.grad, hz.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(wl.grad, wz.grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- the Hugging Face Trainer

def test_distill_trainer_loss_equals_fastkd_train_on_the_same_batch(kd, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from fastkd.hf import CacheDataset, DistillCollator, DistillTrainer
    from fastkd.loader import CacheSource, collate
    from fastkd.student import StudentWithLoss, batch_inputs
    from fastkd.teacher import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    ds = CacheDataset(str(kd["cache"]), layers=[])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    trainer = DistillTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                             train_dataset=ds, data_collator=DistillCollator(tok.pad_token_id), processing_class=tok,
                             fastkd_config={"kl_weight": 0.8, "temperature": 1.5})
    positions = [0, 4, 9, 13]
    hf_loss = trainer.compute_loss(model, DistillCollator(tok.pad_token_id)([ds[i] for i in positions]))
    # fastkd train's module on the same batch, with the options parsed the way `fastkd train` parses them
    cfg = quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), kl_weight=0.8, temperature=1.5)
    source = CacheSource(kd["cache"], layers=[])
    module = StudentWithLoss(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), len(tok), cfg)
    terms = module(**batch_inputs(collate([source[i] for i in positions], tok.pad_token_id), []))
    assert float(hf_loss) == pytest.approx(float(terms.total), rel=1e-6)
    assert trainer.last_terms["kl"] > 0


def test_a_wrapped_forward_takes_the_logits_it_made_with_the_same_loss(kd, tiny_llama_dir):
    """Under another trainer's wrapper (DDP) the forward runs through the wrapper, which gives logits: the fused
    path then scores those (the same loss and gradient) instead of failing for want of the hidden states."""
    from transformers import AutoModelForCausalLM

    from fastkd.loader import CacheSource, collate
    from fastkd.student import StudentWithLoss, batch_inputs
    from fastkd.teacher import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    source = CacheSource(kd["cache"], layers=[])
    batch = batch_inputs(collate([source[i] for i in (0, 4, 9)], tok.pad_token_id), [])
    cfg = quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), kl_weight=0.8, temperature=1.5)
    module = StudentWithLoss(AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)), len(tok), cfg)
    assert module.loss_path == "fused"
    grads = []
    for runner in (None, module.student):  # the bare model's hidden states, then a stand-in wrapper's logits
        module.zero_grad(set_to_none=True)
        terms = module(**batch, runner=runner)
        terms.total.backward()
        grads.append(module.student.get_output_embeddings().weight.grad.clone())
        assert float(terms.kl) > 0
        if runner is None:
            bare = float(terms.total)
    assert float(terms.total) == pytest.approx(bare, rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_the_hf_trainer_example_trains_and_its_loss_falls(kd, tiny_llama_dir, tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import hf_trainer
    finally:
        sys.path.remove(str(ROOT / "examples"))
    out = hf_trainer.main(["--cache", str(kd["cache"]), "--student", str(tiny_llama_dir), "--out", str(tmp_path / "hf"),
                           "--max-steps", "12", "--batch-size", "8", "--lr", "3e-3"])
    losses = out["losses"]
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out["final"])) is not None


# ----------------------------------------------------------------------------- LoRA students

def test_lora_student_trains_adapters_only_saves_a_peft_adapter_that_merges(kd, tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = train(quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), out=str(tmp_path / "lora"), max_steps=6,
                         batch_size=8, lr=1e-2, lora_rank=4, lora_targets="q_proj,v_proj", eval_sequences=8))
    final = result.final_dir
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert adapter and all("lora_" in key for key in adapter)
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    merged = peft.PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    plain = AutoModelForCausalLM.from_pretrained(str(final / "merged"))
    original = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        a, b, c = merged(ids).logits, plain(ids).logits, original(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert float((a - c).abs().max()) > 1e-4  # the adapters changed the model
    # everything but the adapters stayed frozen: the merged model differs only in q_proj / v_proj
    changed = {k for k, v in plain.state_dict().items() if not torch.equal(v, original.state_dict()[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    assert result.after["kl"] < result.before["kl"]


def test_lora_resume_is_exact(kd, tiny_llama_dir, tmp_path):
    pytest.importorskip("peft")
    assert_resume_is_exact(tmp_path, "adapter_model.safetensors", cache=str(kd["cache"]), student=str(tiny_llama_dir),
                           batch_size=8, lr=1e-2, lora_rank=2, schedule="constant", seed=1)


def test_lora_errors_are_clear(kd, tiny_llama_dir, tmp_path):
    pytest.importorskip("peft")
    with pytest.raises(UserError, match="--lora-targets"):
        train(quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), out=str(tmp_path / "bad"), max_steps=1,
                    lora_rank=2, lora_targets="no_such_module"))
    with pytest.raises(UserError, match="fsdp"):
        quiet(cache=str(kd["cache"]), student=str(tiny_llama_dir), lora_rank=2, distributed="fsdp")


# ----------------------------------------------------------------------------- eval during training

def test_eval_during_training_logs_heldout_and_bbh_scores_to_jsonl_and_tensorboard(kd, tiny_llama_dir, tmp_path):
    from fastkd.bbh import resolve_bbh_dir

    if resolve_bbh_dir(None, ["boolean_expressions"]) is None:
        pytest.skip("BBH data not found (../shared/bbh)")
    run = tmp_path / "evals"
    pytest.importorskip("tensorboard")
    result = train(quiet(tensorboard=True, cache=str(kd["cache"]), student=str(tiny_llama_dir), out=str(run), max_steps=4,
                                      batch_size=8, eval_sequences=8, eval_every=2, eval_bbh_tasks="boolean_expressions",
                                      eval_bbh_limit=3, eval_bbh_max_new_tokens=8, gradient_checkpointing=True))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval_kl" in line]
    assert [line["step"] for line in evals] == [0, 2, 4]
    for line in evals:
        assert line["eval_bbh_items"] == 3 and 0.0 <= line["eval_bbh_strict"] <= 100.0
    assert "bbh_strict" in result.after
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "eval_kl", "eval_bbh_strict"} <= set(tags)
    assert [e.step for e in acc.Scalars("eval_kl")] == [0, 2, 4]

