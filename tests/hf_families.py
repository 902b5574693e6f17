"""Tiny random checkpoints of real architectures, built offline, with tokenizers shaped like
their families' (special tokens, chat templates, pad and EOS conventions).

| family | chat template | system role | pad token | EOS ids of the checkpoint |
|---|---|---|---|---|
| llama  | Llama 3 headers, ``<|eot_id|>`` | yes | none | ``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>`` |
| qwen2  | ChatML, ``<|im_end|>``           | yes | ``<|endoftext|>`` | ``<|im_end|>``, ``<|endoftext|>`` |
| gemma  | ``<start_of_turn>``/``<end_of_turn>``, raises on a system message | no | ``<pad>`` | ``<eos>``, ``<end_of_turn>`` |
| gpt2   | none (``prompt_format: template``) | - | none | ``<|endoftext|>`` |
"""

from __future__ import annotations

from pathlib import Path

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

FAMILIES = {
    "llama": {"special": ["<|begin_of_text|>", "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>",
                          "<|start_header_id|>", "<|end_header_id|>"],
              "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": None,
              "model_eos": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
              "template": LLAMA3_TEMPLATE, "end_of_turn": "<|eot_id|>", "system_role": True},
    "qwen2": {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
              "model_eos": ["<|im_end|>", "<|endoftext|>"],
              "template": CHATML_TEMPLATE, "end_of_turn": "<|im_end|>", "system_role": True},
    "gemma": {"special": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
              "bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
              "model_eos": ["<eos>", "<end_of_turn>"],
              "template": GEMMA_TEMPLATE, "end_of_turn": "<end_of_turn>", "system_role": False},
    "gpt2": {"special": ["<|endoftext|>"], "bos": "<|endoftext|>", "eos": "<|endoftext|>",
             "pad": None, "model_eos": ["<|endoftext|>"], "template": None,
             "end_of_turn": "<|endoftext|>", "system_role": False},
}

# tokenizers that pad with the token that ends a response (the reward is easily read one
# token away from where it was trained): name -> (architecture family, changed fields)
PAD_IS_END = {
    # SmolLM2-Instruct style ChatML: bos <|im_start|>, eos = pad = <|im_end|>
    "chatml_pad_end": ("qwen2", {"bos": "<|im_start|>", "eos": "<|im_end|>",
                                 "pad": "<|im_end|>"}),
    # Llama 3 Instruct: eos <|eot_id|>, no pad (padded with EOS)
    "llama3_instruct": ("llama", {"eos": "<|eot_id|>"}),
    # GPT-2 in template format: pad = EOS = the end of a response
    "gpt2_template": ("gpt2", {}),
}


def spec_of(name: str) -> tuple[str, dict]:
    """(architecture family, tokenizer spec) of a family or a PAD_IS_END variant."""
    if name in FAMILIES:
        return name, FAMILIES[name]
    family, changes = PAD_IS_END[name]
    return family, {**FAMILIES[family], **changes}


CORPUS = [
    "Led a team of five engineers and cut costs by 20%.",
    "Managed the payroll system for 300 employees.",
    "Wrote reports about sales every week for the board.",
    "Helped customers with their questions on the phone.",
    "Improved the build time by 40% with caching.",
    "Trained new staff on safety rules and audits.",
    "You are a helpful assistant. Rewrite the bullet. Shorter please.",
]


def build_tokenizer(family: str, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = spec_of(family)[1]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    kwargs = {k + "_token": spec[k] for k in ("bos", "eos", "pad") if spec[k]}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    extra = [t for t in spec["special"] if t not in kwargs.values()]
    fast.add_special_tokens({"additional_special_tokens": extra})
    if spec["template"]:
        fast.chat_template = spec["template"]
    fast.padding_side = "left"
    fast.save_pretrained(out_dir)
    return fast


def _config(family: str, tokenizer, eos_ids: list[int]):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    common = dict(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0], pad_token_id=pad)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **common)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(**shape, tie_word_embeddings=False, **common)
    if family == "qwen2":
        return Qwen2Config(**shape, tie_word_embeddings=True, **common)
    return Gemma3TextConfig(**shape, head_dim=16, sliding_window=64, **common)


def build_checkpoint(family: str, out_dir: Path, *, seed: int = 0,
                     generation: dict | None = None) -> Path:
    """A random checkpoint of ``family`` in ``out_dir`` (safetensors + tokenizer); its
    ``generation_config.json`` sets ``generation`` (a real checkpoint's sampling defaults)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(family, out_dir)
    architecture, spec = spec_of(family)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in spec["model_eos"]]
    config = _config(architecture, tokenizer, eos_ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id, **(generation or {}))
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
