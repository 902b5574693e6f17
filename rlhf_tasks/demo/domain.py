"""The demo's synthetic domain: weak resume bullets rewritten into strong ones.

A *case* is the set of facts behind one bullet: what the job seeker worked on (an object
such as "payroll system"), a metric that moved (up or down) and by how many percent.
The prompt states those facts weakly ("i was responsible for the payroll system and
errors went down about 35 percent"); a strong answer names them in an expert's form
("Automated payroll system, cutting errors by 35%").  Answers of every quality are
generated from the same facts, each flaw one an HR reviewer would fail:
weak verb, first person, no number, a wrong number (a made-up fact), a wrong object,
padding that makes the bullet long.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OBJECTS = [
    "payroll system", "sales team", "onboarding process", "support queue", "hiring pipeline",
    "inventory system", "billing workflow", "training program", "vendor contracts",
    "data warehouse", "mobile app", "checkout page", "release process", "expense reports",
    "help desk", "email campaign", "shift schedule", "budget review", "product catalog",
    "quality audits", "customer survey", "benefits portal", "safety program", "call center",
    "logistics network", "brand website", "recruiting events", "warehouse layout",
    "compliance checks", "partner program", "intern program", "reporting dashboard",
]
METRICS_UP = ["revenue", "sales", "retention", "signups", "accuracy", "throughput",
              "satisfaction", "conversions"]
METRICS_DOWN = ["costs", "errors", "delays", "turnover", "complaints", "wait times",
                "defects", "overtime"]
STRONG_VERBS = ["Led", "Built", "Redesigned", "Automated", "Launched", "Streamlined",
                "Overhauled", "Managed", "Scaled", "Optimized"]
WEAK_OPENERS = ["Responsible for", "Helped with", "Worked on", "Assisted with", "Involved in"]
FIRST_PERSON = ["I", "We"]
PADDING = ["which was a really great result for the whole team and the company",
           "and everyone on the team was very happy with how it all turned out",
           "as part of my many day to day duties in this busy role at the time"]

PROMPT_TEMPLATES = [
    "i was responsible for the {obj} and {metric} went {dir_word} about {n} percent",
    "helped with the {obj}. {metric} {dir_past} by {n}% after that",
    "worked on our {obj}, we saw {metric} {dir_past} {n} percent",
    "in charge of the {obj} where {metric} {dir_past} by around {n}%",
    "my job was the {obj}; {metric} {dir_past} {n} percent in a year",
]


@dataclass(frozen=True)
class Case:
    obj: str
    metric: str
    up: bool
    n: int
    template: int

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATES[self.template].format(
            obj=self.obj, metric=self.metric, n=self.n,
            dir_word="up" if self.up else "down",
            dir_past="increased" if self.up else "dropped")

    @property
    def change(self) -> str:
        return "raising" if self.up else "cutting"


def sample_case(rng: random.Random) -> Case:
    up = rng.random() < 0.5
    metric = rng.choice(METRICS_UP if up else METRICS_DOWN)
    return Case(rng.choice(OBJECTS), metric, up, 5 * rng.randint(2, 18),
                rng.randrange(len(PROMPT_TEMPLATES)))


def unique_cases(rng: random.Random, count: int, exclude: set[str] = frozenset()) -> list[Case]:
    """``count`` cases whose prompts are all different (and not in ``exclude``)."""
    seen, out = set(exclude), []
    while len(out) < count:
        case = sample_case(rng)
        if case.prompt not in seen:
            seen.add(case.prompt)
            out.append(case)
    return out


FLAWS = ("weak_verb", "first_person", "no_number", "wrong_number", "wrong_object", "too_long")


def strong_answer(case: Case, rng: random.Random) -> str:
    return f"{rng.choice(STRONG_VERBS)} {case.obj}, {case.change} {case.metric} by {case.n}%"


def flawed_answer(case: Case, rng: random.Random, flaw: str) -> str:
    verb, obj, n = rng.choice(STRONG_VERBS), case.obj, f"{case.n}%"
    tail = f"{case.change} {case.metric} by {n}"
    if flaw == "weak_verb":
        return f"{rng.choice(WEAK_OPENERS)} the {obj}, {tail}"
    if flaw == "first_person":
        return f"{rng.choice(FIRST_PERSON)} {verb.lower()} the {obj}, {tail}"
    if flaw == "no_number":
        return f"{verb} {obj}, {case.change} {case.metric} a lot"
    if flaw == "wrong_number":
        wrong = case.n + rng.choice([-1, 1]) * 5 * rng.randint(1, 6)
        wrong = wrong if 10 <= wrong <= 90 else case.n + (5 if case.n < 50 else -5)
        return f"{verb} {obj}, {case.change} {case.metric} by {wrong}%"
    if flaw == "wrong_object":
        other = rng.choice([o for o in OBJECTS if o != obj])
        return f"{verb} {other}, {tail}"
    if flaw == "too_long":
        return f"{verb} {obj}, {tail}, {rng.choice(PADDING)}"
    raise ValueError(flaw)


def answer(case: Case, rng: random.Random, strong_share: float) -> tuple[str, bool]:
    """A strong answer with probability ``strong_share``, else one with a random flaw."""
    if rng.random() < strong_share:
        return strong_answer(case, rng), True
    return flawed_answer(case, rng, rng.choice(FLAWS)), False
