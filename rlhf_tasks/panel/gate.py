"""The gate policy: promote the candidate only when the panel's verdicts clear the bar.

* its pass rate is at least ``min_pass_rate``;
* against the reference (the registry's champion; the foundation model when there is
  no champion yet, since that is what serves), the lift is at least ``min_lift`` and the
  one-sided exact McNemar test on the prompts both answered gives p < ``significance``
  (both models answer the same eval prompts: the comparison is paired);
  (a sequential panel, ``rlhf_tasks.panel.sequential``: its anytime-valid test in place of
  the fixed McNemar test, at the same significance);
* with ``max_gap_to_reference`` set, its pass rate trails the experts' own reference
  answers (the ``reference`` rows of the eval data, reviewed blinded) by at most that
  gap, both counted on the same prompts (those with a decided reference answer and a
  decided candidate answer: the eval data may give references for some prompts only);
  set but with no such prompt, the rule fails (it cannot be checked).

A bake-off (several candidates of one run, ``tuning.algorithms``) judges each candidate by
the same rules against the same reference, in one blinded batch, with one change: each
lift's p-value is adjusted by Holm's step-down method for the number of candidates, so
that the chance of promoting a candidate no better than the reference stays below
``significance`` however many are tried.  Of those that pass every rule the gate
promotes the one with the highest pass rate (ties: the smaller adjusted p, then the order
named); the others are registered and rejected with the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rlhf_tasks.config import SINGLE_CANDIDATE
from rlhf_tasks.panel.aggregate import PanelResult, discordant_pairs, mcnemar_exact

EXPERT = "reference"  # the label of the experts' own answers in a review batch
CANDIDATE = SINGLE_CANDIDATE  # the label of a run's one tuned policy (a bake-off: each
# candidate's algorithm)


def reference_model(models) -> str | None:
    """The model the candidate must beat: the registry's champion when the batch has one,
    else the foundation model (what serves), else none."""
    return "champion" if "champion" in models else ("foundation" if "foundation" in models
                                                    else None)


@dataclass(frozen=True)
class GatePolicy:
    min_pass_rate: float
    min_lift: float
    significance: float
    max_gap_to_reference: float | None = None

    @classmethod
    def from_config(cls, panel_cfg) -> "GatePolicy":
        return cls(panel_cfg.pass_rate_threshold, panel_cfg.min_lift, panel_cfg.significance,
                   panel_cfg.max_gap_to_reference)


@dataclass
class GateDecision:
    promote: bool
    candidate: str
    reference: str | None
    candidate_pass_rate: float | None
    reference_pass_rate: float | None
    lift: float | None
    better: int | None       # prompts where only the candidate passed
    worse: int | None        # prompts where only the reference passed
    p_value: float | None
    reasons: list[str] = field(default_factory=list)
    sequential: dict | None = None  # a sequential panel's state (its look, e-value, verdicts)
    p_adjusted: float | None = None  # a bake-off's: Holm-adjusted for the candidates

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def summary(self) -> str:
        return ("promote" if self.promote else "reject") + (
            ": " + "; ".join(self.reasons) if self.reasons else "")


def gap_to_experts(result: PanelResult, candidate: str) -> tuple[float, float, int] | None:
    """(candidate's pass rate, the experts' pass rate, prompts) on the prompts where both
    the candidate's answer and the expert-written reference were decided; None if none."""
    cand, expert = result.outcomes.get(candidate, {}), result.outcomes.get(EXPERT, {})
    shared = sorted(set(cand) & set(expert))
    if not shared:
        return None
    return (sum(cand[p] for p in shared) / len(shared),
            sum(expert[p] for p in shared) / len(shared), len(shared))


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values: sorted ascending, the i-th (from 0) of m is
    ``max over j <= i of min(1, (m - j) p_(j))``; a hypothesis is rejected at level alpha
    exactly when its adjusted p is below alpha (the family-wise error stays below alpha)."""
    adjusted, running = {}, 0.0
    order = sorted(p_values, key=lambda name: (p_values[name], name))
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * p_values[name]))
        adjusted[name] = running
    return adjusted


def decide(result: PanelResult, policy: GatePolicy, candidate: str,
           reference: str | None, sequential=None, *, p_adjusted: float | None = None,
           family: int = 1) -> GateDecision:
    """``sequential``: a sequential panel's state (``sequential.SequentialState``); its
    test decides significance.  ``p_adjusted``: the lift's p-value adjusted for a
    bake-off's ``family`` of candidates (``holm``), tested in place of the raw one."""
    reasons: list[str] = []
    state = sequential.as_dict() if sequential is not None else None
    cand = result.scores.get(candidate)
    if cand is None:
        return GateDecision(False, candidate, reference, None, None, None, None, None, None,
                            [f"no decided items for the candidate ({candidate})"], state)
    if cand.pass_rate < policy.min_pass_rate:
        reasons.append(f"pass rate {cand.pass_rate:.3f} is below the minimum "
                       f"{policy.min_pass_rate:.3f}")
    ref = result.scores.get(reference) if reference else None
    lift = better = worse = p = None
    if reference and ref is None:
        reasons.append(f"no decided items for the reference ({reference})")
    if ref is not None:
        lift = cand.pass_rate - ref.pass_rate
        better, worse, shared = discordant_pairs(result.outcomes.get(candidate, {}),
                                                 result.outcomes.get(reference, {}))
        p = mcnemar_exact(better, worse)
        if shared == 0:
            reasons.append(f"no prompt was decided for both {candidate} and {reference}")
        if lift < policy.min_lift:
            reasons.append(f"lift over {reference} {lift:+.3f} is below the minimum "
                           f"{policy.min_lift:+.3f}")
        if sequential is not None:
            if not sequential.promote_worthy:
                reasons.append(f"the sequential panel found no significant lift over "
                               f"{reference} ({sequential.look} look: {sequential.reason})")
        elif p_adjusted is not None:
            if p_adjusted >= policy.significance:
                reasons.append(f"lift over {reference} is not significant after Holm's "
                               f"correction for {family} candidates (p = {p:.3g}, adjusted "
                               f"{p_adjusted:.3g} >= {policy.significance})")
        elif p >= policy.significance:
            reasons.append(f"lift over {reference} is not significant "
                           f"(p = {p:.3g} >= {policy.significance})")
    if policy.max_gap_to_reference is not None:
        gap = gap_to_experts(result, candidate)
        if gap is None:
            reasons.append("the policy compares with expert-written answers, but no eval row "
                           "had a reviewed reference answer")
        elif gap[0] < gap[1] - policy.max_gap_to_reference:
            reasons.append(f"pass rate {gap[0]:.3f} trails the expert-written answers' "
                           f"{gap[1]:.3f} on the same {gap[2]} prompts by more than "
                           f"{policy.max_gap_to_reference:.3f}")
    return GateDecision(not reasons, candidate, reference, cand.pass_rate,
                        ref.pass_rate if ref else None, lift, better, worse, p, reasons, state,
                        p_adjusted)


