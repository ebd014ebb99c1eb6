"""The codecs a cache may name, written out: kt (top-k, `precision` fine/small/exact), ks (sampled ids +
counts), kh (hidden states, `method` bf16/int8/fp8); and how a caller spells them (docs/cache-format.md 4)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from .errors import CodecError
from .hidden_codec import METHODS, decode_hidden, encode_hidden
from .planes import peek
from .topk2_codec import decode_topk2, encode_topk2
from .topk_codec import TOPK_MAGIC, decode_sampled, decode_topk, encode_sampled, encode_topk, topk_exact

PRECISIONS = ("fine", "small", "exact")   # kt: quantised (default), table + labels (smaller), float32 bits
CHOICES = {"kt": ("precision", PRECISIONS), "kh": ("method", tuple(METHODS))}  # params with a fixed set of values


def encode_kt(ids, logprobs, tail, vocab_size: int, *, labels=None, precision: str = "fine", **params) -> bytes:
    """The top-k codec at its precision: fine and exact are KT version 1, small is KT version 2 (labels used)."""
    if precision == "small":
        return encode_topk2(ids, logprobs, tail, vocab_size, labels=labels, **params)
    check_choice("kt", precision)
    return encode_topk(ids, logprobs, tail, vocab_size, exact=precision == "exact", **params)


def decode_kt(payload: bytes, n: int, k: int, vocab_size: int, *, labels=None, precision: str = "fine", **params):
    """Inverse of encode_kt; a payload of another precision than the cache names is refused."""
    check_choice("kt", precision)
    version = peek(payload, TOPK_MAGIC, "top-k")
    stored = "small" if version == 2 else "exact" if topk_exact(payload) else "fine"
    if stored != precision:
        raise CodecError(f"top-k codec payload has precision {stored!r}, the cache names {precision!r}")
    if precision == "small":
        return decode_topk2(payload, n, k, vocab_size, labels=labels, **params)
    return decode_topk(payload, n, k, vocab_size, **params)


def check_choice(name: str, value) -> None:
    """The value of codec `name`'s param in CHOICES is one this fastkd knows; CodecError naming them."""
    key, values = CHOICES[name]
    if value not in values:
        raise CodecError(f"{name} codec: unknown {key} {value!r}; choose {', '.join(values)}")


@dataclass(frozen=True)
class Codec:
    """One codec: its functions, default and known params. `sampled`: ids + counts (mode sample), not log-probs."""

    name: str
    encode: Callable
    decode: Callable
    defaults: dict = field(default_factory=dict)
    params: frozenset = frozenset()
    sampled: bool = False


TOPK_CODECS = {"kt": Codec("kt", encode_kt, decode_kt, {"precision": "fine"},
                           frozenset({"precision", "step", "max_step", "growth", "level", "mass_tol"})),
               "ks": Codec("ks", encode_sampled, decode_sampled, {}, frozenset({"level"}), sampled=True)}
HIDDEN_CODECS = {"kh": Codec("kh", encode_hidden, decode_hidden, {"method": "int8", "block": 128},
                             frozenset({"method", "block", "level"}))}
REGISTRY = {"topk": TOPK_CODECS, "hidden": HIDDEN_CODECS}
WHAT = {"topk": "logits", "hidden": "hidden"}


def get_codec(part: str, name: str) -> Codec:
    """The codec `name` of part 'topk' or 'hidden'; KeyError listing the known names."""
    if name not in REGISTRY[part]:
        raise KeyError(f"unknown {WHAT[part]} codec {name!r} (known: {', '.join(sorted(REGISTRY[part]))})")
    return REGISTRY[part][name]


def default_codec(part: str, mode: str = "topk") -> dict:
    """The format's choice (docs/codec.md): kt at precision fine (mode topk), ks (mode sample), kh int8."""
    name = "kh" if part == "hidden" else "ks" if mode == "sample" else "kt"
    return {"name": name, "params": dict(REGISTRY[part][name].defaults)}


def normalize_codec(spec, part: str = "topk", mode: str = "topk") -> dict:
    """None, 'name', 'name:key=value,key=value' or {'name', 'params'} -> {'name', 'params'} with the
    codec's defaults filled in; KeyError: unknown name, ValueError: malformed, CodecError: unknown param or value."""
    if spec is None:
        return default_codec(part, mode)
    if isinstance(spec, str):
        name, _, rest = spec.partition(":")
        params = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"codec {spec!r}: expected name:key=value,key=value")
            params[key.strip()] = _param_value(value.strip())
        spec = {"name": name.strip(), "params": params}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValueError(f"codec must be a name or {{'name': ..., 'params': {{...}}}}, got {spec!r}")
    codec = get_codec(part, spec["name"])
    params = {**codec.defaults, **(spec.get("params") or {})}
    if set(params) - codec.params:
        raise CodecError(f"{codec.name} codec: unknown parameter(s) {', '.join(sorted(set(params) - codec.params))}; "
                         f"known: {', '.join(sorted(codec.params))}")
    if codec.name in CHOICES:
        check_choice(codec.name, params[CHOICES[codec.name][0]])
    return {"name": codec.name, "params": params}


def spell_codec(spec: dict) -> str:
    """{'name', 'params'} as a user spells it, name:key=value,... (what normalize_codec reads back)."""
    params = ",".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in spec.get("params", {}).items())
    return spec["name"] + (f":{params}" if params else "")


def _param_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
