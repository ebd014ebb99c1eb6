"""The teacher's signal at loss positions (top-k log-probs + exact tail, or sampled ids with counts; hidden states) for
cache-teacher and online KD; a backend is a `Backend`: `load_hf` here, `teacher_vllm.load_vllm`, `capturing` wraps."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastkd.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TeacherSignal:
    """Rows = loss positions of a batch, in row-major (sequence, position) order."""

    topk_ids: torch.Tensor            # int64 [M, k]; -1 marks an unused slot (sampled mode)
    topk_logprobs: torch.Tensor       # float32 [M, k]
    tail: torch.Tensor                # float32 [M]
    counts: torch.Tensor | None       # int32 [M, k] in sampled mode
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [M, d]
    rows_per_sequence: list[int] = field(default_factory=list)


@dataclass
class Backend:
    """A loaded teacher: what the manifest records of it (teacher, layers, hidden_widths ...) and its
    signal(chunk of examples, generator) at their loss positions; `device` holds --sample's generator."""

    settings: dict
    signal: Callable[..., TeacherSignal]
    device: torch.device | str = "cpu"


def resolve_device(device: str | None) -> torch.device:
    """--device as a torch.device: auto (cuda when available, else cpu) or one this machine has; anything else is a
    one-line UserError naming the accepted forms (checked before any model is loaded)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"--device {device!r}: not a device; use one of "
                        f"auto, cpu, cuda, cuda:N (N a GPU index), mps") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and not count:
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= count:
        raise UserError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return dev


def load_causal_lm(path: str, dtype: str = "auto", device: str | None = None, role: str = "teacher", *,
                   device_map=None, max_memory=None, offload_folder: str | None = None):
    """A causal LM from a folder or hub id, in eval mode (a clear error otherwise); device_map / max_memory
    spread one bigger than a device over several through accelerate (parse_device_map, parse_max_memory)."""
    from transformers import AutoModelForCausalLM

    from fastkd.paths import resolve_model

    path = resolve_model(path, role, need="model")
    torch_dtype = "auto" if dtype == "auto" else DTYPES.get(dtype)
    if torch_dtype is None:
        raise UserError(f"--dtype {dtype}: choose one of auto, {', '.join(sorted(DTYPES))}")
    kwargs = {}
    if device_map is not None or max_memory is not None:
        device_map = parse_device_map(device_map if device_map is not None else "auto")
        on_gpu = torch.cuda.is_available() and (not isinstance(device_map, dict) or any(
            isinstance(v, int) or str(v).startswith("cuda") for v in device_map.values()))
        if dtype == "auto" and not on_gpu:
            torch_dtype = torch.float32
        kwargs = {"device_map": device_map, "offload_folder": str(offload_folder) if offload_folder else None,
                  "max_memory": parse_max_memory(max_memory) if max_memory is not None else None}
    else:
        dev = resolve_device(device)
        if dtype == "auto" and dev.type == "cpu":
            torch_dtype = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # missing files, bad config, size mismatches
        if not Path(path).is_dir():
            raise hub_failure(role, path, err) from None
        raise UserError(f"cannot load the {role} model {path!r}: {one_line(err)}") from None
    return (model if kwargs else model.to(dev)).eval()


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value):
    """--device-map: a strategy name, or a JSON object module name -> device (0, "cpu", "disk")."""
    text = str(value).strip()
    if text in DEVICE_MAP_NAMES:
        return text
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not parsed:
        raise UserError(f"--device-map {value!r}: use one of {', '.join(DEVICE_MAP_NAMES)} or a JSON object "
                        f"module -> device, e.g. '{{\"model.layers.0\": 0, \"lm_head\": \"cpu\"}}'")
    return parsed


def parse_max_memory(value) -> dict:
    """--max-memory "0=70GiB,1=70GiB,cpu=200GiB" -> {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}."""
    if isinstance(value, dict):
        return value
    out = {}
    for part in str(value).split(","):
        key, sep, amount = part.partition("=")
        key, amount = key.strip(), amount.strip()
        if not sep or not key or not amount:
            raise UserError(f"--max-memory {value!r}: write device=amount pairs, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
        out[int(key) if key.isdigit() else key] = int(amount) if amount.isdigit() else amount
    return out


def input_device(model) -> torch.device:
    """Where a model's inputs go: the first device of its device map (its embeddings), else its device."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        if isinstance(first, int):
            return torch.device("cuda", first)
        if str(first) in ("cpu", "disk", "meta"):
            return torch.device("cpu")
        return torch.device(str(first))
    return model.device


