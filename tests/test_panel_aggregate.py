"""Panel statistics against hand-computed values."""

from __future__ import annotations

import pytest

from rlhf_tasks.panel.aggregate import (aggregate, discordant_pairs, fleiss_kappa, majority,
                                        mcnemar_exact, wilson_interval)
from rlhf_tasks.panel.gate import GatePolicy, decide


def test_majority_ties_fail():
    assert majority([True, True, False])
    assert not majority([True, False])
    assert not majority([True, False, False])


def test_wilson_interval_by_hand():
    # 8/10, z = 1.96: centre (0.8 + 0.19208) / 1.38416, half 1.41602 * sqrt(0.025604)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_fleiss_kappa_published_example():
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories -> 0.210
    rows = [(0, 0, 0, 0, 14), (0, 2, 6, 4, 2), (0, 0, 3, 5, 6), (0, 3, 9, 2, 0),
            (2, 2, 8, 1, 1), (7, 7, 0, 0, 0), (3, 2, 6, 3, 0), (2, 5, 3, 2, 2),
            (6, 5, 2, 1, 0), (0, 2, 2, 3, 7)]
    assert fleiss_kappa(rows) == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_small_cases():
    assert fleiss_kappa([(3, 0), (0, 3)]) == pytest.approx(1.0)
    # P_i = (4 + 1 - 3) / 6 = 1/3 each, P_e = 1/2 -> (1/3 - 1/2) / (1/2)
    assert fleiss_kappa([(2, 1), (1, 2)]) == pytest.approx(-1 / 3)
    assert fleiss_kappa([(3, 0), (3, 0)]) is None  # every verdict the same: undefined
    with pytest.raises(ValueError):
        fleiss_kappa([(3, 0), (1, 1)])


def test_exact_mcnemar_by_hand():
    """One-sided: P(X >= b) for X ~ Binomial(b + c, 1/2) over the discordant prompts."""
    import math

    # by hand: 7 discordant prompts, all for the candidate: 1/2^7
    assert mcnemar_exact(7, 0) == pytest.approx(1 / 128, rel=1e-12)
    # 5 for, 1 against: (C(6,5) + C(6,6)) / 64 = 7/64
    assert mcnemar_exact(5, 1) == pytest.approx(7 / 64, rel=1e-12)
    # the worked example of docs/ARCHITECTURE.md: 30 for, 12 against -> 0.00396
    assert mcnemar_exact(30, 12) == pytest.approx(0.003957948667448363, rel=1e-12)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(0, 5) == 1.0
    # the binomial tail summed in integers, for larger and lopsided counts
    for better, worse in [(9, 4), (3, 3), (1, 0), (600, 540), (1500, 1400), (2, 40)]:
        n = better + worse
        exact = sum(math.comb(n, i) for i in range(better, n + 1)) / 2 ** n
        assert mcnemar_exact(better, worse) == pytest.approx(exact, rel=1e-9)


def test_discordant_pairs_count_only_shared_prompts():
    cand = {0: True, 1: True, 2: False, 3: True, 9: True}
    ref = {0: False, 1: True, 2: True, 3: False, 4: False}
    assert discordant_pairs(cand, ref) == (2, 1, 4)  # 9 and 4 are not shared


def test_paired_test_is_not_fooled_by_unpaired_rates():
    """9/10 against 4/10 looks decisive to a pooled z-test (p = 0.0095), but if the
    candidate is better on 6 prompts and worse on 1, the paired evidence is p = 0.0625."""
    spec = {f"c{i}": ("candidate", [i < 9] * 3, i) for i in range(10)}
    ref_passes = {0, 1, 2, 9}  # reference passes where the candidate failed once (9)
    spec.update({f"r{i}": ("champion", [i in ref_passes] * 3, i) for i in range(10)})
    result = aggregate(_rows(spec), k=3)
    decision = decide(result, GatePolicy(0.5, 0.0, 0.05), "candidate", "champion")
    assert (decision.better, decision.worse) == (6, 1)
    assert decision.p_value == pytest.approx(8 / 128) and not decision.promote


def _rows(spec):
    """spec: {item: (model, [votes...])} -> verdict rows in arrival order."""
    rows, n = [], 0
    for item, (model, votes, *prompt) in spec.items():
        for r, v in enumerate(votes):
            n += 1
            rows.append({"id": n, "item_id": item, "model": model, "reviewer": f"r{r}",
                         "passed": v, "prompt_index": prompt[0] if prompt else None})
    return rows


