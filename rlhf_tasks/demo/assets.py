"""``rlhf demo init``: build the offline demo, deterministically, in about a minute on 2 cores.

Writes into ``out_dir`` (default ``.rlhf/demo``):
* ``prompts.jsonl`` (1,500 PPO prompts), ``eval.jsonl`` (200 held-out prompts),
* ``preferences.jsonl`` (4,000 TRL-style pairs ranked by simulated annotators who are not the
  panel (:mod:`rlhf_tasks.demo.annotators`), with a handful of deliberately bad rows that
  validation must quarantine: duplicates, chosen = rejected, eval leakage, broken JSON,
  a missing field, an empty prompt), ``preferences_ranked.jsonl`` (ranked lists),
* ``sft.jsonl`` (prompt + reference completion, 60% strong references),
* ``foundation/`` the tiny Llama and its tokenizer (safetensors),
* ``demo.yaml`` a pipeline config pointing at all of it, ``info.json`` what was built.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from rlhf_tasks.demo import annotators, domain, rubric

INSTRUCTION = "Rewrite:"
# the demo's own prompt layout (``model.prompt_format: template``): its tokenizer has no
# chat template; the foundation model is trained on exactly this text
PROMPT_TEMPLATE = "{instruction} {prompt}\nBullet:"
RESPONSE_PREFIX = " "


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(instruction=INSTRUCTION, prompt=prompt.strip())


def format_response(response: str) -> str:
    return RESPONSE_PREFIX + response.strip()

BUILD_VERSION = "demo-v2"  # v2: preferences from annotators, not the rubric
SIZES = {"eval": 200, "prompts": 1500, "preference_pairs": 4000, "ranked_lists": 300,
         "sft": 1000, "foundation_corpus": 4000}
FOUNDATION = {"steps": 400, "batch_size": 48, "strong_share": 0.3}


def _write_jsonl(path: Path, rows: list, raw_lines: dict[int, str] | None = None) -> None:
    """Rows as JSON lines; ``raw_lines`` inserts verbatim (possibly broken) lines at indexes."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            if raw_lines and i in raw_lines:
                fh.write(raw_lines[i] + "\n")
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _pair(case: domain.Case, rng: random.Random, pool: list[annotators.Annotator]
          ) -> dict | None:
    """Two answers to one prompt, ranked by one of the annotators (not the panel: their
    own partial view of the quality bar and their own noise)."""
    a, _ = domain.answer(case, rng, 0.5)
    b, _ = domain.answer(case, rng, 0.5)
    ranked = rng.choice(pool).prefer(case.prompt, a, b, rng)
    if ranked is None:
        return None
    return {"prompt": case.prompt, "chosen": ranked[0], "rejected": ranked[1]}


