"""The benefit and cost of automation: what the tuned model costs and gains against the
experts writing the answers themselves (the case study's next step).

Inputs are measured where the pipeline can measure them and configured where it cannot,
and every figure says which:

* compute: each step's device-hours (``rlhf_tasks.compute``), **measured**, priced at
  the admin's ``cost.gpu_hour`` / ``cost.cpu_hour``;
* the panel's time: the verdicts' seconds (served to verdict, capped), **measured**, at
  ``cost.expert_hour``; a simulated panel has none, and says so;
* preference labelling: ``cost.labelling_per_pair`` × the validated pairs, **declared**;
* an expert writing one answer: ``cost.reference_minutes``, **configured**;
* a model writing one answer: evaluate's inference time per answer × the devices it
  held, **measured**.

Per run, the tuning cost (the training steps' compute and the labelling) and the
evaluation cost (evaluate's compute and the panel's time).  Per model, the cost of 1,000
answers against the experts' own, the benefit in pass-rate points against the experts'
own answers (when the batch had them), and for the candidate the break-even volume: the
answers after which tuning and evaluating it cost less than having experts write them.
An input the admin did not price leaves the figures that need it empty ("not priced").
"""

from __future__ import annotations

from rlhf_tasks.panel.gate import CANDIDATE

TUNING_STEPS = ("validate_preference", "validate_prompt", "validate_eval", "validate_sft",
                "reward", "sft")  # and the candidates' training (``trained``)
EVALUATION_STEPS = ("evaluate", "panel_simulate")
PER = 1000  # answers, for the per-volume figures


def _rate(cost_cfg, device: str) -> float | None:
    return cost_cfg.gpu_hour if device == "gpu" else cost_cfg.cpu_hour


def _compute_cost(cost_cfg, records: list[dict]) -> tuple[float | None, float]:
    """(price or None when a needed rate is not set, device-hours) of step records."""
    hours = sum(r["device_hours"] for r in records)
    prices = [_rate(cost_cfg, r["device"]) for r in records]
    if any(p is None for p in prices):
        return None, hours
    return sum(r["device_hours"] * p for r, p in zip(records, prices)), hours


def _add(*parts: float | None) -> float | None:
    return None if any(p is None for p in parts) else sum(parts)


def benefit_and_cost(cost_cfg, *, compute: dict[str, dict], expert_time: dict,
                     evaluation: dict, pass_rates: dict[str, float],
                     preference_pairs: int | None, candidate: str = CANDIDATE,
                     trained: tuple[str, ...] | list[str] = ("ppo",),
                     expert_label: str = "reference") -> dict:
    """The run's figures (see the module); every money figure is None when not priced.
    ``trained``: the compute records of the candidates' training (a bake-off trains
    several, and its tuning cost is all of them); ``candidate``: the one whose break-even
    is reported."""
    tuning_records = [compute[s] for s in (*TUNING_STEPS, *trained) if s in compute]
    eval_records = [compute[s] for s in EVALUATION_STEPS if s in compute]
    tuning_compute, tuning_hours = _compute_cost(cost_cfg, tuning_records)
    eval_compute, eval_hours = _compute_cost(cost_cfg, eval_records)
    labelling = (None if cost_cfg.labelling_per_pair is None or preference_pairs is None
                 else cost_cfg.labelling_per_pair * preference_pairs)
    timed = expert_time.get("timed", 0)
    panel_hours = expert_time.get("seconds", 0.0) / 3600.0
    panel = (None if cost_cfg.expert_hour is None or not timed
             else panel_hours * cost_cfg.expert_hour)
    tuning = _add(tuning_compute, 0.0 if cost_cfg.labelling_per_pair is None else labelling)
    evaluation_cost = _add(eval_compute, panel if timed else 0.0)

    # the experts' minutes per answer: measured in the eval data when it says, else the
    # admin's figure
    written = evaluation.get("reference_minutes") or None
    minutes = written["mean"] if written else cost_cfg.reference_minutes
    minutes_source = (f"measured: reference_minutes of {written['rows']} eval rows"
                      if written else "configured (cost.reference_minutes)")
    expert_per_answer = (None if minutes is None or cost_cfg.expert_hour is None
                         else minutes / 60.0 * cost_cfg.expert_hour)
    device = (compute.get("evaluate") or {}).get("device", "cpu")
    devices = (compute.get("evaluate") or {}).get("devices", 1)
    rate = _rate(cost_cfg, device)
    expert_rate = pass_rates.get(expert_label)
    models = {}
    for label, metrics in (evaluation.get("metrics") or {}).items():
        if label == expert_label or "seconds_per_answer" not in metrics:
            continue
        per_answer = (None if rate is None
                      else metrics["seconds_per_answer"] * devices / 3600.0 * rate)
        models[label] = {
            "seconds_per_answer": metrics["seconds_per_answer"],
            "cost_per_1000": None if per_answer is None else per_answer * PER,
            "pass_rate": pass_rates.get(label),
            "points_vs_experts": (None if expert_rate is None or label not in pass_rates
                                  else (pass_rates[label] - expert_rate) * 100.0)}
    break_even = None
    cand = models.get(candidate)
    if cand and cand["cost_per_1000"] is not None and expert_per_answer is not None:
        saving = expert_per_answer - cand["cost_per_1000"] / PER
        one_off = _add(tuning, evaluation_cost)
        if one_off is not None and saving > 0:
            break_even = one_off / saving
    return {
        "currency": cost_cfg.currency,
        "tuning": {"compute": tuning_compute, "device_hours": tuning_hours,
                   "labelling": labelling, "total": tuning,
                   "source": "measured compute" + (", declared labelling"
                                                   if labelling is not None else "")},
        "evaluation": {"compute": eval_compute, "device_hours": eval_hours, "panel": panel,
                       "panel_hours": panel_hours, "timed_verdicts": timed,
                       "total": evaluation_cost,
                       "source": "measured compute" + (", measured panel time" if timed
                                                       else "; no expert time (simulated "
                                                            "or untimed panel)")},
        "experts": {"cost_per_1000": (None if expert_per_answer is None
                                      else expert_per_answer * PER),
                    "minutes_per_answer": minutes,
                    "pass_rate": expert_rate, "source": minutes_source},
        "models": models,
        "break_even_answers": break_even,
    }


