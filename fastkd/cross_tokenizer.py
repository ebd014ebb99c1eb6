"""Cross-tokenizer distillation from a teacher cache: each cached sequence re-tokenised for a student with its own
tokenizer, with teacher rows per student loss row by method, uld or exact (docs/library.md)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastkd.cache_tools.format import atomic_write_bytes
from fastkd.cache_tools.integrity import digest_bytes
from fastkd.errors import UserError, user_errors

TEACHER_TOKENIZER_DIR = "teacher_tokenizer"
METHODS = ("uld", "exact")
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def save_teacher_tokenizer(tokenizer, out: str | Path, write: bool = True) -> dict:
    """save_pretrained the tokenizer into `<out>/teacher_tokenizer/` (staged, then renamed into place);
    returns the manifest entry {dir, files: name -> sha256}. write=False only computes the entry."""
    out = Path(out)
    try:
        with tempfile.TemporaryDirectory(prefix="fastkd-tok-") as tmp:
            tokenizer.save_pretrained(tmp)
            files = {p.name: digest_bytes(p.read_bytes(), "sha256") for p in sorted(Path(tmp).iterdir()) if p.is_file()}
            bad = [name for name in files if not _FILE_NAME.match(name)]
            if bad:
                raise UserError(f"the teacher tokenizer saves a file named {bad[0]!r}, which a cache cannot list; "
                                f"rename it or save the tokenizer differently")
            if write:
                out.mkdir(parents=True, exist_ok=True)
                staging = out / f".{TEACHER_TOKENIZER_DIR}.{os.getpid()}.tmp"
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir()
                for name in files:
                    atomic_write_bytes(staging / name, (Path(tmp) / name).read_bytes())
                dest = out / TEACHER_TOKENIZER_DIR
                if dest.exists():       # no manifest names it yet (checked by the caller): an earlier attempt's
                    shutil.rmtree(dest)
                os.replace(staging, dest)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for OS errors (disk full)
        if write:
            shutil.rmtree(out / f".{TEACHER_TOKENIZER_DIR}.{os.getpid()}.tmp", ignore_errors=True)
        raise UserError(f"cache {out}: cannot save the teacher tokenizer into the cache ({str(err).splitlines()[0]}); "
                        f"free space (or fix the folder's permissions) and re-run the same command: nothing "
                        f"written is lost") from None
    return {"dir": TEACHER_TOKENIZER_DIR, "files": files}


def with_teacher_tokenizer(settings: dict, tokenizer, out: str | Path, existing: dict | None, write: bool) -> dict:
    """The cache settings with the `teacher_tokenizer` entry: kept from an existing manifest that has one,
    left out for a cache begun by a fastkd that did not save it (so it still resumes), else saved now."""
    if existing is not None and (existing.get("shards") or "records" in existing):
        if "teacher_tokenizer" in existing:
            return dict(settings, teacher_tokenizer=existing["teacher_tokenizer"])
        return settings
    return dict(settings, teacher_tokenizer=save_teacher_tokenizer(tokenizer, out, write))


def load_teacher_tokenizer(cache: str, manifest: dict, given: str | None = None):
    """The teacher tokenizer saved in the cache (each file checked against its sha256, then its identity), or
    `given` (--teacher-tokenizer, identity checked); None when the cache has none and none is given."""
    from fastkd.tokenizer_identity import check_tokenizer
    from fastkd.teacher import load_tokenizer

    identity = manifest.get("tokenizer") or {}
    if given:
        tok = load_tokenizer(given, "--teacher-tokenizer")
        check_tokenizer(identity, tok, f"cache {cache}: --teacher-tokenizer {given}")
        return tok
    entry = manifest.get("teacher_tokenizer")
    if entry is None:
        return None
    field = "manifest.json field 'teacher_tokenizer'"
    files = entry.get("files") if isinstance(entry, dict) else None
    well_formed = isinstance(files, dict) and files and all(
        isinstance(n, str) and _FILE_NAME.match(n) and isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d)
        for n, d in files.items())
    if not isinstance(entry, dict) or entry.get("dir") != TEACHER_TOKENIZER_DIR or not well_formed:
        raise UserError(f"cache {cache}: {field} is malformed (expected dir {TEACHER_TOKENIZER_DIR!r} and files: "
                        f"name -> sha256); re-create the cache with `fastkd cache-teacher`")
    from fastkd.cache_tools.storage import open_storage

    storage = open_storage(cache)
    with tempfile.TemporaryDirectory(prefix="fastkd-teacher-tok-") as tmp:
        for name, digest in files.items():
            where = f"{TEACHER_TOKENIZER_DIR}/{name}"
            try:
                data = storage.read_bytes(where)
            except (OSError, *user_errors()) as err:
                raise UserError(f"cache {cache}: cannot read {where} ({str(err).splitlines()[0]}), listed in {field}; "
                                f"restore the folder or re-create the cache") from None
            if digest_bytes(data, "sha256") != digest:
                raise UserError(f"cache {cache}: {where} does not match its sha256 in {field}: corrupted or edited; "
                                f"nothing of it was used; restore it or re-create the cache")
            (Path(tmp) / name).write_bytes(data)       # loaded from the checked bytes only
        tok = load_tokenizer(tmp)
        _ = tok.get_vocab()
    check_tokenizer(identity, tok, f"cache {cache}: {TEACHER_TOKENIZER_DIR}/")
    return tok


def token_strings(tokenizer) -> list[str]:
    """The decoded text of every id as it reads inside a text (decoded after an anchor token, so decoders
    that drop a leading space at the start of a text do not change it). None where it is not whole text."""
    n = len(tokenizer)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    anchor = anchor if len(anchor) == 1 else []
    head = tokenizer.decode(anchor, clean_up_tokenization_spaces=False) if anchor else ""
    texts = tokenizer.batch_decode([anchor + [i] for i in range(n)], clean_up_tokenization_spaces=False)
    cut = [text[len(head):] if text.startswith(head) else None for text in texts]
    return [s if s and "\ufffd" not in s else None for s in cut]


def vocab_map(teacher_tok, student_tok) -> np.ndarray:
    """teacher id -> the student id with the identical decoded string (-1: none); teacher EOS -> student EOS."""
    strings = list(enumerate(token_strings(student_tok)))
    by_string = {s: sid for sid, s in reversed(strings) if s is not None}      # the first id of each string
    strings = token_strings(teacher_tok)
    mapped = np.array([by_string.get(s, -1) if s is not None else -1 for s in strings], dtype=np.int64)
    if teacher_tok.eos_token_id is not None and student_tok.eos_token_id is not None:
        mapped[teacher_tok.eos_token_id] = student_tok.eos_token_id
    return mapped


def response_offsets(tokenizer, body: list[int], text: str, eos: bool) -> np.ndarray:
    """Character offset in `text` where each response token starts (-1 where the tokens before it do not decode to a
    prefix of `text`, e.g. inside a multi-byte character), plus the EOS row (at the end of the text)."""
    prefixes = tokenizer.batch_decode([body[:i] for i in range(len(body))], clean_up_tokenization_spaces=False)
    return np.array([len(p) if text.startswith(p) else -1 for p in prefixes] + ([len(text)] if eos else []), np.int64)


@dataclass
class Retokenized:
    """One cached sequence's text in student tokens."""

    prompt_ids: list[int]
    response_ids: list[int]     # ends with the student's EOS when the teacher's ended with its own (and it fits)
    prompt_text: str
    response_text: str          # the response without EOS
    teacher_response: list[int]     # the teacher's response ids (without EOS) that response_text decodes
    eos: bool                   # the teacher's response ended with EOS
    student_eos: bool           # response_ids ends with the EOS appended for it