def test_aggregate_majority_rates_and_quorum():
    spec = {"a": ("rlhf", [True, True, False]), "b": ("rlhf", [True, True, True]),
            "c": ("rlhf", [False, False, True]), "d": ("sft", [False, True, False]),
            "e": ("sft", [True, True, True, False]),  # a 4th verdict is ignored (first k)
            "f": ("sft", [True])}                      # short of quorum: left out
    result = aggregate(_rows(spec), k=3)
    assert result.scores["rlhf"].passed == 2 and result.scores["rlhf"].items == 3
    assert result.scores["sft"].passed == 1 and result.scores["sft"].items == 2
    assert result.items_decided == 5 and result.items_judged == 6
    assert result.scores["rlhf"].ci_low == pytest.approx(wilson_interval(2, 3)[0])
    counts = [(2, 1), (3, 0), (1, 2), (1, 2), (3, 0)]
    assert result.kappa == pytest.approx(fleiss_kappa(counts))


def test_gate_decisions():
    spec = {f"c{i}": ("candidate", [i < 17] * 3, i) for i in range(20)}
    spec.update({f"f{i}": ("foundation", [i < 10] * 3, i) for i in range(20)})
    result = aggregate(_rows(spec), k=3)  # 0.85 against 0.50 on the same 20 prompts
    policy = GatePolicy(min_pass_rate=0.6, min_lift=0.1, significance=0.05)
    promote = decide(result, policy, "candidate", "foundation")
    assert promote.promote and promote.lift == pytest.approx(0.35)
    # better on prompts 10..16, worse on none: 1/2^7
    assert (promote.better, promote.worse) == (7, 0) and promote.p_value == 1 / 128
    strict = decide(result, GatePolicy(0.9, 0.1, 0.05), "candidate", "foundation")
    assert not strict.promote and "below the minimum 0.900" in strict.reasons[0]
    lift = decide(result, GatePolicy(0.6, 0.5, 0.05), "candidate", "foundation")
    assert not lift.promote and "lift" in lift.reasons[0]
    alone = decide(result, policy, "candidate", None)
    assert alone.promote and alone.p_value is None
    assert not decide(result, policy, "missing", None).promote


def test_gate_compares_with_expert_written_answers():
    """Candidate 17/20, experts' own answers 19/20: within a gap of 0.1 (0.85 >= 0.85),
    not within 0.05; a policy that asks for the comparison fails without references."""
    spec = {f"c{i}": ("candidate", [i < 17] * 3, i) for i in range(20)}
    spec.update({f"f{i}": ("foundation", [i < 10] * 3, i) for i in range(20)})
    spec.update({f"r{i}": ("reference", [i < 19] * 3, i) for i in range(20)})
    result = aggregate(_rows(spec), k=3)
    assert result.scores["reference"].pass_rate == 0.95
    near = decide(result, GatePolicy(0.6, 0.1, 0.05, max_gap_to_reference=0.1), "candidate",
                  "foundation")
    assert near.promote, near.reasons
    far = decide(result, GatePolicy(0.6, 0.1, 0.05, max_gap_to_reference=0.05), "candidate",
                 "foundation")
    assert not far.promote and far.reasons == [
        "pass rate 0.850 trails the expert-written answers' 0.950 on the same 20 prompts by "
        "more than 0.050"]
    without = aggregate(_rows({k: v for k, v in spec.items() if not k.startswith("r")}), k=3)
    missing = decide(without, GatePolicy(0.6, 0.1, 0.05, max_gap_to_reference=0.5),
                     "candidate", "foundation")
    assert not missing.promote and "no eval row had a reviewed reference" in missing.reasons[0]


def test_the_gap_to_the_experts_is_counted_on_the_prompts_they_answered():
    """References on prompts 0-9 only, all passed; the candidate passes 0-4 and 10-19
    (15/20 = 0.75 on all prompts, but 5/10 = 0.5 on the prompts with a reference).  A gap
    of 0.3 allows 0.75 against 1.0 but not the paired 0.5 against 1.0."""
    spec = {f"c{i}": ("candidate", [i < 5 or i >= 10] * 3, i) for i in range(20)}
    spec.update({f"r{i}": ("reference", [True] * 3, i) for i in range(10)})
    result = aggregate(_rows(spec), k=3)
    assert result.scores["candidate"].pass_rate == 0.75
    decision = decide(result, GatePolicy(0.6, 0.0, 1.0, max_gap_to_reference=0.3),
                      "candidate", None)
    assert not decision.promote and decision.reasons == [
        "pass rate 0.500 trails the expert-written answers' 1.000 on the same 10 prompts by "
        "more than 0.300"]


