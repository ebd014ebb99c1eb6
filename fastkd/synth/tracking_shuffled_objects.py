"""tracking_shuffled_objects_three_objects: Alice, Bob and Claire hold one thing each, three
pairwise swaps follow, the question asks what one of them holds at the end; answer (A)-(C).

The five BBH scenarios with their ten-item pools; items drawn without replacement, swaps
between two different people and never the same pair twice in a row (as in BBH)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from fastkd.synth.common import join_coarse, join_fine

NAME = "tracking_shuffled_objects_three_objects"
PEOPLE = ("Alice", "Bob", "Claire")
ORDINALS = ("First", "Then", "Finally")
LETTERS = "ABC"


@dataclass(frozen=True)
class Scenario:
    """One story frame; `{}` marks a person, items carry the article the story uses."""

    opening: str       # the first sentence(s), up to and including the colon
    holds: str         # how a person's initial item is stated, e.g. "{} gets {}"
    progress: str      # the sentence opening the second line
    swap: str          # one swap, e.g. "{} and {} swap books."
    question: str      # the closing phrase, e.g. "At the end of the semester, {} has"
    items: tuple[str, ...]

    def option(self, item: str) -> str:
        """An item as the options list writes it (without the leading article)."""
        return item[2:] if item.startswith("a ") else item


_COLOURS = ("black", "blue", "brown", "green", "orange", "pink", "purple", "red", "white", "yellow")
SCENARIOS = (
    Scenario("Alice, Bob, and Claire are friends and avid readers who occasionally trade books. At the start "
             "of the semester, they each buy one new book:", "{} gets {}",
             "As the semester proceeds, they start trading around the new books.", "{} and {} swap books.",
             "At the end of the semester, {} has",
             ("Catch-22", "Frankenstein", "Hound of the Baskervilles", "Lolita", "Moby Dick",
              "The Fellowship of the Ring", "The Great Gatsby", "The Odyssey", "The Pearl", "Ulysses")),
    Scenario("Alice, Bob, and Claire are dancers at a square dance. At the start of a song, they each have a "
             "partner:", "{} is dancing with {}",
             "Throughout the song, the dancers often trade partners.", "{} and {} switch partners.",
             "At the end of the dance, {} is dancing with",
             ("Helga", "Izzi", "Jamie", "Karl", "Lola", "Melissa", "Ophelia", "Patrick", "Rodrigo", "Sam")),
    Scenario("Alice, Bob, and Claire are playing a game. At the start of the game, they are each holding a "
             "ball:", "{} has {}",
             "As the game progresses, pairs of players trade balls.", "{} and {} swap balls.",
             "At the end of the game, {} has the", tuple(f"a {c} ball" for c in _COLOURS)),
    Scenario("Alice, Bob, and Claire are holding a white elephant gift exchange. At the start of the event, "
             "they are each holding a present of a different color:", "{} has {}",
             "As the event progresses, pairs of people swap gifts.", "{} and {} swap their gifts.",
             "At the end of the event, {} has the",
             ("a black ball", "a blue present", "a brown present", "a green present", "a orange ball",
              "a pink ball", "a purple present", "a red present", "a white present", "a yellow present")),
    Scenario("Alice, Bob, and Claire are on the same team in a soccer match. At the start of the match, they "
             "are each assigned to a position:", "{} is playing {}",
             "As the game progresses, pairs of players occasionally swap positions.", "{} and {} trade positions.",
             "At the end of the match, {} is playing",
             ("benchwarmer", "center midfielder", "cheerleader", "fullback", "goalkeeper", "left midfielder",
              "left winger", "right midfielder", "right winger", "striker")),
)


@dataclass(frozen=True)
class Problem:
    scenario: Scenario
    items: tuple[str, str, str]              # what Alice, Bob, Claire hold at the start
    swaps: tuple[tuple[str, str], ...]       # pairs of people, in order
    asked: str                               # the person the question is about


def render(p: Problem) -> str:
    s = p.scenario
    holds = [s.holds.format(who, item) for who, item in zip(PEOPLE, p.items)]
    swaps = " ".join(f"{o}, {s.swap.format(a, b)}" for o, (a, b) in zip(ORDINALS, p.swaps))
    options = "\n".join(f"({LETTERS[i]}) {s.option(item)}" for i, item in enumerate(p.items))
    return (f"{s.opening} {holds[0]}, {holds[1]}, and {holds[2]}.\n{s.progress} {swaps} "
            f"{s.question.format(p.asked)}\nOptions:\n{options}")


def _pattern(template: str) -> str:
    return re.escape(template).replace(r"\{\}", "{}")


def parse(text: str) -> Problem:
    """The problem behind a BBH input; ValueError when it is not in BBH's format."""
    scenario = next((s for s in SCENARIOS if text.startswith(s.opening + " ")), None)
    if scenario is None:
        raise ValueError(f"unknown tracking scenario: {text[:80]!r}")
    person, item = "(Alice|Bob|Claire)", "(.+?)"
    holds = [_pattern(scenario.holds).format(name, item) for name in PEOPLE]
    swap = _pattern(scenario.swap).format(person, person)
    regex = (re.escape(scenario.opening) + " " + holds[0] + ", " + holds[1] + ", and " + holds[2] + r"\.\n"
             + re.escape(scenario.progress) + " " + " ".join(f"{o}, {swap}" for o in ORDINALS) + " "
             + _pattern(scenario.question).format(person) + r"\nOptions:\n(?s:.*)")
    m = re.fullmatch(regex, text)
    if not m:
        raise ValueError(f"not in BBH's tracking format: {text!r}")
    g = m.groups()
    items = tuple(g[:3])
    swaps = tuple((g[3 + 2 * i], g[4 + 2 * i]) for i in range(3))
    problem = Problem(scenario, items, swaps, g[9])
    if any(a == b for a, b in swaps) or len(set(items)) != 3 or render(problem) != text:
        raise ValueError(f"not in BBH's tracking format: {text!r}")
    return problem