def retokenize(input_ids, loss_mask, teacher_tok, student_tok, max_length: int | None = None) -> Retokenized:
    """The teacher's prompt and response parts decoded and tokenised with the student tokenizer (as fastkd.templates
    builds them: prompt with its BOS, response + EOS), the response end cut at max_length like build_example."""
    from fastkd.templates import text_prompt_ids

    mask = np.asarray(loss_mask).astype(bool)
    prompt = np.asarray(input_ids)[~mask].tolist()
    response = np.asarray(input_ids)[mask].tolist()
    eos = bool(response) and response[-1] == teacher_tok.eos_token_id
    if eos:
        response = response[:-1]
    prompt_text = teacher_tok.decode(prompt, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    response_text = teacher_tok.decode(response, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    p = text_prompt_ids(student_tok, prompt_text)
    r = list(student_tok(response_text, add_special_tokens=False)["input_ids"]) if response_text else []
    if eos:
        if student_tok.eos_token_id is None:
            raise UserError("--cross-tokenizer: the student tokenizer has no EOS token; set tokenizer.eos_token")
        r.append(int(student_tok.eos_token_id))
    cut = max_length is not None and len(p) + len(r) > max_length
    if cut:
        r = r[:max(1, max_length - len(p))]
    return Retokenized(p, r, prompt_text, response_text, response, eos, eos and not cut)


def _no_teacher(n: int, width: int):
    """(ids, log-probs, tail) of n rows holding no teacher: ids -1, log-probs -inf, tail 1."""
    return np.full((n, width), -1, np.int64), np.full((n, width), -np.inf, np.float32), np.ones(n, np.float32)


def uld_rows(topk_ids, topk_logprobs, tail, n_student: int):
    """Row i of the student's response gets the teacher's row i (up to the shorter); later rows: ids -1."""
    m = min(n_student, len(topk_ids))
    ids, lp, tl = _no_teacher(n_student, topk_ids.shape[1])
    ids[:m], lp[:m], tl[:m] = topk_ids[:m], topk_logprobs[:m], tail[:m]
    return ids, lp, tl


def exact_rows(teacher_offsets: np.ndarray, student_offsets: np.ndarray, topk_ids, topk_logprobs, tail,
               id_map: np.ndarray, width: int):
    """Student row j gets teacher row i where both next tokens start at the same unique offset, ids mapped through
    id_map, repeats merged, unmapped mass (or beyond `width` slots) in the tail; other rows: ids -1, tail 1."""
    ids, lp, tl = _no_teacher(len(student_offsets), width)
    teacher_at = _unique_positions(teacher_offsets[:len(topk_ids)])
    student_at = _unique_positions(student_offsets)
    for off in student_at.keys() & teacher_at.keys():
        i, j = teacher_at[off], student_at[off]
        t_ids = np.asarray(topk_ids[i], dtype=np.int64)
        p = np.exp(np.asarray(topk_logprobs[i], dtype=np.float64))
        ok = (t_ids >= 0) & (t_ids < len(id_map)) & (p > 0)
        sid = id_map[t_ids[ok]]
        q = p[ok][sid >= 0]
        sid = sid[sid >= 0]
        if not len(sid):
            continue                                      # nothing maps: all mass in the tail, as unaligned
        uniq, inverse = np.unique(sid, return_inverse=True)
        merged = np.bincount(inverse, weights=q)
        order = np.argsort(-merged, kind="stable")[:width]
        ids[j, :len(order)] = uniq[order]
        lp[j, :len(order)] = np.log(merged[order])
        tl[j] = float(np.clip(tail[i] + p[p > 0].sum() - merged[order].sum(), 0.0, 1.0))   # + unmapped, dropped
    return ids, lp, tl


def _unique_positions(offsets: np.ndarray) -> dict[int, int]:
    """offset -> row for offsets (>= 0) that occur exactly once."""
    values, counts = np.unique(offsets[offsets >= 0], return_counts=True)
    once = set(values[counts == 1].tolist())
    return {int(o): i for i, o in enumerate(offsets.tolist()) if o in once}


class CrossTokenizerSource:
    """A CacheSource seen in the student's tokens, with teacher rows per student loss row (see the module
    notes). Positions, lengths (the teacher's, used for length grouping) and blocks are the cache's."""

    has_teacher = True

    def __init__(self, base, teacher_tok, student_tok, method: str, max_length: int | None = None):
        if method not in METHODS:
            raise UserError(f"--cross-tokenizer {method!r}: choose one of {', '.join(METHODS)}")
        self.base, self.teacher_tok, self.student_tok = base, teacher_tok, student_tok
        self.method, self.max_length = method, max_length
        self.manifest = base.manifest
        self.path = base.path
        self.lengths, self.shards = base.lengths, base.shards
        self.width = min(int(self.manifest.get("k") or 0), len(student_tok) - 1)   # leaves the student a tail bucket
        self.id_map = vocab_map(teacher_tok, student_tok) if method == "exact" else None

    def __len__(self) -> int:
        return len(self.base)

    def __copy__(self):
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.base = copy.copy(self.base)             # its own reader and block cache
        return other

    def corrupt_positions(self, progress=None):
        return self.base.corrupt_positions(progress)

    def __getitem__(self, position: int):
        from fastkd.cache_tools import CachedSequence

        seq = self.base[position]
        rt = retokenize(seq.input_ids, seq.loss_mask, self.teacher_tok, self.student_tok, self.max_length)
        n_s = len(rt.response_ids) if rt.prompt_ids else max(len(rt.response_ids) - 1, 0)
        if self.method == "uld":
            ids, lp, tl = uld_rows(np.asarray(seq.topk_ids), np.asarray(seq.topk_logprobs), np.asarray(seq.tail), n_s)
        else:
            t_off = response_offsets(self.teacher_tok, rt.teacher_response, rt.response_text, rt.eos)
            s_resp = rt.response_ids
            s_off = response_offsets(self.student_tok, s_resp[:-1] if rt.student_eos else s_resp, rt.response_text,
                                     rt.student_eos)[len(s_resp) - n_s:]
            ids, lp, tl = exact_rows(t_off, s_off, np.asarray(seq.topk_ids), np.asarray(seq.topk_logprobs),
                                     np.asarray(seq.tail), self.id_map, self.width)
        input_ids = np.asarray(rt.prompt_ids + rt.response_ids, dtype=np.int32)
        loss_mask = np.asarray([0] * len(rt.prompt_ids) + [1] * len(rt.response_ids), dtype=np.uint8)
        return CachedSequence(record_index=seq.record_index, task=seq.task, input_ids=input_ids, loss_mask=loss_mask,
                              topk_ids=ids, topk_logprobs=lp, tail=tl, counts=None, hidden={})


def wrap_cache(source, student_tok, config, where: str):
    """--cross-tokenizer: the cache source seen in the student's tokens (refusals name what to do)."""
    method = config.cross_tokenizer
    manifest = source.manifest
    if manifest.get("mode", "topk") != "topk":
        raise UserError(f"{where}: --cross-tokenizer {method} needs a top-k cache; this one holds sampled ids "
                        f"(made with --sample): re-create it without --sample")
    if (manifest.get("template") or {}).get("chat"):
        raise UserError(f"{where}: --cross-tokenizer does not support caches made with --chat-template (the chat "
                        f"markup is the teacher's); re-create the cache without --chat-template")
    if (manifest.get("template") or {}).get("messages"):
        raise UserError(f"{where}: --cross-tokenizer does not support caches of conversation records (their text is "
                        f"the teacher's chat template and their loss spans several turns); distil them into a student "
                        f"with the teacher's tokenizer and chat template")
    teacher_tok = load_teacher_tokenizer(source.path, manifest, config.teacher_tokenizer)
    if teacher_tok is None:
        need = ("the teacher's token strings (to map its top-k ids to student ids)" if method == "exact"
                else "only the cached values for its loss, but the teacher tokenizer to decode the cached text")
        raise UserError(f"{where}: made before fastkd saved the teacher tokenizer in the cache (manifest.json has "
                        f"no 'teacher_tokenizer'); --cross-tokenizer {method} needs {need}: re-create the cache with "
                        f"this version's `fastkd cache-teacher`, or give --teacher-tokenizer DIR (checked against "
                        f"the cache's tokenizer identity)")
    return CrossTokenizerSource(source, teacher_tok, student_tok, method, config.max_length)
