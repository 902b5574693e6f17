"""The ``evaluate`` step: every model under comparison answers the eval prompts as it was
trained and is served; automatic metrics per model; a blinded review batch for the panel.

Each model is judged in its own form: the registry's champion with the tokenizer, prompt
format, instruction and decoding recorded in its served folder (never this run's, so a
change of form in this run cannot handicap it), this run's models with this run's.  The
reward model (this run's) scores every answer in this run's token layout: the exact
generated tokens for this run's models, the answer's text re-encoded for a model served
in another form.

Models: the candidate (``<run>/ppo/model``; a bake-off's candidates, each from its
folder, ``tuning.algorithms``), the registry's ``champion`` (when there is one) and the
baselines of ``evaluation.baselines`` (``foundation``: the base model; ``sft``:
``<run>/sft/model`` when the SFT step ran).  Eval rows that carry an expert's ``reference``
answer add one more blinded "model", ``reference``: the experts judge human
writing beside the models' (scored by the reward model too, not generated).  Outputs
under ``<run>/evaluate/``:
``responses.jsonl`` (server side: it names the model of every response),
``evaluate.json`` (decoding settings, metrics, the batch id).  The review batch goes into
the verdict store, shuffled, the model kept there on the server side only.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf_tasks import models, registry, tracking, training
from rlhf_tasks.generation import generate
from rlhf_tasks.panel.gate import EXPERT, reference_model
from rlhf_tasks.storage import Storage, join

log = logging.getLogger(__name__)


def sequential_plan(cfg, models) -> dict | None:
    """The sequential panel's plan (``panel.sequential``, from the base config): the
    candidate against the gate's reference, the experts' answers too when the policy
    compares with them; the policy's rules.  None: a fixed panel."""
    reference = reference_model(models)
    candidates = cfg.candidates
    if not cfg.panel.sequential or reference is None:
        return None
    if len(candidates) > 1:  # its test follows one candidate; a bake-off is Holm's (gate)
        log.info("evaluate: a bake-off of %d candidates is judged by a fixed panel (the "
                 "sequential panel tests one candidate)", len(candidates))
        return None
    gap = cfg.panel.max_gap_to_reference
    return {"candidate": candidates[0].label, "reference": reference,
            "k": cfg.panel.verdicts_per_item, "significance": cfg.panel.significance,
            "min_pass_rate": cfg.panel.pass_rate_threshold, "min_lift": cfg.panel.min_lift,
            "expert": EXPERT if gap is not None and EXPERT in models else None,
            "max_gap": gap, "min_prompts": cfg.panel.sequential_min_prompts}


def reference_answers(frame) -> list[tuple[int, str]]:
    """(row, text) of the eval data's non-empty expert references, stripped as the models'
    answers are: raw whitespace would tell a reviewer which answer a person wrote."""
    if "reference" not in frame.columns:
        return []
    return [(i, text.strip()) for i, text in enumerate(frame["reference"])
            if isinstance(text, str) and text.strip()]


def reference_minutes(frame) -> dict | None:
    """The minutes the experts took to write the references, where the eval data says
    (``reference_minutes``): rows and the mean; None when no row says."""
    if "reference_minutes" not in frame.columns:
        return None
    found = [float(m) for m, text in zip(frame["reference_minutes"], frame["reference"])
             if m is not None and m == m and isinstance(text, str) and text.strip()]
    return {"rows": len(found), "mean": sum(found) / len(found)} if found else None


def _reference_rows(frame, prompts, encoded, renderer, reward_model, norm, tokenizer,
                    device) -> tuple[list[dict], dict | None]:
    """Review rows of the experts' reference answers, scored as the models' are (the
    answer's tokens after the prompt's, the end-of-turn token included), and their
    metrics (None when the eval data carry no reference answer)."""
    from rlhf_tasks.reward_model import score_sequences

    found = reference_answers(frame)
    if not found:
        return [], None
    answers = [renderer.response_ids(text) for _, text in found]
    scores = score_sequences(reward_model, [encoded[i] + a for (i, _), a in zip(found, answers)],
                             tokenizer.pad_token_id, device=device)
    scores = [(s - norm["mean"]) / norm["std"] for s in scores]
    rows = [{"prompt_index": i, "prompt": prompts[i], "response": text, "model": EXPERT,
             "reward": round(s, 4), "ended": True}
            for (i, text), s in zip(found, scores)]
    metrics = {"reward_mean": sum(scores) / len(scores),
               "length_mean": sum(map(len, answers)) / len(answers),
               "missing_eos_rate": 0.0, "empty_rate": 0.0}
    return rows, metrics


