"""Each model is judged as it was trained and is served: a champion registered in chat
format answers in chat format with its own instruction and decoding, while this run's
candidate uses a template; neither borrows the other's form."""

from __future__ import annotations

from rlhf_tasks.prompting import PromptRenderer
from tests.hf_families import build_checkpoint

PROMPTS = ["Rewrite: helped with payroll", "Rewrite: wrote weekly reports"]


def test_a_chat_champion_answers_in_its_own_form_beside_a_template_candidate(tmp_path):
    import pandas as pd
    from transformers import AutoModelForCausalLM

    from rlhf_tasks import serving, training
    from rlhf_tasks.generation import generate
    from rlhf_tasks.models import load_tokenizer_from
    from rlhf_tasks.steps.evaluate import ServedForm, served_form

    model_dir = build_checkpoint("qwen2", tmp_path / "qwen2")
    tokenizer = load_tokenizer_from(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    champion_renderer = PromptRenderer(tokenizer, "chat", "You are the champion.")
    served = serving.save_policy_model(
        tmp_path / "champion", model, tokenizer, champion_renderer,
        {"temperature": 0.3, "max_new_tokens": 5, "stop_ids": "", "seed": 0})

    # this run's form: a plain template, another instruction, other decoding
    run_renderer = PromptRenderer(tokenizer, "template", "Candidate instruction.",
                                  "Q: {instruction} {prompt}\nA:")
    run_form = ServedForm(tokenizer, run_renderer, 0.9, 7, False)

    form = served_form(served, run_form)
    assert form.recorded and form.renderer.format == "chat"
    assert (form.temperature, form.max_new_tokens) == (0.3, 5)
    frame = pd.DataFrame({"prompt": PROMPTS})
    own = training.encode_prompts(form.renderer, frame)
    text = tokenizer.decode(own[0])
    assert "<|im_start|>system\nYou are the champion." in text and "Q:" not in text
    assert served_form(None, run_form) is run_form  # this run's models keep this run's form
    run_text = tokenizer.decode(training.encode_prompts(run_form.renderer, frame)[0])
    assert run_text.startswith("Q: Candidate instruction.") and "<|im_start|>" not in run_text

    answers, _ = generate(model, form.tokenizer, form.renderer, own, device="cpu",
                          temperature=form.temperature, max_new_tokens=form.max_new_tokens,
                          seed=0)
    assert all(len(a) <= 5 for a in answers)
    assert form.describe()["source"] == "recorded with the model"
