"""The demo rubric against hand-written bullets, and the demo data's promises."""

import json
import random

from rlhf_tasks.demo import domain, rubric

PROMPT = "i was responsible for the payroll system and errors went down about 35 percent"


def test_strong_bullet_passes():
    v = rubric.judge(PROMPT, "Automated payroll system, cutting errors by 35%")
    assert v.passed and v.failed_checks == []


def test_each_flaw_fails_its_check():
    cases = {
        "Responsible for the payroll system, cutting errors by 35%": ["strong_verb"],
        "Automated payroll system, cutting errors a lot": ["quantified", "keeps_facts"],
        "Automated payroll system, cutting errors by 40%": ["keeps_facts"],
        "Automated sales team, cutting errors by 35%": ["keeps_facts"],
        "I automated the payroll system, cutting errors by 35%": ["strong_verb", "no_first_person"],
        "Automated payroll system, cutting errors by 35%, which was a really great result "
        "for the whole team": ["concise"],
        "Automated payroll system, cutting errors by 35% and 10%": ["keeps_facts"],
        "": ["strong_verb", "quantified", "keeps_facts"],
    }
    for text, failed in cases.items():
        assert rubric.judge(PROMPT, text).failed_checks == failed, text


def test_facts_read_back_from_prompt():
    assert rubric.facts(PROMPT) == ("payroll system", "35")


def test_generated_answers_match_their_labels():
    rng = random.Random(0)
    for _ in range(300):
        case = domain.sample_case(rng)
        assert rubric.judge(case.prompt, domain.strong_answer(case, rng)).passed
        for flaw in domain.FLAWS:
            assert not rubric.judge(case.prompt, domain.flawed_answer(case, rng, flaw)).passed, flaw


def test_pass_rate():
    assert rubric.pass_rate([PROMPT, PROMPT], ["Automated payroll system, cutting errors by 35%",
                                               "helped"]) == 0.5


def test_demo_data_is_deterministic_and_separated(demo_dir, tmp_path):
    from rlhf_tasks.demo.assets import build_datasets

    first = build_datasets(tmp_path, random.Random(1234))
    again = (tmp_path / "eval.jsonl").read_text()
    build_datasets(tmp_path, random.Random(1234))
    assert (tmp_path / "eval.jsonl").read_text() == again
    eval_prompts = {json.loads(l)["prompt"] for l in open(tmp_path / "eval.jsonl")}
    train = {json.loads(l)["prompt"] for l in open(tmp_path / "prompts.jsonl")}
    assert len(eval_prompts) == first["eval"] == 200 and not eval_prompts & train
    prefs = [l for l in open(tmp_path / "preferences.jsonl")]
    assert len(prefs) == first["preference_rows"] == 4010


def test_annotators_do_not_check_the_figure_the_panel_checks():
    """The preference annotators are not the panel: a bullet with a made-up number looks
    as good to them as the strong one; the rubric fails it.  Other flaws they see."""
    from rlhf_tasks.demo import annotators

    strong = "Automated payroll system, cutting errors by 35%"
    wrong_figure = "Automated payroll system, cutting errors by 50%"
    assert annotators.seen_flaws(PROMPT, strong) == 0
    assert annotators.seen_flaws(PROMPT, wrong_figure) == 0
    assert not rubric.judge(PROMPT, wrong_figure).passed
    assert annotators.seen_flaws(PROMPT, "Automated sales team, cutting errors by 35%") == 1
    assert annotators.seen_flaws(PROMPT, "Responsible for the payroll system, cutting errors "
                                         "by 35%") == 1
    rng = random.Random(0)
    quiet = annotators.Annotator("a", noise=0.0)
    assert quiet.prefer(PROMPT, strong, wrong_figure, rng) is None
    assert quiet.prefer(PROMPT, "Worked on the payroll system", strong, rng) == (
        strong, "Worked on the payroll system")
    noisy = annotators.Annotator("b", noise=1.0)
    assert noisy.prefer(PROMPT, strong, "Worked on the payroll system", rng) == (
        "Worked on the payroll system", strong)


def test_the_demo_preferences_are_the_annotators_not_the_panels(tmp_path):
    """Built from the annotators' view: most pairs agree with the panel's rubric, but some
    prefer a bullet the panel fails to one it passes (their noise and the unchecked figure),
    so the reward model cannot simply learn the panel's rule."""
    from rlhf_tasks.demo.assets import build_datasets

    build_datasets(tmp_path, random.Random(1234))
    pairs = []
    for line in open(tmp_path / "preferences.jsonl"):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if {"prompt", "chosen", "rejected"} <= set(row) and row["prompt"].strip():
            pairs.append(row)
    flaws = [(len(rubric.judge(r["prompt"], r["chosen"]).failed_checks),
              len(rubric.judge(r["prompt"], r["rejected"]).failed_checks)) for r in pairs]
    agree = sum(c < r for c, r in flaws) / len(flaws)
    against_panel = sum(1 for r in pairs if not rubric.judge(r["prompt"], r["chosen"]).passed
                        and rubric.judge(r["prompt"], r["rejected"]).passed)
    assert 0.7 < agree < 0.97, agree
    assert against_panel > 40, against_panel
