"""Print the cache-codec table: bytes per loss position, decoded KL and single-core throughput
for the top-k codecs and their baselines, then the hidden-state table.

    python benchmarks/codec_table.py            # both data sets, k=64
    python benchmarks/codec_table.py --quick    # fewer positions (a smoke run)

Data: (a) a tiny Qwen2 teacher (~600-token BPE vocabulary) trained for 300 steps on generated
chain-of-thought text (cached under benchmarks/.cache/ after the first run, ~5 CPU-minutes);
(b) the synthetic 151,936-token LM of benchmarks/synthetic_lm.py. KL(decoded || exact) is taken
over K u {tail} against the float64 distribution computed from the teacher's logits.
Throughput is thread CPU time (time.thread_time), best of --repeats, one thread.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_lm import TeacherSample, concat, synthetic_contexts, synthetic_teacher, topk_from_logits  # noqa: E402

from fastkd.cache_tools import topk_codec  # noqa: E402
from fastkd.cache_tools.hidden_codec import decode_hidden, encode_hidden, random_projection  # noqa: E402
from fastkd.cache_tools.planes import (compress_planes, decompress_planes, pack_frames, plane_count,  # noqa: E402
                                       unpack_frames)
from fastkd.cache_tools.topk2_codec import DEFAULT_TOPK2_PARAMS, decode_topk2, encode_topk2  # noqa: E402
from fastkd.cache_tools.topk_codec import (DEFAULT_TOPK_PARAMS, decode_sampled, decode_topk,  # noqa: E402
                                           encode_sampled, encode_topk)

FINE, SMALL = "kt:precision=fine", "kt:precision=small"   # measured as kt-zstd / kt2-zstd before the 1.0 rename

CACHE = Path(__file__).resolve().parent / ".cache"

# ------------------------------------------------------------------------------ tiny teacher (a)

NAMES = ["Alice", "Bob", "Claire", "Dave", "Eve", "Fidel", "Jerry", "Kate", "Leo", "Mia"]
OBJECTS = ["red ball", "blue ball", "green book", "yellow hat", "purple box", "white cup"]


def _example(rng: random.Random) -> str:
    """One generated CoT record: question, step-by-step rationale, answer."""
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return (f"Q: What is {a} + {b}?\nA: Let's think step by step. {a} plus {b} is {a + b}. "
                f"So the answer is {a + b}.")
    if kind == 1:
        vals = [rng.choice(["True", "False"]) for _ in range(3)]
        ops = [rng.choice(["and", "or"]) for _ in range(2)]
        expr = f"{vals[0]} {ops[0]} {vals[1]} {ops[1]} {vals[2]}"
        return f"Q: {expr} is\nA: Let's think step by step. We evaluate {expr} from left to right. So the answer is {eval(expr)}."
    if kind == 2:
        p, q = rng.sample(NAMES, 2)
        truth, says = rng.choice([True, False]), rng.choice([True, False])
        verb = "tells the truth" if truth else "lies"
        claim = "tells the truth" if says else "lies"
        ans = "Yes" if says == truth else "No"
        return (f"Q: {p} {verb}. {q} says {p} {claim}. Does {q} tell the truth?\nA: Let's think step by step. "
                f"{p} {verb}. If {q} says {p} {claim}, then {q} {'tells the truth' if ans == 'Yes' else 'lies'}. So the answer is {ans}.")
    people, items = rng.sample(NAMES, 3), rng.sample(OBJECTS, 3)
    x, y = rng.sample(range(3), 2)
    swapped = list(items)
    swapped[x], swapped[y] = swapped[y], swapped[x]
    return (f"Q: {', '.join(people)} hold a {', a '.join(items)}. {people[x]} and {people[y]} swap. What does {people[0]} hold?\n"
            f"A: Let's think step by step. After the swap {people[0]} holds the {swapped[0]}. So the answer is {swapped[0]}.")


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def load_or_train_teacher(steps: int = 300, vocab_size: int = 2048, seed: int = 0):
    """(tokenizer, model): trained once with a plain torch loop, then loaded from the cache."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastkd.tiny import build_model, pin_tokenizer_class, train_tokenizer

    out = CACHE / f"tiny_teacher_v{vocab_size}_s{steps}"
    if (out / "done").exists():
        return AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    texts = corpus(4000, seed)
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    model = build_model(tok, hidden=128, layers=2, heads=4, kv_heads=2, seed=seed)
    stream = torch.cat([torch.tensor(tok(t)["input_ids"] + [tok.eos_token_id]) for t in texts])
    seq, batch = 128, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="training the tiny teacher"):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        x = torch.stack([stream[s:s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    pin_tokenizer_class(out)
    (out / "done").write_text(f"final training loss {loss.item():.3f}\n")
    return tok, model


def teacher_data(n: int, k: int, samples: int, seed: int = 1):
    """(TeacherSample, last-layer hidden states [n, d], vocab size) on held-out generated text."""
    import torch

    tok, model = load_or_train_teacher()
    texts = corpus(4000, seed + 1000)
    rng = np.random.default_rng(seed)
    parts, hidden, total = [], [], 0
    with torch.no_grad():
        for i in range(0, len(texts), 16):
            enc = tok(texts[i:i + 16], return_tensors="pt", padding=True)
            out = model(**enc, output_hidden_states=True)
            mask = enc["attention_mask"].bool()
            parts.append(topk_from_logits(out.logits[mask].double().numpy(), k, rng, samples))
            hidden.append(out.hidden_states[-1][mask].float().numpy())
            total += int(mask.sum())
            if total >= n:
                break
    sample = concat(parts)
    for name in TeacherSample.__dataclass_fields__:
        setattr(sample, name, getattr(sample, name)[:n])
    return sample, np.concatenate(hidden)[:n], model.config.vocab_size


def embedded_teacher_data(n: int, k: int, seed: int = 200):
    """(TeacherSample, next-token labels, V) of the embedded teacher (fastkd/assets/teacher, V=1,024) over
    generated held-out CoT records of its four demo tasks, through fastkd's own template and tokenizer:
    the rows `fastkd cache-teacher` would store (the distribution at t predicts token t+1 of the response)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastkd import synth
    from fastkd.templates import Template, build_example
    from fastkd.demo import DEMO_TASKS
    from fastkd.paths import EMBEDDED_TEACHER

    path = CACHE / f"embedded_n{n}_k{k}_s{seed}.npz"
    if path.exists():
        with np.load(path) as f:
            sample = TeacherSample(**{name: (f[name] if name in f else None) for name in TeacherSample.__dataclass_fields__})
            return sample, f["labels"], int(f["vocab"])
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TEACHER).eval()
    vocab = model.config.vocab_size
    per_task = [synth.generate(task, 60, seed=seed) for task in DEMO_TASKS]    # seed 200: the held-out split
    records = [dict(r, task=task) for group in zip(*per_task) for task, r in zip(DEMO_TASKS, group)]
    rng = np.random.default_rng(seed)
    parts, labels, total = [], [], 0
    with torch.no_grad():
        for j, record in enumerate(records):
            ex = build_example(record, j, tok, Template(cot=True), max_length=512)
            if ex is None:
                continue
            ids = torch.tensor([ex.input_ids])
            mask = np.asarray(ex.loss_mask, bool)
            logits = model(input_ids=ids).logits[0, :-1].double().numpy()[mask[1:]]
            parts.append(topk_from_logits(logits[:, :vocab], k, rng, 0))
            labels.append(np.asarray(ex.input_ids)[1:][mask[1:]])
            total += len(logits)
            if total >= n:
                break
    sample = concat(parts)
    for name in TeacherSample.__dataclass_fields__:
        if getattr(sample, name) is not None:
            setattr(sample, name, getattr(sample, name)[:n])
    labels = np.concatenate(labels)[:n].astype(np.int64)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    np.savez(path, labels=labels, vocab=vocab, **{name: v for name, v in sample.__dict__.items() if v is not None})
    return sample, labels, vocab


def sampled_labels(sample: TeacherSample, vocab: int, seed: int = 5) -> np.ndarray:
    """Next tokens for a teacher without text (the synthetic LM): drawn from its exact distribution,
    a top-k id with its probability, else a uniform id outside the top-k's bucket."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(np.exp(sample.exact_logprobs), axis=1)
    slot = (cdf < rng.random(len(cdf))[:, None]).sum(1)
    inside = slot < sample.ids.shape[1]
    return np.where(inside, sample.ids[np.arange(len(slot)), np.minimum(slot, sample.ids.shape[1] - 1)],
                    rng.integers(0, vocab, len(slot))).astype(np.int64)


def synthetic_data(n: int, k: int, samples: int) -> TeacherSample:
    """The synthetic LM sample, cached as .npz (generating it takes ~8 s per 1,000 positions)."""
    path = CACHE / f"synthetic_n{n}_k{k}_s{samples}.npz"
    if path.exists():
        with np.load(path) as f:
            return TeacherSample(**{name: (f[name] if name in f else None) for name in TeacherSample.__dataclass_fields__})
    sample = synthetic_teacher(n, k=k, samples=samples)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / ".gitignore").write_text("*\n")
    np.savez(path, **{name: v for name, v in sample.__dict__.items() if v is not None})
    return sample


# ------------------------------------------------------------------------------ measuring

def aligned_probabilities(sample: TeacherSample, ids, logprobs, tail):
    """(exact p, decoded q) over K with rows aligned by id, and the two tails, float64."""
    o1, o2 = np.argsort(sample.ids, axis=1), np.argsort(ids, axis=1)
    if not np.array_equal(np.take_along_axis(sample.ids, o1, 1), np.take_along_axis(ids, o2, 1)):
        raise AssertionError("decoded ids differ from the encoded ones")
    p = np.exp(np.take_along_axis(sample.exact_logprobs, o1, 1))
    q = np.exp(np.take_along_axis(np.asarray(logprobs, np.float64), o2, 1))
    return p, q, sample.exact_tail, np.asarray(tail, np.float64)


def kl_exact_vs_decoded(sample: TeacherSample, ids, logprobs, tail) -> np.ndarray:
    """KL(exact || decoded) per position over K u {tail} (the tail bucket as the loss uses it: with the
    tail exact, spreading it over the V-k other ids adds nothing), float64; rows aligned by id."""
    p, q, pt, qt = aligned_probabilities(sample, ids, logprobs, tail)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * np.log(p / q), 0.0).sum(1)
        kl += np.where(pt > 0, pt * np.log(pt / qt), 0.0)
    return kl


def kl_decoded_vs_exact(sample: TeacherSample, ids, logprobs, tail) -> np.ndarray:
    """KL(decoded || exact) per position over K u {tail}, float64; rows aligned by id."""
    p, q, pt, qt = aligned_probabilities(sample, ids, logprobs, tail)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(q > 0, q * np.log(q / p), 0.0).sum(1)
        kl += np.where(qt > 0, qt * np.log(qt / pt), 0.0)
    return kl


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Best single-thread CPU time of fn() over `repeats` runs, and its last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.thread_time()
        out = fn()
        best = min(best, time.thread_time() - t0)
    return max(best, 1e-9), out


def blocks(n: int, block: int):
    return [(a, min(a + block, n)) for a in range(0, n, block)]


def measure_topk(name, sample, vocab, encode, decode, block, repeats, labels=None):
    """One table row for a codec given as encode(ids, lp, tail) -> bytes and decode(bytes, n) -> (ids, lp, tail);
    with `labels`, encode(ids, lp, tail, labels) and decode(bytes, n, labels) get each block's next tokens."""
    n, k = sample.ids.shape
    spans = blocks(n, block)
    if labels is None:
        t_enc, payloads = best_time(lambda: [encode(sample.ids[a:b], sample.logprobs[a:b], sample.tail[a:b])
                                             for a, b in spans], repeats)
        t_dec, outs = best_time(lambda: [decode(p, b - a) for p, (a, b) in zip(payloads, spans)], repeats)
    else:
        t_enc, payloads = best_time(lambda: [encode(sample.ids[a:b], sample.logprobs[a:b], sample.tail[a:b], labels[a:b])
                                             for a, b in spans], repeats)
        t_dec, outs = best_time(lambda: [decode(p, b - a, labels[a:b]) for p, (a, b) in zip(payloads, spans)], repeats)
    ids = np.concatenate([o[0] for o in outs])
    lp = np.concatenate([o[1] for o in outs])
    tail = np.concatenate([o[2] for o in outs])
    kl = kl_decoded_vs_exact(sample, ids, lp, tail)
    kl_x = kl_exact_vs_decoded(sample, ids, lp, tail)
    mass = np.exp(lp.astype(np.float64)).sum(1) + tail
    return dict(codec=name, k=k, V=vocab, bytes=sum(map(len, payloads)) / n, kl_mean=kl.mean(), kl_max=kl.max(),
                klx_mean=kl_x.mean(), klx_max=kl_x.max(), mass_max=mass.max(), enc=n / t_enc, dec=n / t_dec)


def raw_codec(vocab, k, compress_level=None):
    """Baseline: int32 ids + fp16 log-probs + fp32 tail, optionally one zstd frame over them."""
    def enc(ids, lp, tail):
        body = ids.astype("<i4").tobytes() + lp.astype("<f2").tobytes() + tail.astype("<f4").tobytes()
        return body if compress_level is None else zstandard.ZstdCompressor(level=compress_level).compress(body)

    def dec(payload, n):
        body = payload if compress_level is None else zstandard.ZstdDecompressor().decompress(payload)
        ids = np.frombuffer(body, "<i4", n * k).reshape(n, k).astype(np.int64)
        lp = np.frombuffer(body, "<f2", n * k, offset=4 * n * k).reshape(n, k).astype(np.float32)
        tail = np.frombuffer(body, "<f4", n, offset=6 * n * k).copy()
        return ids, lp, tail
    return enc, dec


def raw_planes_codec(vocab, k, level=3):
    """Baseline: the cache's default logits codec before 1.0 (raw-zstd): ids as the smallest unsigned type (-1 as
    all ones), fp16 log-probs, fp32 tail, each split into byte planes, one zstd frame."""
    width = np.dtype(np.uint8 if vocab <= 255 else np.uint16 if vocab <= 65535 else np.uint32)

    def planes(a):
        return np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize).T.tobytes()

    def enc(ids, lp, tail):
        stored = np.where(ids < 0, np.iinfo(width).max, ids).astype(width.newbyteorder("<"))
        body = planes(stored) + planes(lp.astype("<f2")) + planes(tail.astype("<f4"))
        return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(body)

    def dec(payload, n):
        body = np.frombuffer(zstandard.ZstdDecompressor().decompress(payload), np.uint8)
        sizes = np.cumsum([0, n * k * width.itemsize, n * k * 2, n * 4])
        unplane = lambda part, dtype: body[sizes[part]:sizes[part + 1]].reshape(np.dtype(dtype).itemsize, -1).T \
            .copy().view(dtype).reshape(-1)  # noqa: E731
        stored = unplane(0, width.newbyteorder("<")).reshape(n, k)
        ids = np.where(stored == np.iinfo(width).max, -1, stored.astype(np.int64))
        return ids, unplane(1, "<f2").reshape(n, k).astype(np.float32), unplane(2, "<f4").astype(np.float32)
    return enc, dec


