"""navigate: a list of `Take N steps [direction].` / `Turn left|right|around.` instructions,
answer Yes when they lead back to the starting point.

BBH has three kinds of item, generated here in about the same shares and lengths:
"Always face forward." then 2-9 moves with a direction (~49%, ~39% Yes); plain moves mixed
with turns (~45%, ~50% Yes); plain moves only (~6%, always No)."""

from __future__ import annotations

import random
import re

from fastkd.synth.common import join_coarse, join_fine, weighted

NAME = "navigate"
QUESTION = "If you follow these instructions, do you return to the starting point? "
OPTIONS = "\nOptions:\n- Yes\n- No"
DIRECTIONS = ("forward", "backward", "left", "right")
TURNS = ("left", "right", "around")
_STEP = re.compile(r"Take (\d+) (step|steps)(?: (forward|backward|left|right))?")

# number of sentences (instructions) per kind, and the share of Yes answers, as in BBH
KIND_WEIGHTS = {"forward": 49, "turning": 45, "plain": 6}
LENGTHS = {
    "forward": {3: 12, 4: 31, 5: 28, 6: 15, 7: 16, 8: 8, 9: 9, 10: 3},
    "turning": {3: 5, 4: 24, 5: 25, 6: 15, 7: 24, 8: 14, 9: 7},
    "plain": {3: 8, 4: 3, 5: 1, 6: 1, 7: 1, 8: 1},
}
# the Yes shares are set a little above BBH's (39%, 50%) because short Yes items repeat more
# often and duplicates are dropped; the generated sets then come out near BBH's 42% Yes overall
YES_SHARE = {"forward": 0.42, "turning": 0.56, "plain": 0.0}
TURN_WEIGHTS = {"around": 44, "left": 31, "right": 25}
TURN_SHARE = 0.37  # share of turns among the instructions of a turning item
# turn sequences whose net effect is facing the opposite way
REVERSALS = (("around",), ("left", "left"), ("right", "right"), ("around", "around", "around"),
             ("left", "right", "around"), ("around", "left", "right"), ("right", "left", "around"))

AXIS_NAMES = {(0, 1): "the positive y-axis", (0, -1): "the negative y-axis",
              (1, 0): "the positive x-axis", (-1, 0): "the negative x-axis"}


# ----------------------------------------------------------------------------- parsing
# an instruction is ("face",), ("turn", "left"|"right"|"around") or ("take", n, direction|None)

def _phrase(ins: tuple) -> str:
    if ins[0] == "face":
        return "Always face forward"
    if ins[0] == "turn":
        return f"Turn {ins[1]}"
    n, direction = ins[1], ins[2]
    text = f"Take {n} {'step' if n == 1 else 'steps'}"
    return f"{text} {direction}" if direction else text


def render(instructions: list[tuple]) -> str:
    return QUESTION + " ".join(_phrase(i) + "." for i in instructions) + OPTIONS


def parse(text: str) -> list[tuple]:
    """The instructions of a BBH navigate input; ValueError when it is not in BBH's format."""
    if not text.startswith(QUESTION) or not text.endswith(OPTIONS):
        raise ValueError(f"not a navigate question: {text[:80]!r}")
    body = text[len(QUESTION):-len(OPTIONS)]
    if not body.endswith("."):
        raise ValueError(f"instructions must end with '.': {body!r}")
    out = []
    for sentence in body[:-1].split(". "):
        if sentence == "Always face forward":
            out.append(("face",))
        elif sentence.startswith("Turn ") and sentence[5:] in TURNS:
            out.append(("turn", sentence[5:]))
        else:
            m = _STEP.fullmatch(sentence)
            if not m or (m.group(2) == "step") != (int(m.group(1)) == 1):
                raise ValueError(f"unknown instruction {sentence!r}")
            out.append(("take", int(m.group(1)), m.group(3)))
    if render(out) != text:
        raise ValueError(f"not in BBH's navigate format: {text!r}")
    return out


def _turn(heading: tuple[int, int], how: str) -> tuple[int, int]:
    dx, dy = heading
    return {"left": (-dy, dx), "right": (dy, -dx), "around": (-dx, -dy), "forward": (dx, dy),
            "backward": (-dx, -dy)}[how]


