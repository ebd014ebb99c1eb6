"""`cache-teacher --backend vllm`: the top-k from vLLM's prompt log-probs (per prompt token a dict id -> Logprob of
the top k and the token itself); no hidden states, and the tail is -expm1(logsumexp(top-k))."""

from __future__ import annotations

import numpy as np
import torch

from fastkd.errors import UserError
from fastkd.paths import resolve_model
from fastkd.teacher import Backend, TeacherSignal, config_identity, one_line

def require_vllm():
    """The vllm module, or a UserError saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise UserError("--backend vllm: the vllm package is not installed; pip install vllm (Linux with a CUDA GPU; "
                        "https://docs.vllm.ai/en/latest/getting_started/installation/), or use --backend hf") from None
    return vllm


def exact_tail(topk_logprobs: np.ndarray) -> np.ndarray:
    """1 - sum(exp(l_i)) per row, accurate when the top-k mass is near 1 (expm1) and when it is
    small (log-sum-exp); clamped to [0, 1] (rounding of the engine's log-probs may push it out)."""
    lp = np.asarray(topk_logprobs, np.float64)
    top = np.max(lp, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):       # a row of only -inf: log(0) = -inf, tail 1
        lse = (top[:, 0] + np.log(np.exp(lp - top).sum(axis=1))) if lp.shape[1] else np.full(lp.shape[0], -np.inf)
    return np.clip(-np.expm1(np.minimum(lse, 0.0)), 0.0, 1.0)


def top_k_of(position: dict, k: int, where: str) -> tuple[list[int], list[float]]:
    """The k most likely (id, log-prob) of one prompt position's dict (which may also hold the prompt token)."""
    if not hasattr(position, "items"):
        raise UserError(f"{where}: vLLM returned {type(position).__name__} instead of a dict of log-probs")
    items = sorted(((int(tid), float(getattr(v, "logprob", v))) for tid, v in position.items()),
                   key=lambda kv: (-kv[1], kv[0]))
    if len(items) < k:
        raise UserError(f"{where}: vLLM returned {len(items)} log-probs, {k} were asked (--top-k); "
                        f"the engine's max_logprobs must be >= --top-k")
    return [tid for tid, _ in items[:k]], [lp for _, lp in items[:k]]


def check_vllm_request(config, world_size: int) -> None:
    """What the vLLM backend cannot do, refused up front (before an engine starts) with the reason."""
    if config.layers:
        raise UserError("--backend vllm: --layers asks for hidden states, which vLLM does not return (only "
                        "log-probs); drop --layers, or use --backend hf for hidden states")
    if config.sample:
        raise UserError("--backend vllm: --sample needs the full distribution per position, vLLM returns only the "
                        "top log-probs; use --top-k, or --backend hf")
    if world_size > 1:
        raise UserError("--backend vllm under torchrun is not supported: run one process and spread the teacher "
                        "with --vllm-tensor-parallel N (vLLM runs its own workers)")
    max_logprobs = config.vllm_max_logprobs or config.top_k
    if config.top_k > max_logprobs:
        raise UserError(f"--top-k {config.top_k} is above the vLLM engine's max_logprobs {max_logprobs}; raise "
                        f"--vllm-max-logprobs to at least {config.top_k} (it sizes the engine's log-prob buffers)")


def start_engine(config):
    """A vllm.LLM for the teacher and the sampling params that ask it for --top-k prompt log-probs."""
    vllm = require_vllm()
    model = resolve_model(config.teacher, "--teacher")
    try:
        engine = vllm.LLM(model=model, tokenizer=model, dtype=config.dtype,
                          max_logprobs=config.vllm_max_logprobs or config.top_k,
                          tensor_parallel_size=config.vllm_tensor_parallel, max_model_len=config.max_length,
                          enable_prefix_caching=False, gpu_memory_utilization=0.9, seed=config.seed)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"--backend vllm: cannot start the engine for {config.teacher!r}: {one_line(err)}") from None
    return engine, vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=config.top_k, detokenize=False)


def prompt_signal(engine, params, chunk, k: int, vocab_size: int) -> TeacherSignal:
    """Top-k log-probs and tail at the loss positions of `chunk` (examples with input_ids, loss_mask); `engine`
    needs `generate(prompts, sampling_params, use_tqdm=False) -> list[RequestOutput]`."""
    prompts = [{"prompt_token_ids": [int(t) for t in ex.input_ids]} for ex in chunk]
    outputs = list(engine.generate(prompts, params, use_tqdm=False))
    if len(outputs) != len(chunk):
        raise UserError(f"--backend vllm: the engine returned {len(outputs)} outputs for {len(chunk)} prompts")
    ids_rows, lp_rows, rows = [], [], []
    for ex, out in zip(chunk, outputs):
        where = f"--backend vllm: record {ex.record_index}"
        got_ids = getattr(out, "prompt_token_ids", None)
        if got_ids is not None and list(got_ids) != list(ex.input_ids):
            raise UserError(f"{where}: the engine's output belongs to another prompt (outputs out of order)")
        plp = out.prompt_logprobs
        if plp is None or len(plp) != len(ex.input_ids):
            raise UserError(f"{where}: prompt_logprobs has {None if plp is None else len(plp)} entries for "
                            f"{len(ex.input_ids)} tokens (the engine must be asked prompt_logprobs=k)")
        positions = [t for t in range(1, len(ex.input_ids)) if ex.loss_mask[t]]
        for t in positions:
            if plp[t] is None:
                raise UserError(f"{where}: no log-probs at position {t}")
            tids, lps = top_k_of(plp[t], k, f"{where} position {t}")
            if max(tids) >= vocab_size or min(tids) < 0:
                raise UserError(f"{where} position {t}: vLLM put id {max(tids)} in the top-{k}, outside the "
                                f"tokenizer's {vocab_size} ids (the model's padded vocabulary rows)")
            ids_rows.append(tids)
            lp_rows.append(lps)
        rows.append(len(positions))
    ids = np.asarray(ids_rows, np.int64).reshape(-1, k)
    lps = np.asarray(lp_rows, np.float64).reshape(-1, k)
    bad = np.flatnonzero(np.isnan(lps).any(1) | (lps > 1e-3).any(1))
    if bad.size:
        raise UserError(f"--backend vllm: log-probs hold NaN or positive values (row {bad[0]}); try --dtype float32")
    tail = exact_tail(lps) if lps.size else np.zeros(0)
    return TeacherSignal(torch.from_numpy(ids), torch.from_numpy(lps.astype(np.float32)),
                         torch.from_numpy(tail.astype(np.float32)), None, {}, rows)


def load_vllm(config, tokenizer, world_size: int, engine=None) -> Backend:
    """The vLLM teacher (config: a CacheConfig): top-k log-probs only; `engine` stands in for vllm.LLM (tests)."""
    from transformers import AutoConfig

    check_vllm_request(config, world_size)
    engine, params = (engine, None) if engine is not None else start_engine(config)
    try:
        hf_config = AutoConfig.from_pretrained(resolve_model(config.teacher, "--teacher"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the teacher config {config.teacher!r}: {one_line(err)}") from None
    identity = dict(config_identity(hf_config, config.teacher), backend="vllm", dtype=config.dtype)
    vocab = len(tokenizer)
    return Backend({"teacher": identity, "layers": [], "hidden_widths": []},
                   lambda chunk, generator: prompt_signal(engine, params, chunk, config.top_k, vocab))
