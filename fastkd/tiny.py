"""Tiny tokenizers (a BPE trained with `tokenizers`) and Qwen2 / Llama models of a few hundred thousand parameters,
built from configs and saved, so the demo and the tests load them through the real `from_pretrained` path."""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>"]

DEFAULT_CORPUS = [
    "Q: not ( True ) and ( True ) is\nA: So the answer is False.",
    "Q: Take 1 step. Take 2 steps. Turn around. Always face forward. Do you return to the starting point?",
    "Options:\n- Yes\n- No\nA: Let's think step by step. So the answer is Yes.",
    "Question: Fidel lies. Jerry says Fidel tells the truth. Does Jerry tell the truth?",
    "The sum of 12 and 30 is 42, so the answer is 42. (A) (B) (C) (D) (E) (F) (Q)",
    "Alice, Bob, and Claire are friends. First, Alice and Bob swap balls. Then Claire.",
    "True False and or not ( ) [ ] { } < > 0 1 2 3 4 5 6 7 8 9 + - * / = . , ? !",
]


def train_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or DEFAULT_CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=4096,
    )
    fast.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    return fast


def build_model(tokenizer, arch: str = "qwen2", hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                max_positions: int = 1024, vocab_size: int | None = None, seed: int = 0):
    """A randomly initialised causal LM of the given shape (Qwen2 or Llama)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kinds = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if arch not in kinds:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(kinds)}")
    config_cls, model_cls = kinds[arch]
    config = config_cls(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return model_cls(config)


STUDENT_SHAPE = dict(hidden=96, layers=3, heads=4, kv_heads=4, intermediate=288)   # the demo's 0.55M-parameter student


def make_student_init(teacher: str | Path, out: str | Path, seed: int, shape: dict | None = None) -> Path:
    """A randomly initialised small Llama sharing the tokenizer saved in the `teacher` folder, saved into `out`."""
    return save_tiny(out, arch="llama", tokenizer=load_saved_tokenizer(teacher), seed=seed, max_positions=1024,
                     **(shape or STUDENT_SHAPE))


def load_saved_tokenizer(folder: str | Path):
    """A tokenizer folder as saved: one pinned by pin_tokenizer_class is loaded from its tokenizer.json as is
    (transformers 5 otherwise re-derives a model family's own normalizer and pre-tokenizer, and ids change)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg, spec = Path(folder) / "tokenizer_config.json", Path(folder) / "tokenizer.json"
    try:
        pinned = cfg.is_file() and spec.is_file() and json.loads(cfg.read_text()).get("tokenizer_class") in (
            "PreTrainedTokenizerFast", "TokenizersBackend")
    except (OSError, ValueError):
        pinned = False
    tok = (PreTrainedTokenizerFast if pinned else AutoTokenizer).from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def save_tiny(out_dir: str | Path, arch: str = "qwen2", tokenizer=None, **model_kwargs) -> Path:
    """Build (or reuse) a tokenizer and a tiny model and save both into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or train_tokenizer()
    build_model(tokenizer, arch=arch, **model_kwargs).save_pretrained(out)
    tokenizer.save_pretrained(out)
    pin_tokenizer_class(out)
    return out


def pin_tokenizer_class(folder: str | Path) -> None:
    """Make AutoTokenizer load the saved tokenizer.json as-is (not the model family's class,
    which would re-derive different ids from the same files)."""
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))
