"""The teacher's signal at loss positions: top-k log-probs with the exact tail mass (or sampled
ids with counts) and chosen hidden states. Used by `cache-teacher` and by online KD alike."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from fastkd.errors import UserError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class TeacherSignal:
    """Rows = loss positions of a batch, in row-major (sequence, position) order."""

    topk_ids: torch.Tensor            # int64 [M, k]; -1 marks an unused slot (sampled mode)
    topk_logprobs: torch.Tensor       # float32 [M, k]
    tail: torch.Tensor                # float32 [M]
    counts: torch.Tensor | None       # int32 [M, k] in sampled mode
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> float32 [M, d]
    rows_per_sequence: list[int] = field(default_factory=list)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def load_causal_lm(path: str, dtype: str = "auto", device: str | None = None, role: str = "teacher", *,
                   device_map=None, max_memory=None, offload_folder: str | None = None):
    """Load a causal LM from a local folder or a hub id, in eval mode, with a clear error.

    device_map (auto, balanced, sequential, or a dict module -> device) spreads a model bigger than
    one device over several (accelerate), max_memory caps each ({0: "70GiB", "cpu": "200GiB"})."""
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
        kwargs = {"device_map": device_map}
        if max_memory is not None:
            kwargs["max_memory"] = parse_max_memory(max_memory)
        if offload_folder:
            kwargs["offload_folder"] = str(offload_folder)
    else:
        dev = resolve_device(device)
        if dtype == "auto" and dev.type == "cpu":
            torch_dtype = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:  # missing files, bad config, size mismatches
        raise UserError(f"cannot load the {role} model {path!r}: {one_line(err)}") from None
    if kwargs:
        return model.eval()
    return model.to(dev).eval()


DEVICE_MAP_NAMES = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(value):
    """--device-map: a strategy name, or a JSON object module name -> device (0, "cpu", "disk")."""
    if isinstance(value, dict):
        return value
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


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type and whole message with line breaks folded, capped at `limit` characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_tokenizer(path: str, role: str = "tokenizer"):
    """A tokenizer from a folder, an embedded name or a hub id; any failure is a one-line UserError."""
    from transformers import AutoTokenizer

    from fastkd.paths import resolve_model

    path = resolve_model(path, role, need="tokenizer")
    try:
        tok = _pinned_tokenizer(path) or AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a tokenizer.json it cannot build
        raise UserError(f"cannot load a tokenizer from {path!r}: {one_line(err)}; the tokenizer files there are "
                        f"damaged or were written by an incompatible library version") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _pinned_tokenizer(path: str):
    """A folder whose tokenizer_config.json pins the generic class (fastkd.tiny.pin_tokenizer_class)
    is loaded from its tokenizer.json as saved: transformers 5 otherwise re-derives a model
    family's own normalizer and pre-tokenizer (Qwen2: NFC + its split regex), ids change."""
    import json
    from pathlib import Path

    cfg, tok_json = Path(path) / "tokenizer_config.json", Path(path) / "tokenizer.json"
    if not (cfg.is_file() and tok_json.is_file()):
        return None
    try:
        pinned = json.loads(cfg.read_text()).get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend")
    except (OSError, ValueError):
        return None
    if not pinned:
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def model_identity(model, path: str) -> dict:
    """Teacher identity for the manifest: path, a hash of its config, dtype, size."""
    ident = config_identity(model.config, path)
    ident.update(dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                 num_parameters=sum(p.numel() for p in model.parameters()))
    return {key: ident[key] for key in ("path", "config_sha256", "model_type", "dtype", "num_parameters",
                                        "num_hidden_layers", "hidden_size")}


def config_identity(config, path: str) -> dict:
    """The config part of a teacher's identity (for backends without a torch model, e.g. vLLM)."""
    cfg = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        cfg.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    return {"path": str(path), "config_sha256": digest, "model_type": cfg.get("model_type"),
            "num_hidden_layers": getattr(config, "num_hidden_layers", None),
            "hidden_size": getattr(config, "hidden_size", None)}


