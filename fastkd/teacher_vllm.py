"""`cache-teacher --backend vllm`: the teacher's top-k log-probs from vLLM's prompt log-probs.

vLLM returns, per request, `prompt_logprobs`: one entry per prompt token, None for the first,
then a dict token_id -> Logprob(logprob, rank, decoded_token) with the top `prompt_logprobs`
ids plus the prompt token itself. Only log-probs come back (no hidden states, no full
distribution), so the tail is 1 - sum(exp(top-k)), computed as -expm1(logsumexp(top-k)).
"""

from __future__ import annotations

import numpy as np
import torch

from fastkd.errors import UserError
from fastkd.teacher import TeacherSignal

INSTALL_HINT = ("pip install vllm (Linux with a CUDA GPU; https://docs.vllm.ai/en/latest/getting_started/installation/), "
                "or use --backend hf")


def require_vllm():
    """The vllm module, or a UserError saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise UserError(f"--backend vllm: the vllm package is not installed; {INSTALL_HINT}") from None
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


def _entry_logprob(value) -> float:
    return float(value.logprob if hasattr(value, "logprob") else value)


def top_k_of(position: dict, k: int, where: str) -> tuple[list[int], list[float]]:
    """The k most likely (id, log-prob) of one prompt position's dict (the dict may also hold the
    prompt token itself, ranked below k)."""
    if not isinstance(position, dict) and not hasattr(position, "items"):
        raise UserError(f"{where}: vLLM returned {type(position).__name__} instead of a dict of log-probs")
    items = sorted(((int(tid), _entry_logprob(v)) for tid, v in position.items()), key=lambda kv: (-kv[1], kv[0]))
    if len(items) < k:
        raise UserError(f"{where}: vLLM returned {len(items)} log-probs, {k} were asked (--top-k); "
                        f"the engine's max_logprobs must be >= --top-k")
    items = items[:k]
    return [tid for tid, _ in items], [lp for _, lp in items]


class VllmTeacher:
    """Turns a vLLM engine's prompt log-probs into the cache's TeacherSignal (top-k mode only).

    `engine` needs `generate(prompts, sampling_params, use_tqdm=False) -> list[RequestOutput]`;
    `max_logprobs` is the cap the engine was built with (we set it)."""

    backend = "vllm"

    def __init__(self, engine, k: int, max_logprobs: int, sampling_params=None):
        if k > max_logprobs:
            raise UserError(f"--top-k {k} is above the vLLM engine's max_logprobs {max_logprobs}; raise "
                            f"--vllm-max-logprobs to at least {k} (it sizes the engine's log-prob buffers)")
        self.engine = engine
        self.k = k
        self.max_logprobs = max_logprobs
        self.sampling_params = sampling_params

    @classmethod
    def load(cls, path: str, k: int, *, dtype: str = "auto", max_logprobs: int | None = None,
             tensor_parallel_size: int = 1, max_length: int = 2048, gpu_memory_utilization: float = 0.9,
             seed: int = 0) -> "VllmTeacher":
        """Build a vLLM engine for `path` with max_logprobs = max(k, given) and params asking k prompt log-probs."""
        max_logprobs = int(max_logprobs or k)
        if k > max_logprobs:
            raise UserError(f"--top-k {k} is above --vllm-max-logprobs {max_logprobs}; raise --vllm-max-logprobs "
                            f"to at least {k}")
        vllm = require_vllm()
        dtypes = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float16": "float16", "fp16": "float16"}
        if dtype not in dtypes:
            raise UserError(f"--dtype {dtype}: choose one of {', '.join(dtypes)}")
        try:
            engine = vllm.LLM(model=path, tokenizer=path, dtype=dtypes[dtype], max_logprobs=max_logprobs,
                              tensor_parallel_size=tensor_parallel_size, max_model_len=max_length,
                              enable_prefix_caching=False, gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        except (OSError, ValueError, RuntimeError) as err:
            raise UserError(f"--backend vllm: cannot start the engine for {path!r}: {type(err).__name__}: "
                            f"{err}".splitlines()[0]) from None
        params = vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        return cls(engine, k, max_logprobs, params)

    def signal(self, chunk, vocab_size: int) -> TeacherSignal:
        """Top-k log-probs and tail at the loss positions of `chunk` (examples with input_ids, loss_mask)."""
        prompts = [{"prompt_token_ids": [int(t) for t in ex.input_ids]} for ex in chunk]
        outputs = list(self.engine.generate(prompts, self.sampling_params, use_tqdm=False))
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
                tids, lps = top_k_of(plp[t], self.k, f"{where} position {t}")
                if max(tids) >= vocab_size or min(tids) < 0:
                    raise UserError(f"{where} position {t}: vLLM put id {max(tids)} in the top-{self.k}, outside the "
                                    f"tokenizer's {vocab_size} ids (the model's padded vocabulary rows)")
                ids_rows.append(tids)
                lp_rows.append(lps)
            rows.append(len(positions))
        k = self.k
        ids = np.asarray(ids_rows, np.int64).reshape(-1, k)
        lps = np.asarray(lp_rows, np.float64).reshape(-1, k)
        if lps.size and (np.isnan(lps).any() or (lps > 1e-3).any()):
            bad = int(np.flatnonzero(np.isnan(lps).any(1) | (lps > 1e-3).any(1))[0])
            raise UserError(f"--backend vllm: log-probs hold NaN or positive values (row {bad}); try --dtype float32")
        tail = exact_tail(lps) if lps.size else np.zeros(0)
        return TeacherSignal(torch.from_numpy(ids), torch.from_numpy(lps.astype(np.float32)),
                             torch.from_numpy(tail.astype(np.float32)), None, {}, rows)


def check_vllm_request(layers_asked: bool, sample_n: int | None, world_size: int) -> None:
    """What the vLLM backend cannot do, refused up front with the reason."""
    if layers_asked:
        raise UserError("--backend vllm: --layers asks for hidden states, which vLLM does not return (only "
                        "log-probs); drop --layers, or use --backend hf for hidden states")
    if sample_n:
        raise UserError("--backend vllm: --sample needs the full distribution per position, vLLM returns only the "
                        "top log-probs; use --top-k, or --backend hf")
    if world_size > 1:
        raise UserError("--backend vllm under torchrun is not supported: run one process and spread the teacher "
                        "with --vllm-tensor-parallel N (vLLM runs its own workers)")

