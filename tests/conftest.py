"""Shared fixtures: tiny tokenizer and models saved to disk and loaded via from_pretrained."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

import fastkd  # noqa: F401  (first: keeps the checkout's kernels/ from hiding the Hugging Face `kernels` package)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from fastkd.tiny import train_tokenizer

    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory, tiny_tokenizer):
    """A Qwen2 teacher (hidden 64, 2 layers) with its tokenizer, saved with save_pretrained."""
    from fastkd.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("qwen2"), "qwen2", tokenizer=tiny_tokenizer, hidden=64, layers=2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A Llama student (hidden 32, 2 layers) sharing the tokenizer."""
    from fastkd.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("llama"), "llama", tokenizer=tiny_tokenizer, hidden=32, layers=2, heads=4, kv_heads=2, seed=1)


@pytest.fixture
def records_jsonl(tmp_path):
    """A handful of CoT-Collection-style records as JSONL."""
    import json

    recs = [
        {"source": "not ( True ) and ( True ) is", "rationale": "not True is False. False and True is False.", "target": "False", "task": "boolean_expressions"},
        {"source": "Take 1 step. Turn around. Take 1 step. Do you return to the starting point?", "rationale": "We go 1 forward, then 1 back, ending at 0.", "target": "Yes", "task": "navigate"},
        {"source": "True or False is", "rationale": "True or False is True. So the answer is True.", "target": "True", "task": "boolean_expressions"},
        {"source": "Fidel lies. Jerry says Fidel tells the truth. Does Jerry tell the truth?", "rationale": "Fidel lies, so Jerry lies.", "target": "No", "task": "web_of_lies"},
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="session")
def bbh_dir():
    """The real BBH items of the generated tasks (../shared/bbh or $FASTKD_BBH_DIR); skips when absent."""
    from fastkd import paths, synth

    folder = paths.resolve_bbh_dir(None, synth.TASKS)
    if folder is None:
        pytest.skip("real BBH items not found (set FASTKD_BBH_DIR to the folder with <task>.json)")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared, loaded machine: one intra-op thread is many times faster (no spin-waits);
    a module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_tokenizer):
    """A one-layer Llama student sharing the tiny tokenizer."""
    from fastkd.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("student"), "llama", tokenizer=tiny_tokenizer, hidden=32, layers=1,
                     heads=4, kv_heads=2, seed=1)
