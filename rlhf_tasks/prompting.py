"""How a dataset prompt becomes model input: one renderer for every step and for serving.

``model.prompt_format``:

* ``chat``: the tokenizer's own chat template (``apply_chat_template`` with
  ``add_generation_prompt=True``).  ``model.instruction`` becomes the system message when
  the template has a system role, otherwise it is prepended to the first user turn.  A
  conversation keeps its turns.  A response ends with the template's end-of-turn token
  (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>`` ...), found by rendering a sample turn.
* ``template``: ``model.prompt_template`` with ``{instruction}`` and ``{prompt}``; the
  response is ``model.response_prefix`` + the text, ended by the tokenizer's EOS.
* ``auto`` (default): ``chat`` when the tokenizer has a chat template, else ``template``.

Token layout everywhere (reward, SFT, PPO, evaluate, the served model):
``prompt_ids(prompt) + response_ids(response)``, so the reward model scores exactly the
token sequence PPO generates (PPO's sampled tokens end with the same stop token).

Generation stops at every EOS id the checkpoint declares (``config.json`` and
``generation_config.json``; Llama 3 has several), the tokenizer's EOS and the template's
end-of-turn token: :attr:`PromptRenderer.stop_ids`.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_tasks.errors import BadInput

SETTINGS_FILE = "prompt_format.json"
_PROBE = "\u2063probe-7f3a\u2063"  # a string no template adds or changes
TEMPLATE_FIELDS = {"instruction", "prompt"}


def check_template(template: str) -> None:
    """ValueError unless ``template`` is a format string using only {instruction}/{prompt}
    and using {prompt}."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write literal braces as {{{{ }}}}") from None
    unknown = names - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; use {{instruction}} and "
                         "{prompt}")
    if "prompt" not in names:
        raise ValueError("the template must contain {prompt}")


