"""The reward is read where it was trained, for tokenizers that pad with the token that ends
a response (ChatML with pad = <|im_end|>, Llama 3 Instruct padded with <|eot_id|>, GPT-2 in
template format): the score TRL's RewardTrainer pools in its loss, the score
``score_sequences`` reads (PPO, evaluate, the served model) and the score
``AutoModelForSequenceClassification`` gives on the saved weights are one number."""

from __future__ import annotations

import pytest

from tests.hf_families import PAD_IS_END, build_checkpoint

PAIRS = [
    ("Rewrite: helped with payroll", "Led payroll for 300 staff.", "did stuff"),
    ("Rewrite: wrote reports", "Cut reporting time by 40%.", "Wrote reports about sales."),
    ("Draft a bullet", "Trained 12 new staff on audits.", "ok"),
]


def _setup(name: str, folder):
    from transformers import AutoModelForSequenceClassification

    from rlhf_tasks.models import load_tokenizer_from
    from rlhf_tasks.prompting import PromptRenderer, checkpoint_eos_ids

    model_dir = build_checkpoint(name, folder)
    tokenizer = load_tokenizer_from(str(model_dir))
    renderer = PromptRenderer(tokenizer, "auto", "Answer in one line.",
                              model_eos_ids=checkpoint_eos_ids(model_dir))
    assert tokenizer.pad_token_id == renderer.end_id  # the case this file is about
    chosen = [renderer.prompt_ids(p) + renderer.response_ids(c) for p, c, _ in PAIRS]
    rejected = [renderer.prompt_ids(p) + renderer.response_ids(r) for p, _, r in PAIRS]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    return model_dir, tokenizer, renderer, model, chosen, rejected


def _trainer_scores(model, tokenizer, chosen, rejected, tmp_path):
    """The scores RewardTrainer's loss uses for these pairs (its collator, its model call)."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    data = Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    args = RewardConfig(output_dir=str(tmp_path / "trainer"), max_steps=1, report_to=[],
                        per_device_train_batch_size=len(chosen), use_cpu=True,
                        disable_dropout=True, max_length=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data,
                            processing_class=tokenizer)
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        _, outputs = trainer.compute_loss(model, batch, return_outputs=True)
    return outputs["logits"].squeeze(-1).tolist() if isinstance(outputs, dict) \
        else outputs.logits.squeeze(-1).tolist()


@pytest.mark.parametrize("name", list(PAD_IS_END))
def test_the_trainer_pools_the_score_that_ppo_and_evaluate_read(name, tmp_path):
    from rlhf_tasks.reward_model import reward_tokenizer, score_sequences

    _, tokenizer, renderer, model, chosen, rejected = _setup(name, tmp_path / "model")
    scorer = reward_tokenizer(tokenizer, renderer.stop_ids)
    assert scorer.pad_token_id not in renderer.stop_ids
    assert tokenizer.pad_token_id == renderer.end_id  # the caller's tokenizer is untouched
    model.config.pad_token_id = scorer.pad_token_id
    pooled = _trainer_scores(model, scorer, chosen, rejected, tmp_path)
    read = score_sequences(model, chosen + rejected, scorer.pad_token_id)
    assert pooled == pytest.approx(read, abs=1e-5)


@pytest.mark.parametrize("name", ["chatml_pad_end"])
def test_with_the_tokenizers_own_pad_the_trainer_reads_another_token(name, tmp_path):
    """What the reward step did before: trained on the token before the stop token."""
    from rlhf_tasks.reward_model import score_sequences

    _, tokenizer, _, model, chosen, rejected = _setup(name, tmp_path / "model")
    model.config.pad_token_id = tokenizer.pad_token_id
    pooled = _trainer_scores(model, tokenizer, chosen, rejected, tmp_path)
    read = score_sequences(model, chosen + rejected, tokenizer.pad_token_id)
    before_stop = score_sequences(model, [r[:-1] for r in chosen + rejected],
                                  tokenizer.pad_token_id)
    assert pooled == pytest.approx(before_stop, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(pooled, read)) > 1e-3


def test_the_saved_weights_score_the_same_through_transformers_and_pyfunc(tmp_path):
    """The served reward model (as the reward step saves it): transformers' own pooling on a
    right-padded batch, and ``mlflow.pyfunc``, give what ``score_sequences`` reads."""
    import mlflow.pyfunc
    import pandas as pd
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_tasks import serving
    from rlhf_tasks.reward_model import reward_tokenizer, score_sequences

    _, tokenizer, renderer, model, chosen, rejected = _setup("chatml_pad_end", tmp_path / "m")
    scorer = reward_tokenizer(tokenizer, renderer.stop_ids)
    model.config.pad_token_id = scorer.pad_token_id
    norm = {"mean": 0.5, "std": 2.0}
    served = serving.save_reward_model(tmp_path / "served", model, scorer, renderer, norm)
    rows = chosen + rejected
    read = score_sequences(model, rows, scorer.pad_token_id)

    folder = serving.hf_folder(served)
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    loaded_tok = AutoTokenizer.from_pretrained(folder)
    batch = loaded_tok.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == len(rows)
    with torch.no_grad():
        plain = loaded(**batch).logits.squeeze(-1).tolist()
    assert plain == pytest.approx(read, abs=1e-5)

    pyfunc = mlflow.pyfunc.load_model(str(served))
    frame = pd.DataFrame({"prompt": [p for p, _, _ in PAIRS] * 2,
                          "response": [c for _, c, _ in PAIRS] + [r for _, _, r in PAIRS]})
    out = list(pyfunc.predict(frame))
    assert out == pytest.approx([(s - 0.5) / 2.0 for s in read], abs=1e-4)