def build_datasets(out: Path, rng: random.Random) -> dict:
    eval_cases = domain.unique_cases(rng, SIZES["eval"])
    eval_prompts = {c.prompt for c in eval_cases}
    train_cases = domain.unique_cases(rng, 3000, exclude=eval_prompts)
    prompt_cases = train_cases[:SIZES["prompts"]]
    _write_jsonl(out / "eval.jsonl", [{"prompt": c.prompt} for c in eval_cases])
    _write_jsonl(out / "prompts.jsonl", [{"prompt": c.prompt} for c in prompt_cases])

    pairs: list[dict] = []
    seen: set[tuple] = set()
    pool = annotators.annotators(rng)
    while len(pairs) < SIZES["preference_pairs"]:
        pair = _pair(rng.choice(train_cases), rng, pool)
        key = pair and tuple(pair.values())
        if key and key not in seen:
            seen.add(key)
            pairs.append(pair)
    # deliberate problems: validation must quarantine exactly these rows
    bad = [dict(pairs[10]), dict(pairs[20]), dict(pairs[30]),                  # duplicates
           {**pairs[40], "rejected": pairs[40]["chosen"]},                       # chosen = rejected
           {**pairs[50], "rejected": pairs[50]["chosen"]},
           {**pairs[60], "prompt": eval_cases[0].prompt},                        # eval leakage
           {**pairs[70], "prompt": eval_cases[1].prompt},
           {"prompt": pairs[80]["prompt"], "chosen": pairs[80]["chosen"]},       # missing field
           {**pairs[90], "prompt": "   "}]                                       # empty prompt
    rows = pairs + bad
    rng.shuffle(rows)
    broken = {len(rows) // 2: '{"prompt": "worked on the help desk", "chosen": '}
    _write_jsonl(out / "preferences.jsonl", rows, raw_lines=broken)

    ranked = []
    for case in rng.sample(train_cases, SIZES["ranked_lists"]):
        answers = [domain.strong_answer(case, rng)] + [
            domain.flawed_answer(case, rng, f) for f in rng.sample(domain.FLAWS, 3)]
        # ranked by what the annotators look at (the figure unchecked): equal = equal rank
        quality = [annotators.seen_flaws(case.prompt, a) for a in answers]
        if rng.random() < 0.5:  # best to worst
            order = sorted(range(4), key=lambda i: quality[i])
            ranked.append({"prompt": case.prompt, "responses": [answers[i] for i in order]})
        else:  # with ranks (1 = best; equal quality = equal rank)
            levels = sorted(set(quality))
            ranked.append({"prompt": case.prompt, "responses": answers,
                           "ranks": [levels.index(q) + 1 for q in quality]})
    _write_jsonl(out / "preferences_ranked.jsonl", ranked)

    sft = []
    for case in train_cases[:SIZES["sft"]]:
        text, _ = domain.answer(case, rng, 0.6)
        sft.append({"prompt": case.prompt, "completion": text})
    _write_jsonl(out / "sft.jsonl", sft)
    return {"eval": len(eval_cases), "prompts": len(prompt_cases), "preference_rows": len(rows) + 1,
            "preference_bad_rows": len(bad) + 1, "ranked_lists": len(ranked), "sft": len(sft),
            "train_cases": train_cases}


def write_config(out: Path) -> Path:
    root = out.resolve()
    config = {
        "model": {"base_model": str(root / "foundation"), "instruction": INSTRUCTION,
                  "prompt_format": "template", "prompt_template": PROMPT_TEMPLATE,
                  "response_prefix": RESPONSE_PREFIX},
        "registry": {"model_name": "resume-assistant"},
        "data": {
            "preference_uri": str(root / "preferences.jsonl"),
            "prompt_uri": str(root / "prompts.jsonl"),
            "eval_uri": str(root / "eval.jsonl"),
            "sft_uri": str(root / "sft.jsonl"),
            "max_prompt_tokens": 64, "max_target_tokens": 48,
            "max_bad_fraction": 0.01,
        },
        "storage": {"allowed_roots": [str(root)]},
        # sized for 2 CPU cores: about a minute per training step
        "reward": {"train_steps": 400, "batch_size": 16, "lora_rank": 8},
        "sft": {"enabled": True, "train_steps": 150, "batch_size": 32, "lora_rank": 8},
        "ppo": {"train_steps": 32, "batch_size": 32, "num_minibatches": 4, "ppo_epochs": 4,
                "response_length": 32, "temperature": 0.7, "kl_coef": 0.05, "lora_rank": 8},
        # every model answers the 200 eval prompts with PPO's decoding
        "evaluation": {"temperature": 0.7, "max_new_tokens": 32},
        # simulated rubric raters stand in for HR experts (labelled simulated everywhere);
        # this demo, and only it, lets their verdict move the champion alias
        "panel": {"mode": "simulated", "simulated_may_promote": True, "verdicts_per_item": 3,
                  "quality_bar": rubric.QUALITY_BAR, "pass_rate_threshold": 0.6,
                  "min_lift": 0.05, "significance": 0.05},
        # illustrative prices for the benefit-and-cost table (configured, and labelled so):
        # an on-demand CPU core and GPU hour, an HR writer's hour, 4 minutes to write one
        # strong bullet by hand, 0.10 per labelled preference pair
        "cost": {"currency": "USD", "cpu_hour": 0.04, "gpu_hour": 2.50, "expert_hour": 60.0,
                 "reference_minutes": 4.0, "labelling_per_pair": 0.10},
    }
    import yaml

    path = out / "demo.yaml"
    path.write_text("# Written by `rlhf demo init`: the demo's pipeline config.\n"
                    + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def build_demo(out: Path, force: bool = False, seed: int = 1234, model: bool = True,
               foundation_steps: int | None = None) -> dict:
    """Build everything; ``model=False`` stops after the data and the tokenizer, and
    ``foundation_steps`` trains a smaller foundation model (both for tests)."""
    import logging

    log = logging.getLogger(__name__)
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "info.json"
    steps = foundation_steps or FOUNDATION["steps"]
    fingerprint = hashlib.sha256(json.dumps([BUILD_VERSION, SIZES, FOUNDATION, seed, model,
                                             steps]).encode()
                                 ).hexdigest()[:16]
    if info_path.exists() and not force:
        info = json.loads(info_path.read_text())
        if info.get("fingerprint") == fingerprint and (out / "foundation").is_dir():
            write_config(out)  # cheap, and keeps the config in step with this code
            log.info("demo assets in %s are up to date (use --force to rebuild)", out)
            return info
    started = time.perf_counter()
    rng = random.Random(seed)
    counts = build_datasets(out, rng)
    train_cases = counts.pop("train_cases")

    from rlhf_tasks.demo.foundation import sample_answers, train_foundation, train_tokenizer

    corpus = []
    for i in range(SIZES["foundation_corpus"]):
        case = train_cases[i % len(train_cases)]
        text, _ = domain.answer(case, rng, FOUNDATION["strong_share"])
        corpus.append(format_prompt(case.prompt) + format_response(text))
    model_dir = out / "foundation"
    tokenizer = train_tokenizer(corpus, model_dir)
    if not model:
        config_path = write_config(out)
        info = {"fingerprint": fingerprint, "version": BUILD_VERSION, "seed": seed, **counts,
                "tokenizer_vocab": len(tokenizer), "config": str(config_path.resolve())}
        info_path.write_text(json.dumps(info, indent=2))
        return info
    log.info("tokenizer: %d tokens; training the foundation model", len(tokenizer))
    training = train_foundation(corpus, tokenizer, model_dir, steps=steps,
                                batch_size=FOUNDATION["batch_size"], seed=seed)
    eval_prompts = [json.loads(line)["prompt"] for line in open(out / "eval.jsonl")]
    answers = sample_answers(model_dir, [format_prompt(p) for p in eval_prompts],
                             seed=seed)
    foundation_pass = rubric.pass_rate(eval_prompts, answers)
    config_path = write_config(out)
    info = {"fingerprint": fingerprint, "version": BUILD_VERSION, "seed": seed, **counts,
            "tokenizer_vocab": len(tokenizer), "foundation": training,
            "foundation_rubric_pass_rate_sampled": round(foundation_pass, 4),
            "config": str(config_path.resolve()), "out": str(out.resolve()),
            "seconds": round(time.perf_counter() - started, 1)}
    info_path.write_text(json.dumps(info, indent=2))
    return info