def distillkit_bytes(vocab: int, k: int, exact_k: int, exact_bits: int, n_terms: int, term_bits: int = 32) -> int:
    """DistillKit DistributionQuantizationConfig.total_bits() / 8 with no residual bins:
    exact_k values + polynomial coefficients, rounded up to a byte, + k ids of ceil(log2 V) bits."""
    value_bits = exact_k * exact_bits + n_terms * term_bits
    value_bytes = (value_bits + 7) // 8
    index_bytes = (k * int(np.ceil(np.log2(vocab))) + 7) // 8
    return value_bytes + index_bytes


def ours(vocab, k, **params):
    return (lambda ids, lp, tail: encode_topk(ids, lp, tail, vocab, **params),
            lambda payload, n: decode_topk(payload, n, k, vocab, **params))


def encode_variant(ids, lp, tail, vocab, layout="id", reference="top1", rank_of_id=None, **params) -> bytes:
    """kt:precision=fine with an option measured and not taken (docs/codec.md), as the library wrote it while it
    had them: rows sorted by value (layout byte 0), x measured below log-prob 0, ids coded as ranks of a table."""
    p = {**DEFAULT_TOPK_PARAMS, **params}
    ids, lp, tail, steps, unused = topk_codec.prepared(ids, lp, tail, vocab, (p["step"], p["max_step"], p["growth"]),
                                                       1e-3)
    assert unused is None, "the variants take full rows only"
    n, k = ids.shape
    keys = ids.astype(np.int64) if rank_of_id is None else np.asarray(rank_of_id, np.int64)[ids]
    finite = np.isfinite(lp)
    ref = (np.zeros((n, 1), np.float32) if reference == "absolute"
           else np.where(finite, lp, -np.inf).max(axis=1, initial=-np.inf, keepdims=True))
    with np.errstate(invalid="ignore"):
        codes = topk_codec._to_code(np.maximum(np.where(finite, ref - lp, np.float32(0)), np.float32(0)), *steps)
    codes[~finite] = topk_codec.NEG_INF_CODE
    if layout == "value":   # ids raw in value order, the ascending codes as differences
        id_bits = max(1, int(vocab + k - 1).bit_length())
        packed = np.sort((codes << id_bits) | keys, axis=1)
        key_stream, codes = packed & ((1 << id_bits) - 1), packed >> id_bits
        code_stream = np.concatenate([codes[:, :1], np.diff(codes, axis=1)], axis=1)
    else:
        key_stream, code_stream = topk_codec._sorted_gaps(keys, codes, 16)
    flags = (1 if rank_of_id is not None else 0) | (2 if reference == "absolute" else 0)
    header = topk_codec._TOPK_HEADER.pack(b"KT", 1, 0 if layout == "value" else 1, flags, n, k, *steps)
    code_planes = plane_count(max(int(code_stream.max(initial=0)), 1))
    return pack_frames(header, [compress_planes(key_stream, plane_count(vocab + k), p["level"]),
                                compress_planes(code_stream, code_planes, p["level"]),
                                compress_planes(tail.view(np.uint32), 4, p["level"])])


