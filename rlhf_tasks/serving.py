"""The registered models as MLflow models: what ``mlflow.pyfunc.load_model`` loads and
``mlflow models serve`` serves.

* The policy (:class:`PolicyModel`): merged weights, the tokenizer, the prompt format
  (``prompt_format.json``, the renderer every training step used) and the decoding
  settings of the evaluation the panel judged (``decoding.json``).  Input: prompts, one
  string each (a JSON list of ``{"role", "content"}`` messages is a conversation); output:
  the responses.  Optional params at predict time: ``temperature``, ``max_new_tokens``.
* The reward model (:class:`RewardModel`): merged weights, tokenizer, prompt format and the
  score normalisation; input columns ``prompt`` and ``response``; output the normalised
  scores (what PPO optimised).

Each folder carries MLmodel, a signature, an input example, pinned pip requirements, and
this package as code (``code_paths``), so it loads wherever those requirements are
installed; nothing refers back to the training machines.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import mlflow.pyfunc

DECODING_FILE = "decoding.json"
NORM_FILE = "normalisation.json"
REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "jinja2", "pandas")


def _requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS] + [
        f"mlflow=={metadata.version('mlflow')}"]


def decoding_from_config(cfg, renderer) -> dict:
    """The evaluation's decoding: what the panel judged is what the model serves."""
    from rlhf_tasks.generation import describe

    ev = cfg.evaluation
    return describe(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                    stop_ids=renderer.stop_ids, seed=cfg.run.seed)


def _parse_prompt(text: str) -> tuple[str, list | None]:
    """A prompt string, or a JSON list of chat messages (a conversation)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            messages = json.loads(stripped)
        except ValueError:
            return text, None
        if isinstance(messages, list) and messages and all(
                isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            return text, [{"role": str(m["role"]), "content": str(m["content"])}
                          for m in messages]
    return text, None


def _column(model_input, name: str | int = 0) -> list[str]:
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        col = name if name in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[col].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]


def _load(folder: str, kind: str):
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    from rlhf_tasks.prompting import SETTINGS_FILE, PromptRenderer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    settings = json.loads((Path(folder) / SETTINGS_FILE).read_text(encoding="utf-8"))
    renderer = PromptRenderer.from_settings(tokenizer, settings)
    cls = AutoModelForCausalLM if kind == "policy" else AutoModelForSequenceClassification
    model = cls.from_pretrained(folder, use_safetensors=True,
                                **({"dtype": dtype} if dtype else {})).to(device).eval()
    return model, tokenizer, renderer, device


class PolicyModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        folder = context.artifacts["model"]
        self.model, self.tokenizer, self.renderer, self.device = _load(folder, "policy")
        self.decoding = json.loads((Path(folder) / DECODING_FILE).read_text(encoding="utf-8"))

    def predict(self, context, model_input, params=None):
        from rlhf_tasks.generation import generate

        params = params or {}
        prompts = [self.renderer.prompt_ids(*_parse_prompt(p)) for p in _column(model_input)]
        responses, _ = generate(
            self.model, self.tokenizer, self.renderer, prompts, device=self.device,
            temperature=float(params.get("temperature", self.decoding["temperature"])),
            max_new_tokens=int(params.get("max_new_tokens", self.decoding["max_new_tokens"])))
        return [self.renderer.response_text(r) for r in responses]


class RewardModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        folder = context.artifacts["model"]
        self.model, self.tokenizer, self.renderer, self.device = _load(folder, "reward")
        self.norm = json.loads((Path(folder) / NORM_FILE).read_text(encoding="utf-8"))

    def predict(self, context, model_input, params=None):
        from rlhf_tasks.reward_model import score_sequences

        prompts = _column(model_input, "prompt")
        responses = _column(model_input, "response")
        rows = [self.renderer.prompt_ids(*_parse_prompt(p)) + self.renderer.response_ids(r)
                for p, r in zip(prompts, responses)]
        raw = score_sequences(self.model, rows, self.tokenizer.pad_token_id, device=self.device)
        return [(s - self.norm["mean"]) / self.norm["std"] for s in raw]


def _save_weights(folder: Path, model, tokenizer, renderer) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    renderer.save(folder)
    return folder


def _code_path() -> str:
    return str(Path(__file__).resolve().parent)


def save_policy_model(path: Path, model, tokenizer, renderer, decoding: dict,
                      example: str = "Write one sentence about your work.") -> Path:
    """An MLflow pyfunc model folder at ``path`` serving ``model`` (merged weights)."""
    import tempfile

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    with tempfile.TemporaryDirectory(prefix="rlhf-served-") as tmp:
        weights = _save_weights(Path(tmp) / "model", model, tokenizer, renderer)
        (weights / DECODING_FILE).write_text(json.dumps(decoding, indent=2), encoding="utf-8")
        signature = ModelSignature(
            inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
            params=ParamSchema([ParamSpec("temperature", "double", decoding["temperature"]),
                                ParamSpec("max_new_tokens", "long",
                                          decoding["max_new_tokens"])]))
        mlflow.pyfunc.save_model(str(path), python_model=PolicyModel(),
                                 artifacts={"model": str(weights)}, signature=signature,
                                 input_example=[example], code_paths=[_code_path()],
                                 pip_requirements=_requirements(),
                                 metadata={"prompt_format": renderer.settings(),
                                           "decoding": decoding})
    return Path(path)


def save_reward_model(path: Path, model, tokenizer, renderer, normalisation: dict,
                      example: tuple[str, str] = ("Write one sentence about your work.",
                                                  "I ship things.")) -> Path:
    """An MLflow pyfunc model folder at ``path`` scoring (prompt, response) pairs."""
    import tempfile

    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    with tempfile.TemporaryDirectory(prefix="rlhf-served-") as tmp:
        weights = _save_weights(Path(tmp) / "model", model, tokenizer, renderer)
        (weights / NORM_FILE).write_text(json.dumps(normalisation, indent=2), encoding="utf-8")
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "response")]),
            outputs=Schema([ColSpec("double")]))
        mlflow.pyfunc.save_model(str(path), python_model=RewardModel(),
                                 artifacts={"model": str(weights)}, signature=signature,
                                 input_example=pd.DataFrame({"prompt": [example[0]],
                                                             "response": [example[1]]}),
                                 code_paths=[_code_path()], pip_requirements=_requirements(),
                                 metadata={"prompt_format": renderer.settings(),
                                           "normalisation": normalisation})
    return Path(path)


def hf_folder(mlflow_model_dir: Path) -> Path | None:
    """The Hugging Face checkpoint inside one of our MLflow model folders (None if it is
    not one)."""
    folder = Path(mlflow_model_dir) / "artifacts" / "model"
    return folder if (Path(mlflow_model_dir) / "MLmodel").exists() and folder.is_dir() else None
