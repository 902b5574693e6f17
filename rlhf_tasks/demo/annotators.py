"""The demo's preference annotators: simulated people who are *not* the panel.

They rank two answers by their own, partial view of the quality bar: they never check the
figure (that the bullet's number is the original's: a made-up number looks fine to
them, as long as the bullet names what was worked on and states one number), and each
errs on a share of the pairs (their own noise, drawn around ``NOISE``).  The panel's
raters apply the whole rubric (:mod:`rlhf_tasks.panel.simulated`).  So the reward model
learns what the annotators rewarded, and the panel's table shows whether RLHF
generalised to what the experts want: nothing in the preferences teaches the policy to
keep the figure, and the panel fails every bullet that changes it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from rlhf_tasks.demo import rubric

NOISE = 0.1
COUNT = 8


def seen_flaws(prompt: str, text: str) -> int:
    """The rubric's failed checks as an annotator sees them (fewer is better): the same,
    except that ``keeps_facts`` holds for any single number beside the right object."""
    failed = set(rubric.judge(prompt, text).failed_checks)
    obj, _ = rubric.facts(prompt)
    if "keeps_facts" in failed and obj is not None and obj in text.lower() \
            and len(re.findall(r"\d+", text)) == 1:
        failed.discard("keeps_facts")
    return len(failed)


@dataclass(frozen=True)
class Annotator:
    name: str
    noise: float

    def prefer(self, prompt: str, a: str, b: str, rng: random.Random) -> tuple[str, str] | None:
        """(chosen, rejected), or None when the two look equally good to this annotator."""
        fa, fb = seen_flaws(prompt, a), seen_flaws(prompt, b)
        if fa == fb:
            return None
        chosen, rejected = (a, b) if fa < fb else (b, a)
        if rng.random() < self.noise:
            chosen, rejected = rejected, chosen
        return chosen, rejected


def annotators(rng: random.Random, count: int = COUNT, noise: float = NOISE) -> list[Annotator]:
    return [Annotator(f"annotator-{i + 1}", noise * rng.uniform(0.5, 1.5))
            for i in range(count)]
