"""A simulated panel for the demo and the tests: rubric raters with their own noise.

Each rater applies the demo's rubric (``rlhf_tasks.demo.rubric``), then errs: with chance
``strictness_r`` it fails an item the rubric passes, and with chance ``noise_r`` its
verdict flips.  Per-rater rates are drawn around the configured means, so raters
disagree the way people do and Fleiss' kappa has something to measure.  Raters are
reviewers named ``simulated-rater-N`` (flagged simulated in the store) and take work
through the same ``next_item`` path a person's browser uses.  Everything they produce is
labelled simulated: the batch, the verdicts' source, the report, the MLflow tags.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rlhf_tasks.demo import rubric
from rlhf_tasks.panel.store import PanelStore


@dataclass(frozen=True)
class RubricRater:
    name: str
    noise: float
    strictness: float

    def judge(self, prompt: str, response: str, rng: random.Random) -> tuple[bool, str]:
        verdict = rubric.judge(prompt, response)
        passed = verdict.passed
        comment = "" if passed else "fails: " + ", ".join(verdict.failed_checks)
        if passed and rng.random() < self.strictness:
            passed, comment = False, "not convincing"
        if rng.random() < self.noise:
            passed, comment = not passed, "(second thoughts)"
        return passed, comment


def raters(count: int, noise: float, strictness: float, seed: int) -> list[RubricRater]:
    rng = random.Random(seed)
    return [RubricRater(f"simulated-rater-{i + 1}", noise * rng.uniform(0.5, 1.5),
                        strictness * rng.uniform(0.5, 1.5)) for i in range(count)]


def run_panel(store: PanelStore, batch_id: str, panel: list[RubricRater], seed: int) -> int:
    """Raters take turns asking for their next item until none has work left; returns
    the number of verdicts given."""
    for rater in panel:
        store.add_reviewer(rater.name, simulated=True, with_token=False)
    rng = random.Random(seed)
    given, active = 0, list(panel)
    while active:
        for rater in list(active):
            item = store.next_item(batch_id, rater.name)
            if item is None:
                active.remove(rater)
                continue
            passed, comment = rater.judge(item.prompt, item.response, rng)
            store.record_verdict(item.id, rater.name, passed, comment, source="simulated")
            given += 1
    return given
