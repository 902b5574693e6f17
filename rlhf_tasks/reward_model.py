"""The reward model as the other steps use it: load, score, measure accuracy and normalisation.

Saved by the reward step as a folder with ``reward_model.json`` (what it is: a LoRA adapter
over ``base_model`` or a full model, and the score normalisation), the weights in
safetensors (``adapter_model.safetensors`` with the score head, or ``model.safetensors``)
and the tokenizer.

Where the score is read.  A Hugging Face sequence classifier (and so TRL's RewardTrainer,
which trains through it) pools its score at the rightmost token that is not
``config.pad_token_id``.  A response ends with the stop token (the chat template's
end-of-turn, or EOS).  Many tokenizers pad with that very token (ChatML models such as
SmolLM2 and Qwen's base models, Llama 3 Instruct whose pad we set to its EOS, GPT-2-style
tokenizers in template format); the classifier would then read the token *before* the
stop token in training, while PPO and evaluate read the stop token.  So the reward model
pads with its own id, :func:`score_pad_id`, never a stop token: the Trainer's pooled score,
:func:`score_sequences` (PPO, evaluate, the served model) and ``AutoModelForSequenceClassification``
on the registered weights all read the stop token, the last token of the sequence.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf_tasks.errors import BadInput

INFO = "reward_model.json"


def score_pad_id(tokenizer, stop_ids) -> int:
    """The id the reward model pads with (its ``config.pad_token_id``): the tokenizer's pad
    when it ends no response, else the first special token that ends none (unk, BOS, the
    others), else the lowest ordinary id that ends none.  Padding only needs an id that is
    never the last token of a sequence: every scored sequence ends with a stop token, or
    with the last sampled token of a response that never stopped."""
    stops = set(stop_ids)
    candidates = [tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None),
                  tokenizer.bos_token_id, *sorted(tokenizer.all_special_ids)]
    for i in candidates:
        if i is not None and i not in stops:
            return int(i)
    return next(i for i in range(len(tokenizer)) if i not in stops)


def reward_tokenizer(tokenizer, stop_ids):
    """A copy of ``tokenizer`` that pads with :func:`score_pad_id` (what the reward step
    hands to TRL, which sets the classifier's ``config.pad_token_id`` from it, and saves
    with the reward model)."""
    import copy

    pad_id = score_pad_id(tokenizer, stop_ids)
    out = copy.deepcopy(tokenizer)
    if out.pad_token_id != pad_id:
        out.pad_token = out.convert_ids_to_tokens(pad_id)
    assert out.pad_token_id == pad_id, (out.pad_token, pad_id)
    return out


def _pad_right(rows: list[list[int]], pad_token_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def score_sequences(model, rows: list[list[int]], pad_token_id: int, batch_size: int = 64,
                    device: str = "cpu") -> list[float]:
    """The model's score of each full sequence, read at its last token (the stop token,
    where the reward model was trained to score: see the module's docstring)."""
    import torch

    from rlhf_tasks.generation import position_ids

    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, mask = _pad_right(rows[start: start + batch_size], pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            out += sequence_scores(model, ids, mask, position_ids(mask),
                                   mask.sum(1) - 1).tolist()
    return out


def backbone_and_head(model):
    """A sequence classifier's (or a PEFT model over one) backbone and score head."""
    from rlhf_tasks.models import unwrap_peft

    inner = unwrap_peft(model)
    return getattr(inner, inner.base_model_prefix), inner.score


def sequence_scores(model, ids, mask, positions, last_index):
    """The reward model's score read at ``last_index`` (EOS, or the last token)."""
    import torch

    backbone, head = backbone_and_head(model)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                      use_cache=False).last_hidden_state
    picked = hidden[torch.arange(len(ids), device=ids.device), last_index]
    return head(picked).squeeze(-1).float()


def pairwise_accuracy(model, chosen: list[list[int]], rejected: list[list[int]],
                      pad_token_id: int, device: str = "cpu") -> dict:
    """Share of held-out pairs where the chosen response scores higher (ties count half),
    the mean margin, and the raw scores (``chosen_scores``, ``rejected_scores``)."""
    if not chosen:
        return {"accuracy": float("nan"), "pairs": 0, "margin": float("nan"),
                "chosen_scores": [], "rejected_scores": []}
    a = score_sequences(model, chosen, pad_token_id, device=device)
    b = score_sequences(model, rejected, pad_token_id, device=device)
    wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b))
    return {"accuracy": wins / len(a), "pairs": len(a),
            "margin": sum(x - y for x, y in zip(a, b)) / len(a),
            "chosen_scores": a, "rejected_scores": b}


def load_reward_model(folder: str | Path, *, base_model_dir: Path, trust_remote_code: bool = False,
                      **load_kwargs):
    """The reward model as a plain sequence classifier (a LoRA adapter merged in); + its info.
    ``load_kwargs``: ``from_pretrained`` settings (dtype, attention)."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    info_path = folder / INFO
    if not info_path.exists():
        raise BadInput(f"not a reward model folder (no {INFO})", file=str(folder))
    info = json.loads(info_path.read_text())
    if info["kind"] == "full":
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, use_safetensors=True, trust_remote_code=trust_remote_code,
            **load_kwargs)
    else:
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            base_model_dir, num_labels=1, use_safetensors=True,
            trust_remote_code=trust_remote_code, **load_kwargs)
        base.config.pad_token_id = info["pad_token_id"]
        model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    model.config.pad_token_id = info["pad_token_id"]
    return model.eval(), info
