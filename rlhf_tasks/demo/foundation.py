"""A tiny Llama-style foundation model and BPE tokenizer, trained offline from scratch.

The corpus is prompts followed by answers of mixed quality (``strong_share`` of them
strong), so that the model's sampled answers pass the rubric only some of the time: the
starting point that supervised tuning and RLHF then improve.  Saved with
``save_pretrained`` (safetensors) and loaded back with the real ``from_pretrained``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 1200):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    # digits one by one, so numbers are copied digit by digit from the prompt
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.padding_side = "left"  # generation pads on the left
    fast.save_pretrained(out_dir)
    return fast


def train_foundation(texts: list[str], tokenizer, out_dir: Path, *, steps: int = 400,
                     batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     hidden: int = 128, layers: int = 4, heads: int = 4) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_tasks.progress import Progress

    torch.manual_seed(seed)
    ids = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"]
           + [tokenizer.eos_token_id] for t in texts]
    max_len = max(len(x) for x in ids)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(128, 2 ** math.ceil(math.log2(max_len))),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    config._attn_implementation = "eager"  # faster than sdpa for these tiny shapes on CPU
    model = LlamaForCausalLM(config)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id
    model.train()
    started, losses = time.perf_counter(), []
    progress = Progress(steps, "foundation")
    for step in range(steps):
        picks = torch.randint(len(ids), (batch_size,), generator=generator).tolist()
        width = max(len(ids[i]) for i in picks)
        batch = torch.full((batch_size, width), pad, dtype=torch.long)
        for row, i in enumerate(picks):
            batch[row, : len(ids[i])] = torch.tensor(ids[i])
        attention = (batch != pad).long()
        labels = batch.masked_fill(attention == 0, -100)
        loss = model(input_ids=batch, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.update(1, loss=f"{loss.item():.3f}")
    progress.close()
    model.eval()
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"steps": steps, "final_loss": round(sum(losses[-20:]) / 20, 4),
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - started, 1)}


def sample_answers(model_dir: Path, prompts: list[str], *, max_new_tokens: int = 32,
                   temperature: float = 1.0, seed: int = 0, batch_size: int = 64) -> list[str]:
    """Sampled answers of a saved model to formatted prompts (for the demo's pass rates)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        enc = tokenizer([tokenizer.bos_token + p for p in chunk], return_tensors="pt",
                        padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=temperature > 0, temperature=temperature or None,
                                 top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        out += [t.strip() for t in texts]
    return out