def decode_variant(payload: bytes, n: int, k: int, id_of_rank=None):
    """Inverse of encode_variant (the inverse rank table passed when it had one)."""
    _, _, layout, _, _, _, *steps = topk_codec._TOPK_HEADER.unpack_from(payload)
    g_keys, g_codes, g_tail = unpack_frames(payload, topk_codec._TOPK_HEADER.size, 3)
    tail = decompress_planes(g_tail, n).view(np.float32)
    keys = decompress_planes(g_keys, n * k).reshape(n, k).astype(np.int64)
    codes = decompress_planes(g_codes, n * k).reshape(n, k).astype(np.int64)
    if layout == 0:
        np.cumsum(codes, axis=1, out=codes)
    else:
        np.cumsum(keys, axis=1, out=keys)
        keys += np.arange(k)
    ids = keys if id_of_rank is None else id_of_rank[keys]
    return ids, topk_codec._decoded_logprobs(codes, tail, *steps), tail


def variant(vocab, k, layout="id", reference="top1", rank_of_id=None, **params):
    """(encode, decode) of kt:precision=fine with the options of encode_variant; the library's own without them."""
    if layout == "id" and reference == "top1" and rank_of_id is None:
        return ours(vocab, k, **params)
    id_of_rank = None if rank_of_id is None else np.argsort(rank_of_id)
    return (lambda ids, lp, tail: encode_variant(ids, lp, tail, vocab, layout, reference, rank_of_id, **params),
            lambda payload, n: decode_variant(payload, n, k, id_of_rank))


