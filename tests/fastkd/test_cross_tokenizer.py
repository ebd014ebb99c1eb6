"""--cross-tokenizer: the ULD loss and the exact-offset target against float64 references written here,
re-tokenisation round trip, the token-string map of two tiny tokenizers, the teacher tokenizer sealed in
the cache, `fastkd train --cross-tokenizer uld|exact` (loss falls, exact resume) and the refusals."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd.errors import UserError
from helpers import assert_resume_is_exact, build_teacher_and_cache, quiet

pytestmark = pytest.mark.usefixtures("one_thread")


STUDENT_CORPUS = [f"{a} plus {b} is {a + b}. So the answer is {a + b}." for a in range(10) for b in range(10)] + [
    "Q: 3 + 4 is\nA: Let's think step by step.", "zebra quilt vexing jumps (A) (B) [x] {y}"]


@pytest.fixture(scope="module")
def xt(tmp_path_factory, tiny_qwen_dir):
    """A tiny teacher cache (tokenizer A, 512 ids) and a student with its own tokenizer (B, 300 ids)."""
    from fastkd.tiny import save_tiny, train_tokenizer

    root = tmp_path_factory.mktemp("xt")
    kd = build_teacher_and_cache(root, tiny_qwen_dir, layers=None)
    student = save_tiny(root / "student", "llama", tokenizer=train_tokenizer(STUDENT_CORPUS, vocab_size=300),
                        hidden=32, layers=2, heads=4, kv_heads=2, seed=1)
    return {**kd, "student": student}


def tokenizers(xt):
    from fastkd.teacher import load_tokenizer

    return load_tokenizer(str(xt["teacher"])), load_tokenizer(str(xt["student"]))


# ----------------------------------------------------------------------------- ULD against float64

def reference_uld(z, labels, logprobs, tail, ids, ce_w, uld_w):
    """Row by row in float64: CE mean + uld_w * sum over teacher rows of the sorted L1 / counted rows."""
    z = z.double()
    counted = [r for r in range(z.shape[0]) if labels[r] != -100]
    n = max(len(counted), 1)
    ce = z.new_zeros(())
    uld = z.new_zeros(())
    k = logprobs.shape[1]
    for r in counted:
        logq = z[r] - torch.logsumexp(z[r], 0)
        ce = ce - logq[labels[r]]
        if not bool((ids[r] >= 0).any()):
            continue
        s = torch.sort(logq.exp(), descending=True).values
        s = torch.cat([s, s.new_zeros(max(0, k - len(s)))])[:k]          # ranks beyond V: probability 0
        t = torch.sort(logprobs[r].double().exp(), descending=True).values
        uld = uld + (s - t).abs().sum() + ((1 - s.sum()) - tail[r].double()).abs()
    return ce_w * ce / n + uld_w * uld / n + 0 * z.sum(), ce / n, uld / n


def random_case(n, v, k, seed, pad_rows=(), no_teacher=()):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, v, generator=g) * 3
    labels = torch.randint(0, v, (n,), generator=g)
    full = torch.log_softmax(torch.randn(n, max(k + 5, 2 * k), generator=g) * 2, dim=1)
    top = full.topk(k, dim=1).values
    top = top[:, torch.randperm(k, generator=g)]                         # order must not matter
    tail = (1 - top.exp().sum(1)).clamp_min(0)
    ids = torch.randint(0, 1000, (n, k), generator=g)
    for r in pad_rows:
        labels[r] = -100
        top[r], tail[r] = float("nan"), float("nan")                     # padding rows are never read
    for r in no_teacher:
        ids[r] = -1
    return z, labels, top, tail, ids


@pytest.mark.parametrize("n,v,k,pad,none", [(9, 13, 5, (1, 7), (3,)), (6, 4, 7, (0,), (5,)), (5, 7, 7, (), ()),
                                            (0, 8, 3, (), ()), (3, 6, 2, (0, 1, 2), ())])
def test_uld_matches_a_float64_reference_with_padding_k_at_least_v_and_empty(n, v, k, pad, none):
    from fastkd.kernels import LossSpec, Teacher, uld_loss

    z, labels, top, tail, ids = random_case(n, v, k, seed=n * 100 + v * 10 + k, pad_rows=pad, no_teacher=none)
    leaf64 = z.double().clone().requires_grad_()
    ref, ref_ce, ref_uld = reference_uld(leaf64, labels, top, tail, ids, 0.7, 1.3)
    ref.backward()
    leaf = z.clone().requires_grad_()
    terms = uld_loss(leaf, labels, Teacher(ids, top, tail), LossSpec(ce_weight=0.7, kl_weight=1.3, chunk_size=2))
    terms.total.backward()
    assert abs(float(terms.total.detach()) - float(ref.detach())) < 1e-5
    assert abs(float(terms.kl) - float(ref_uld.detach())) < 1e-5 and abs(float(terms.ce) - float(ref_ce.detach())) < 1e-5
    assert torch.allclose(leaf.grad, leaf64.grad.float(), atol=1e-6), (leaf.grad - leaf64.grad).abs().max()
    for r in pad:                                                          # padding rows: no gradient at all
        assert torch.all(leaf.grad[r] == 0)


def test_uld_is_zero_where_the_sorted_distributions_agree():
    """A student whose sorted probabilities equal the teacher's (other ids, same values): ULD 0."""
    from fastkd.kernels import Teacher, uld_loss

    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    z = p.log()[:, [2, 0, 3, 1]]                                           # a permutation: ids differ, values not
    teacher = Teacher(torch.zeros(1, 3, dtype=torch.long), p[:, :3].log(), torch.tensor([0.05]))
    terms = uld_loss(z, torch.tensor([1]), teacher)
    assert float(terms.kl) < 1e-6


