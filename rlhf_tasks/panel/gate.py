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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rlhf_tasks.panel.aggregate import PanelResult, discordant_pairs, mcnemar_exact

EXPERT = "reference"  # the label of the experts' own answers in a review batch
CANDIDATE = "rlhf"    # the label of the run's tuned policy


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


def decide(result: PanelResult, policy: GatePolicy, candidate: str,
           reference: str | None, sequential=None) -> GateDecision:
    """``sequential``: a sequential panel's state (``sequential.SequentialState``); its
    test decides significance."""
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
                        ref.pass_rate if ref else None, lift, better, worse, p, reasons, state)


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
