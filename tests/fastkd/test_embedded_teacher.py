"""The embedded default teacher (fastkd/assets/teacher): loads through plain transformers and
solves held-out generated items, better with its step-by-step rationale than answering
directly (greedy, deterministic)."""

import pytest

from fastkd.demo import HELD_OUT_SEED
from fastkd.paths import EMBEDDED_TEACHER


def _answers(model, tok, items, cot: bool, max_new_tokens: int) -> int:
    from fastkd.bbh import STOP_STRING, extract_answer
    from fastkd.templates import Template, prompt_ids
    from fastkd.generate import greedy_generate

    prompts = [prompt_ids(tok, Template(cot=cot), r["source"]) for r in items]
    outputs = greedy_generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=len(items),
                              stop_strings=[STOP_STRING])
    return sum(extract_answer(o.text) == r["target"] for o, r in zip(outputs, items))


@pytest.mark.usefixtures("bbh_dir")
def test_embedded_teacher_loads_and_reasons_on_held_out_items():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastkd import synth

    assert sum(f.stat().st_size for f in EMBEDDED_TEACHER.iterdir()) < 10 * 2**20
    tok = AutoTokenizer.from_pretrained(EMBEDDED_TEACHER)
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED_TEACHER).eval()
    text = "Q: not ( True ) and ( False ) is\nA:"
    assert tok.decode(tok(text)["input_ids"]) == text
    # the held-out split (never trained on): 12 items each of two tasks where CoT should help
    items = [r for task in ("boolean_expressions", "navigate") for r in synth.generate(task, 12, seed=HELD_OUT_SEED)]
    majority = sum(max(sum(r["target"] == v for r in items[i:i + 12]) for v in ("True", "False", "Yes", "No"))
                   for i in (0, 12))
    cot = _answers(model, tok, items, cot=True, max_new_tokens=320)
    direct = _answers(model, tok, items, cot=False, max_new_tokens=4)
    print(f"CoT {cot}/24, direct {direct}/24, majority {majority}/24")
    assert cot >= 20 and cot > direct and cot > majority, f"CoT {cot}/24, direct {direct}/24, majority {majority}/24"