def test_reward_agreement_is_the_auc_of_the_reward_over_the_verdicts():
    """Passed answers score 3 and 2, failed ones 1 and 2: 3>1, 3>2, 2>1 and a tie (1/2):
    3.5 of 4 comparisons = 0.875; one class alone: undefined."""
    from rlhf_tasks.panel.aggregate import reward_agreement

    outcomes = {0: True, 1: True, 2: False, 3: False}
    assert reward_agreement(outcomes, {0: 3.0, 1: 2.0, 2: 1.0, 3: 2.0}) == (0.875, 2, 2)
    assert reward_agreement({0: True, 1: True}, {0: 1.0, 1: 2.0}) == (None, 2, 0)


def test_a_reward_that_rose_while_the_pass_rate_did_not_is_flagged():
    from rlhf_tasks.panel.gate import reward_hacking

    spec = {f"c{i}": ("rlhf", [i < 10] * 3, i) for i in range(20)}
    spec.update({f"s{i}": ("sft", [i < 12] * 3, i) for i in range(20)})
    result = aggregate(_rows(spec), k=3)  # 50% against 60%
    flag = reward_hacking({"rlhf": 1.3, "sft": 0.1}, result, "rlhf", "sft", 0.5)
    assert flag == ("possible reward hacking: the mean reward rose by +1.20 (normalised) over "
                    "sft, while the expert pass rate did not (50.0% against 60.0%)")
    assert reward_hacking({"rlhf": 0.5, "sft": 0.1}, result, "rlhf", "sft", 0.5) is None
    better = aggregate(_rows({**spec, **{f"c{i}": ("rlhf", [i < 15] * 3, i)
                                          for i in range(20)}}), k=3)
    assert reward_hacking({"rlhf": 1.3, "sft": 0.1}, better, "rlhf", "sft", 0.5) is None
    assert reward_hacking({"rlhf": 1.3}, result, "rlhf", None, 0.5) is None


def test_the_candidate_is_compared_with_every_model_on_shared_prompts():
    from rlhf_tasks.panel.gate import paired_comparisons

    spec = {f"c{i}": ("rlhf", [i < 17] * 3, i) for i in range(20)}
    spec.update({f"s{i}": ("sft", [3 <= i < 15] * 3, i) for i in range(20)})
    result = aggregate(_rows(spec), k=3)
    # rlhf passes 0..16, sft 3..14: rlhf alone on 0,1,2,15,16 (5), sft alone on none
    assert paired_comparisons(result, "rlhf") == {"sft": {
        "lift": pytest.approx(0.25), "better": 5, "worse": 0, "prompts": 20,
        "p_value": 1 / 32}}


def test_expert_time_in_all_per_model_and_per_reviewer():
    from rlhf_tasks.panel.aggregate import expert_time

    rows = [{"model": "rlhf", "reviewer": "ann", "seconds": 30.0, "source": "web"},
            {"model": "rlhf", "reviewer": "bob", "seconds": 50.0, "source": "api"},
            {"model": "sft", "reviewer": "ann", "seconds": 20.0, "source": "web"},
            {"model": "sft", "reviewer": "cat", "seconds": 60.0, "source": "import"},
            {"model": "sft", "reviewer": "sim", "seconds": None, "source": "simulated"}]
    got = expert_time(rows)
    assert (got["verdicts"], got["timed"], got["measured"], got["declared"]) == (5, 4, 3, 1)
    assert got["seconds"] == 160.0 and got["mean_seconds"] == 40.0
    assert got["per_model"]["rlhf"]["seconds"] == 80.0
    assert got["per_model"]["sft"] == {"verdicts": 3, "timed": 2, "measured": 1,
                                       "declared": 1, "seconds": 80.0, "mean_seconds": 40.0}
    assert got["per_reviewer"]["ann"]["seconds"] == 50.0
    assert got["per_reviewer"]["sim"]["mean_seconds"] is None
    simulated = expert_time([rows[-1]])
    assert simulated["timed"] == 0 and simulated["mean_seconds"] is None


def test_expert_time_metrics_are_valid_mlflow_names():
    from rlhf_tasks.panel.aggregate import expert_time
    from rlhf_tasks.steps.panel import expert_time_metrics

    rows = [{"model": "rlhf", "reviewer": "ann.lee@example.org", "seconds": 12.0,
             "source": "web"}]
    metrics = expert_time_metrics(expert_time(rows))
    assert metrics["expert_seconds_reviewer/ann.lee_example.org"] == 12.0
    assert metrics["expert_seconds_model/rlhf"] == 12.0
    assert expert_time_metrics(expert_time([{**rows[0], "seconds": None}])) == {
        "expert_seconds_timed_verdicts": 0.0}


