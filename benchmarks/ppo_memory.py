"""Peak memory and seconds of one PPO update on a random ~0.45B-parameter Llama.

Compares precision / memory settings of the same update (``shared`` layout, LoRA rank 8,
policy and reward model of the same shape):

* ``fp32``: fp32 weights, no gradient checkpointing (the baseline);
* ``bf16+ckpt``: frozen weights in bf16, LoRA and value head as fp32 master copies under
  bf16 autocast, gradient checkpointing on.

Each (setting, run) is a fresh process, so the peak is that setting's alone: peak RSS on
the CPU (weights + update), ``torch.cuda.max_memory_allocated`` on a GPU.  Prints one JSON
line per run and a table of medians.

    .venv/bin/python benchmarks/ppo_memory.py --runs 3                # CPU
    .venv/bin/python benchmarks/ppo_memory.py --runs 3 --device cuda  # GPU (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SETTINGS = {"fp32": ("fp32", False), "bf16+ckpt": ("bf16", True)}


def child(args) -> None:
    import resource

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    from rlhf_tasks.config import LoraFields
    from rlhf_tasks.rl.models import build_models
    from rlhf_tasks.rl.settings import RLSettings
    from rlhf_tasks.rl.trainer import train

    dtype_name, checkpointing = SETTINGS[args.setting]
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=3 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 64, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, num_labels=1)
    config._attn_implementation = "sdpa"
    policy = AutoModelForCausalLM.from_config(config, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in policy.parameters())
    models = build_models(policy, reward, lora=LoraFields(lora_rank=8), layout="shared")
    for model in (models.policy, models.critic):
        model.to(args.device)
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, args.vocab, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(args.batch)]
    settings = RLSettings(train_steps=args.updates, batch_size=args.batch, num_minibatches=1,
                          microbatch_size=args.microbatch, ppo_epochs=1,
                          response_length=args.response_tokens, temperature=1.0,
                          dtype=dtype_name, gradient_checkpointing=checkpointing)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps = [time.perf_counter()]
    train(models, prompts, settings, eos_token_id=-1, pad_token_id=0, device=args.device,
          on_metrics=lambda update, metrics: stamps.append(time.perf_counter()))
    per_update = [b - a for a, b in zip(stamps, stamps[1:])]
    out = {"setting": args.setting, "params_per_model": params, "device": args.device,
           # the first update warms allocators and kernels; the last is timed
           "seconds_per_update": round(per_update[-1], 2),
           "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "rss_after_loading_mib": round(rss_loaded)}
    if args.device == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    print(json.dumps(out), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--microbatch", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--response-tokens", type=int, default=32)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--setting", choices=list(SETTINGS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("runs", "setting", "child")]
    results: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.runs):
        for name in SETTINGS:  # interleaved, so drift affects both alike
            proc = subprocess.run([sys.executable, __file__, "--child", f"--setting={name}",
                                   *passthrough], capture_output=True, text=True, check=True)
            line = proc.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            results[name].append(json.loads(line))
    memory_key = "peak_cuda_mib" if args.device == "cuda" else "peak_rss_mib"
    print(f"\nmedians of {args.runs} runs, device {args.device}, "
          f"{results['fp32'][0]['params_per_model'] / 1e6:.0f} M parameters per model "
          f"(policy + reward/value), batch {args.batch}, {args.prompt_tokens}+"
          f"{args.response_tokens} tokens")
    print(f"{'setting':<12} {memory_key:>14} {'after load MiB':>15} {'s/update':>9}")
    for name, rows in results.items():
        print(f"{name:<12} {statistics.median(r[memory_key] for r in rows):>14.0f} "
              f"{statistics.median(r['rss_after_loading_mib'] for r in rows):>15.0f} "
              f"{statistics.median(r['seconds_per_update'] for r in rows):>9.2f}")


if __name__ == "__main__":
    main()
