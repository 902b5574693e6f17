"""The prompt renderer's rules, by hand (the chat-template families: test_architectures.py)."""

from __future__ import annotations

import pytest

from rlhf_tasks import config
from rlhf_tasks.errors import BadInput
from rlhf_tasks.prompting import PromptRenderer


def test_template_format_places_instruction_system_and_turns(tokenizer):
    renderer = PromptRenderer(tokenizer, "auto", "Be brief.", "{instruction}\n---\n{prompt}\n>",
                              " ")
    assert renderer.format == "template"  # the demo tokenizer has no chat template
    assert renderer.prompt_text("  fix this  ") == "Be brief.\n---\nfix this\n>"
    conversation = [{"role": "system", "content": "You edit CVs."},
                    {"role": "user", "content": "draft"}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "shorter"}]
    # the data's system message joins the instruction; the turns stay, role-labelled
    assert renderer.prompt_text("", conversation) == (
        "Be brief.\n\nYou edit CVs.\n---\nuser: draft\nassistant: ok\nuser: shorter\n>")
    # no instruction: the template's leading separator goes
    bare = PromptRenderer(tokenizer, "template", "", "{instruction}\n\n{prompt}\n")
    assert bare.prompt_text("q") == "q\n"
    # BOS first, then the text; the response: prefix + text + EOS
    ids = renderer.prompt_ids("fix this")
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == \
        "Be brief.\n---\nfix this\n>"
    response = renderer.response_ids(" Led a team ")
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == " Led a team"


def test_responses_are_cut_after_the_first_stop_token(tokenizer):
    renderer = PromptRenderer(tokenizer, "template", model_eos_ids=[7])
    eos = tokenizer.eos_token_id
    assert renderer.stop_ids == [eos, 7]
    assert renderer.split_response([40, 41, 7, 42, eos]) == ([40, 41, 7], True)
    assert renderer.split_response([40, 41]) == ([40, 41], False)
    assert renderer.response_text([40, 41, 7]) == tokenizer.decode([40, 41]).strip()


@pytest.mark.parametrize("template,reason", [
    ("{instruction} only", "must contain {prompt}"),
    ("{prompt} for {user}", "unknown placeholder"),
    ("{prompt", "not a valid template"),
])
def test_config_refuses_a_bad_template(template, reason):
    with pytest.raises(BadInput, match=f"model.prompt_template.*{reason}"):
        config.validate({"model": {"prompt_template": template}})


def test_chat_format_needs_a_chat_template(tokenizer):
    with pytest.raises(BadInput, match="no chat template"):
        PromptRenderer(tokenizer, "chat")