def test_uld_checks_its_inputs_like_the_other_loss_paths():
    """Bad teacher values, labels or shapes are refused naming the field and row, never scored as NaN; the
    teacher's ids index its own vocabulary (here up to 1000 > V), so they are not checked against V."""
    from fastkd.kernels import LossInputError, Teacher, uld_loss

    z, labels, top, tail, ids = random_case(6, 9, 4, seed=3)
    nan_lp = top.clone()
    nan_lp[0, 0] = float("nan")
    cases = [(Teacher(ids, nan_lp, tail), labels, r"teacher.logprobs row 0"),
             (Teacher(ids, top, tail), torch.full_like(labels, 9), r"labels\[0\]=9"),
             (Teacher(ids, top[:, :2], tail), labels, "teacher.logprobs must have shape"),
             (Teacher(ids, top, tail * 0 + 2), labels, r"teacher.tail\[0\]"),
             (Teacher(ids, top, None), labels, "needs teacher.tail")]
    for teacher, y, match in cases:
        with pytest.raises(LossInputError, match=match):
            uld_loss(z, y, teacher)
    assert math.isfinite(float(uld_loss(z, labels, Teacher(ids, top, tail)).total))


def test_uld_rows_align_by_index_up_to_the_shorter_response():
    from fastkd.cross_tokenizer import exact_rows, uld_rows

    ids = np.arange(15).reshape(5, 3)
    lp = np.log(np.full((5, 3), 0.2, dtype=np.float32))
    tail = np.full(5, 0.4, dtype=np.float32)
    longer = uld_rows(ids, lp, tail, 7)                                    # student response longer: 2 rows without
    assert (longer[0][:5] == ids).all() and (longer[0][5:] == -1).all() and (longer[2][5:] == 1).all()
    shorter = uld_rows(ids, lp, tail, 3)
    assert (shorter[0] == ids[:3]).all() and np.allclose(shorter[1], lp[:3]) and np.allclose(shorter[2], tail[:3])
    empty = uld_rows(ids, lp, tail, 0)
    assert empty[0].shape == (0, 3) and empty[2].shape == (0,)
    none = exact_rows(np.arange(5), np.zeros(0, dtype=np.int64), ids, lp, tail, np.arange(20), width=3)
    assert none[0].shape == (0, 3)


# ----------------------------------------------------------------------------- exact target on the fused loss

