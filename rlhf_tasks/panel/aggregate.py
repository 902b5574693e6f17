"""Turn verdicts into decisions: per-item majority, per-model pass rate with a Wilson
interval, Fleiss' kappa for agreement, and the exact McNemar test of candidate against
champion on the prompts both answered (the data are paired: the same eval prompts).
Pure functions on plain data; the exact binomial test and the Wilson interval are
SciPy's (``scipy.stats.binomtest``), checked against hand-computed values in
tests/test_panel_aggregate.py.

References:
* E. B. Wilson (1927), "Probable inference, the law of succession, and statistical
  inference", JASA 22:209 -- the score interval.
* J. L. Fleiss (1971), "Measuring nominal scale agreement among many raters",
  Psychological Bulletin 76:378.
* Q. McNemar (1947), "Note on the sampling error of the difference between correlated
  proportions or percentages", Psychometrika 12:153; the exact (binomial) form as in
  Agresti, "Categorical Data Analysis", 10.1.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field


def majority(votes: list[bool]) -> bool:
    """Pass when strictly more than half of the verdicts pass; a tie fails (the bar is a
    bar: with an even k, k/2 passes out of k is a fail)."""
    return sum(votes) * 2 > len(votes)


def wilson_interval(passes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval (no continuity correction) for a binomial proportion;
    (0, 1) when n = 0."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(passes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def fleiss_kappa(counts: list[tuple[int, ...]]) -> float | None:
    """Fleiss' kappa from per-item category counts (each item rated by the same number of
    raters).  None when it is undefined: fewer than 2 raters, or every verdict the same."""
    if not counts:
        return None
    raters = sum(counts[0])
    if raters < 2 or any(sum(c) != raters for c in counts):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings per item")
    items = len(counts)
    per_item = [(sum(c * c for c in row) - raters) / (raters * (raters - 1)) for row in counts]
    p_bar = sum(per_item) / items
    categories = len(counts[0])
    shares = [sum(row[j] for row in counts) / (items * raters) for j in range(categories)]
    p_e = sum(s * s for s in shares)
    if p_e >= 1.0:
        return None
    return (p_bar - p_e) / (1 - p_e)


def mcnemar_exact(better: int, worse: int) -> float:
    """One-sided exact McNemar test for H1: the candidate passes more often than the
    reference on the same prompts.  ``better``: prompts where only the candidate passed,
    ``worse``: where only the reference passed; prompts where both agree carry no
    information.  Under H0 each discordant prompt goes either way with probability 1/2:
    P(X >= better), X ~ Binomial(better + worse, 1/2) (SciPy's exact binomial test)."""
    from scipy.stats import binomtest

    if better + worse == 0:
        return 1.0
    return float(binomtest(better, better + worse, 0.5, alternative="greater").pvalue)


def discordant_pairs(candidate: dict, reference: dict) -> tuple[int, int, int]:
    """(candidate only passed, reference only passed, prompts both decided) over the
    prompts that both models' outcomes cover (``{prompt_index: passed}``)."""
    shared = set(candidate) & set(reference)
    better = sum(1 for p in shared if candidate[p] and not reference[p])
    worse = sum(1 for p in shared if reference[p] and not candidate[p])
    return better, worse, len(shared)


@dataclass(frozen=True)
class ModelScore:
    model: str
    items: int            # items with a majority verdict (quorum reached)
    passed: int
    pass_rate: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PanelResult:
    scores: dict[str, ModelScore]
    kappa: float | None
    items_judged: int      # items with at least one verdict
    items_decided: int
    verdicts: int
    reviewers: int
    # model -> {prompt_index: majority verdict}, for the paired test
    outcomes: dict[str, dict[int, bool]] = field(default_factory=dict)


def verdicts_by_item(verdicts: list[dict]) -> dict[str, list[dict]]:
    """Each item's verdicts in arrival order (``id``): its first k are the ones that count
    (here, and in the panel's MLflow views)."""
    by_item: dict[str, list[dict]] = defaultdict(list)
    for row in sorted(verdicts, key=lambda r: r["id"]):
        by_item[row["item_id"]].append(row)
    return dict(by_item)


def aggregate(verdicts: list[dict], k: int, *, curtailed: bool = False) -> PanelResult:
    """``verdicts``: rows with ``item_id``, ``model``, ``reviewer``, ``passed`` and ``id``
    (arrival order).  Each item counts with its first ``k`` verdicts; items with fewer
    are left out of the pass rates (and of kappa).  ``curtailed`` (a sequential panel):
    an item counts once its majority of k is settled (k = 3: two agreeing verdicts), and
    kappa is computed on the first (k + 1) // 2 verdicts of each item, the fewest any
    settled item has."""
    from rlhf_tasks.panel.sequential import item_outcome

    by_item = verdicts_by_item(verdicts)
    models: dict[str, list[bool]] = defaultdict(list)
    per_prompt: dict[str, dict[int, bool]] = defaultdict(dict)
    counts = []
    raters = (k + 1) // 2 if curtailed else k
    for rows in by_item.values():
        votes = [bool(r["passed"]) for r in rows[:k]]
        outcome = item_outcome(votes, k) if curtailed else (
            majority(votes) if len(votes) == k else None)
        if outcome is None:
            continue
        models[rows[0]["model"]].append(outcome)
        if rows[0].get("prompt_index") is not None:
            per_prompt[rows[0]["model"]][int(rows[0]["prompt_index"])] = outcome
        first = votes[:raters]
        counts.append((sum(first), raters - sum(first)))
    scores = {}
    for model, outcomes in sorted(models.items()):
        passed, n = sum(outcomes), len(outcomes)
        low, high = wilson_interval(passed, n)
        scores[model] = ModelScore(model, n, passed, passed / n, low, high)
    kappa = fleiss_kappa(counts) if raters >= 2 else None
    return PanelResult(scores=scores, kappa=kappa, items_judged=len(by_item),
                       items_decided=len(counts), verdicts=len(verdicts),
                       reviewers=len({r["reviewer"] for r in verdicts}),
                       outcomes=dict(per_prompt))


def reward_agreement(outcomes: dict[int, bool], rewards: dict[int, float]
                     ) -> tuple[float | None, int, int]:
    """How well the reward score ranks one model's answers as the panel judged them: the
    AUC (Mann-Whitney) of the reward over the answers' majority verdicts, the chance that
    a passed answer scores higher than a failed one (ties count half; 0.5 = no agreement,
    1 = perfect); with the counts of passed and failed answers.  None when either is 0."""
    passed = [rewards[p] for p, ok in outcomes.items() if ok and p in rewards]
    failed = [rewards[p] for p, ok in outcomes.items() if not ok and p in rewards]
    if not passed or not failed:
        return None, len(passed), len(failed)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in passed for b in failed)
    return wins / (len(passed) * len(failed)), len(passed), len(failed)


