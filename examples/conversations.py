"""Conversations with reasoning traces and tool turns, distilled end to end: cache -> train -> a scored student.

    python examples/conversations.py                       # about 20 s on 2 idle CPU cores
    python examples/conversations.py --steps 150 --loss-turns answer

1. A small conversation dataset in messages form (TRL / OpenAI), written here from fastkd's synthetic
   BIG-Bench-Hard-style tasks: a user question and the assistant's answer, its step-by-step rationale in
   `reasoning_content` and `So the answer is X.` in `content`. For boolean expressions the assistant first
   calls an `evaluate` tool (`tool_calls`), a tool turn answers, then it answers; every third conversation
   asks a second question.
2. A chat template for the embedded teacher: its tokenizer ships one without an end of turn, so the example
   writes a copy of the teacher folder (<out>/teacher) whose chat_template.jinja renders a conversation in
   the teacher's own prompt format (`Q: ...` then `A: Let's think step by step. ... So the answer is X.` and
   EOS), the assistant's output marked with {% generation %} so the template itself says which tokens are
   the assistant's.
3. `fastkd cache-teacher` over the training and the held-out conversations, and `fastkd train` of a fresh
   student sharing that tokenizer (and so the template) from the cache: held-out KL/CE before and after.
4. Scored on the held-out conversations: the student's cross-entropy and next-token accuracy on the answer
   parts (the `--loss-turns answer` mask), before and after training, beside the teacher's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ["boolean_expressions", "navigate", "web_of_lies", "tracking_shuffled_objects_three_objects"]
# the teacher's prompt format as a chat template; tool calls and results as plain lines
TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}{{- message.content + '\\n\\n' }}"
    "{%- elif message.role == 'user' %}{{- 'Q: ' + message.content + '\\n' }}"
    "{%- elif message.role == 'tool' %}{{- 'Result: ' + message.content + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- 'A:' }}{% generation %}"
    "{%- if message.reasoning_content %}{{- ' ' + message.reasoning_content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{{- ' Call ' + call.function.name + ': ' + call.function.arguments.expression + '.' }}{%- endfor %}"
    "{%- if message.content %}{{- ' ' + message.content }}{%- endif %}{{- eos_token }}{% endgeneration %}"
    "{{- '\\n\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'A:' }}{%- endif %}")


def parse_args(argv=None) -> argparse.Namespace:
    """The options; parsed before torch and transformers are imported, so --help answers at once."""
    from fastkd.templates import LOSS_TURNS     # light: no torch or transformers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/conversations", help="work folder (default: %(default)s)")
    ap.add_argument("--train", type=int, default=48, help="training conversations (default: %(default)s)")
    ap.add_argument("--held-out", type=int, default=16, help="held-out conversations (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=60, help="student optimizer steps (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    ap.add_argument("--loss-turns", default="all", choices=LOSS_TURNS,
                    help="assistant parts the cache (and so the student) learns from (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="records, student initialisation, data order (default: 0)")
    return ap.parse_args(argv)


def conversation(record: dict, second: dict | None = None) -> dict:
    """A synthetic record (and optionally a second one, asked next) as a conversation in messages form."""
    from fastkd.templates import ANSWER_PHRASE, COT_TRIGGER, strip_answer_phrase

    messages = []
    for rec in [record] + ([second] if second else []):
        body = strip_answer_phrase(rec["rationale"], rec["target"])
        body = body[len(COT_TRIGGER):].strip() if body.startswith(COT_TRIGGER) else body
        messages.append({"role": "user", "content": rec["source"]})
        if rec["task"] == "boolean_expressions":
            expression = rec["source"].removesuffix(" is")
            call = {"type": "function", "id": "call-1", "function": {"name": "evaluate",
                                                                     "arguments": {"expression": expression}}}
            messages += [{"role": "assistant", "content": None, "tool_calls": [call],
                          "reasoning_content": f"{COT_TRIGGER} I will evaluate the expression."},
                         {"role": "tool", "tool_call_id": "call-1", "content": rec["target"]}]
        messages.append({"role": "assistant", "reasoning_content": f"{COT_TRIGGER} {body}".strip(),
                         "content": f"{ANSWER_PHRASE}{rec['target']}."})
    return {"messages": messages, "task": record["task"]}


def write_conversations(path: Path, n: int, seed: int, exclude: set | None = None) -> set:
    """n conversations over TASKS (inputs in `exclude` left out); returns the inputs used."""
    from fastkd import synth

    per_task = -(-n * 4 // 3 // len(TASKS)) + 1     # a third of the conversations hold two records
    records = [r for task in TASKS for r in synth.generate(task, per_task, seed=seed, exclude=exclude)]
    random.Random(seed).shuffle(records)
    out, used = [], set()
    while len(out) < n and records:
        first = records.pop()
        second = records.pop() if len(out) % 3 == 2 and records else None
        out.append(conversation(first, second))
        used |= {synth.normalise(r["source"]) for r in (first, second) if r}
    path.write_text("".join(json.dumps(c) + "\n" for c in out))
    return used


def teacher_with_template(work: Path) -> Path:
    """A copy of the embedded teacher whose tokenizer has the example's chat template."""
    from fastkd.paths import EMBEDDED_TEACHER

    folder = work / "teacher"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(EMBEDDED_TEACHER, folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return folder


def answer_scores(model_dir, tokenizer, examples) -> dict:
    """Cross-entropy and next-token accuracy of a model on the loss tokens of `examples` (teacher forcing)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    nll, right, count = 0.0, 0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            at = torch.tensor(ex.loss_mask[1:]).bool()
            targets = ids[0, 1:][at]
            nll += float(torch.nn.functional.cross_entropy(logits[at], targets, reduction="sum"))
            right += int((logits[at].argmax(-1) == targets).sum())
            count += int(at.sum())
    return {"ce": nll / count, "accuracy": right / count, "tokens": count}


def main(argv=None) -> dict:
    args = parse_args(argv)

    from fastkd.cache_stage import cache_teacher
    from fastkd.templates import Template, build_examples
    from fastkd.tiny import load_saved_tokenizer, make_student_init
    from fastkd.trainer import train

    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    train_data, held_out = work / "train.jsonl", work / "held_out.jsonl"
    used = write_conversations(train_data, args.train, args.seed)
    write_conversations(held_out, args.held_out, args.seed + 1, exclude=used)
    teacher = teacher_with_template(work)
    print(f"[1/3] {args.train} + {args.held_out} conversations in {work}; teacher with the example's chat template: "
          f"{teacher}")
    for data, cache in ((train_data, work / "cache"), (held_out, work / "cache-held-out")):
        shutil.rmtree(cache, ignore_errors=True)
        cache_teacher(dict(teacher=str(teacher), data=str(data), out=str(cache), top_k=32, max_length=512,
                           loss_turns=args.loss_turns, progress=False))
    init = make_student_init(teacher, work / "student-init", args.seed)
    print(f"[2/3] cached; training a fresh student ({args.steps} steps, loss on: {args.loss_turns})")
    run = train(dict(cache=str(work / "cache"), eval_cache=str(work / "cache-held-out"), student=str(init),
                     out=str(work / "student"), max_steps=args.steps, batch_size=args.batch_size, lr=3e-3,
                     schedule="cosine", warmup_steps=max(args.steps // 10, 1), seed=args.seed, progress=False,
                     tensorboard=False, max_length=512, overwrite=True, log_every=max(args.steps // 5, 1)))
    print(run.summary())
    tokenizer = load_saved_tokenizer(teacher)
    answers = build_examples(held_out, tokenizer, Template(loss_turns="answer"))
    scores = {name: answer_scores(path, tokenizer, answers)
              for name, path in (("teacher", teacher), ("student before", init), ("student after", run.final_dir))}
    print(f"[3/3] held-out answer parts ({scores['teacher']['tokens']} tokens of {len(answers)} conversations):")
    for name, s in scores.items():
        print(f"  {name:<15} CE {s['ce']:.3f}   next-token accuracy {100 * s['accuracy']:.1f}%")
    summary = {"held_out_kl_ce": {"before": run.before, "after": run.after}, "answer_scores": scores}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
    sys.exit(0)