def size_without_plane_split(sample, vocab, block, **params) -> float:
    """Bytes/position of the same streams stored as whole little-endian integers (one zstd frame
    per stream) instead of byte planes: an ablation, measured by swapping the plane splitter."""
    original = topk_codec.compress_planes

    def whole(values, nbytes, level):
        raw = np.ascontiguousarray(values, dtype="<u4").reshape(-1).view(np.uint8).reshape(-1, 4)[:, :nbytes]
        return [zstandard.ZstdCompressor(level=level).compress(raw.tobytes())]
    topk_codec.compress_planes = whole
    try:
        total = sum(len(encode_topk(sample.ids[a:b], sample.logprobs[a:b], sample.tail[a:b], vocab, **params))
                    for a, b in blocks(len(sample.ids), block))
    finally:
        topk_codec.compress_planes = original
    return total / len(sample.ids)


def frequency_table(sample, vocab, calibration: float = 0.25) -> np.ndarray:
    """rank_of_id from how often each id appears in the top-k of the first `calibration` share of positions."""
    m = max(1, int(len(sample.ids) * calibration))
    counts = np.bincount(sample.ids[:m].ravel(), minlength=vocab)
    rank_of_id = np.empty(vocab, np.int64)
    rank_of_id[np.argsort(-counts, kind="stable")] = np.arange(vocab)
    return rank_of_id


def ours2(vocab, k, **params):
    return (lambda ids, lp, tail, labels: encode_topk2(ids, lp, tail, vocab, labels=labels, **params),
            lambda payload, n, labels: decode_topk2(payload, n, k, vocab, labels=labels, **params))