def one_line(err: BaseException, limit: int = 400, first: bool = False) -> str:
    """An exception as one line: its type and whole message (`first`: its first line) with line breaks folded,
    capped at `limit` characters."""
    message = next((line for line in str(err).splitlines() if line.strip()), "") if first else str(err)
    text = " ".join(f"{type(err).__name__}: {message}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def hub_failure(role: str, name: str, err: BaseException) -> UserError:
    """A name that is no local folder and did not load as a hub id: one line saying both, with the hub's first line
    of reason and, in offline mode, that only the local Hugging Face cache was looked in."""
    from huggingface_hub import constants

    variable = "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"  # the hub reads both
    offline = (f"; {variable} is set, so only models already in the local Hugging Face cache load"
               if constants.HF_HUB_OFFLINE else "")
    return UserError(f"{role} {name!r}: no local folder of that name, and the hub id {name!r} could not be loaded "
                     f"({one_line(err, 300, first=True)}){offline}")


def load_tokenizer(path: str, role: str = "tokenizer"):
    """A tokenizer from a folder, an embedded name or a hub id (a pinned folder as saved: fastkd.tiny); any failure
    is a one-line UserError."""
    from fastkd.paths import resolve_model
    from fastkd.tiny import load_saved_tokenizer

    path = resolve_model(path, role, need="tokenizer")
    try:
        return load_saved_tokenizer(path)
    except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception for a tokenizer.json it cannot build
        if not Path(path).is_dir():
            raise hub_failure(role, path, err) from None
        raise UserError(f"cannot load a tokenizer from {path!r}: {one_line(err)}; the tokenizer files there are "
                        f"damaged or were written by an incompatible library version") from None


def config_identity(config, path: str, model=None) -> dict:
    """Teacher identity for the manifest: path, a hash of its config, its shape; dtype and size given a torch model."""
    cfg = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    identity = {"path": str(path), "config_sha256": digest, "model_type": cfg.get("model_type"),
                "num_hidden_layers": getattr(config, "num_hidden_layers", None),
                "hidden_size": getattr(config, "hidden_size", None)}
    if model is not None:
        identity.update(dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                        num_parameters=sum(p.numel() for p in model.parameters()))
    return identity


HEAD_CHUNK_BYTES = 256 * 2**20   # bounds the [chunk, V] fp32 buffer of the chunked output head
UNREPRODUCED = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier", "logit_multiplier",
                "mup_width_multiplier", "scale_width", "dim_model_base")    # head-side scalings not applied here
_HEAD_AGREES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> its chunked head matches its logits


