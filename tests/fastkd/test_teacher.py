"""teacher_signal's chunked output head against a brute-force float64 full-logits computation."""

import copy

import pytest
import torch

from fastkd import teacher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["qwen", "llama"])
def model(request, tiny_qwen_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    folder = tiny_qwen_dir if request.param == "qwen" else tiny_llama_dir
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def batch(tiny_tokenizer):
    """Three right-padded sequences of different lengths; loss positions from 5 to each sequence's end."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, len(tiny_tokenizer), (3, 40), generator=gen)
    attn = torch.ones_like(ids)
    attn[1, 30:] = 0
    attn[2, 12:] = 0
    ids = ids.masked_fill(attn == 0, tiny_tokenizer.pad_token_id)
    loss = torch.zeros_like(ids)
    loss[:, 5:] = 1
    return ids, attn, loss * attn


def brute(model, batch, vocab, cap=None):
    """Full logits in float64: log-probs [M, vocab] and every hidden state at the rows."""
    ids, attn, loss = batch
    with torch.no_grad():
        out = copy.deepcopy(model).double()(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    mask = loss[:, 1:].bool()
    logits = out.logits[:, :-1][mask][:, :vocab]
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1), [h[:, :-1][mask] for h in out.hidden_states]


@pytest.mark.parametrize("chunk", [None, 1, 7, 10_000])
def test_topk_matches_float64_full_logits(model, batch, tiny_tokenizer, chunk):
    vocab = len(tiny_tokenizer)
    ref, hidden = brute(model, batch, vocab)
    sig = teacher.teacher_signal(model, *batch, k=8, layers=(0, 2), vocab_size=vocab, chunk_rows=chunk)
    assert sig.rows_per_sequence == [35, 25, 7] and sig.topk_ids.shape == (67, 8) and sig.counts is None
    top = ref.topk(8, dim=-1).values
    assert torch.allclose(sig.topk_logprobs.double(), top, atol=2e-5)
    assert torch.allclose(ref.gather(1, sig.topk_ids), top, atol=2e-5)           # the ids are the top-k
    assert torch.allclose(sig.tail.double(), (1 - top.exp().sum(1)).clamp(min=0), atol=2e-5)
    assert sorted(sig.hidden) == [0, 2]
    for layer in (0, 2):
        assert sig.hidden[layer].dtype == torch.float32
        assert torch.allclose(sig.hidden[layer].double(), hidden[layer], atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 64, 10_000])
def test_k_equal_vocab_and_chunks_agree(model, batch, tiny_tokenizer, chunk):
    vocab = len(tiny_tokenizer)
    ref, _ = brute(model, batch, vocab)
    sig = teacher.teacher_signal(model, *batch, k=vocab, vocab_size=vocab, chunk_rows=chunk)
    assert sig.topk_ids.shape == (67, vocab)
    assert torch.equal(sig.topk_ids.sort(dim=1).values, torch.arange(vocab).expand(67, vocab))
    assert torch.allclose(sig.topk_logprobs.double(), ref.sort(dim=1, descending=True).values, atol=2e-5)
    assert float(sig.tail.max()) < 1e-5
    whole = teacher.teacher_signal(model, *batch, k=vocab, vocab_size=vocab)
    assert torch.allclose(sig.topk_logprobs, whole.topk_logprobs, atol=1e-6)
    with pytest.raises(teacher.UserError, match="--top-k"):
        teacher.teacher_signal(model, *batch, k=vocab + 1, vocab_size=vocab, chunk_rows=chunk)


@pytest.mark.parametrize("chunk", [1, 5, 10_000])
def test_sampled_draws_equal_unchunked(model, batch, tiny_tokenizer, chunk):
    """Same seed, same draws as sampling the whole batch's full-logits log-probs at once."""
    vocab = len(tiny_tokenizer)
    ids, attn, loss = batch
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1][loss[:, 1:].bool()][:, :vocab]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    want_ids, want_counts = teacher._sample(logprobs, 16, torch.Generator().manual_seed(7))
    sig = teacher.teacher_signal(model, *batch, sample_n=16, vocab_size=vocab, chunk_rows=chunk,
                                 generator=torch.Generator().manual_seed(7))
    assert torch.equal(sig.topk_ids, want_ids) and torch.equal(sig.counts, want_counts)
    assert torch.equal(sig.counts.sum(dim=1), torch.full((67,), 16, dtype=torch.int32))
    picked = logprobs.gather(1, want_ids.clamp(min=0)).masked_fill(want_ids < 0, float("-inf"))
    assert torch.allclose(sig.topk_logprobs, picked, atol=1e-6)
    assert torch.allclose(sig.tail, (1 - picked.double().exp().sum(1)).clamp(min=0).float(), atol=1e-6)


def test_default_chunk_is_bitwise_the_full_logits_path(model, batch, tiny_tokenizer, monkeypatch, capsys):
    """One chunk holds every row of a tiny batch: the bytes equal those of the model's own full logits."""
    vocab = len(tiny_tokenizer)
    chunked = teacher.teacher_signal(model, *batch, k=8, layers=(1,), vocab_size=vocab)
    teacher._say_once.cache_clear()
    monkeypatch.setattr(model, "get_output_embeddings", lambda: None)
    assert teacher.split_head(model) == "it has no output embeddings"
    for _ in range(2):
        full = teacher.teacher_signal(model, *batch, k=8, layers=(1,), vocab_size=vocab, chunk_rows=3)
        assert torch.equal(full.topk_ids, chunked.topk_ids) and torch.equal(full.tail, chunked.tail)
        assert torch.equal(full.topk_logprobs, chunked.topk_logprobs)
        assert torch.equal(full.hidden[1], chunked.hidden[1])
    assert capsys.readouterr().err.count("no output embeddings") == 1             # said once