def holdings(p: Problem) -> list[dict[str, str]]:
    """Who holds what: at the start, then after each swap."""
    state = dict(zip(PEOPLE, p.items))
    history = [dict(state)]
    for a, b in p.swaps:
        state[a], state[b] = state[b], state[a]
        history.append(dict(state))
    return history


def _answer(p: Problem) -> str:
    final = holdings(p)[-1][p.asked]
    return f"({LETTERS[p.items.index(final)]})"


def solve(text: str) -> str:
    return _answer(parse(text))


def sample_input(rng: random.Random) -> str:
    scenario = rng.choice(SCENARIOS)
    items = tuple(rng.sample(scenario.items, 3))
    swaps: list[tuple[str, str]] = []
    while len(swaps) < 3:
        pair = tuple(rng.sample(PEOPLE, 2))
        if swaps and set(pair) == set(swaps[-1]):
            continue
        swaps.append(pair)
    return render(Problem(scenario, items, tuple(swaps), rng.choice(PEOPLE)))


def rationale(text: str, granularity: str) -> str:
    p = parse(text)
    s = p.scenario
    target = _answer(p)
    history = holdings(p)
    final = s.option(history[-1][p.asked])
    ending = f"{s.question.format(p.asked)} {final}, option {target}."
    if granularity == "coarse":
        return join_coarse(f"Following the three swaps in order, {ending[0].lower()}{ending[1:]}", target)

    def state(h: dict) -> str:
        return ", ".join(f"{who}: {s.option(h[who])}" for who in PEOPLE)

    lines = [f"(0) At the start: {state(history[0])}."]
    for i, ((a, b), h) in enumerate(zip(p.swaps, history[1:]), start=1):
        lines.append(f"({i}) {s.swap.format(a, b)[:-1]}: {state(h)}.")
    lines.append(ending)
    return join_fine(lines, target)