def split_head(model):
    """(decoder, head: last hidden states -> logits, soft-capped as the model does; its width) for the chunked
    path, or why a model cannot take it."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Module) or getattr(head, "weight", None) is None:
        return "it has no output embeddings"
    base = getattr(model, str(getattr(model, "base_model_prefix", "")), None)
    if not isinstance(base, torch.nn.Module) or base is model or base is head:
        return "its decoder cannot be run alone"
    config = getattr(model, "config", None)
    odd = [name for name in UNREPRODUCED if getattr(config, name, None) not in (None, 1, 1.0)]
    if odd:
        return f"its config sets {', '.join(odd)}"
    cap = getattr(config, "final_logit_softcapping", None)

    def apply(rows: torch.Tensor) -> torch.Tensor:
        logits = head(rows)                                      # the module's own bias and device hooks apply
        return torch.tanh(logits / cap) * cap if cap else logits

    return base, apply, int(head.weight.shape[0])


@functools.cache
def _say_once(reason: str) -> None:
    """Why the full-logits path is taken, on stderr once per process and reason."""
    print(f"fastkd: the teacher's output head is applied by the model on the whole batch ([B, T, V] logits in "
          f"memory), as {reason}", file=sys.stderr)


def _head_agrees(model, split, ids: torch.Tensor) -> bool:
    """Once per model: the chunked head on a few tokens equals the model's own logits, so a head transform the
    config does not announce can never go unnoticed (the full-logits path is taken instead)."""
    if model not in _HEAD_AGREES:
        base, head, _ = split
        full = model(input_ids=ids, use_cache=False).logits
        mine = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
        tol = 1e-4 if full.dtype == torch.float32 else 5e-2
        full = full.float()
        _HEAD_AGREES[model] = bool(torch.allclose(mine, full, rtol=tol, atol=tol * max(1.0, float(full.abs().max()))))
    return _HEAD_AGREES[model]


@torch.no_grad()
def teacher_signal(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, *,
                   k: int = 64, layers: tuple[int, ...] = (), sample_n: int | None = None,
                   vocab_size: int | None = None, generator: torch.Generator | None = None,
                   chunk_rows: int | None = None) -> TeacherSignal:
    """Teacher forward on a right-padded batch; row r is its distribution on the r-th loss token (logits one
    position earlier), log-softmax over the tokenizer's vocabulary in fp32 per chunk of rows, tail summed in fp64."""
    predicts_loss = loss_mask[:, 1:].bool()                      # position t predicts token t+1
    split = split_head(model)
    if not isinstance(split, str) and not _head_agrees(model, split, input_ids[:1, :16]):
        split = "its logits differ from its output head applied to its decoder's last hidden states"
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(layers),
                  use_cache=False)
    if isinstance(split, str):                                   # the model builds [B, T, V]
        _say_once(split)
        out = model(**kwargs)
        states, head, width = out.logits, None, out.logits.shape[-1]
    else:
        base, head, width = split
        out = base(**kwargs)
        states = out.last_hidden_state
    source = states[:, :-1][predicts_loss.to(states.device)]
    width = min(width, vocab_size) if vocab_size is not None else width    # drop padded embedding rows
    if not sample_n and not 1 <= k <= width:
        raise UserError(f"--top-k {k}: must be between 1 and the vocabulary size ({width})")
    step = max(1, int(chunk_rows or HEAD_CHUNK_BYTES // (4 * width)))
    parts = []
    for start in range(0, source.shape[0], step) or [0]:
        rows = source[start:start + step]
        logits = rows if head is None else head(rows)
        parts.append(_rows_signal(torch.log_softmax(logits[:, :width].float(), dim=-1), k, sample_n, generator))
    ids, values, counts = (torch.cat(part) if part[0] is not None else None for part in zip(*parts))
    tail = (1.0 - values.double().exp().sum(dim=1)).clamp(min=0.0).float()
    hidden = {}                                                  # a device map may leave layers on other devices
    for layer in layers:
        h = out.hidden_states[layer]
        hidden[layer] = h[:, :-1][predicts_loss.to(h.device)].float().to(values.device)
    return TeacherSignal(ids, values, tail, counts, hidden, predicts_loss.sum(dim=1).tolist())


def _rows_signal(logprobs: torch.Tensor, k: int, sample_n: int | None, generator):
    """(ids, log-probs, counts or None) of one chunk of rows: top-k, or --sample's draws (-inf on unused slots)."""
    if not sample_n:
        values, ids = logprobs.topk(k, dim=-1)
        return ids, values, None
    ids, counts = _sample(logprobs, sample_n, generator)
    return ids, logprobs.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf")), counts


def _sample(logprobs: torch.Tensor, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n ids with replacement per row; return unique ids (padded with -1) and counts."""
    draws = torch.multinomial(logprobs.exp(), n, replacement=True, generator=generator)   # [M, n]
    draws, _ = draws.sort(dim=1)
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = first.cumsum(dim=1) - 1                                                           # unique slot per draw
    ids = torch.full_like(draws, -1).scatter(1, slot, draws)
    counts = torch.zeros_like(draws, dtype=torch.int32).scatter_add(1, slot, torch.ones_like(draws, dtype=torch.int32))
    return ids, counts


def parse_layers(text: str | None, num_layers: int) -> list[int]:
    """`--layers` as a comma list of hidden-state indices (0 = embeddings, L = last block);
    negative values count from the end (-1 = last)."""
    if not text:
        return []
    layers = []
    for part in str(text).split(","):
        try:
            value = int(part)
        except ValueError:
            raise UserError(f"--layers {text!r}: {part!r} is not an integer") from None
        index = value if value >= 0 else num_layers + 1 + value
        if not 0 <= index <= num_layers:
            raise UserError(f"--layers {text!r}: layer {value} is out of range for a teacher with "
                            f"{num_layers} blocks (valid: 0..{num_layers} or -1..-{num_layers + 1})")
        layers.append(index)
    return sorted(set(layers))


def _rank_max_memory(config, env):
    """--device-map auto under torchrun: each rank maps the model over its own share of the node's GPUs."""
    if env.world == 1 or config.device_map != "auto" or config.max_memory is not None or not torch.cuda.is_available():
        return config.max_memory
    count = torch.cuda.device_count()
    per = max(count // env.local_world, 1)
    mine = range(env.local_rank * per, env.local_rank * per + per)
    memory = {i: (torch.cuda.get_device_properties(i).total_memory if i in mine else 0) for i in range(count)}
    return dict(memory, cpu="0GiB")


def load_hf(config, tokenizer, env) -> Backend:
    """The transformers teacher (config: a CacheConfig; env: fastkd.runtime.Env): top-k + tail or
    --sample ids, the hidden states of --layers, through the fixed --hidden-project matrix if asked."""
    from fastkd.batching import pad_batch

    model = load_causal_lm(config.teacher, dtype=config.dtype, device=str(env.device), device_map=config.device_map,
                           max_memory=_rank_max_memory(config, env), offload_folder=config.offload_folder)
    layers = parse_layers(config.layers, int(getattr(model.config, "num_hidden_layers", 0)))
    d_in = int(model.config.hidden_size)
    settings = {"teacher": config_identity(model.config, config.teacher, model), "layers": layers,
                "hidden_widths": [int(config.hidden_project or d_in)] * len(layers)}
    projection = None
    if config.hidden_project:       # fixed random projection: smaller hidden part, seed in the manifest
        from fastkd.cache_tools.hidden_codec import random_projection

        settings["hidden_projection"] = {"kind": "rademacher-splitmix64", "d_in": d_in,
                                         "d_out": config.hidden_project, "seed": config.seed}
        projection = torch.from_numpy(random_projection(d_in, config.hidden_project, config.seed))
    where, vocab = input_device(model), len(tokenizer)

    def signal(chunk, generator) -> TeacherSignal:
        ids, attn, loss = pad_batch([ex.input_ids for ex in chunk], tokenizer.pad_token_id, "right",
                                    [ex.loss_mask for ex in chunk])
        sig = teacher_signal(model, ids.to(where), attn.to(where), loss.to(where), k=config.top_k,
                             layers=tuple(layers), sample_n=config.sample, vocab_size=vocab, generator=generator)
        if projection is not None:
            sig.hidden = {layer: h @ projection.to(h.device) for layer, h in sig.hidden.items()}
        return sig

    return Backend(settings, signal, where)


def capture_rows(sig: TeacherSignal, record_indices: list[int], share: float, by: str, seed: int) -> torch.Tensor:
    """Selective capture: per sequence, the ceil(share * rows) highest-entropy rows (ties: the earlier) or a
    random choice seeded by (seed, record), so a resumed or re-split run keeps the same rows (bool [M])."""
    keep = torch.zeros(sig.tail.shape[0], dtype=torch.bool)
    entropy = None
    if by == "entropy":
        p, t = sig.topk_logprobs.double().exp(), sig.tail.double()   # entropy of top-k + tail: both backends have it
        entropy = -(torch.special.xlogy(p, p).sum(dim=1) + torch.special.xlogy(t, t)).cpu()
    start = 0
    for record, rows in zip(record_indices, sig.rows_per_sequence):
        chosen = min(rows, math.ceil(share * rows - 1e-9))
        if by == "entropy":
            order = torch.sort(-entropy[start:start + rows], stable=True).indices
        else:
            order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(record)))
        keep[start + order[:chosen]] = True
        start += rows
    return keep


def capturing(backend: Backend, share: float, by: str, seed: int) -> Backend:
    """Selective capture around any backend: rows not chosen are emptied (ids -1, log-probs -inf, tail 1: KL 0, CE
    alone there; hidden states stay); the choice is recorded in the manifest's settings."""
    def signal(chunk, generator) -> TeacherSignal:
        sig = backend.signal(chunk, generator)
        drop = ~capture_rows(sig, [ex.record_index for ex in chunk], share, by, seed).to(sig.tail.device)
        sig.topk_ids = sig.topk_ids.masked_fill(drop[:, None], -1)
        sig.topk_logprobs = sig.topk_logprobs.masked_fill(drop[:, None], float("-inf"))
        sig.tail = sig.tail.masked_fill(drop, 1.0)
        return sig

    capture = {"share": float(share), "by": by, "seed": int(seed) if by == "random" else None}
    return Backend(dict(backend.settings, capture=capture), signal, backend.device)