def render_turns(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text: a lone user turn as is, else role-labelled turns."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def parse_messages(value: Any) -> list[dict[str, str]] | None:
    """The ``messages`` column of canonical data (a JSON string, or None for plain text)."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return json.loads(value) if isinstance(value, str) else list(value)


def checkpoint_eos_ids(folder: str | Path | None) -> list[int]:
    """Every EOS id a checkpoint folder declares (config.json, generation_config.json)."""
    ids: list[int] = []
    if folder is None:
        return ids
    for name in ("generation_config.json", "config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        for i in (value if isinstance(value, list) else [value]):
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


@dataclass
class PromptRenderer:
    tokenizer: Any
    format: str                      # "chat" | "template"
    instruction: str = ""
    template: str = "{instruction}\n\n{prompt}\n"
    response_prefix: str = ""
    model_eos_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        tok = self.tokenizer
        if self.format == "auto":
            self.format = "chat" if getattr(tok, "chat_template", None) else "template"
        if self.format == "chat" and not getattr(tok, "chat_template", None):
            raise BadInput("model.prompt_format is 'chat' but the tokenizer has no chat "
                           "template; use 'template' with model.prompt_template",
                           field="model.prompt_format")
        if self.format == "template":
            try:
                check_template(self.template)
            except ValueError as exc:
                raise BadInput(str(exc), field="model.prompt_template") from None
        if tok.eos_token_id is None:
            raise BadInput("the tokenizer has no EOS token, so responses cannot end",
                           field="model.tokenizer")
        self.system_role = self.format == "chat" and self._has_system_role()
        self.end_id = self._end_of_turn() if self.format == "chat" else tok.eos_token_id
        stops = [self.end_id, tok.eos_token_id, *self.model_eos_ids]
        self.stop_ids: list[int] = list(dict.fromkeys(i for i in stops if i is not None))

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg, tokenizer, model_dir: str | Path | None = None) -> "PromptRenderer":
        m = cfg.model
        return cls(tokenizer, m.prompt_format, m.instruction, m.prompt_template,
                   m.response_prefix, checkpoint_eos_ids(model_dir))

    def settings(self) -> dict:
        """What a served model needs to render prompts as training did (saved as JSON)."""
        return {"format": self.format, "instruction": self.instruction,
                "template": self.template, "response_prefix": self.response_prefix,
                "model_eos_ids": self.model_eos_ids, "stop_ids": self.stop_ids,
                "end_of_turn_id": self.end_id}

    @classmethod
    def from_settings(cls, tokenizer, settings: dict) -> "PromptRenderer":
        return cls(tokenizer, settings["format"], settings["instruction"], settings["template"],
                   settings["response_prefix"], list(settings.get("model_eos_ids", [])))

    def save(self, folder: Path) -> None:
        (Path(folder) / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=2),
                                                  encoding="utf-8")

    # -- probing the chat template -----------------------------------------------------
    def _chat_text(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _has_system_role(self) -> bool:
        try:
            text = self._chat_text([{"role": "system", "content": _PROBE},
                                    {"role": "user", "content": "hi"}], True)
        except Exception:  # templates without a system role raise (Gemma's does)
            return False
        return _PROBE in text

    def _end_of_turn(self) -> int:
        """The first special token after the assistant's text in a rendered turn."""
        tok = self.tokenizer
        text = self._chat_text([{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": _PROBE}], False)
        if _PROBE not in text:
            raise BadInput("the chat template drops the assistant's message; cannot find "
                           "its end-of-turn token", field="model.prompt_format")
        tail = text[text.rindex(_PROBE) + len(_PROBE):]
        special = set(tok.all_special_ids) | {
            i for i, t in getattr(tok, "added_tokens_decoder", {}).items()
            if getattr(t, "special", False)}
        for i in tok(tail, add_special_tokens=False)["input_ids"]:
            if i in special:
                return i
        return tok.eos_token_id

    # -- rendering ---------------------------------------------------------------------
    def _split_system(self, prompt: str, messages: list[dict] | None):
        """(instruction + the data's system messages, the other turns)."""
        turns = [dict(m) for m in (messages or [{"role": "user", "content": prompt}])]
        system = [m["content"].strip() for m in turns if m["role"] == "system"]
        head = "\n\n".join(t for t in [self.instruction.strip(), *system] if t)
        return head, [m for m in turns if m["role"] != "system"]

    def conversation(self, prompt: str, messages: list[dict] | None = None) -> list[dict]:
        """The chat messages of a prompt, the instruction placed as the template allows."""
        head, turns = self._split_system(prompt, messages)
        if head and self.system_role:
            return [{"role": "system", "content": head}] + turns
        if head:
            first = next((m for m in turns if m["role"] == "user"), None)
            if first is None:
                raise BadInput("a conversation without a user turn", field="messages")
            first["content"] = f"{head}\n\n{first['content']}"
        return turns

    def prompt_text(self, prompt: str, messages: list[dict] | None = None) -> str:
        if self.format == "chat":
            return self._chat_text(self.conversation(prompt, messages), True)
        head, turns = self._split_system(prompt, messages)
        body = render_turns(turns) if messages else prompt
        text = self.template.format(instruction=head, prompt=body.strip())
        return text if head else text.lstrip()

    def prompt_ids(self, prompt: str, messages: list[dict] | None = None) -> list[int]:
        tok = self.tokenizer
        ids = tok(self.prompt_text(prompt, messages), add_special_tokens=False)["input_ids"]
        if self.format == "template" and tok.bos_token_id is not None:
            return [tok.bos_token_id] + ids  # a chat template writes its own BOS
        return ids

    def response_ids(self, response: str) -> list[int]:
        text = self.response_prefix + response.strip()
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end_id]

    def split_response(self, ids: list[int]) -> tuple[list[int], bool]:
        """Generated ids cut after the first stop token (kept), and whether one came."""
        for n, i in enumerate(ids):
            if i in self.stop_ids:
                return ids[: n + 1], True
        return list(ids), False

    def response_text(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in self.stop_ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
