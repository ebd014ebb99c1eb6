"""A tokenizer's identity (vocabulary, merges, normaliser, pre-tokenizer, post-processor, special and
added tokens, as digests) and the check that refuses a tokenizer that differs from a cache's."""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings

from fastkd.records import DataError

# What is hashed, and why: docs/cache-format.md, "The tokenizer identity".

IDENTITY_VERSION = 2

_COMPONENTS = {          # name -> what a refusal says
    "merges": "merges differ",
    "model": "tokenizer model settings differ (type, unk token, byte fallback, subword affixes, dropout)",
    "normalizer": "normalizer differs",
    "pre_tokenizer": "pre-tokenizer differs",
    "post_processor": "post-processor differs (the template that adds BOS/EOS)",
    "added_tokens": "added tokens differ (content or flags)",
    "special_tokens": "special tokens differ",
    "slow_settings": "tokenizer class or its tokenisation flags differ",
    "sentencepiece": "sentencepiece model differs",
    "probe": "probe texts tokenise differently",
}
_BACKEND_ONLY = ("merges", "model", "normalizer", "pre_tokenizer", "post_processor")

_PROBES = (
    "Q: not ( True ) and ( False ) is\nA: Let's think step by step. So the answer is False.",
    "Hello World HELLO world hello",
    "  two  spaces,\ttab\n\nnewlines\r\n  and trailing   ",
    "12345 3.14159 -42 1,000,000 2024-01-01",
    "caf\u00e9 cafe\u0301 na\u00efve \u212b \ufb01 \uff21",        # composed / decomposed / compatibility forms
    "\u4f60\u597d\u4e16\u754c \u3053\u3093\u306b\u3061\u306f \u0645\u0631\u062d\u0628\u0627 \U0001f600",
    "it's don't I'M we'LL (A) [b] {c} <d> e/f g\\h #$%&*+=@^_`|~",
    "x",
)

_SLOW_FLAGS = ("do_lower_case", "add_prefix_space", "add_bos_token", "add_eos_token", "legacy", "strip_accents",
               "tokenize_chinese_chars", "split_special_tokens", "sp_model_kwargs", "errors")


def _sha(obj) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical_part(obj):
    """A tokenizer.json part without what never changes ids, in one spelling."""
    if isinstance(obj, list):
        return [_canonical_part(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    obj = {k: _canonical_part(v) for k, v in obj.items() if k != "trim_offsets"}
    if obj.get("type") == "Sequence" and len(obj) == 2:
        items = next((v for k, v in obj.items() if k != "type"), None)
        if isinstance(items, list) and len(items) <= 1:
            return items[0] if items else None
    return obj


def _canonical_merges(merges) -> list:
    """BPE merges in one spelling: "a b" and ["a", "b"] both as ["a", "b"]."""
    pairs = [m.split(" ") if isinstance(m, str) and m.count(" ") == 1 else m for m in merges or []]
    return [[m] if isinstance(m, str) else list(m) for m in pairs]


def _special_tokens(tokenizer) -> dict:
    out = {}
    for name in ("bos", "eos", "pad", "unk"):
        try:
            token, token_id = getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)
        except Exception:  # noqa: BLE001 - some tokenizers raise for an unset special token
            token, token_id = None, None
        out[f"{name}_token"] = None if token is None else str(token)
        out[f"{name}_token_id"] = None if token_id is None else int(token_id)
    return out


def _probe(tokenizer):
    try:
        return [[list(tokenizer(text, add_special_tokens=special)["input_ids"]) for text in _PROBES]
                for special in (False, True)]
    except Exception:  # noqa: BLE001 - an exotic tokenizer that cannot encode these: no probe
        return None


def _vocab_sha256(tokenizer) -> str:
    """The vocabulary hash as the first manifests stored it (kept byte for byte: old caches compare)."""
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()).hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    """What must match between the cache's tokenizer and a student's (stored in the manifest):
    size, vocabulary hash, special ids (the first identity's keys), then one hash per part that
    decides tokenisation under `components` (docs/cache-format.md). Deterministic across
    save_pretrained / from_pretrained."""
    special = _special_tokens(tokenizer)
    ident = {"vocab_size": len(tokenizer), "vocab_sha256": _vocab_sha256(tokenizer),
             "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
             "class": type(tokenizer).__name__, "identity_version": IDENTITY_VERSION}
    parts: dict = {}
    spec = None
    with contextlib.suppress(Exception):    # no backend, or one that cannot serialise: the partial identity
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec is not None:
        model = dict(spec.get("model") or {})
        parts["merges"] = _canonical_merges(model.pop("merges", None))
        if isinstance(model.get("vocab"), dict):     # BPE / WordPiece / WordLevel: covered by vocab_sha256
            model.pop("vocab")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key) == "":
                model[key] = None
        parts["model"] = model
        for key in ("normalizer", "pre_tokenizer", "post_processor"):
            parts[key] = _canonical_part(spec.get(key))
        added = [dict(t) for t in spec.get("added_tokens") or []]
        parts["added_tokens"] = sorted(added, key=lambda t: (t.get("id", -1), str(t.get("content"))))
    else:
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        parts["added_tokens"] = sorted(
            ({"id": int(i), "content": str(getattr(t, "content", t)),
              **{flag: getattr(t, flag, None) for flag in ("single_word", "lstrip", "rstrip", "normalized", "special")}}
             for i, t in dict(decoder).items()), key=lambda t: (t["id"], t["content"]))
        parts["slow_settings"] = {"class": type(tokenizer).__name__,
                                  **{f: getattr(tokenizer, f) for f in _SLOW_FLAGS if hasattr(tokenizer, f)}}
        sp = getattr(tokenizer, "sp_model", None)
        if sp is not None and hasattr(sp, "serialized_model_proto"):
            parts["sentencepiece"] = hashlib.sha256(sp.serialized_model_proto()).hexdigest()
    parts["special_tokens"] = special
    stochastic = spec is not None and bool((spec.get("model") or {}).get("dropout"))   # BPE dropout: ids vary per call
    probe = None if stochastic else _probe(tokenizer)
    if probe is not None:
        parts["probe"] = probe
    ident["components"] = {name: _sha(value) for name, value in parts.items()}
    ident["special_tokens"] = special
    ident["added_token_count"] = len(parts["added_tokens"])
    ident["partial"] = spec is None
    if spec is None:
        ident["unchecked"] = list(_BACKEND_ONLY)
    return ident