def models_under_comparison(cfg, storage: Storage):
    """label -> model folder URI (or the base model), in table order; and the champion's
    ModelVersion (None when there is none)."""
    out: dict[str, str] = {}
    if "foundation" in cfg.evaluation.baselines:
        out["foundation"] = cfg.model.base_model
    sft_uri = cfg.step_uri("sft", "model")
    if "sft" in cfg.evaluation.baselines and storage.is_complete(sft_uri):
        out["sft"] = sft_uri
    champ = registry.champion(cfg)
    if champ is not None:
        out["champion"] = champ.source
    for candidate in cfg.candidates:
        out[candidate.label] = cfg.step_uri(candidate.folder, "model")
    return out, champ


@dataclass
class ServedForm:
    """How a model renders prompts and decodes: its tokenizer, renderer and decoding."""

    tokenizer: object
    renderer: object
    temperature: float
    max_new_tokens: int
    recorded: bool  # read from the model's own served folder (else this run's config)

    def describe(self) -> dict:
        return {"prompt_format": self.renderer.settings(), "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens,
                "source": "recorded with the model" if self.recorded else "this run's config"}


def served_form(folder: Path | None, run_form: ServedForm) -> ServedForm:
    """The form recorded in one of our MLflow model folders (a registered version): its
    tokenizer, ``prompt_format.json`` and ``decoding.json``; ``run_form`` for anything
    else (this run's base model, SFT and candidate)."""
    from rlhf_tasks import serving
    from rlhf_tasks.models import load_tokenizer_from
    from rlhf_tasks.prompting import SETTINGS_FILE, PromptRenderer

    inside = serving.hf_folder(folder) if folder is not None else None
    if inside is None or not (inside / SETTINGS_FILE).is_file():
        return run_form
    tokenizer = load_tokenizer_from(str(inside))
    renderer = PromptRenderer.from_settings(
        tokenizer, json.loads((inside / SETTINGS_FILE).read_text(encoding="utf-8")))
    decoding_path = inside / serving.DECODING_FILE
    decoding = json.loads(decoding_path.read_text(encoding="utf-8")) \
        if decoding_path.is_file() else {}
    return ServedForm(tokenizer, renderer,
                      float(decoding.get("temperature", run_form.temperature)),
                      int(decoding.get("max_new_tokens", run_form.max_new_tokens)), True)


def load_policy(cfg, storage: Storage, uri: str, local: Path):
    """A causal LM from the base checkpoint, one of our MLflow model folders (a registered
    version), a merged folder, or a LoRA adapter folder."""
    from rlhf_tasks import serving

    kwargs = models.load_kwargs(cfg, training.resolve_device(cfg), trainable=False)
    if uri == cfg.model.base_model:
        return models.load_causal_lm(cfg, storage, **kwargs)
    folder = storage.get_dir(uri, local)
    inside = serving.hf_folder(folder)
    if inside is not None:
        return models.load_causal_lm(cfg, storage, path=str(inside), **kwargs)
    if (folder / "merged").is_dir():
        return models.load_causal_lm(cfg, storage, path=str(folder / "merged"), **kwargs)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        summary = next((json.loads(p.read_text()) for p in
                        (folder / "ppo_summary.json", folder / "dpo_summary.json",
                         folder / "sft_summary.json") if p.exists()), {})
        base_ref = summary.get("base_model")
        base = models.load_causal_lm(
            cfg, storage, path=None if base_ref in (None, cfg.model.base_model) else base_ref,
            **kwargs)
        return PeftModel.from_pretrained(base, folder).merge_and_unload()
    return models.load_causal_lm(cfg, storage, path=str(folder), **kwargs)