def bake_off(result: PanelResult, policy: GatePolicy, candidates: list[str],
             reference: str | None, sequential=None) -> tuple[str, dict[str, GateDecision]]:
    """Every candidate's decision (several: Holm-adjusted, see the module) and the one the
    run stands for: the best that passed, promoted alone; when none passed, the one with
    the highest pass rate (rejected like the others).  One candidate: ``decide``."""
    if len(candidates) == 1:
        return candidates[0], {candidates[0]: decide(result, policy, candidates[0], reference,
                                                     sequential)}
    raw = {}
    if reference is not None:
        for name in candidates:  # no paired prompt: no evidence of a lift (p = 1)
            better, worse, shared = discordant_pairs(result.outcomes.get(name, {}),
                                                     result.outcomes.get(reference, {}))
            raw[name] = mcnemar_exact(better, worse) if shared else 1.0
    adjusted = holm(raw)
    decisions = {name: decide(result, policy, name, reference, p_adjusted=adjusted.get(name),
                              family=len(candidates)) for name in candidates}

    def rank(name: str) -> tuple:
        d = decisions[name]
        return (d.candidate_pass_rate if d.candidate_pass_rate is not None else -1.0,
                -(d.p_adjusted if d.p_adjusted is not None else 0.0),
                -candidates.index(name))

    passed = [name for name in candidates if decisions[name].promote]
    chosen = max(passed or candidates, key=rank)
    for name in passed:
        if name != chosen:
            decisions[name].promote = False
            decisions[name].reasons.append(
                f"not chosen: {chosen} passed too, with pass rate "
                f"{decisions[chosen].candidate_pass_rate:.3f} against "
                f"{decisions[name].candidate_pass_rate:.3f}")
    return chosen, decisions


def reward_hacking(reward_means: dict[str, float], result: PanelResult, candidate: str,
                   start: str | None, min_rise: float) -> str | None:
    """A warning when the candidate's mean reward rose by at least ``min_rise``
    (normalised units) over the model RL started from while its pass rate did not rise:
    the policy learned what the reward model rewards, not what the experts pass."""
    if start is None or candidate not in reward_means or start not in reward_means:
        return None
    cand, base = result.scores.get(candidate), result.scores.get(start)
    if cand is None or base is None:
        return None
    rise = reward_means[candidate] - reward_means[start]
    if rise >= min_rise and cand.pass_rate <= base.pass_rate:
        return (f"possible reward hacking: the mean reward rose by {rise:+.2f} (normalised) "
                f"over {start}, while the expert pass rate did not "
                f"({cand.pass_rate:.1%} against {base.pass_rate:.1%})")
    return None


def paired_comparisons(result: PanelResult, candidate: str) -> dict[str, dict]:
    """The candidate against every other model of the batch, paired on the prompts both
    were decided on: lift, prompts only the candidate passed / only the other passed, and
    the one-sided exact McNemar p (a report: the gate decides on its own reference)."""
    out = {}
    mine = result.outcomes.get(candidate, {})
    for other, theirs in sorted(result.outcomes.items()):
        if other == candidate:
            continue
        better, worse, shared = discordant_pairs(mine, theirs)
        if not shared:
            continue
        # on shared prompts the pass rates differ by the discordant ones only
        out[other] = {"lift": (better - worse) / shared, "better": better, "worse": worse,
                      "prompts": shared, "p_value": mcnemar_exact(better, worse)}
    return out