def _money(value: float | None, currency: str) -> str:
    return "not priced" if value is None else f"{value:,.2f} {currency}"


def text_table(figures: dict) -> str:
    """The "Benefit and cost" table as text (the demo's output, logs)."""
    c = figures["currency"]
    t, e, x = figures["tuning"], figures["evaluation"], figures["experts"]
    lines = ["Benefit and cost",
             f"  tuning      {_money(t['total'], c):>18}  ({t['device_hours']:.3f} device-hours; "
             f"{t['source']})",
             f"  evaluation  {_money(e['total'], c):>18}  ({e['device_hours']:.3f} device-hours, "
             f"{e['panel_hours'] * 60:.1f} expert minutes; {e['source']})",
             f"  {'model':<12}{'s/answer':>9} {'per 1,000 answers':>18} {'pass rate':>9} "
             f"{'vs experts':>11}"]
    for label, m in figures["models"].items():
        points = "" if m["points_vs_experts"] is None else f"{m['points_vs_experts']:+.1f} pts"
        rate = "" if m["pass_rate"] is None else f"{m['pass_rate']:.1%}"
        lines.append(f"  {label:<12}{m['seconds_per_answer']:9.3f} "
                     f"{_money(m['cost_per_1000'], c):>18} {rate:>9} {points:>11}  (measured)")
    expert_rate = "" if x["pass_rate"] is None else f"{x['pass_rate']:.1%}"
    lines.append(f"  {'experts':<12}{'':9} {_money(x['cost_per_1000'], c):>18} "
                 f"{expert_rate:>9} {'':>11}  ({x['source']})")
    volume = figures["break_even_answers"]
    lines.append("  break-even: " + ("not priced, or the model does not cost less per answer"
                                     if volume is None else
                                     f"after {volume:,.0f} answers the tuned model costs less "
                                     "than experts writing them"))
    return "\n".join(lines)


def headline(figures: dict, candidate: str = CANDIDATE) -> str:
    """One line for the run's note: the run's costs, the candidate's per 1,000 answers
    against the experts', the break-even volume (only what is priced)."""
    c = figures["currency"]
    parts = []
    for name in ("tuning", "evaluation"):
        if figures[name]["total"] is not None:
            parts.append(f"{name} {_money(figures[name]['total'], c)}")
    model = figures["models"].get(candidate) or {}
    if model.get("cost_per_1000") is not None:
        experts = figures["experts"]["cost_per_1000"]
        parts.append(f"{candidate} {_money(model['cost_per_1000'], c)} per 1,000 answers"
                     + ("" if experts is None else f" (experts {_money(experts, c)})"))
    if figures["break_even_answers"] is not None:
        parts.append(f"break-even after {figures['break_even_answers']:,.0f} answers")
    return "; ".join(parts) if parts else "not priced (cost.* unset)"


def metrics(figures: dict) -> dict[str, float]:
    """``cost/*`` metrics (money in the configured currency; only what is priced)."""
    out = {"tuning_device_hours": figures["tuning"]["device_hours"],
           "evaluation_device_hours": figures["evaluation"]["device_hours"],
           "panel_hours": figures["evaluation"]["panel_hours"]}
    for name, value in (("tuning", figures["tuning"]["total"]),
                        ("evaluation", figures["evaluation"]["total"]),
                        ("experts_per_1000", figures["experts"]["cost_per_1000"]),
                        ("break_even_answers", figures["break_even_answers"])):
        if value is not None:
            out[name] = value
    for label, m in figures["models"].items():
        out[f"{label}/seconds_per_answer"] = m["seconds_per_answer"]
        if m["cost_per_1000"] is not None:
            out[f"{label}/per_1000"] = m["cost_per_1000"]
        if m["points_vs_experts"] is not None:
            out[f"{label}/points_vs_experts"] = m["points_vs_experts"]
    return out