def evaluate(cfg) -> dict:
    from rlhf_tasks.panel.store import PanelStore, panel_store_url
    from rlhf_tasks.reward_model import load_reward_model, score_sequences

    ev = cfg.evaluation
    storage = Storage.from_config(cfg)
    device = training.resolve_device(cfg)
    out_uri = cfg.step_uri("evaluate")
    with tracking.step_run(cfg, "evaluate", tags=training.precision_tag(cfg)) as run_id, \
            tempfile.TemporaryDirectory(prefix="rlhf-evaluate-") as tmp:
        tmp = Path(tmp)
        import mlflow

        from rlhf_tasks.serving import decoding_from_config

        training.log_model_reference(cfg, storage)
        tokenizer = models.load_tokenizer(cfg, storage)
        renderer = models.renderer(cfg, tokenizer, storage)
        decoding = decoding_from_config(cfg, renderer)
        mlflow.log_params({f"decoding.{k}": v for k, v in decoding.items()})
        frame = training.read_canonical(cfg, storage, "eval", mlflow_context="eval")
        if ev.max_prompts:
            frame = frame.iloc[:ev.max_prompts]
        prompts = list(frame["prompt"])
        encoded = training.encode_prompts(renderer, frame)
        base_dir = models.base_model_dir(cfg, storage)
        reward_model, info = load_reward_model(
            storage.get_dir(cfg.step_uri("reward", "model"), tmp / "reward"),
            base_model_dir=base_dir, trust_remote_code=cfg.model.trust_remote_code,
            **models.load_kwargs(cfg, device, trainable=False))
        norm = info["normalisation"]
        reward_model.to(device)

        compared, champion = models_under_comparison(cfg, storage)
        run_form = ServedForm(tokenizer, renderer, ev.temperature, ev.max_new_tokens, False)
        rows, metrics, forms = [], {}, {}
        for label, uri in compared.items():
            log.info("evaluate: %s (%s) answers %d prompts", label, uri, len(prompts))
            policy = load_policy(cfg, storage, uri, tmp / label)
            form = served_form(tmp / label, run_form)
            forms[label] = form.describe()
            own = encoded if form is run_form else training.encode_prompts(form.renderer, frame)
            started = time.perf_counter()
            with training.autocast(cfg, device):
                responses, ended = generate(policy, form.tokenizer, form.renderer, own,
                                            device=device, temperature=form.temperature,
                                            max_new_tokens=form.max_new_tokens,
                                            seed=cfg.run.seed, batch_size=64,
                                            progress=f"evaluate: {label} answers")
                inference = time.perf_counter() - started  # the answers, measured
                del policy
                texts = [form.renderer.response_text(r) for r in responses]
                # this run's models: exactly the tokens generated (the stop token
                # included), as PPO scores them; another form: its text in this run's
                scored = ([p + r for p, r in zip(encoded, responses)] if form is run_form
                          else [p + renderer.response_ids(t) for p, t in zip(encoded, texts)])
                scores = score_sequences(reward_model, scored, tokenizer.pad_token_id,
                                         device=device)
            scores = [(s - norm["mean"]) / norm["std"] for s in scores]
            metrics[label] = {"reward_mean": sum(scores) / len(scores),
                              "length_mean": sum(len(r) - e for r, e in zip(responses, ended))
                              / len(responses),
                              "missing_eos_rate": 1 - sum(ended) / len(ended),
                              "empty_rate": sum(not t for t in texts) / len(texts),
                              "inference_seconds": inference,
                              "seconds_per_answer": inference / len(responses)}
            tracking.log_metrics("eval", {f"{label}/{k}": v for k, v in metrics[label].items()})
            rows += [{"prompt_index": i, "prompt": p, "response": t, "model": label,
                      "reward": round(s, 4), "ended": e}
                     for i, (p, t, s, e) in enumerate(zip(prompts, texts, scores, ended))]

        with training.autocast(cfg, device):
            reference, reference_metrics = _reference_rows(
                frame, prompts, encoded, renderer, reward_model, norm, tokenizer, device)
        if reference:
            rows += reference
            metrics[EXPERT] = reference_metrics
            tracking.log_metrics("eval", {f"{EXPERT}/{k}": v
                                          for k, v in metrics[EXPERT].items()})
            compared[EXPERT] = "expert-written reference answers (eval data)"

        mlflow.log_dict(forms, "eval/forms.json")
        # no answers table here: it names each answer's model, and reviewers judge the batch
        # blinded while anyone who can read this run could read it; the gate logs it once
        # the batch is closed (panel/answers.json)
        tracking.log_histograms(
            {label: [r["reward"] for r in rows if r["model"] == label] for label in compared},
            "eval/reward_scores.png", title="Reward scores on the eval prompts",
            xlabel="normalised reward score")
        with PanelStore(panel_store_url(cfg)) as store:
            batch_id = store.create_batch(
                pipeline=cfg.run.pipeline, run_id=cfg.run.run_id, items=rows,
                verdicts_per_item=cfg.panel.verdicts_per_item,
                quality_bar=cfg.panel.quality_bar, simulated=cfg.panel.mode == "simulated",
                excluded=[cfg.run.triggered_by, cfg.run.triggered_by_id, cfg.panel.approver],
                idle_cap_seconds=cfg.panel.idle_cap_seconds,
                sequential=sequential_plan(cfg, compared))
        local = tmp / "out"
        local.mkdir()
        with open(local / "responses.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary = {"models": compared, "decoding": decoding, "forms": forms,
                   "metrics": metrics,
                   "champion_version": str(champion.version) if champion else None,
                   "prompts": len(prompts), "batch_id": batch_id, "mlflow_run_id": run_id,
                   "reference_minutes": reference_minutes(frame)}
        (local / "evaluate.json").write_text(json.dumps(summary, indent=2))
        storage.put_dir(local, out_uri, extra={"step": "evaluate"})
        mlflow.set_tag("panel.batch_id", batch_id)
    return {"batch_id": batch_id, "models": list(compared), "prompts": len(prompts),
            "items": len(rows), "summary_uri": join(out_uri, "evaluate.json"),
            "metrics": {m: {k: round(v, 4) for k, v in d.items()} for m, d in metrics.items()},
            "mlflow_run_id": run_id}