def topk2_rows(sample, vocab, labels, block, repeats):
    """kt at precision small: the default, without labels, and parameter variants; bytes are the
    whole payload (its per-block id table included) over all positions."""
    n, k = sample.ids.shape
    default = dict(DEFAULT_TOPK2_PARAMS)
    rows = [measure_topk(f"{SMALL} {fmt_params(default)}", sample, vocab, *ours2(vocab, k), block, repeats, labels),
            measure_topk(f"{SMALL}, no labels", sample, vocab,
                         lambda i, l, t: encode_topk2(i, l, t, vocab), lambda p, m: decode_topk2(p, m, k, vocab),
                         block, repeats)]
    for params in (dict(step=0.12), dict(step=0.07), dict(level=1)):
        rows.append(measure_topk(f"{SMALL}, {fmt_params(params)}", sample, vocab, *ours2(vocab, k, **params), block,
                                 repeats, labels))
    for other in (256, 4096):
        if other != block and other <= n:
            rows.append(measure_topk(f"{SMALL}, blocks of {other} positions", sample, vocab, *ours2(vocab, k), other,
                                     repeats, labels))
    return rows


def topk2_parts(sample, vocab, labels, block) -> str:
    """kt:precision=small bytes per position by part, and the ideal cost of the id sets alone (an arithmetic
    coder with each id's inclusion probability taken from the other half of the positions)."""
    from fastkd.cache_tools.topk2_codec import topk_section_sizes
    n = len(sample.ids)
    totals: dict[str, float] = {}
    for a, b in blocks(n, block):
        p = encode_topk2(sample.ids[a:b], sample.logprobs[a:b], sample.tail[a:b], vocab, labels=labels[a:b])
        for key, v in topk_section_sizes(p).items():
            totals[key] = totals.get(key, 0) + v / n
    half = n // 2
    cost = held_out_set_bits(sample.ids[:half], sample.ids[half:], vocab) + held_out_set_bits(
        sample.ids[half:], sample.ids[:half], vocab)
    values, values_given_scale, values_given_both = value_floors(sample)
    return (", ".join(f"{key} {v:.2f}" for key, v in totals.items())
            + f"; ideal id-set cost with a held-out frequency model: {cost / n / 8:.1f} B/position"
            + f"; value codes (precision small steps) at their zeroth-order entropy {values:.1f} B, given a 16-class "
            + "row scale "
            + f"(its 0.5 B counted) {values_given_scale:.1f} B, given the row scale and the id's frequency class "
            + f"{values_given_both:.1f} B")


def _set_bits(f: np.ndarray, test: np.ndarray, group: np.ndarray) -> float:
    """Bits for the id sets `test` (rows of ids) with each id in or out independently, row i's inclusion
    probabilities taken from row group[i] of the table f [groups, vocab]."""
    f_in = f[group[:, None], test]
    return float(-np.log2(1 - f).sum(1)[group].sum() + (np.log2(1 - f_in) - np.log2(f_in)).sum())


def _frequencies(train: np.ndarray, vocab: int) -> np.ndarray:
    return np.clip((np.bincount(train.ravel(), minlength=vocab) + 0.005) / len(train), 1e-9, 0.999)


def held_out_set_bits(train: np.ndarray, test: np.ndarray, vocab: int) -> float:
    """Bits an arithmetic coder needs for the id sets of `test` with each id in or out independently,
    its inclusion probability counted on `train` (rows of ids; -1 = unused slot is not expected)."""
    return _set_bits(_frequencies(train, vocab)[None], test, np.zeros(len(test), np.int64))