def reference_tail_kl(z, labels, ids, lp, tail):
    """Dense float64 KL(t || q) with t over the row's ids plus the tail bucket (renormalised), per row."""
    out = []
    for r in range(z.shape[0]):
        if labels[r] == -100:
            continue
        logq = z[r].double() - torch.logsumexp(z[r].double(), 0)
        valid = [int(i) for i in ids[r] if i >= 0]
        t = {int(i): math.exp(float(x)) for i, x in zip(ids[r], lp[r]) if i >= 0}
        t_tail = float(tail[r]) if len(valid) < z.shape[1] else 0.0
        total = sum(t.values()) + t_tail
        kl = sum(w / total * (math.log(w / total) - float(logq[i])) for i, w in t.items() if w > 0)
        q_tail = 1 - sum(float(logq[i].exp()) for i in valid)
        if t_tail > 0:
            kl += t_tail / total * math.log((t_tail / total) / q_tail)
        out.append(kl)
    return out


def test_exact_rows_on_the_fused_loss_match_the_reference_and_unaligned_rows_have_no_gradient():
    from fastkd.cross_tokenizer import exact_rows
    from fastkd.kernels import LossSpec, Teacher, distill_loss, fused_linear_distill_loss

    g = torch.Generator().manual_seed(5)
    v_t, v_s, k = 40, 12, 6
    id_map = torch.randint(-1, v_s, (v_t,), generator=g).numpy()           # many teacher ids map to one student id
    id_map[:3] = -1
    n_t, n_s = 7, 9
    full = torch.log_softmax(torch.randn(n_t, v_t, generator=g) * 2, 1)
    top, top_ids = full.topk(k, 1)
    tail = (1 - top.exp().sum(1)).numpy()
    t_off = np.array([0, 2, 5, 6, 9, 11, 14])
    s_off = np.array([0, 1, 2, 4, 6, 9, 10, 13, 14])                       # aligned at 0, 2, 6, 9, 14
    ids, lp, tl = exact_rows(t_off, s_off, top_ids.numpy(), top.numpy(), tail, id_map, width=min(k, v_s - 1))
    aligned = {0: 0, 2: 1, 4: 3, 5: 4, 8: 6}
    for j in range(n_s):
        assert ((ids[j] >= 0).any() or tl[j] == 1.0)
        if j not in aligned:
            assert (ids[j] == -1).all() and tl[j] == 1.0
        else:                                                               # mass kept: mapped + tail = 1
            i = aligned[j]
            mapped = {}
            for t_id, x in zip(top_ids[i].tolist(), top[i].exp().tolist()):
                if id_map[t_id] >= 0:
                    mapped[int(id_map[t_id])] = mapped.get(int(id_map[t_id]), 0.0) + x
            got = {int(a): math.exp(float(b)) for a, b in zip(ids[j], lp[j]) if a >= 0}
            assert got.keys() == mapped.keys() and all(abs(got[a] - mapped[a]) < 1e-5 for a in got)
            assert abs(tl[j] + sum(got.values()) - 1) < 1e-5
    labels = torch.randint(0, v_s, (n_s,), generator=g)
    labels[3] = -100
    h = torch.randn(n_s, 8, generator=g)
    w = torch.randn(v_s, 8, generator=g)
    ref = reference_tail_kl(h @ w.T, labels, ids, lp, tl)
    ids_t, lp_t, tl_t = torch.from_numpy(ids), torch.from_numpy(lp), torch.from_numpy(tl)
    z = (h @ w.T).requires_grad_()
    spec = LossSpec(mode="tail", ce_weight=0.0, kl_weight=1.0)
    terms = distill_loss(z, labels, Teacher(ids_t, lp_t, tl_t), spec)
    terms.total.backward()
    assert abs(float(terms.kl) - sum(ref) / len(ref)) < 1e-5
    for j in range(n_s):
        if j not in aligned:                                               # KL 0, gradient 0 there
            assert float(z.grad[j].abs().max()) < 1e-7, j
    hl = h.clone().requires_grad_()
    fused = fused_linear_distill_loss(hl, w, labels, Teacher(ids_t, lp_t, tl_t), spec)
    assert abs(float(fused.kl) - sum(ref) / len(ref)) < 1e-5


# ----------------------------------------------------------------------------- the data side

