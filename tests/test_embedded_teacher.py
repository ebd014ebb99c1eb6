"""The embedded default teacher (fastkd/assets/teacher): loads through plain transformers and
knows something about the tasks it was trained on (greedy, deterministic)."""

import pytest

from fastkd.demo import EMBEDDED_TEACHER


def test_embedded_teacher_loads_and_answers_generated_items():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastkd import synth
    from fastkd.data import Template, prompt_ids
    from fastkd.generate import greedy_generate

    assert sum(f.stat().st_size for f in EMBEDDED_TEACHER.iterdir()) < 10 * 2**20
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TEACHER).eval()
    text = "Q: not ( True ) and ( False ) is\nA:"
    assert tok.decode(tok(text)["input_ids"]) == text
    items = synth.generate("boolean_expressions", 40, seed=1234)
    prompts = [prompt_ids(tok, Template(cot=False), r["source"]) for r in items]
    outputs = greedy_generate(model, tok, prompts, max_new_tokens=4, batch_size=40)
    correct = sum(o.text.strip() == r["target"] for o, r in zip(outputs, items))
    majority = max(sum(r["target"] == v for r in items) for v in ("True", "False"))
    assert correct > majority, f"{correct}/40 correct, majority class {majority}/40"
