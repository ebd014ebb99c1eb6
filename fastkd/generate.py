"""Batched generation (greedy, or sampled with a seeded generator per row): prompts length-grouped and left-padded by
fastkd.batching, a row stops at EOS, a stop string (text cut there) or max_new_tokens and then leaves the batch."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from fastkd.batching import length_sorted_batches, pad_batch

STOP_WINDOW = 24  # tokens decoded to look for a stop string (a 4-char string spans <= 16 byte tokens)


@dataclass
class Generation:
    """One row's output: decoded text (cut before the stop string), the generated ids (up to the one completing the
    stop string; EOS excluded) and why it ended: `stop`, `eos` or `length`."""

    text: str
    token_ids: list[int]
    finish: str


def eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation config EOS."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def cut_text(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cuts = [k for k in (text.find(s) for s in stop_strings) if k >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _kv_cache(output):
    """The KV cache a forward returned (`cache` in newer transformers, `past_key_values` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@dataclass(frozen=True)
class Sampling:
    """Temperature, nucleus (top_p) and top_k (0 = off); each row draws from its own generator seeded by the caller,
    so its text does not depend on which rows share its batch (up to the batch's float rounding)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not self.temperature > 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"sampling needs temperature > 0, 0 < top_p <= 1, top_k >= 0; got {self}")

    def draw(self, logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """One token per row of logits [rows, V], row r drawn with generators[r]."""
        z = logits.float() / self.temperature
        if self.top_k:
            kth = z.topk(min(self.top_k, z.shape[-1]), dim=-1).values[:, -1:]
            z = z.masked_fill(z < kth, float("-inf"))
        probs = torch.softmax(z, dim=-1)
        if self.top_p < 1:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each one
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)  # keep the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        cpu = probs.cpu()
        return torch.stack([torch.multinomial(cpu[r], 1, generator=g)[0] for r, g in enumerate(generators)]).to(
            logits.device)


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop_strings: Sequence[str],
                   sampling: Sampling | None, seeds: Sequence[int]) -> list[Generation]:
    """Decode one batch of prompts together (left padded, one KV cache), greedy or with `sampling` (a seed per row)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    device = next(model.parameters()).device
    pad_id = next((int(v) for v in (tokenizer.pad_token_id, tokenizer.eos_token_id) if v is not None), 0)
    stops = eos_ids(model, tokenizer)
    ids, attn = pad_batch(prompts, pad_id, side="left")
    ids, attn = ids.to(device), attn.to(device)
    position = (attn.cumsum(-1) - 1).clamp(min=0)   # real tokens only: a padded row sees what it would alone
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_arg = "cache" if "cache" in params else "past_key_values"   # transformers >= 5.2x renamed it
    out = model(input_ids=ids, attention_mask=attn, position_ids=position, use_cache=True, **extra)
    cache, next_pos = _kv_cache(out), position[:, -1:] + 1
    rows = len(prompts)
    generated: list[list[int]] = [[] for _ in range(rows)]
    finish: list[str | None] = [None] * rows
    active = list(range(rows))  # the original row of each row still in the batch
    for step in range(max_new_tokens):
        last = out.logits[:, -1, :]
        tokens = last.argmax(-1) if sampling is None else sampling.draw(last, [generators[r] for r in active])
        for r, t in zip(active, tokens.tolist()):
            if finish[r] is None and t in stops:
                finish[r] = "eos"
            elif finish[r] is None:
                generated[r].append(t)
                if stop_strings and cut_text(tokenizer.decode(generated[r][-STOP_WINDOW:]), stop_strings)[1]:
                    finish[r] = "stop"
        if all(finish) or step == max_new_tokens - 1:
            break
        keep = [b for b, r in enumerate(active) if finish[r] is None]
        if len(keep) < len(active) and hasattr(cache, "batch_select_indices"):
            # drop finished rows from the batch and the cache: the rest run on a smaller batch
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            tokens, attn, next_pos = tokens[index], attn[index], next_pos[index]
            active = [active[b] for b in keep]
        done = torch.tensor([finish[r] is not None for r in active], device=device)
        tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
        attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=next_pos,
                    use_cache=True, **{cache_arg: cache})
        cache, next_pos = _kv_cache(out), next_pos + 1
    texts = [cut_text(tokenizer.decode(ids, skip_special_tokens=True), stop_strings) for ids in generated]
    return [Generation(text, ids, "stop" if found else (end or "length"))
            for (text, found), ids, end in zip(texts, generated, finish)]


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 512,
                    stop_strings: Sequence[str] = (), batch_size: int = 8,
                    on_batch: Callable[[int], None] | None = None, sampling: Sampling | None = None,
                    seeds: Sequence[int] | None = None) -> list[Generation]:
    """Decode every prompt in length-sorted batches (greedy unless `sampling`; `seeds`: one per prompt);
    results in the prompts' order. on_batch(n) is called after each batch with its size (progress bar)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if sampling is not None and seeds is not None and len(seeds) != len(prompts):
        raise ValueError("seeds must give one seed per prompt")
    results: list[Generation | None] = [None] * len(prompts)
    for batch in length_sorted_batches([len(p) for p in prompts], batch_size):
        row_seeds = [seeds[i] for i in batch] if seeds is not None else list(batch)
        gens = generate_batch(model, tokenizer, [prompts[i] for i in batch], max_new_tokens, stop_strings, sampling,
                              row_seeds)
        for i, gen in zip(batch, gens):
            results[i] = gen
        if on_batch:
            on_batch(len(batch))
    return results
