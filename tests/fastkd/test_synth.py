"""fastkd data synth: BBH-format generators, reference solvers, rationales, overlap, CLI.

Solvers are checked on every real BBH item of their task and, on generated items, against
independent brute-force references written here."""

from __future__ import annotations

import itertools
import json
import random
import re
import warnings
from collections import Counter

import pytest

from fastkd import synth
from fastkd.templates import ANSWER_PHRASE, Template, strip_answer_phrase, COT_TRIGGER
from fastkd.records import FieldMap, read_records, validate_record
from fastkd.synth import boolean_expressions as boolexp
from fastkd.synth import dyck_languages as dyck
from fastkd.synth import navigate as nav
from fastkd.synth import web_of_lies as wol
from fastkd.synth.common import SynthShortfallWarning, load_real_items, normalise

N = 2000
BOOL_UNIVERSE = 2122  # grammatical 8-token expressions


@pytest.fixture(scope="module")
def real(bbh_dir):
    return {t: load_real_items(t, bbh_dir) for t in synth.TASKS}


@pytest.fixture(scope="module")
def generated(bbh_dir):
    """N fine-rationale records per task, seed 0 (boolean_expressions: all that exist)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SynthShortfallWarning)
        for t in synth.TASKS:
            out[t] = synth.generate(t, N, seed=0, granularity="fine", bbh_dir=bbh_dir)
    return out


# ----------------------------------------------------------------------------- independent references

def ref_boolean(text: str) -> str:
    assert re.fullmatch(r"((True|False|not|and|or|\(|\)) )+is", text)
    return str(eval(text[:-3]))  # Python's precedence is BBH's: not > and > or


def ref_walk(text: str) -> tuple[complex, complex]:
    """(position, heading) at the end, on the complex plane: 1j is +y, a left turn multiplies by 1j."""
    pos, heading = 0j, 1j
    rel = {None: 1, "forward": 1, "backward": -1, "left": 1j, "right": -1j}
    for sentence in text.split("?", 1)[1].split("\n")[0].strip().rstrip(".").split(". "):
        words = sentence.split()
        if words[0] == "Turn":
            heading *= {"left": 1j, "right": -1j, "around": -1}[words[1]]
        elif words[0] == "Take":
            pos += int(words[1]) * heading * rel[words[3] if len(words) > 3 else None]
    return pos, heading


def ref_navigate(text: str) -> str:
    return "Yes" if ref_walk(text)[0] == 0 else "No"


def ref_tracking(text: str) -> str:
    first, second = text.split("\n")[:2]
    names = re.findall(r"[A-Z][a-z]+", first.split(" are ")[0])
    holder = {}
    for name in names:
        holder[name] = re.search(name + r" (?:gets|has|is dancing with|is playing) (?:a )?([^,.]+)", first).group(1)
    options = {line[4:]: line[:3] for line in text.split("Options:\n")[1].split("\n")}
    assert len(options) == len(names) == len(set(holder.values()))
    who = "(" + "|".join(names) + ")"
    for a, b in re.findall(who + " and " + who + " (?:swap|switch|trade)", second):
        holder[a], holder[b] = holder[b], holder[a]
    asked = re.search(r"At the end of the \w+, (\w+)", second).group(1)
    return options[holder[asked]]


def ref_web_of_lies(text: str) -> str:
    """Brute force: the one truth assignment consistent with every sentence."""
    sentences = text[len("Question: "):].split(". ")
    names = [s.split()[0] for s in sentences[:-1]]
    answers = set()
    for bits in itertools.product([True, False], repeat=len(names)):
        truth = dict(zip(names, bits))
        ok = truth[names[0]] == sentences[0].endswith("tells the truth")
        for s in sentences[1:-1]:
            speaker, _, subject, *rest = s.split()
            ok &= truth[speaker] == (truth[subject] == (rest[0] == "tells"))
        if ok:
            answers.add("Yes" if truth[names[-1]] else "No")
    assert len(answers) == 1
    return answers.pop()


def ref_dyck(text: str) -> str:
    """Delete adjacent matched pairs until none is left; close what remains."""
    s = text.split("Input: ", 1)[1].replace(" ", "")
    while True:
        shorter = re.sub(r"\(\)|\[\]|\{\}|<>", "", s)
        if shorter == s:
            break
        s = shorter
    assert s and all(c in "([{<" for c in s)
    return " ".join({"(": ")", "[": "]", "{": "}", "<": ">"}[c] for c in reversed(s))


TRACKING = [f"tracking_shuffled_objects_{k}_objects" for k in ("three", "five", "seven")]
REFERENCES = {"boolean_expressions": ref_boolean, "navigate": ref_navigate, "web_of_lies": ref_web_of_lies,
              "dyck_languages": ref_dyck, **{t: ref_tracking for t in TRACKING}}


def test_every_task_has_a_reference():
    assert set(REFERENCES) == set(synth.TASKS)


# ----------------------------------------------------------------------------- solvers on real items

@pytest.mark.parametrize("task", synth.TASKS)
def test_solver_scores_100_percent_on_real_items(task, real):
    items = real[task]
    assert len(items) == 250
    wrong = [(e["input"], e["target"]) for e in items if synth.solve(task, e["input"]) != e["target"]]
    assert not wrong, f"{len(wrong)} wrong, first: {wrong[0]}"
    # the test's own reference agrees too (so it is a fair judge of generated items)
    assert all(REFERENCES[task](e["input"]) == e["target"] for e in items)


@pytest.mark.parametrize("task", synth.TASKS)
def test_parser_accepts_real_items_and_rejects_broken_ones(task, real):
    for e in real[task]:
        synth.parse(task, e["input"])  # raises ValueError when the format differs
    text = real[task][0]["input"]
    broken = {"boolean_expressions": text.replace(" is", " ) is"),
              "navigate": text.replace("Options:", "Choices:"),
              **{t: text.replace("Bob", "Bobby", 1) for t in TRACKING},
              "web_of_lies": text.replace("Does", "Do"),
              "dyck_languages": text + " ) ) ) )"}[task]
    with pytest.raises(ValueError):
        synth.parse(task, broken)


def test_boolean_universe_holds_every_real_item(real):
    universe = set(boolexp.all_inputs())
    assert len(universe) == BOOL_UNIVERSE
    assert {e["input"] for e in real["boolean_expressions"]} <= universe


def test_navigate_parser_checks_step_agreement():
    good = nav.QUESTION + "Take 1 step. Turn around. Take 1 step." + nav.OPTIONS
    assert nav.solve(good) == "Yes"
    for bad in ("Take 1 steps. Turn around. Take 1 step.", "Take 2 step. Turn around. Take 2 steps.",
                "Take 1 step. Turn back. Take 1 step."):
        with pytest.raises(ValueError):
            nav.parse(nav.QUESTION + bad + nav.OPTIONS)


# ----------------------------------------------------------------------------- generated sets

@pytest.mark.parametrize("task", synth.TASKS)
def test_generated_items_parse_and_targets_are_right(task, generated):
    records = generated[task]
    for rec in records:
        assert set(rec) >= {"source", "rationale", "target", "task", "cot"}
        assert rec["task"] == task and rec["cot"] is True
        synth.parse(task, rec["source"])
        assert synth.solve(task, rec["source"]) == rec["target"]
        assert REFERENCES[task](rec["source"]) == rec["target"], rec["source"]


@pytest.mark.parametrize("task", synth.TASKS)
def test_no_overlap_with_bbh_and_no_duplicates(task, generated, real):
    records = generated[task]
    expected = BOOL_UNIVERSE - 250 if task == "boolean_expressions" else N
    assert len(records) == expected
    keys = [normalise(r["source"]) for r in records]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {normalise(e["input"]) for e in real[task]}


def test_overlap_check_normalises_whitespace(bbh_dir):
    first = synth.generate("web_of_lies", 30, seed=5, bbh_dir=bbh_dir)
    spaced = {"  " + r["source"].replace(" ", "   ") + "\n" for r in first[:10]}
    again = synth.generate("web_of_lies", 30, seed=5, exclude=spaced)
    assert not {normalise(r["source"]) for r in again} & {normalise(s) for s in spaced}
    assert len(again) == 30


def test_boolean_shortfall_warns_and_stops(bbh_dir):
    with pytest.warns(SynthShortfallWarning, match="only 1872 unique"):
        records = synth.generate("boolean_expressions", 5000, seed=1, granularity="coarse", bbh_dir=bbh_dir)
    assert len(records) == BOOL_UNIVERSE - 250


def test_shortfall_of_a_sampled_task_is_reported():
    """A sampled input space smaller than asked ends with a warning after `patience` misses."""
    from fastkd.synth.common import draw_unique

    rng = random.Random(0)
    with pytest.warns(SynthShortfallWarning, match="found only 2 unique"):
        got = draw_unique("tiny", 10, rng, lambda r: str(r.randint(0, 2)), banned={"1"}, patience=200)
    assert sorted(got) == ["0", "2"]


def test_deterministic_for_a_seed(bbh_dir):
    for task in synth.TASKS:
        a = synth.generate(task, 40, seed=3, granularity="coarse", bbh_dir=bbh_dir, answer_only_fraction=0.25)
        b = synth.generate(task, 40, seed=3, granularity="coarse", bbh_dir=bbh_dir, answer_only_fraction=0.25)
        c = synth.generate(task, 40, seed=4, granularity="coarse", bbh_dir=bbh_dir, answer_only_fraction=0.25)
        assert a == b
        assert [r["source"] for r in a] != [r["source"] for r in c]


def test_deterministic_across_processes(bbh_dir):
    """Same seed, same records in fresh interpreters with different string-hash seeds."""
    import os
    import subprocess
    import sys

    code = ("import hashlib, json; from fastkd import synth; "
            "recs = [r for t in synth.TASKS for r in synth.generate(t, 25, seed=11, granularity='fine')]; "
            "print(hashlib.sha256(json.dumps(recs).encode()).hexdigest())")
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, FASTKD_BBH_DIR=str(bbh_dir))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(done.stdout.strip())
    assert len(digests) == 1


@pytest.mark.parametrize("task", synth.TASKS)
def test_distributions_roughly_match_bbh(task, generated, real):
    gen_targets = Counter(r["target"] for r in generated[task])
    real_targets = Counter(e["target"] for e in real[task])
    if task != "dyck_languages":
        assert set(gen_targets) == set(real_targets)
        for target, count in real_targets.items():
            share_real = count / len(real[task])
            share_gen = gen_targets[target] / len(generated[task])
            assert abs(share_real - share_gen) < 0.08, (target, share_real, share_gen)
    if task == "navigate":
        def shape(text):
            ins = nav.parse(text)
            kind = "forward" if ins[0] == ("face",) else ("turning" if any(i[0] == "turn" for i in ins) else "plain")
            return kind, len(ins)
        real_shapes = Counter(shape(e["input"]) for e in real[task])
        gen_shapes = Counter(shape(r["source"]) for r in generated[task])
        assert set(gen_shapes) <= set(real_shapes) | {("plain", 7)}
        for kind in ("forward", "turning", "plain"):
            r = sum(c for (k, _), c in real_shapes.items() if k == kind) / 250
            g = sum(c for (k, _), c in gen_shapes.items() if k == kind) / len(generated[task])
            assert abs(r - g) < 0.06, (kind, r, g)
        # every generated step count is 1..10, as in BBH
        steps = {i[1] for r in generated[task] for i in nav.parse(r["source"]) if i[0] == "take"}
        assert steps == set(range(1, 11))
    if task == "dyck_languages":
        lengths = [len(dyck.parse(r["source"])) for r in generated[task]]
        assert 2 <= min(lengths) and max(lengths) <= 99
        opened = Counter(len(r["target"].split()) for r in generated[task])
        assert set(opened) == {1, 2, 3} and all(c / len(lengths) > 0.2 for c in opened.values())
        real_median = sorted(len(dyck.parse(e["input"])) for e in real[task])[125]
        gen_median = sorted(lengths)[len(lengths) // 2]
        assert abs(real_median - gen_median) <= 5
    if task == "web_of_lies":
        assert all(len(wol.parse(r["source"])[0]) == 5 for r in generated[task])
    if task in TRACKING:
        scenarios = Counter(synth.parse(task, r["source"]).scenario.opening for r in generated[task])
        assert len(scenarios) == 5 and min(scenarios.values()) > 0.15 * N

        def repeats(text):  # the same pair swapping twice in a row: never in BBH
            swaps = synth.parse(task, text).swaps
            return any(set(a) == set(b) for a, b in zip(swaps, swaps[1:]))
        assert not any(repeats(e["input"]) for e in real[task])
        assert not any(repeats(r["source"]) for r in generated[task])


# ----------------------------------------------------------------------------- rationales

@pytest.mark.parametrize("granularity", ["fine", "coarse"])
@pytest.mark.parametrize("task", synth.TASKS)
def test_rationale_ends_with_answer_and_round_trips(task, granularity, generated):
    template = Template(cot=True)
    for rec in generated[task][:300]:
        text = synth.rationale(task, rec["source"], granularity)
        ending = f"{ANSWER_PHRASE}{rec['target']}."
        assert text.endswith(ending)
        assert text.count(ANSWER_PHRASE) == 1
        body = strip_answer_phrase(text, rec["target"])
        assert body == text[:-len(ending)].strip()
        assert "  " not in text  # generated rationales are clean: single spaces only
        # the CoT prompt ends with the trigger phrase, so the response leaves it out
        assert body.startswith(COT_TRIGGER)
        assert template.response(text, rec["target"]) == f" {body[len(COT_TRIGGER):].strip()} {ending}"
        if granularity == "coarse":
            assert "\n" not in text
    assert generated[task][0]["rationale"] == synth.rationale(task, generated[task][0]["source"], "fine")


def test_fine_boolean_steps_reduce_one_operation_each(generated):
    for rec in generated["boolean_expressions"][:400]:
        lines = rec["rationale"].split("\n")
        steps = [l for l in lines if re.match(r".* = (True|False), so Z = ", l)]
        expr = " ".join(rec["source"].split()[:-1])
        before = len(expr.split())
        for line in steps:
            part, after = re.fullmatch(r"(.*) = (?:True|False), so Z = (.*)\.", line).groups()
            assert eval(after) == eval(expr)  # each step keeps the value
            assert part in ("not True", "not False") or re.fullmatch(r"\( (True|False) \)|(True|False) (and|or) (True|False)", part)
            assert len(after.split()) < before
            before = len(after.split())
        assert steps[-1].endswith(f"so Z = {rec['target']}.")


def test_fine_navigate_lists_each_position(generated):
    axes = {1j: "positive y", -1j: "negative y", 1: "positive x", -1: "negative x"}
    for rec in generated["navigate"][:300]:
        instructions = nav.parse(rec["source"])
        lines = re.findall(r"^\((\d+)\) [^:]+: \((-?\d+), (-?\d+)\), facing the (\w+ \w)-axis\.$",
                           rec["rationale"], re.M)
        assert [int(k) for k, *_ in lines] == list(range(1, len(instructions) + 1))
        for k, x, y, axis in lines:  # independent replay of the first k instructions
            prefix = nav.QUESTION + " ".join(nav._phrase(i) + "." for i in instructions[:int(k)]) + nav.OPTIONS
            pos, heading = ref_walk(prefix)
            assert (int(x), int(y)) == (pos.real, pos.imag) and axis == axes[heading]


def test_fine_tracking_and_web_of_lies_steps(generated):
    for task, size in zip(TRACKING, (3, 5, 7)):
        for rec in generated[task][:100]:
            lines = rec["rationale"].split("\n")
            assert [l[:3] for l in lines[1:size + 2]] == [f"({i})" for i in range(size + 1)]
            first, second = rec["source"].split("\n")[:2]
            names = re.findall(r"[A-Z][a-z]+", first.split(" are ")[0])
            state = {n: re.search(n + r" (?:gets|has|is dancing with|is playing) (?:a )?([^,.]+)", first).group(1)
                     for n in names}
            who = "(" + "|".join(names) + ")"
            swaps = re.findall(who + " and " + who + " (?:swap|switch|trade)", second)
            for k, line in enumerate(lines[1:size + 2]):
                if k:
                    a, b = swaps[k - 1]
                    state[a], state[b] = state[b], state[a]
                listed = line.split(": ", 1)[1].rstrip(".")
                assert listed == ", ".join(f"{n}: {state[n]}" for n in names)
    for rec in generated["web_of_lies"][:200]:
        names, first, claims = wol.parse(rec["source"])
        lines = rec["rationale"].split("\n")
        for i, name in enumerate(names):
            assert lines[1 + i].startswith(f"({i + 1}) ")
            # each line ends with the person's truthfulness, checked by brute force on the prefix
            prefix = ". ".join(rec["source"].split(". ")[:i + 1]) + f". Does {name} tell the truth?"
            truthful = ref_web_of_lies(prefix)
            assert lines[1 + i].endswith(f"{name} {'tells the truth' if truthful == 'Yes' else 'lies'}.")


def test_fine_dyck_lists_stack_after_each_token(generated):
    for rec in generated["dyck_languages"][:200]:
        toks = dyck.parse(rec["source"])
        lines = [l for l in rec["rationale"].split("\n") if re.match(r"\d+: ", l)]
        assert len(lines) == len(toks) + 1
        final = lines[-1].split("stack: ")[1]
        assert ref_dyck(dyck.PROMPT + final) == rec["target"]


# ----------------------------------------------------------------------------- answer-only, records, CLI

def test_answer_only_fraction(bbh_dir):
    records = synth.generate("navigate", 200, seed=0, bbh_dir=bbh_dir, answer_only_fraction=0.2)
    plain = [r for r in records if not r["cot"]]
    assert len(plain) == 40
    assert all(r["rationale"] == "" for r in plain)
    assert all(r["rationale"].endswith(f"So the answer is {r['target']}.") for r in records if r["cot"])
    assert all(synth.solve("navigate", r["source"]) == r["target"] for r in plain)


def test_bad_arguments_raise_user_errors(bbh_dir):
    from fastkd.errors import UserError

    with pytest.raises(UserError, match="unknown synthetic task"):
        synth.generate("sports_understanding", 3, bbh_dir=bbh_dir)
    with pytest.raises(UserError, match="granularity"):
        synth.generate("navigate", 3, granularity="medium", bbh_dir=bbh_dir)
    with pytest.raises(UserError, match="answer-only"):
        synth.generate("navigate", 3, answer_only_fraction=1.5, bbh_dir=bbh_dir)
    with pytest.raises(UserError, match="no BBH task files"):
        synth.generate("navigate", 3, bbh_dir="/nonexistent/bbh")


def test_cli_writes_valid_jsonl(tmp_path, bbh_dir, capsys):
    from fastkd.cli import main

    out = tmp_path / "synth.jsonl"
    args = ["data", "synth", "--tasks", "boolean_expressions,navigate,web_of_lies", "--n", "60",
            "--granularity", "coarse", "--answer-only-fraction", "0.25", "--seed", "7", "--out", str(out),
            "--bbh-dir", str(bbh_dir)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "navigate" in printed and "180" in printed
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 180
    records = [json.loads(line) for line in lines]
    assert Counter(r["task"] for r in records) == {"boolean_expressions": 60, "navigate": 60, "web_of_lies": 60}
    assert sum(not r["cot"] for r in records) == 45
    for i, rec in read_records(out):  # the cache stage's reader and validator accept them
        v = validate_record(rec, i, FieldMap(), str(out), cot=rec["cot"])
        assert synth.solve(v["task"], v["source"]) == v["target"]
    first = out.read_bytes()
    assert main(args) == 0
    assert out.read_bytes() == first  # same seed, same file


def test_cli_errors_are_one_line(tmp_path, capsys):
    from fastkd.cli import main

    rc = main(["data", "synth", "--tasks", "navigate,nope", "--out", str(tmp_path / "x.jsonl")])
    assert rc == 2
    assert "unknown synthetic task 'nope'" in capsys.readouterr().err
    rc = main(["data", "synth", "--tasks", "navigate", "--n", "5", "--out", str(tmp_path / "x.jsonl"),
               "--bbh-dir", str(tmp_path / "missing")])
    assert rc == 2 and not (tmp_path / "x.jsonl").exists()


def test_cli_exclude_keeps_a_held_out_split_out(tmp_path, bbh_dir, capsys):
    """--exclude: the held-out split's inputs (a BBH-layout folder, or a records file) are never
    generated; with the whole boolean universe asked for, exactly universe - BBH - held-out remain."""
    from fastkd.cli import main
    from fastkd.demo import write_held_out

    held = write_held_out(tmp_path / "held", ["boolean_expressions", "web_of_lies"], n=40, seed=3)  # capped at 40 per task
    held_keys = {normalise(x) for inputs in held.values() for x in inputs}
    assert len(held_keys) == 80
    out = tmp_path / "train.jsonl"
    args = ["data", "synth", "--tasks", "boolean_expressions,web_of_lies", "--n", "3000", "--seed", "3",
            "--exclude", str(tmp_path / "held"), "--out", str(out), "--bbh-dir", str(bbh_dir)]
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = {normalise(r["source"]) for r in records}
    assert not keys & held_keys
    assert not keys & (synth.real_inputs("boolean_expressions", bbh_dir) | synth.real_inputs("web_of_lies", bbh_dir))
    assert sum(r["task"] == "boolean_expressions" for r in records) == BOOL_UNIVERSE - 250 - 40
    assert "80 inputs of --exclude rejected" in capsys.readouterr().out
    # a records file works too, and a bad one names its line
    excl = tmp_path / "excl.jsonl"
    excl.write_text(json.dumps({"source": records[0]["source"]}) + "\n")
    assert main(args[:-4] + ["--exclude", str(excl), "--out", str(tmp_path / "b.jsonl"), "--bbh-dir", str(bbh_dir)]) == 0
    again = {normalise(json.loads(line)["source"]) for line in (tmp_path / "b.jsonl").read_text().splitlines()}
    assert normalise(records[0]["source"]) not in again
    excl.write_text('{"source": "x"}\n{"target": "y"}\n')
    assert main(args[:-4] + ["--exclude", str(excl), "--out", str(tmp_path / "c.jsonl"), "--bbh-dir", str(bbh_dir)]) == 2
    assert "excl.jsonl: line 2: no string field 'source' or 'input'" in capsys.readouterr().err
    assert not (tmp_path / "c.jsonl").exists()
