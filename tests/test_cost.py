"""The benefit-and-cost figures (panel/cost.py), by hand on small numbers."""

from __future__ import annotations

import pytest

from rlhf_tasks import config
from rlhf_tasks.panel.cost import benefit_and_cost, metrics, text_table

PRICES = {"currency": "EUR", "cpu_hour": 0.04, "gpu_hour": 2.5, "expert_hour": 60.0,
          "reference_minutes": 4.0, "labelling_per_pair": 0.1}
COMPUTE = {
    "validate_preference": {"step": "validate_preference", "device": "cpu", "devices": 2,
                            "device_hours": 0.01},
    "reward": {"step": "reward", "device": "gpu", "devices": 1, "device_hours": 0.5},
    "ppo": {"step": "ppo", "device": "gpu", "devices": 1, "device_hours": 1.0},
    "evaluate": {"step": "evaluate", "device": "gpu", "devices": 1, "device_hours": 0.2},
    "gate": {"step": "gate", "device": "cpu", "devices": 2, "device_hours": 0.001},
}
EVALUATION = {"metrics": {"rlhf": {"seconds_per_answer": 0.36},
                          "foundation": {"seconds_per_answer": 0.72},
                          "reference": {"reward_mean": 0.1}}}
RATES = {"rlhf": 0.85, "foundation": 0.55, "reference": 0.90}


def _cost(**prices):
    return config.validate({"cost": {**PRICES, **prices}}).cost


def test_every_figure_by_hand():
    figures = benefit_and_cost(_cost(), compute=COMPUTE,
                               expert_time={"timed": 10, "seconds": 1800.0},
                               evaluation=EVALUATION, pass_rates=RATES, preference_pairs=4000)
    # tuning: 0.5 h + 1.0 h of GPU at 2.5, 0.01 core-hours at 0.04, 4,000 pairs at 0.10
    assert figures["tuning"]["compute"] == pytest.approx(1.25 + 2.5 + 0.0004)
    assert figures["tuning"]["labelling"] == pytest.approx(400.0)
    assert figures["tuning"]["total"] == pytest.approx(403.7504)
    # evaluation: 0.2 GPU-hours, and half an hour of the panel at 60 (the gate's own step
    # is in neither)
    assert figures["evaluation"]["panel"] == pytest.approx(30.0)
    assert figures["evaluation"]["total"] == pytest.approx(30.5)
    # answers: 0.36 s of one GPU at 2.5/h = 0.00025 each; an expert's 4 minutes at 60/h = 4
    assert figures["models"]["rlhf"]["cost_per_1000"] == pytest.approx(0.25)
    assert figures["models"]["foundation"]["cost_per_1000"] == pytest.approx(0.5)
    assert figures["experts"]["cost_per_1000"] == pytest.approx(4000.0)
    assert "reference" not in figures["models"]
    # benefit: pass-rate points against the experts' own answers (90%)
    assert figures["models"]["rlhf"]["points_vs_experts"] == pytest.approx(-5.0)
    assert figures["models"]["foundation"]["points_vs_experts"] == pytest.approx(-35.0)
    # break-even: (tuning + evaluation) / (expert - model) per answer
    assert figures["break_even_answers"] == pytest.approx(434.2504 / 3.99975)
    got = metrics(figures)
    assert got["tuning"] == pytest.approx(403.7504) and got["rlhf/per_1000"] == pytest.approx(0.25)
    assert got["break_even_answers"] == pytest.approx(108.569, abs=1e-3)
    from rlhf_tasks.panel.cost import headline

    assert headline(figures) == ("tuning 403.75 EUR; evaluation 30.50 EUR; rlhf 0.25 EUR per "
                                 "1,000 answers (experts 4,000.00 EUR); break-even after 109 "
                                 "answers")
    table = text_table(figures)
    assert "403.75 EUR" in table and "after 109 answers" in table
    assert "configured (cost.reference_minutes)" in table and "(measured)" in table


def test_the_experts_minutes_come_from_the_eval_data_when_it_says():
    figures = benefit_and_cost(_cost(), compute=COMPUTE, expert_time={"timed": 0},
                               evaluation={**EVALUATION,
                                           "reference_minutes": {"rows": 3, "mean": 6.0}},
                               pass_rates=RATES, preference_pairs=None)
    # 6 minutes at 60 an hour: 6.00 an answer, 6,000 per 1,000
    assert figures["experts"]["cost_per_1000"] == pytest.approx(6000.0)
    assert figures["experts"]["source"] == "measured: reference_minutes of 3 eval rows"


def test_unpriced_and_simulated_say_so():
    """No prices: nothing is priced, and the table says so; a simulated panel has no
    expert time: the evaluation's cost is its compute alone, labelled."""
    unpriced = benefit_and_cost(config.PipelineConfig().cost, compute=COMPUTE,
                                expert_time={"timed": 0, "seconds": 0.0},
                                evaluation=EVALUATION, pass_rates=RATES,
                                preference_pairs=4000)
    assert unpriced["tuning"]["total"] is None and unpriced["break_even_answers"] is None
    assert unpriced["tuning"]["device_hours"] == pytest.approx(1.51)
    assert "not priced" in text_table(unpriced)
    assert set(metrics(unpriced)) == {"tuning_device_hours", "evaluation_device_hours",
                                      "panel_hours", "rlhf/seconds_per_answer",
                                      "foundation/seconds_per_answer",
                                      "rlhf/points_vs_experts", "foundation/points_vs_experts"}
    simulated = benefit_and_cost(_cost(), compute=COMPUTE,
                                 expert_time={"timed": 0, "seconds": 0.0},
                                 evaluation=EVALUATION, pass_rates=RATES,
                                 preference_pairs=4000)
    assert simulated["evaluation"]["total"] == pytest.approx(0.5)
    assert "no expert time" in simulated["evaluation"]["source"]
    # a model that costs more per answer than an expert never breaks even
    dear = benefit_and_cost(_cost(reference_minutes=0.001), compute=COMPUTE,
                            expert_time={"timed": 0, "seconds": 0.0},
                            evaluation=EVALUATION, pass_rates=RATES, preference_pairs=None)
    assert dear["break_even_answers"] is None and dear["tuning"]["labelling"] is None


def test_prices_are_validated():
    from rlhf_tasks.errors import BadInput

    for field, bad in (("currency", "dollars"), ("gpu_hour", -1), ("reference_minutes", 0)):
        with pytest.raises(BadInput, match=f"config field 'cost.{field}'"):
            config.validate({"cost": {field: bad}})