def test_token_string_map_between_two_different_tiny_tokenizers(xt):
    from fastkd.cross_tokenizer import vocab_map

    teacher, student = tokenizers(xt)
    assert len(teacher) != len(student)
    mapping = vocab_map(teacher, student)
    assert mapping.shape == (len(teacher),)
    student_strings = {}
    for sid in range(len(student)):
        s = student.decode([sid])
        if "\ufffd" not in s and s and sid not in student.all_special_ids:
            student_strings.setdefault(s, sid)
    hits = 0
    for tid in range(len(teacher)):
        s = teacher.decode([tid])
        if tid == teacher.eos_token_id:
            assert mapping[tid] == student.eos_token_id
        elif mapping[tid] >= 0:
            hits += 1
            assert student.decode([int(mapping[tid])]) == s, (tid, s)
        elif "\ufffd" not in s and tid not in teacher.all_special_ids:
            assert s not in student_strings, (tid, s)                      # nothing identical was missed
    assert 50 < hits < len(teacher)


def test_retokenised_responses_decode_to_the_teacher_response_text(xt):
    from fastkd.cross_tokenizer import retokenize
    from fastkd.templates import Template
    from fastkd.loader import CacheSource

    teacher, student = tokenizers(xt)
    records = [json.loads(x) for x in xt["records"].read_text().splitlines()]
    source = CacheSource(xt["cache"])
    template = Template()
    for pos in range(len(source)):
        seq = source[pos]
        rt = retokenize(seq.input_ids, seq.loss_mask, teacher, student)
        rec = records[seq.record_index]
        assert rt.prompt_text == template.prompt(rec["source"])
        assert rt.response_text == template.response(rec["rationale"], rec["target"])
        assert rt.eos and rt.response_ids[-1] == student.eos_token_id
        assert student.decode(rt.response_ids[:-1], clean_up_tokenization_spaces=False) == rt.response_text
        assert rt.prompt_ids == list(student(rt.prompt_text)["input_ids"])
    one = source[0]
    short = retokenize(one.input_ids, one.loss_mask, teacher, student, max_length=len(rt.prompt_ids) + 2)
    assert len(short.response_ids) <= 2 and not short.student_eos


def test_exact_alignment_matches_a_brute_force_over_all_row_pairs(xt):
    from fastkd.cross_tokenizer import CrossTokenizerSource, retokenize
    from fastkd.loader import CacheSource

    teacher, student = tokenizers(xt)
    base = CacheSource(xt["cache"])
    source = CrossTokenizerSource(base, teacher, student, "exact")
    aligned_rows = total_rows = 0
    for pos in range(4):
        seq, out = base[pos], source[pos]
        rt = retokenize(seq.input_ids, seq.loss_mask, teacher, student)
        t_resp = [int(t) for t, m in zip(seq.input_ids, seq.loss_mask) if m]
        t_text = [teacher.decode(t_resp[:i], clean_up_tokenization_spaces=False) for i in range(len(t_resp))]
        s_text = [student.decode(rt.response_ids[:j], clean_up_tokenization_spaces=False)
                  for j in range(len(rt.response_ids))]
        assert len(out.topk_ids) == len(rt.response_ids) == int(out.loss_mask[1:].sum())
        for j, s in enumerate(s_text):
            pairs = [i for i, t in enumerate(t_text) if t == s and rt.response_text.startswith(s)]
            has = bool((out.topk_ids[j] >= 0).any())
            if not pairs:
                assert not has and out.tail[j] == 1.0
            else:
                i = pairs[0]
                want = {int(source.id_map[a]) for a in seq.topk_ids[i] if source.id_map[a] >= 0}
                assert {int(a) for a in out.topk_ids[j] if a >= 0} == want
                aligned_rows += 1
        total_rows += len(s_text)
    assert 0.3 * total_rows < aligned_rows <= total_rows


def test_the_teacher_tokenizer_is_in_the_cache_with_its_digests(xt, tmp_path):
    import hashlib

    from fastkd.cross_tokenizer import load_teacher_tokenizer
    from fastkd.cache_tools.format import read_manifest
    from fastkd.tokenizer_identity import tokenizer_identity

    manifest = read_manifest(xt["cache"])
    entry = manifest["teacher_tokenizer"]
    assert entry["dir"] == "teacher_tokenizer" and "tokenizer.json" in entry["files"]
    for name, digest in entry["files"].items():
        assert hashlib.sha256((xt["cache"] / "teacher_tokenizer" / name).read_bytes()).hexdigest() == digest
    tok = load_teacher_tokenizer(str(xt["cache"]), manifest)
    assert tokenizer_identity(tok)["components"] == manifest["tokenizer"]["components"]
    bad = tmp_path / "bad"
    shutil.copytree(xt["cache"], bad)
    path = bad / "teacher_tokenizer" / "tokenizer.json"
    path.write_text(path.read_text().replace('"<|pad|>"', '"<|pod|>"', 1))
    with pytest.raises(UserError, match="tokenizer.json does not match its sha256"):
        load_teacher_tokenizer(str(bad), read_manifest(bad))