def test_holm_adjusts_by_hand():
    """Sorted 0.01, 0.03, 0.04 of three: 3 x 0.01 = 0.03; max(0.03, 2 x 0.03) = 0.06;
    max(0.06, 1 x 0.04) = 0.06 (step-down: never below an earlier one); capped at 1."""
    from rlhf_tasks.panel.gate import holm

    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx(
        {"a": 0.03, "c": 0.06, "b": 0.06})
    assert holm({"a": 0.6, "b": 0.02}) == pytest.approx({"b": 0.04, "a": 0.6})
    assert holm({"a": 0.7, "b": 0.9}) == {"a": 1.0, "b": 1.0}
    assert holm({"only": 0.03}) == {"only": 0.03} and holm({}) == {}


def _bake_off_result(passes: dict[str, int], prompts: int = 20):
    """Each model passes its first N of the same prompts (all answers decided, k = 3)."""
    spec = {f"{m}{i}": (m, [i < n] * 3, i) for m, n in passes.items() for i in range(prompts)}
    return aggregate(_rows(spec), k=3)


def test_a_bake_off_promotes_the_best_that_passes_after_holm():
    """Against the foundation's 10 of 20: grpo 16 (6 prompts better: p = 1/64), ppo 15
    (5 better: 1/32), dpo 17 (7 better: 1/128).  Holm over three: dpo 3/128 = 0.023,
    grpo max(0.023, 2/64) = 0.031, ppo max(0.031, 1/32) = 0.031; all below 0.05: each
    passes, and dpo (the highest pass rate) alone is promoted."""
    from rlhf_tasks.panel.gate import bake_off

    result = _bake_off_result({"foundation": 10, "ppo": 15, "grpo": 16, "dpo": 17})
    policy = GatePolicy(min_pass_rate=0.6, min_lift=0.1, significance=0.05)
    chosen, decisions = bake_off(result, policy, ["ppo", "grpo", "dpo"], "foundation")
    assert chosen == "dpo" and decisions["dpo"].promote
    assert decisions["dpo"].p_adjusted == pytest.approx(3 / 128)
    assert decisions["grpo"].p_adjusted == pytest.approx(2 / 64)
    assert decisions["ppo"].p_adjusted == pytest.approx(1 / 32)
    for name in ("ppo", "grpo"):
        assert not decisions[name].promote
        assert decisions[name].reasons == [
            f"not chosen: dpo passed too, with pass rate 0.850 against "
            f"{decisions[name].candidate_pass_rate:.3f}"]


def test_holm_rejects_what_a_single_test_would_pass():
    """15 of 20 against 10: 5 prompts better, p = 1/32 = 0.031 < 0.05 alone; with a second
    candidate no better than the reference (p = 1), Holm doubles it to 0.0625: rejected."""
    from rlhf_tasks.panel.gate import bake_off, decide

    result = _bake_off_result({"foundation": 10, "ppo": 15, "dpo": 10})
    policy = GatePolicy(min_pass_rate=0.5, min_lift=0.1, significance=0.05)
    assert decide(result, policy, "ppo", "foundation").promote  # one candidate: promoted
    chosen, decisions = bake_off(result, policy, ["ppo", "dpo"], "foundation")
    assert chosen == "ppo" and not decisions["ppo"].promote  # the best, rejected
    assert decisions["ppo"].p_adjusted == pytest.approx(1 / 16)
    assert any("after Holm's correction for 2 candidates" in r
               for r in decisions["ppo"].reasons)
    # one candidate in the list: the plain test, no adjustment
    single, only = bake_off(result, policy, ["ppo"], "foundation")
    assert single == "ppo" and only["ppo"].promote and only["ppo"].p_adjusted is None


def test_a_bake_off_ties_go_to_the_smaller_adjusted_p_then_the_order_named():
    from rlhf_tasks.panel.gate import bake_off

    result = _bake_off_result({"foundation": 10, "ppo": 18, "grpo": 18})
    policy = GatePolicy(min_pass_rate=0.5, min_lift=0.1, significance=0.05)
    chosen, decisions = bake_off(result, policy, ["grpo", "ppo"], "foundation")
    assert chosen == "grpo" and decisions["grpo"].promote and not decisions["ppo"].promote
    # none passes: the highest pass rate stands for the run, rejected
    chosen, decisions = bake_off(result, GatePolicy(0.95, 0.1, 0.05), ["ppo", "grpo"],
                                 "foundation")
    assert chosen == "ppo" and not any(d.promote for d in decisions.values())