def expert_time(verdicts: list[dict]) -> dict:
    """The experts' time on a batch, from the verdicts' ``seconds`` (measured on the review
    page and API, declared for offline imports, none for simulated raters): in all, per
    model and per reviewer, each with the verdicts it counts and the mean per timed
    verdict.  A simulated panel has no expert time: ``timed`` is 0 and says so."""
    def summary(rows: list[dict]) -> dict:
        timed = [float(r["seconds"]) for r in rows if r.get("seconds") is not None]
        return {"verdicts": len(rows), "timed": len(timed),
                "measured": sum(r.get("seconds") is not None and r.get("source") != "import"
                                for r in rows),
                "declared": sum(r.get("seconds") is not None and r.get("source") == "import"
                                for r in rows),
                "seconds": round(sum(timed), 3),
                "mean_seconds": round(sum(timed) / len(timed), 3) if timed else None}

    by_model: dict[str, list[dict]] = defaultdict(list)
    by_reviewer: dict[str, list[dict]] = defaultdict(list)
    for row in verdicts:
        by_model[row["model"]].append(row)
        by_reviewer[row["reviewer"]].append(row)
    return {**summary(verdicts),
            "per_model": {m: summary(rows) for m, rows in sorted(by_model.items())},
            "per_reviewer": {r: summary(rows) for r, rows in sorted(by_reviewer.items())}}
