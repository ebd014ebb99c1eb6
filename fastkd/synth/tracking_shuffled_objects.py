"""tracking_shuffled_objects_{three,five,seven}_objects: 3, 5 or 7 people hold one thing each,
as many pairwise swaps follow, the question asks what one of them holds at the end; the
answer is the option letter, (A) to (G).

The five BBH scenarios with their ten-item pools; items drawn without replacement, swaps
between two different people and never the same pair twice in a row (as in BBH)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from fastkd.synth.common import join_coarse, join_fine

ALL_PEOPLE = ("Alice", "Bob", "Claire", "Dave", "Eve", "Fred", "Gertrude")
LETTERS = "ABCDEFG"
SIZES = {3: "three", 5: "five", 7: "seven"}


@dataclass(frozen=True)
class Scenario:
    """One story frame; `{}` marks a person, items carry the article the story uses."""

    opening: str       # the first sentence(s) after the list of people, up to and including the colon
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
    Scenario("are friends and avid readers who occasionally trade books. At the start "
             "of the semester, they each buy one new book:", "{} gets {}",
             "As the semester proceeds, they start trading around the new books.", "{} and {} swap books.",
             "At the end of the semester, {} has",
             ("Catch-22", "Frankenstein", "Hound of the Baskervilles", "Lolita", "Moby Dick",
              "The Fellowship of the Ring", "The Great Gatsby", "The Odyssey", "The Pearl", "Ulysses")),
    Scenario("are dancers at a square dance. At the start of a song, they each have a "
             "partner:", "{} is dancing with {}",
             "Throughout the song, the dancers often trade partners.", "{} and {} switch partners.",
             "At the end of the dance, {} is dancing with",
             ("Helga", "Izzi", "Jamie", "Karl", "Lola", "Melissa", "Ophelia", "Patrick", "Rodrigo", "Sam")),
    Scenario("are playing a game. At the start of the game, they are each holding a "
             "ball:", "{} has {}",
             "As the game progresses, pairs of players trade balls.", "{} and {} swap balls.",
             "At the end of the game, {} has the", tuple(f"a {c} ball" for c in _COLOURS)),
    Scenario("are holding a white elephant gift exchange. At the start of the event, "
             "they are each holding a present of a different color:", "{} has {}",
             "As the event progresses, pairs of people swap gifts.", "{} and {} swap their gifts.",
             "At the end of the event, {} has the",
             ("a black ball", "a blue present", "a brown present", "a green present", "a orange ball",
              "a pink ball", "a purple present", "a red present", "a white present", "a yellow present")),
    Scenario("are on the same team in a soccer match. At the start of the match, they "
             "are each assigned to a position:", "{} is playing {}",
             "As the game progresses, pairs of players occasionally swap positions.", "{} and {} trade positions.",
             "At the end of the match, {} is playing",
             ("benchwarmer", "center midfielder", "cheerleader", "fullback", "goalkeeper", "left midfielder",
              "left winger", "right midfielder", "right winger", "striker")),
)


@dataclass(frozen=True)
class Problem:
    scenario: Scenario
    people: tuple[str, ...]
    items: tuple[str, ...]                   # what each person holds at the start
    swaps: tuple[tuple[str, str], ...]       # pairs of people, in order
    asked: str                               # the person the question is about


def _listing(parts: list[str]) -> str:
    """'a, b, and c' (BBH always uses the serial comma)."""
    return ", ".join(parts[:-1]) + ", and " + parts[-1]


def _ordinals(count: int) -> list[str]:
    return ["First"] + ["Then"] * (count - 2) + ["Finally"]


def render(p: Problem) -> str:
    s = p.scenario
    holds = [s.holds.format(who, item) for who, item in zip(p.people, p.items)]
    swaps = " ".join(f"{o}, {s.swap.format(a, b)}" for o, (a, b) in zip(_ordinals(len(p.swaps)), p.swaps))
    options = "\n".join(f"({LETTERS[i]}) {s.option(item)}" for i, item in enumerate(p.items))
    return (f"{_listing(list(p.people))} {s.opening} {_listing(holds)}.\n{s.progress} {swaps} "
            f"{s.question.format(p.asked)}\nOptions:\n{options}")


def _pattern(template: str) -> str:
    return re.escape(template).replace(r"\{\}", "{}")


def holdings(p: Problem) -> list[dict[str, str]]:
    """Who holds what: at the start, then after each swap."""
    state = dict(zip(p.people, p.items))
    history = [dict(state)]
    for a, b in p.swaps:
        state[a], state[b] = state[b], state[a]
        history.append(dict(state))
    return history


def answer(p: Problem) -> str:
    final = holdings(p)[-1][p.asked]
    return f"({LETTERS[p.items.index(final)]})"


@dataclass(frozen=True)
class TrackingTask:
    """One of the three BBH tracking files: `size` people and `size` swaps."""

    size: int

    @property
    def NAME(self) -> str:  # noqa: N802 - the attribute every task module has
        return f"tracking_shuffled_objects_{SIZES[self.size]}_objects"

    @property
    def people(self) -> tuple[str, ...]:
        return ALL_PEOPLE[:self.size]

    def parse(self, text: str) -> Problem:
        """The problem behind a BBH input; ValueError when it is not in BBH's format."""
        head = _listing(list(self.people)) + " "
        scenario = next((s for s in SCENARIOS if text.startswith(head + s.opening + " ")), None)
        if scenario is None:
            raise ValueError(f"not a {self.NAME} question: {text[:80]!r}")
        person, item = "(" + "|".join(self.people) + ")", "(.+?)"
        holds = [_pattern(scenario.holds).format(name, item) for name in self.people]
        swap = _pattern(scenario.swap).format(person, person)
        regex = (re.escape(head + scenario.opening) + " " + ", ".join(holds[:-1]) + ", and " + holds[-1] + r"\.\n"
                 + re.escape(scenario.progress) + " " + " ".join(f"{o}, {swap}" for o in _ordinals(self.size))
                 + " " + _pattern(scenario.question).format(person) + r"\nOptions:\n(?s:.*)")
        m = re.fullmatch(regex, text)
        if not m:
            raise ValueError(f"not in BBH's {self.NAME} format: {text!r}")
        g = m.groups()
        n = self.size
        swaps = tuple((g[n + 2 * i], g[n + 1 + 2 * i]) for i in range(n))
        problem = Problem(scenario, self.people, tuple(g[:n]), swaps, g[-1])
        if any(a == b for a, b in swaps) or len(set(problem.items)) != n or render(problem) != text:
            raise ValueError(f"not in BBH's {self.NAME} format: {text!r}")
        return problem

    def solve(self, text: str) -> str:
        return answer(self.parse(text))

    def sample_input(self, rng: random.Random) -> str:
        scenario = rng.choice(SCENARIOS)
        items = tuple(rng.sample(scenario.items, self.size))
        swaps: list[tuple[str, str]] = []
        while len(swaps) < self.size:
            pair = tuple(rng.sample(self.people, 2))
            if swaps and set(pair) == set(swaps[-1]):
                continue
            swaps.append(pair)
        return render(Problem(scenario, self.people, items, tuple(swaps), rng.choice(self.people)))

    def rationale(self, text: str, granularity: str) -> str:
        p = self.parse(text)
        s = p.scenario
        target = answer(p)
        history = holdings(p)
        ending = f"{s.question.format(p.asked)} {s.option(history[-1][p.asked])}, option {target}."
        if granularity == "coarse":
            return join_coarse(f"Following the {SIZES[self.size]} swaps in order, {ending[0].lower()}{ending[1:]}",
                               target)

        def state(h: dict) -> str:
            return ", ".join(f"{who}: {s.option(h[who])}" for who in p.people)

        lines = [f"(0) At the start: {state(history[0])}."]
        for i, ((a, b), h) in enumerate(zip(p.swaps, history[1:]), start=1):
            lines.append(f"({i}) {s.swap.format(a, b)[:-1]}: {state(h)}.")
        lines.append(ending)
        return join_fine(lines, target)


THREE, FIVE, SEVEN = TrackingTask(3), TrackingTask(5), TrackingTask(7)