def test_unreproduced_config_falls_back_and_softcap_applies(model, batch, tiny_tokenizer, monkeypatch, capsys):
    vocab = len(tiny_tokenizer)
    teacher._say_once.cache_clear()
    monkeypatch.setattr(model.config, "logit_scale", 0.5, raising=False)
    assert teacher.split_head(model) == "its config sets logit_scale"
    sig = teacher.teacher_signal(model, *batch, k=4, vocab_size=vocab)
    assert "logit_scale" in capsys.readouterr().err
    assert torch.allclose(sig.topk_logprobs.double(), brute(model, batch, vocab)[0].topk(4).values, atol=2e-5)
    monkeypatch.setattr(model.config, "logit_scale", None)
    monkeypatch.setattr(model.config, "final_logit_softcapping", 2.0, raising=False)
    capped = teacher.teacher_signal(model, *batch, k=4, vocab_size=vocab, chunk_rows=5)
    ref = brute(model, batch, vocab, cap=2.0)[0].topk(4).values
    assert torch.allclose(capped.topk_logprobs.double(), ref, atol=2e-5)
    assert capsys.readouterr().err == ""


def test_no_loss_positions(model, tiny_tokenizer):
    ids = torch.randint(0, len(tiny_tokenizer), (2, 6))
    sig = teacher.teacher_signal(model, ids, torch.ones_like(ids), torch.zeros_like(ids), k=3, layers=(2,),
                                 vocab_size=len(tiny_tokenizer))
    assert sig.topk_ids.shape == (0, 3) and sig.tail.shape == (0,)
    assert sig.hidden[2].shape == (0, model.config.hidden_size)
    assert sig.rows_per_sequence == [0, 0]


def test_a_head_transform_the_config_does_not_announce_is_caught_once(model, batch, tiny_tokenizer, capsys,
                                                                    monkeypatch):
    """A model whose forward changes its logits behind its head: the one-time check sends it down the
    full-logits path, so the signal is still the model's own distribution."""
    scaled = copy.deepcopy(model)
    forward = scaled.forward

    def doubled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    scaled.forward = doubled
    teacher._say_once.cache_clear()     # each model's reason is said once per process
    vocab = len(tiny_tokenizer)
    sig = teacher.teacher_signal(scaled, *batch, k=8, vocab_size=vocab)
    ids, attn, loss = batch
    with torch.no_grad():
        logits = scaled(input_ids=ids, attention_mask=attn).logits[:, :-1][loss[:, 1:].bool()][:, :vocab]
    top = torch.log_softmax(logits.double(), dim=-1).topk(8, dim=-1).values
    assert torch.allclose(sig.topk_logprobs.double(), top, atol=2e-5)
    assert "differ from its output head" in capsys.readouterr().err
    teacher.teacher_signal(model, *batch, k=8, vocab_size=vocab)          # the plain model keeps the chunked path
    assert "differ" not in capsys.readouterr().err


@pytest.mark.parametrize("typo", ["cpus", "gpu", "cuda:x", ""])
def test_a_mistyped_device_is_one_line_naming_the_forms(typo):
    with pytest.raises(teacher.UserError) as err:
        teacher.resolve_device(typo)
    msg = str(err.value)
    assert msg.startswith(f"--device {typo!r}: not a device") and "auto, cpu, cuda, cuda:N" in msg
    assert "\n" not in msg and teacher.resolve_device("cpu") == torch.device("cpu")


def test_a_device_this_machine_lacks_is_refused():
    if torch.cuda.is_available():
        missing = f"cuda:{torch.cuda.device_count()}"
        with pytest.raises(teacher.UserError, match=rf"--device {missing}: this machine has"):
            teacher.resolve_device(missing)
    else:
        with pytest.raises(teacher.UserError, match="CUDA is not available"):
            teacher.resolve_device("cuda:0")


def test_a_name_that_is_no_folder_says_so_not_damaged_files(tmp_path, monkeypatch):
    """A one-word typo is no local folder and (offline) no hub id: said as such, with the hub's first line of reason
    and the offline variable; the 'damaged files' hint is only for a folder whose files do not load."""
    monkeypatch.chdir(tmp_path)
    for load in (lambda: teacher.load_tokenizer("teachr", "--teacher"),
                 lambda: teacher.load_causal_lm("teachr", device="cpu", role="--teacher")):
        with pytest.raises(teacher.UserError) as err:
            load()
        msg = str(err.value)
        assert msg.startswith("--teacher 'teachr': no local folder of that name, and the hub id 'teachr' could not "
                              "be loaded (OSError: ") and msg.endswith("HF_HUB_OFFLINE is set, so only models already "
                                                                        "in the local Hugging Face cache load")
        assert "damaged" not in msg and "\n" not in msg
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("not json")
    with pytest.raises(teacher.UserError, match="cannot load a tokenizer from 'tok': .* damaged"):
        teacher.load_tokenizer("tok")


def test_hub_failure_online_has_the_reason_and_no_offline_note(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    err = OSError("org/nme is not a local folder and is not a valid model identifier\nIf this is a private repository")
    msg = str(teacher.hub_failure("--student", "org/nme", err))
    assert msg == ("--student 'org/nme': no local folder of that name, and the hub id 'org/nme' could not be loaded "
                   "(OSError: org/nme is not a local folder and is not a valid model identifier)")