def walk(instructions: list[tuple]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(position, heading) after each instruction, starting at (0, 0) facing +y."""
    pos, heading = (0, 0), (0, 1)
    states = []
    for ins in instructions:
        if ins[0] == "turn":
            heading = _turn(heading, ins[1])
        elif ins[0] == "take":
            dx, dy = _turn(heading, ins[2]) if ins[2] else heading
            pos = (pos[0] + ins[1] * dx, pos[1] + ins[1] * dy)
        states.append((pos, heading))
    return states


def _answer(instructions: list[tuple]) -> str:
    return "Yes" if walk(instructions)[-1][0] == (0, 0) else "No"


def solve(text: str) -> str:
    return _answer(parse(text))


# ----------------------------------------------------------------------------- generation

def _split_zero_sum(rng: random.Random, parts: int) -> list[int] | None:
    """`parts` signed magnitudes in +-1..10 that add up to zero, or None on a failed try."""
    values = [rng.choice((-1, 1)) * rng.randint(1, 10) for _ in range(parts - 1)]
    last = -sum(values)
    return values + [last] if 1 <= abs(last) <= 10 else None


def _forward(rng: random.Random, length: int, yes: bool) -> list[tuple]:
    moves = length - 1
    while True:
        if not yes:
            steps = [("take", rng.randint(1, 10), rng.choice(DIRECTIONS)) for _ in range(moves)]
        else:
            along_x = rng.choice([k for k in range(moves + 1) if k != 1 and moves - k != 1])
            xs = _split_zero_sum(rng, along_x) if along_x else []
            ys = _split_zero_sum(rng, moves - along_x) if moves - along_x else []
            if xs is None or ys is None:
                continue
            steps = [("take", abs(v), "right" if v > 0 else "left") for v in xs]
            steps += [("take", abs(v), "forward" if v > 0 else "backward") for v in ys]
            rng.shuffle(steps)
        result = [("face",)] + steps
        if (_answer(result) == "Yes") == yes:
            return result


def _partition(rng: random.Random, total: int, parts: int) -> list[int] | None:
    """`parts` numbers in 1..10 adding up to `total`, or None when impossible."""
    if not parts <= total <= 10 * parts:
        return None
    out = []
    for left in range(parts, 0, -1):
        lo, hi = max(1, total - 10 * (left - 1)), min(10, total - (left - 1))
        out.append(rng.randint(lo, hi) if left > 1 else total)
        total -= out[-1]
    rng.shuffle(out)
    return out


def _random_turn(rng: random.Random) -> tuple:
    return ("turn", weighted(rng, TURN_WEIGHTS))


def _turning(rng: random.Random, length: int, yes: bool) -> list[tuple]:
    while True:
        if yes:  # walk out, reverse, walk the same distance back; stray turns before and after
            reversal = rng.choice(REVERSALS)
            before, after = weighted(rng, {0: 6, 1: 3, 2: 1}), weighted(rng, {0: 6, 1: 3, 2: 1})
            moves = length - len(reversal) - before - after
            if moves < 2:
                continue
            out_n = rng.randint(1, moves - 1)
            out_steps = _partition(rng, rng.randint(out_n, 10 * out_n), out_n)
            back = _partition(rng, sum(out_steps), moves - out_n)
            if back is None:
                continue
            result = ([_random_turn(rng) for _ in range(before)] + [("take", n, None) for n in out_steps]
                      + [("turn", t) for t in reversal] + [("take", n, None) for n in back]
                      + [_random_turn(rng) for _ in range(after)])
        else:
            result = [_random_turn(rng) if rng.random() < TURN_SHARE else ("take", rng.randint(1, 10), None)
                      for _ in range(length)]
            if not any(i[0] == "turn" for i in result) or not any(i[0] == "take" for i in result):
                continue
        if (_answer(result) == "Yes") == yes:
            return result


def sample_input(rng: random.Random) -> str:
    kind = weighted(rng, KIND_WEIGHTS)
    length = weighted(rng, LENGTHS[kind])
    yes = rng.random() < YES_SHARE[kind]
    if kind == "forward":
        return render(_forward(rng, length, yes))
    if kind == "turning":
        return render(_turning(rng, length, yes))
    return render([("take", rng.randint(1, 10), None) for _ in range(length)])


# ----------------------------------------------------------------------------- rationales

def _where(pos: tuple[int, int], target: str) -> str:
    if target == "Yes":
        return f"We end at {pos}, the starting point."
    return f"We end at {pos}, which is not the starting point (0, 0)."


def rationale(text: str, granularity: str) -> str:
    instructions = parse(text)
    states = walk(instructions)
    target = _answer(instructions)
    end = states[-1][0]
    if granularity == "coarse":
        return join_coarse(f"Starting at (0, 0) facing the positive y-axis and following the "
                           f"{len(instructions)} instructions in order, we end at {end}, which is "
                           f"{'' if target == 'Yes' else 'not '}the starting point.", target)
    lines = ["We start at the origin (0, 0), facing the positive y-axis."]
    for i, (ins, (pos, heading)) in enumerate(zip(instructions, states), start=1):
        lines.append(f"({i}) {_phrase(ins)}: {pos}, facing {AXIS_NAMES[heading]}.")
    lines.append(_where(end, target))
    return join_fine(lines, target)