def _kmeans(x: np.ndarray, clusters: int, iterations: int = 25, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means centroids [clusters, d] (a deterministic start from `seed`)."""
    centroids = x[np.random.default_rng(seed).choice(len(x), clusters, replace=False)].astype(np.float64)
    for _ in range(iterations):
        nearest = _nearest(x, centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, x)
        members = np.bincount(nearest, minlength=clusters)
        centroids[members > 0] = sums[members > 0] / members[members > 0, None]   # an empty cluster keeps its centroid
    return centroids


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    return np.argmin((x * x).sum(1)[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None], axis=1)


def oracle_cluster_set_bits(train: np.ndarray, test: np.ndarray, train_h: np.ndarray, test_h: np.ndarray,
                            vocab: int, clusters: int, pseudo: float = 100.0) -> tuple[float, float]:
    """(set bits, cluster-label bits) for `test` with one inclusion table per cluster of the TRUE context
    vectors h (k-means on train_h): counted on that cluster's train rows plus `pseudo` rows of the
    all-rows table. No coder sees h, so this flatters any mixture-of-tables coder."""
    centroids = _kmeans(train_h, clusters)
    train_c, test_c = _nearest(train_h, centroids), _nearest(test_h, centroids)
    counts = np.zeros((clusters, vocab))
    np.add.at(counts, (np.repeat(train_c, train.shape[1]), train.ravel()), 1)
    rows = np.bincount(train_c, minlength=clusters)[:, None]
    f = np.clip((counts + pseudo * _frequencies(train, vocab)[None]) / (rows + pseudo), 1e-9, 0.999)
    share = np.bincount(test_c, minlength=clusters) / len(test_c)
    label_bits = -(share[share > 0] * np.log2(share[share > 0])).sum() * len(test_c)
    return _set_bits(f, test, test_c), float(label_bits)


FLOOR_TEST, FLOOR_TRAIN = 4096, 65536   # the floors' sample: test on the first 4,096 positions, count on the rest


def floor_sample(k: int) -> TeacherSample:
    """The floors' synthetic-LM sample: FLOOR_TEST + FLOOR_TRAIN positions (generated once, ~8 min, cached)."""
    return synthetic_data(FLOOR_TEST + FLOOR_TRAIN, k, 0)


def table_size_floors(sample: TeacherSample, sizes=(2048, 4096, 8192, 16384, 65536)) -> str:
    """The id-set floor of topk2_parts as the frequency table is counted on more positions of the
    synthetic LM (a shard-level table instead of a per-block one): test on the first FLOOR_TEST positions
    of floor_sample, count on the next 2k..64k."""
    test = FLOOR_TEST
    rest = sample.ids[test:]
    floors = ", ".join(f"table from {m:,} positions {held_out_set_bits(rest[:m], sample.ids[:test], 151_936) / test / 8:.1f} B"
                       for m in sizes)
    rank = np.empty(151_936, np.int64)
    rank[np.argsort(-np.bincount(rest.ravel(), minlength=151_936), kind="stable")] = np.arange(151_936)
    held = ", ".join(f"{m:,}: {(rank[sample.ids[:test]] < m).mean():.0%}" for m in (1000, 2500, 10_000, 40_000))
    return f"{floors}; share of the test slots held by the m most frequent ids of the {len(rest):,}: {held}"


def cluster_floors(sample: TeacherSample, trains=(16384, 65536), clusters=(16, 64, 256, 1024)) -> str:
    """The id-set floor with one table per cluster of the synthetic LM's true context vectors
    (oracle_cluster_set_bits), on the sample of table_size_floors: about the most a fast mixture-of-tables
    model of which ids appear together could save over per-id frequencies."""
    test = FLOOR_TEST
    h = synthetic_contexts(len(sample.ids))
    out = []
    for train in trains:
        for c in clusters:
            rows = slice(test, test + train)
            sets, labels = oracle_cluster_set_bits(sample.ids[rows], sample.ids[:test], h[rows], h[:test], 151_936, c)
            out.append(f"tables from {train:,} positions, {c} clusters: {sets / test / 8:.1f} + "
                       f"{labels / test / 8:.2f} (labels) = {(sets + labels) / test / 8:.1f} B")
    return "; ".join(out)


def plug_in_bits(symbols: np.ndarray, context: np.ndarray | None = None) -> float:
    """Total bits an ideal entropy coder needs for `symbols` with the empirical (plug-in) distribution,
    per context value when one is given: an optimistic floor for any coder with that model."""
    symbols = np.asarray(symbols, np.int64).ravel()
    if context is not None:
        joint = np.asarray(context, np.int64).ravel() * (int(symbols.max(initial=0)) + 1) + symbols
        return plug_in_bits(joint) - plug_in_bits(context)
    counts = np.unique(symbols, return_counts=True)[1]
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def value_floors(sample) -> tuple[float, float, float]:
    """B/position an ideal coder needs for precision small's value codes at the default steps: with one distribution
    for all entries, with one per row-scale class (16 quantiles of the row's mean code, 4 bits a row), and
    with one per (row-scale class, the id's frequency class: bit length of its rank in a table counted on
    all rows). Fitted on the same codes (in-sample), so all three figures flatter the coder."""
    n = len(sample.ids)
    p = DEFAULT_TOPK2_PARAMS
    codes = topk_codec._value_codes(sample.logprobs, p["step"], p["max_step"], p["growth"])
    scale = np.minimum(codes, 2000).mean(axis=1)          # clipped so -inf codes (65535) do not set a row's class
    scale_class = np.searchsorted(np.quantile(scale, np.linspace(0, 1, 17)[1:-1]), scale)
    given_scale = plug_in_bits(codes, np.broadcast_to(scale_class[:, None], codes.shape)) + 4 * n
    ids = np.maximum(sample.ids, 0)
    rank = np.empty(int(ids.max()) + 1, np.int64)
    rank[np.argsort(-np.bincount(ids.ravel(), minlength=len(rank)), kind="stable")] = np.arange(len(rank))
    id_class = np.frexp(rank[ids] + 1)[1]          # bit length of the id's frequency rank (+1)
    given_both = plug_in_bits(codes, scale_class[:, None] * 64 + id_class) + 4 * n
    return plug_in_bits(codes) / n / 8, given_scale / n / 8, given_both / n / 8


def topk_rows(sample, vocab, block, repeats, full: bool):
    n, k = sample.ids.shape
    rows = []
    rows.append(measure_topk("raw int32 ids + fp16 values + fp32 tail", sample, vocab, *raw_codec(vocab, k), block, repeats))
    rows.append(measure_topk("raw + zstd (level 3, one frame)", sample, vocab, *raw_codec(vocab, k, 3), block, repeats))
    rows.append(measure_topk("raw-zstd (plain codec before 1.0: planes + zstd)", sample, vocab,
                             *raw_planes_codec(vocab, k), block, repeats))
    for label, kk, exact_k, terms in [("DistillKit budget (k=50, 1 exact bf16, 3 fp32 terms)", 50, 1, 3),
                                      ("DistillKit budget shape at k=64", 64, 1, 3),
                                      ("DistillKit recommended (k=128, 16 exact bf16, 6 fp32 terms)", 128, 16, 6)]:
        rows.append(dict(codec=label + " [formula, no tail]", k=kk, V=vocab, bytes=distillkit_bytes(vocab, kk, exact_k, 16, terms)))
    default = dict(DEFAULT_TOPK_PARAMS)
    rows.append(measure_topk(f"{FINE} (default) {fmt_params(default)}", sample, vocab, *ours(vocab, k), block, repeats))
    variants = [
        dict(default, layout="value"),
        dict(default, step=0.1, max_step=0.1),
        dict(default, step=0.3, max_step=0.3),
        dict(default, step=0.02, max_step=1.0),
        dict(default, step=0.05, max_step=4.0),
        dict(default, step=0.03, max_step=3.0, growth=0.5),
        dict(default, reference="absolute"),
        dict(default, level=3),
    ]
    if full:
        variants += [dict(default, layout="value", step=0.1, max_step=0.1), dict(default, level=9)]
    for params in variants:
        changed = {key: v for key, v in params.items() if default.get(key) != v}
        rows.append(measure_topk(f"{FINE}, {fmt_params(changed)}", sample, vocab, *variant(vocab, k, **params), block,
                                 repeats))
    table = frequency_table(sample, vocab)
    rows.append(measure_topk(f"{FINE} + frequency-rank table (from first 25%)", sample, vocab,
                             *variant(vocab, k, rank_of_id=table), block, repeats))
    rows.append(dict(codec=f"{FINE}, no byte-plane split [size only]", k=k, V=vocab,
                     bytes=size_without_plane_split(sample, vocab, block)))
    for other in (256, 4096):
        if other != block and other <= n:
            r = measure_topk(f"{FINE}, blocks of {other} positions", sample, vocab, *ours(vocab, k), other, repeats)
            rows.append(r)
    return rows


def sampled_rows(sample, vocab, block, repeats):
    n, s = sample.sampled_ids.shape
    spans = blocks(n, block)
    t_enc, payloads = best_time(lambda: [encode_sampled(sample.sampled_ids[a:b], sample.sampled_counts[a:b], vocab)
                                         for a, b in spans], repeats)
    t_dec, outs = best_time(lambda: [decode_sampled(p, b - a, s, vocab) for p, (a, b) in zip(payloads, spans)], repeats)
    ids = np.concatenate([o[0] for o in outs])
    counts = np.concatenate([o[1] for o in outs])
    same = all(sorted(zip(a[a >= 0], c[a >= 0])) == sorted(zip(b[b >= 0], d[b >= 0]))
               for a, c, b, d in zip(ids, counts, sample.sampled_ids, sample.sampled_counts))
    distinct = (sample.sampled_ids >= 0).sum(1).mean()
    return [dict(codec=f"raw sampled: {s} int32 ids + {s} uint16 counts", k=s, V=vocab, bytes=6 * s),
            dict(codec=f"ks sampled (s={s}, {distinct:.1f} distinct ids/position; lossless={same})", k=s, V=vocab,
                 bytes=sum(map(len, payloads)) / n, kl_mean=0.0, kl_max=0.0, enc=n / t_enc, dec=n / t_dec)]


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def print_topk_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print("| codec | k | V | bytes/position | mean KL(dec\\|\\|exact) | max KL(dec\\|\\|exact) | mean KL(exact\\|\\|dec) "
          "| max KL(exact\\|\\|dec) | max top-k+tail mass | encode pos/s | decode pos/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def f(key, spec):
            return format(r[key], spec) if key in r else "-"
        print(f"| {r['codec']} | {r['k']} | {r['V']:,} | {r['bytes']:.1f} | {f('kl_mean', '.2e')} | {f('kl_max', '.2e')} "
              f"| {f('klx_mean', '.2e')} | {f('klx_max', '.2e')} | {f('mass_max', '.7f')} | {f('enc', ',.0f')} | {f('dec', ',.0f')} |")


# ------------------------------------------------------------------------------ hidden states

def synthetic_hidden(n: int, d: int, seed: int = 0) -> np.ndarray:
    """LLM-like activations: Gaussian with log-normal channel scales and a few massive outlier channels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32) * rng.lognormal(0, 0.5, d).astype(np.float32)
    x[:, rng.choice(d, 4, replace=False)] *= 60
    return x


def hidden_rows(x: np.ndarray, repeats: int, seed: int = 0):
    n, d = x.shape
    rows = []
    proj_w = d // 4
    r = random_projection(d, proj_w, seed)
    r_pinv = np.linalg.pinv(r.astype(np.float64))
    y_exact = x @ r
    configs = [("fp32 (no codec)", None, {}), ("bf16", None, dict(method="bf16")),
               ("int8 per row", None, dict(method="int8", block=0)), ("int8, blocks of 128", None, dict(method="int8", block=128)),
               ("fp8 e4m3 per row", None, dict(method="fp8", block=0)), ("fp8 e4m3, blocks of 128", None, dict(method="fp8", block=128)),
               (f"projection {d}->{proj_w} (seed {seed}) + bf16", r, dict(method="bf16")),
               (f"projection {d}->{proj_w} (seed {seed}) + int8 blocks of 128", r, dict(method="int8", block=min(128, proj_w)))]
    for label, proj, params in configs:
        target = x if proj is None else y_exact
        if not params:
            rows.append(dict(method=label, width=d, bytes=4 * d, mse=0.0, mse_orig=0.0, enc=None, dec=None))
            continue
        t_enc, payload = best_time(lambda: encode_hidden(target, **params), repeats)
        t_dec, out = best_time(lambda: decode_hidden(payload, n, target.shape[1], **params), repeats)
        mse = float(((out - target) ** 2).sum() / (target ** 2).sum())
        if proj is None:
            mse_orig = mse
        else:
            recon = out.astype(np.float64) @ r_pinv
            mse_orig = float(((recon - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum())
        rows.append(dict(method=label, width=target.shape[1], bytes=len(payload) / n, mse=mse, mse_orig=mse_orig,
                         enc=n / t_enc, dec=n / t_dec))
    return rows


def print_hidden_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print("| method | stored width | bytes/token | relative MSE of the stored target | relative MSE vs the original (least-squares reconstruction) | encode tokens/s | decode tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        enc = "-" if r["enc"] is None else f"{r['enc']:,.0f}"
        dec = "-" if r["dec"] is None else f"{r['dec']:,.0f}"
        print(f"| {r['method']} | {r['width']} | {r['bytes']:.1f} | {r['mse']:.2e} | {r['mse_orig']:.2e} | {enc} | {dec} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="loss positions per data set")
    parser.add_argument("--k", type=int, default=64, help="top-k size")
    parser.add_argument("--sample", type=int, default=50, help="draws per position for the sampled mode")
    parser.add_argument("--block", type=int, default=1024, help="positions per encoded block (a shard block)")
    parser.add_argument("--repeats", type=int, default=5, help="timing repeats (best is kept)")
    parser.add_argument("--hidden-n", type=int, default=512, help="tokens for the synthetic d=4096 hidden-state table")
    parser.add_argument("--quick", action="store_true", help="small smoke run: 1024 positions, 1 repeat")
    parser.add_argument("--skip-teacher", action="store_true", help="only the synthetic data set")
    parser.add_argument("--kt2-only", action="store_true",
                        help="only the kt:precision=small rows (beside precision fine) on the embedded teacher and the "
                             "synthetic LM")
    parser.add_argument("--table-floor", action="store_true",
                        help="also print the synthetic LM's ideal id-set cost as the frequency table grows to 64k "
                             "positions, and with one table per cluster of the true contexts (generates 69,632 "
                             "positions once, ~8 min)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.hidden_n = 1024, 1, 128
    print(f"codec table: k={args.k}, {args.n} positions per data set, blocks of {args.block}, "
          f"times = best of {args.repeats} (thread CPU time, one thread)")
    emb, emb_labels, emb_vocab = embedded_teacher_data(args.n, args.k)
    ent = np.percentile(emb.entropy, [10, 50, 90])
    hits = (emb.ids[:, 0] == emb_labels).mean()
    print_topk_table(f"(c) embedded teacher (fastkd/assets/teacher), V={emb_vocab:,}, {len(emb.ids)} positions of generated "
                     f"held-out CoT records, entropy p10/p50/p90 = {ent[0]:.2f}/{ent[1]:.2f}/{ent[2]:.2f} nats, "
                     f"top-1 = next token at {hits:.0%}",
                     [measure_topk(f"{FINE} (default) {fmt_params(DEFAULT_TOPK_PARAMS)}", emb, emb_vocab,
                                   *ours(emb_vocab, args.k), args.block, args.repeats)]
                     + topk2_rows(emb, emb_vocab, emb_labels, args.block, args.repeats))
    print(f"\n{SMALL}, bytes/position by part: {topk2_parts(emb, emb_vocab, emb_labels, args.block)}")
    syn = synthetic_data(args.n, args.k, args.sample)
    syn_labels = sampled_labels(syn, 151_936)
    ent = np.percentile(syn.entropy, [10, 50, 90])
    print_topk_table(f"(b2) synthetic LM, V=151,936, {len(syn.ids)} positions, next tokens drawn from the teacher "
                     f"(top-1 = next token at {(syn.ids[:, 0] == syn_labels).mean():.0%})",
                     [measure_topk(f"{FINE} (default) {fmt_params(DEFAULT_TOPK_PARAMS)}", syn, 151_936,
                                   *ours(151_936, args.k), args.block, args.repeats)]
                     + topk2_rows(syn, 151_936, syn_labels, args.block, args.repeats))
    print(f"\n{SMALL}, bytes/position by part: {topk2_parts(syn, 151_936, syn_labels, args.block)}")
    if args.table_floor:
        floors = floor_sample(args.k)
        print(f"\nsynthetic LM, ideal id-set cost (held-out per-id frequencies) by table size: {table_size_floors(floors)}")
        print(f"synthetic LM, ideal id-set cost with one table per cluster of the true context vectors (oracle; "
              f"k-means on h): {cluster_floors(floors)}")
    if args.kt2_only:
        return 0
    if not args.skip_teacher:
        sample, hidden, vocab = teacher_data(args.n, args.k, args.sample)
        ent = np.percentile(sample.entropy, [10, 50, 90])
        print_topk_table(f"(a) tiny trained teacher, V={vocab}, {len(sample.ids)} positions, entropy p10/p50/p90 = "
                         f"{ent[0]:.2f}/{ent[1]:.2f}/{ent[2]:.2f} nats",
                         topk_rows(sample, vocab, args.block, args.repeats, full=False)
                         + sampled_rows(sample, vocab, args.block, args.repeats))
    syn = synthetic_data(args.n, args.k, args.sample)
    ent = np.percentile(syn.entropy, [10, 50, 90])
    print_topk_table(f"(b) synthetic LM, V=151,936, {len(syn.ids)} positions, entropy p10/p50/p90 = "
                     f"{ent[0]:.2f}/{ent[1]:.2f}/{ent[2]:.2f} nats",
                     topk_rows(syn, 151_936, args.block, args.repeats, full=True)
                     + sampled_rows(syn, 151_936, args.block, args.repeats))
    if not args.skip_teacher:
        print_hidden_table(f"hidden states (a): tiny teacher's last layer, d={hidden.shape[1]}, {len(hidden)} tokens",
                           hidden_rows(hidden, args.repeats))
    x = synthetic_hidden(args.hidden_n, 4096)
    print_hidden_table(f"hidden states (b): synthetic LLM-like activations, d=4096 with 4 outlier channels, {len(x)} tokens",
                       hidden_rows(x, args.repeats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
