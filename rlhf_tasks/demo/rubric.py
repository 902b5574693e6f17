"""The demo's quality bar: would an HR expert pass this rewritten bullet?

Five checks, each one a reason to fail:
* ``strong_verb``  -- it opens with a strong action verb;
* ``quantified``   -- it states a result as a percentage;
* ``keeps_facts``  -- it names the object of the input and its number, and no other number;
* ``concise``      -- at most ``MAX_WORDS`` words;
* ``no_first_person`` -- no I / me / my / we / our / us.

Facts are read back from the prompt (the object phrase and the number it states).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from rlhf_tasks.demo.domain import OBJECTS, STRONG_VERBS

MAX_WORDS = 14
QUALITY_BAR = ("Pass a bullet only if it opens with a strong action verb, states the result "
               "as a number, keeps the facts of the original (what was worked on, and the "
               "same figure), has at most 14 words and no first person.")
_FIRST_PERSON = {"i", "me", "my", "we", "our", "us"}
_NUMBER = re.compile(r"\d+")


@dataclass
class Verdict:
    passed: bool
    failed_checks: list[str] = field(default_factory=list)


def facts(prompt: str) -> tuple[str | None, str | None]:
    obj = next((o for o in sorted(OBJECTS, key=len, reverse=True) if o in prompt.lower()), None)
    numbers = _NUMBER.findall(prompt)
    return obj, numbers[-1] if numbers else None


def judge(prompt: str, response: str) -> Verdict:
    text = response.strip()
    words = re.findall(r"[A-Za-z0-9%']+", text)
    obj, number = facts(prompt)
    failed = []
    if not words or words[0] not in STRONG_VERBS:
        failed.append("strong_verb")
    if not re.search(r"\d+%", text):
        failed.append("quantified")
    numbers = _NUMBER.findall(text)
    if obj is None or obj not in text.lower() or number is None or numbers != [number]:
        failed.append("keeps_facts")
    if len(words) > MAX_WORDS:
        failed.append("concise")
    if any(w.lower() in _FIRST_PERSON for w in words):
        failed.append("no_first_person")
    return Verdict(not failed, failed)


def pass_rate(prompts: list[str], responses: list[str]) -> float:
    if not prompts:
        return 0.0
    return sum(judge(p, r).passed for p, r in zip(prompts, responses)) / len(prompts)
