"""web_of_lies (a control task): five people, the first tells the truth or lies, each next one
says whether the previous one tells the truth; does the last one tell the truth? Yes/No.

As in BBH: five distinct names from a pool of fifty, each claim and the first fact drawn
evenly, so about half the answers are Yes."""

from __future__ import annotations

import random
import re

from fastkd.synth.common import join_coarse, join_fine

NAME = "web_of_lies"
PEOPLE_PER_ITEM = 5
NAMES = ("Alejandro", "Alexis", "Amberly", "Andree", "Antwan", "Audrie", "Bernita", "Christie",
         "Conception", "Crista", "Dallas", "Delbert", "Delfina", "Elanor", "Fidel", "Fletcher", "Gwenn",
         "Helene", "Inga", "Jamey", "Jaymie", "Jerry", "Jim", "Ka", "Kandi", "Kristian", "Leda", "Lorine",
         "Maybelle", "Michael", "Michaela", "Millicent", "Millie", "Osvaldo", "Phoebe", "Rashida",
         "Raymond", "Ryan", "Sal", "Shalonda", "Shaunda", "Shenna", "Sherrie", "Sima", "Tamika",
         "Teressa", "Vernell", "Vina", "Willian", "Yoland")
_CLAIM = {True: "tells the truth", False: "lies"}
_FIRST = re.compile(r"Question: ([A-Z][a-z]+) (tells the truth|lies)\.")
_SAYS = re.compile(r" ([A-Z][a-z]+) says ([A-Z][a-z]+) (tells the truth|lies)\.")
_ASK = re.compile(r" Does ([A-Z][a-z]+) tell the truth\?")


def render(names: list[str], first_truthful: bool, claims: list[bool]) -> str:
    """claims[i] is what names[i + 1] says about names[i] (True: "tells the truth")."""
    parts = [f"Question: {names[0]} {_CLAIM[first_truthful]}."]
    parts += [f"{names[i + 1]} says {names[i]} {_CLAIM[c]}." for i, c in enumerate(claims)]
    parts.append(f"Does {names[-1]} tell the truth?")
    return " ".join(parts)


def parse(text: str) -> tuple[list[str], bool, list[bool]]:
    """(names, whether the first tells the truth, claims); ValueError when not in BBH's format."""
    m = _FIRST.match(text)
    if not m:
        raise ValueError(f"not a web_of_lies question: {text[:80]!r}")
    names, first, claims = [m.group(1)], m.group(2) == "tells the truth", []
    pos = m.end()
    while (m := _SAYS.match(text, pos)):
        if m.group(2) != names[-1]:
            raise ValueError(f"{m.group(1)} speaks about {m.group(2)}, not about {names[-1]}: {text!r}")
        names.append(m.group(1))
        claims.append(m.group(3) == "tells the truth")
        pos = m.end()
    m = _ASK.fullmatch(text, pos)
    if not m or m.group(1) != names[-1] or len(set(names)) != len(names) or not claims:
        raise ValueError(f"not in BBH's web_of_lies format: {text!r}")
    return names, first, claims


def truths(first: bool, claims: list[bool]) -> list[bool]:
    """Whether each person tells the truth: a speaker is truthful iff their claim is right."""
    out = [first]
    for claim in claims:
        out.append(claim == out[-1])
    return out


def solve(text: str) -> str:
    _, first, claims = parse(text)
    return "Yes" if truths(first, claims)[-1] else "No"


def sample_input(rng: random.Random) -> str:
    names = rng.sample(NAMES, PEOPLE_PER_ITEM)
    return render(names, rng.random() < 0.5, [rng.random() < 0.5 for _ in range(PEOPLE_PER_ITEM - 1)])


def rationale(text: str, granularity: str) -> str:
    names, first, claims = parse(text)
    truth = truths(first, claims)
    target = "Yes" if truth[-1] else "No"
    last = f"{names[-1]} {_CLAIM[truth[-1]]}"
    if granularity == "coarse":
        flips = sum(1 for c in claims if not c)
        return join_coarse(f"{names[0]} {_CLAIM[first]}; of the {len(claims)} claims, {flips} "
                           f"say{'s' if flips == 1 else ''} that someone lies, and each of those flips the truth "
                           f"along the chain while the others keep it, so {last}.", target)
    lines = [f"(1) {names[0]} {_CLAIM[first]}."]
    for i, claim in enumerate(claims):
        right = "right" if claim == truth[i] else "wrong"
        lines.append(f"({i + 2}) {names[i + 1]} says {names[i]} {_CLAIM[claim]}; {names[i]} {_CLAIM[truth[i]]}, "
                     f"so the claim is {right} and {names[i + 1]} {_CLAIM[truth[i + 1]]}.")
    lines.append(f"So {last}.")
    return join_fine(lines, target)