@torch.no_grad()
def teacher_signal(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor, *,
                   k: int = 64, layers: tuple[int, ...] = (), sample_n: int | None = None,
                   vocab_size: int | None = None, generator: torch.Generator | None = None) -> TeacherSignal:
    """Teacher forward on a right-padded batch; signal at the positions that predict a loss token.

    Row r of the result is the distribution the teacher puts on the token at the r-th masked
    position, read from the logits one position earlier. Log-softmax runs over the full
    (tokenizer) vocabulary in fp32; the tail mass 1 - sum_K p_i is summed in fp64 so it is exact
    in fp32 even when tiny.
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(layers), use_cache=False)
    predicts_loss = loss_mask[:, 1:].bool()                      # position t predicts token t+1
    logits = out.logits[:, :-1][predicts_loss.to(out.logits.device)]   # [M, V_model]
    if vocab_size is not None:
        logits = logits[:, :vocab_size]                          # drop padded embedding rows
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    rows = predicts_loss.sum(dim=1).tolist()
    hidden = {}                                                  # a device map may leave layers on other devices
    for layer in layers:
        h = out.hidden_states[layer]
        hidden[layer] = h[:, :-1][predicts_loss.to(h.device)].float().to(logprobs.device)
    if sample_n:
        ids, counts = _sample(logprobs, sample_n, generator)
        picked = logprobs.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
        tail = (1.0 - picked.double().exp().sum(dim=1)).clamp(min=0.0).float()
        return TeacherSignal(ids, picked, tail, counts, hidden, rows)
    if not 1 <= k <= logprobs.shape[1]:
        raise UserError(f"--top-k {k}: must be between 1 and the vocabulary size ({logprobs.shape[1]})")
    values, ids = logprobs.topk(k, dim=-1)
    tail = (1.0 - values.double().exp().sum(dim=1)).clamp(min=0.0).float()
    return TeacherSignal(ids, values, tail, None, hidden, rows)


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


CAPTURE_BY = ("entropy", "random")


def check_capture(share: float, by: str) -> None:
    if not 0.0 < share <= 1.0:
        raise UserError(f"--capture-share must be in (0, 1] (the share of loss positions that keep the teacher), got {share}")
    if by not in CAPTURE_BY:
        raise UserError(f"--capture-by {by!r}: choose one of {', '.join(CAPTURE_BY)}")


def capture_entropy(logprobs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row's top-k + tail-bucket distribution: a lower bound of the full
    entropy that both backends can compute (vLLM returns only the top-k)."""
    p = logprobs.double().exp()
    t = tail.double()
    return -(torch.special.xlogy(p, p).sum(dim=1) + torch.special.xlogy(t, t))


def capture_rows(sig: TeacherSignal, record_indices: list[int], share: float, by: str, seed: int) -> torch.Tensor:
    """Selective capture: which rows keep the teacher (bool [M]). Per sequence, ceil(share * rows)
    of its loss positions: the highest-entropy ones (ties: the earlier position) or a random choice
    seeded by (seed, record), so a resumed or re-split run picks the same rows."""
    check_capture(share, by)
    keep = torch.zeros(sig.tail.shape[0], dtype=torch.bool)
    score = capture_entropy(sig.topk_logprobs, sig.tail).cpu() if by == "entropy" else None
    start = 0
    for record, rows in zip(record_indices, sig.rows_per_sequence):
        chosen = min(rows, math.ceil(share * rows - 1e-9))
        if by == "entropy":
            order = torch.sort(-score[start:start + rows], stable=True).indices
        else:
            order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(record)))
        keep[start + order[:chosen]] = True
        start += rows
    return keep


def drop_rows(sig: TeacherSignal, keep: torch.Tensor) -> TeacherSignal:
    """Empty the rows not kept: ids -1, log-probs -inf, tail 1 (the whole mass outside an empty
    top-k), which every loss path reads as KL 0 with no gradient: CE alone there. Hidden states stay."""
    drop = ~keep.to(sig.tail.device)
    sig.topk_ids = sig.topk_ids.masked_fill(drop[:, None], -1)
    sig.topk_logprobs = sig.topk_logprobs.masked_fill(drop[:, None], float("-inf"))
    sig.tail = sig.tail.masked_fill(drop, 1.0)
    return sig