# ----------------------------------------------------------------------------- fastkd train

def loss_lines(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


@pytest.mark.parametrize("method", ["uld", "exact"])
def test_train_cross_tokenizer_runs_its_loss_falls_and_resume_is_exact(xt, tmp_path, method, capsys):
    from fastkd.cli import main

    run = tmp_path / "cli"
    rc = main(["train", "--cache", str(xt["cache"]), "--student", str(xt["student"]), "--cross-tokenizer", method,
               "--out", str(run), "--no-progress", "--max-steps", "16", "--batch-size", "8", "--lr", "1e-2",
               "--log-every", "4", "--eval-sequences", "8", "--no-tensorboard"])
    assert rc == 0, capsys.readouterr().err
    losses = loss_lines(run)
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    summary = json.loads((run / "final" / "fastkd_train.json").read_text())
    assert summary["after"]["kl"] < summary["before"]["kl"] and summary["after"]["ce"] < summary["before"]["ce"]
    common = dict(cache=str(xt["cache"]), student=str(xt["student"]), cross_tokenizer=method, batch_size=8, lr=3e-3,
                  schedule="constant", seed=2)
    assert_resume_is_exact(tmp_path, **common)


def test_a_mismatch_without_cross_tokenizer_is_refused_and_names_the_option(xt, tmp_path, capsys):
    from fastkd.cli import main

    rc = main(["train", "--cache", str(xt["cache"]), "--student", str(xt["student"]), "--out", str(tmp_path / "r"),
               "--no-progress", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "does not match" in err and "--cross-tokenizer uld" in err


def test_an_old_cache_without_the_teacher_tokenizer_says_what_to_do(xt, tmp_path):
    from fastkd.cache_tools.format import read_manifest, write_manifest
    from fastkd.trainer import train

    old = tmp_path / "old"
    shutil.copytree(xt["cache"], old)
    manifest = read_manifest(old)
    del manifest["teacher_tokenizer"]
    write_manifest(old, manifest)                                       # re-sealed, as an older fastkd wrote it
    shutil.rmtree(old / "teacher_tokenizer")
    common = dict(cache=str(old), student=str(xt["student"]), max_steps=1, batch_size=4)
    for method in ("exact", "uld"):
        with pytest.raises(UserError, match=f"made before fastkd saved the teacher tokenizer.*--cross-tokenizer {method}"
                                            f".*re-create the cache"):
            train(quiet(out=str(tmp_path / f"r-{method}"), cross_tokenizer=method, **common))
    result = train(quiet(out=str(tmp_path / "given"), cross_tokenizer="exact", teacher_tokenizer=str(xt["teacher"]),
                         **common))
    assert result.steps == 1
    with pytest.raises(UserError, match="does not match"):             # a wrong teacher tokenizer is refused
        train(quiet(out=str(tmp_path / "wrong"), cross_tokenizer="uld", teacher_tokenizer=str(xt["student"]), **common))


def test_cross_tokenizer_option_refusals(xt):
    with pytest.raises(UserError, match="give --cache"):
        quiet(data=str(xt["records"]), student=str(xt["student"]), kl_weight=0.0, cross_tokenizer="uld")
    with pytest.raises(UserError, match="--hidden-weight 0"):
        quiet(cache=str(xt["cache"]), student=str(xt["student"]), cross_tokenizer="exact", hidden_weight=1.0)
    with pytest.raises(UserError, match="--temperature 1"):
        quiet(cache=str(xt["cache"]), student=str(xt["student"]), cross_tokenizer="uld", temperature=2.0)
    with pytest.raises(UserError, match="only with --cross-tokenizer"):
        quiet(cache=str(xt["cache"]), student=str(xt["student"]), teacher_tokenizer=str(xt["teacher"]))