def check_tokenizer(expected: dict, tokenizer, where: str) -> None:
    """Refuse a tokenizer whose identity differs from `expected` (a manifest's), saying which parts differ; a part
    only one side has (a slow tokenizer's partial identity) is not refused: a warning says it was not checked."""
    actual = tokenizer_identity(tokenizer)
    expected = expected if isinstance(expected, dict) else {}
    theirs = "teacher" if where.startswith("teacher") else "cache"
    diffs = [f"{key}: {theirs} has {expected.get(key)!r}, tokenizer has {actual[key]!r}"
             for key in ("vocab_size", "eos_token_id") if expected.get(key) != actual[key]]
    if expected.get("vocab_sha256") != actual["vocab_sha256"]:
        diffs.append(f"vocab_sha256: the vocabularies differ ({theirs} {_abbrev(expected.get('vocab_sha256'))}, "
                     f"student {_abbrev(actual['vocab_sha256'])})")
    theirs_parts = expected.get("components")
    if not isinstance(theirs_parts, dict):
        theirs_parts = {}
        diffs = diffs or [f"the {theirs}'s identity has no per-part hashes (`components`): a pre-release fastkd "
                          f"made it, so the rest cannot be compared; re-create the {theirs}"]
    unchecked = []
    for name, label in _COMPONENTS.items():
        a, b = theirs_parts.get(name), actual["components"].get(name)
        if a is None and b is None:
            continue
        if a is None or b is None:
            unchecked.append(name)
        elif a != b:
            diffs.append(label + _detail(name, expected, actual) + f" ({name}: {theirs} {_abbrev(a)}, student {_abbrev(b)})")
    if diffs:
        raise DataError(f"{where}: the tokenizer does not match the one the {theirs} was made with ({'; '.join(diffs)})",
                        reason="tokenizer mismatch")
    if unchecked:
        warnings.warn(f"{where}: one of the two tokenizers has no `tokenizers` backend (a partial identity): "
                      f"{', '.join(unchecked)} could not be checked; the other parts were compared and match",
                      TokenizerIdentityWarning, stacklevel=2)


class TokenizerIdentityWarning(UserWarning):
    """A tokenizer check that could compare only part of the identity (a slow tokenizer)."""


def _abbrev(digest) -> str:
    return f"{digest[:12]}..." if isinstance(digest, str) else repr(digest)


def _detail(name: str, expected: dict, actual: dict) -> str:
    if name == "special_tokens" and isinstance(expected.get("special_tokens"), dict):
        a, b = expected["special_tokens"], actual["special_tokens"]
        keys = [k for k in b if a.get(k) != b.get(k)]
        return ": " + ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys) if keys else ""
    if name == "added_tokens" and isinstance(expected.get("added_token_count"), int) \
            and expected["added_token_count"] != actual["added_token_count"]:
        return f": {expected['added_token_count']} vs {actual['added_token_count']} added tokens"
    return ""
