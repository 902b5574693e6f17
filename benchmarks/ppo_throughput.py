"""RL throughput and peak memory: the project's loop against TRL's trainers: PPO against
TRL 1.12's PPOTrainer, and (``--algorithm rloo | grpo | dr_grpo``) the critic-free
algorithms against TRL 1.16's RLOOTrainer / GRPOTrainer (the project's own environment).

Both sides get the same work: random tiny Llamas of the given sizes (policy, reference,
reward model and a separate value model, all full-weight, as TRL's PPOTrainer uses them),
the same prompts, batch, mini-batches, PPO epochs, response length and sampling settings.
The timed part is training only (models built, imports done); memory is the process's
peak resident set size.  The last line printed is ``episodes_per_s=... peak_rss_mb=...``.

One implementation per process (peak RSS is per process):

    .venv/bin/python benchmarks/ppo_throughput.py --impl rlhf
    /path/to/trl112-venv/bin/python benchmarks/ppo_throughput.py --impl trl

or both, alternating, several runs each, with medians:

    .venv/bin/python benchmarks/ppo_throughput.py --compare --runs 3 \\
        --trl-python /path/to/trl112-venv/bin/python

``--account`` counts instead of timing, one run per side (deterministic): matmul FLOPs
per episode (the speed ratio equal FLOP rates would give), the peak of live tensor
memory (models included, the C allocator's reuse and fragmentation aside: what a GPU
would hold) and the resident floor (imports and models, plus a gradient and two AdamW
moments per trained weight), below which no full-weight fp32 PPO can go:

    .venv/bin/python benchmarks/ppo_throughput.py --compare --account

The TRL side needs a virtual environment of its own, because TRL 1.14+ has no PPO:
``make bench-trl-venv`` installs the project's requirements with TRL 1.12.0 in place of
its TRL, in .rlhf/bench-trl112, so that both sides import the same libraries
(transformers and accelerate import optional packages when they are installed).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAD, BOS, EOS = 0, 1, 2
PHASES: dict[str, float] = {}  # the project's PPO: share of time per phase
FLOOR: dict[str, float] = {}   # resident memory with imports and models in; trained MB
TRAINING: dict[str, float] = {}  # the project's PPO: the training phase's achieved TFLOP/s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--impl", choices=["rlhf", "trl"], default="rlhf")
    p.add_argument("--algorithm", choices=["ppo", "rloo", "grpo", "dr_grpo"], default="ppo",
                   help="ppo: against TRL 1.12's PPOTrainer (its own venv); the others "
                        "against TRL 1.16's RLOOTrainer / GRPOTrainer")
    p.add_argument("--samples-per-prompt", type=int, default=4,
                   help="k: responses per prompt (rloo, grpo, dr_grpo)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--episodes", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=48, help="longest prompt (tokens)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (TRL: through accelerate)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"],
                   help="attention kernel of the random models (both sides)")
    p.add_argument("--rollout-cache", default="dynamic", choices=["dynamic", "static"],
                   help="the project's rollouts: static KV cache (compiled on a GPU)")
    p.add_argument("--account", action="store_true",
                   help="instead of timing: count the work (matmul FLOPs) and the peak of "
                        "live tensor memory, allocator aside (deterministic: one run)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: ours autocasts with frozen models in bf16 and fp32 master "
                        "weights; TRL runs with bf16=True")
    p.add_argument("--compare", action="store_true", help="run both, alternating")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--trl-python", default=str(ROOT / ".rlhf" / "bench-trl112" / "bin" / "python"))
    return p.parse_args(argv)


def build(args):
    """Policy, reference, reward and value models (random, seeded) and the prompts."""
    import torch

    from rlhf_tasks.rl.models import random_llama, sequence_classifier_like

    policy, config = random_llama(args.vocab, args.hidden, args.layers, args.heads,
                                  seed=args.seed, pad_token_id=PAD, bos_token_id=BOS,
                                  eos_token_id=EOS,
                                  max_positions=args.prompt_length + args.response_length + 8,
                                  attn_implementation=getattr(args, "attn", "eager"))
    reference = copy.deepcopy(policy)
    reward = sequence_classifier_like(config, seed=args.seed + 1)
    value = copy.deepcopy(reward)
    FLOOR.setdefault("rss_mb", round(_rss_mb()))
    FLOOR["trained_mb"] = round(sum(p.numel() * p.element_size() for m in (policy, value)
                                    for p in m.parameters()) / 2**20)
    g = torch.Generator().manual_seed(args.seed)
    prompts = []
    for _ in range(args.episodes):
        n = int(torch.randint(args.prompt_length // 2, args.prompt_length + 1, (1,), generator=g))
        prompts.append([BOS] + torch.randint(3, args.vocab, (n - 1,), generator=g).tolist())
    return policy, reference, reward, value, prompts


def run_rlhf(args) -> float:
    from rlhf_tasks.rl.models import Models
    from rlhf_tasks.rl.settings import RLSettings
    from rlhf_tasks.rl.trainer import train

    policy, reference, reward, value, prompts = build(args)
    critic_free = args.algorithm != "ppo"
    if critic_free:  # no value model: nothing of it is built or trained
        value = None
        FLOOR["trained_mb"] = round(sum(p.numel() * p.element_size()
                                        for p in policy.parameters()) / 2**20)
    else:
        value.requires_grad_(True)
    settings = RLSettings(
        algorithm=args.algorithm, samples_per_prompt=args.samples_per_prompt if critic_free else 1,
        train_steps=args.episodes // args.batch_size, batch_size=args.batch_size,
        num_minibatches=args.num_minibatches,
        microbatch_size=args.batch_size // args.num_minibatches, ppo_epochs=args.ppo_epochs,
        learning_rate=3e-6, temperature=args.temperature, response_length=args.response_length,
        missing_eos_penalty=0.0, seed=args.seed, rollout_cache=args.rollout_cache,
        dtype=args.dtype)
    for model in filter(None, (policy, reference, reward, value)):
        model.to(args.device)
    if args.dtype == "bf16":  # frozen models in bf16; trained weights stay fp32 masters
        import torch

        reference.to(torch.bfloat16)
        reward.to(torch.bfloat16)
    started = time.perf_counter()
    result = train(Models(policy=policy, critic=value, reference=reference, reward=reward),
                   prompts, settings, eos_token_id=EOS, pad_token_id=PAD, device=args.device)
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    # where the time went: each phase's share of the updates' time (ppo/time/*)
    phases = {k.split("/", 1)[1]: sum(h[k] for h in result.history)
              for k in result.history[0] if k.startswith("time/") and k != "time/update"}
    total = sum(phases.values()) or 1.0
    PHASES.update({k: round(v / total, 3) for k, v in phases.items()})
    # the training phase's achieved rate, estimated as 6 FLOPs per trained weight per
    # token (forward 2, backward 4; input embeddings are lookups), every PPO epoch
    trained = sum(p.numel() for m in filter(None, (policy, value))
                  for name, p in m.named_parameters() if "embed_tokens" not in name)
    tokens = sum(len(p) + args.response_length for p in prompts[:settings.train_steps
                                                                * args.batch_size])
    TRAINING["tflop_per_s"] = round(6 * trained * tokens * args.ppo_epochs
                                    / max(phases.get("training", 0.0), 1e-9) / 1e12, 3)
    return seconds


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1",
                                   eos_token="t2", unk_token="t3")
    fast.padding_side = "left"
    return fast


def run_trl(args) -> float:
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    policy, reference, reward, value, prompts = build(args)
    with tempfile.TemporaryDirectory() as tmp:
        # TRL 1.12: rollout batch = per_device_train_batch_size * gradient_accumulation_steps,
        # split into num_mini_batches minibatches, each one optimizer step (accumulation 1)
        config = PPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, num_mini_batches=args.num_minibatches,
            local_rollout_forward_batch_size=args.batch_size, total_episodes=args.episodes,
            num_ppo_epochs=args.ppo_epochs, response_length=args.response_length,
            temperature=args.temperature, learning_rate=3e-6, stop_token="eos",
            missing_eos_penalty=None, num_sample_generations=0, report_to="none",
            save_strategy="no", logging_steps=10_000, seed=args.seed,
            use_cpu=not args.device.startswith("cuda"), bf16=args.dtype == "bf16",
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = PPOTrainer(args=config, processing_class=_word_tokenizer(args.vocab),
                             model=policy, ref_model=reference, reward_model=reward,
                             value_model=value,
                             train_dataset=Dataset.from_dict({"input_ids": prompts}))
        started = time.perf_counter()
        trainer.train()
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - started


def run_trl_group(args) -> float:
    """TRL 1.16's RLOOTrainer or GRPOTrainer on the same work: the same random policy (TRL
    loads it, and its reference, from a folder), the same reward model, prompts, k, batch
    (``steps_per_generation`` minibatches, ``num_iterations`` passes), response length,
    temperature and KL coefficient (TRL puts beta * KL in the loss, we in the reward: one
    reference forward each).  A generation is ``per_device_train_batch_size x
    steps_per_generation`` completions."""
    import torch
    from datasets import Dataset

    grpo = args.algorithm in ("grpo", "dr_grpo")
    if grpo:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

    policy, reference, reward, value, prompts = build(args)
    del reference, value  # TRL loads its reference from the folder; it has no value model
    tokenizer = _word_tokenizer(args.vocab)
    updates = args.episodes // args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        policy.save_pretrained(f"{tmp}/policy")
        tokenizer.save_pretrained(f"{tmp}/policy")
        del policy
        extra = ({"loss_type": args.algorithm, "scale_rewards": "none" if args.algorithm ==
                  "dr_grpo" else "group"} if grpo else {"normalize_advantages": False})
        config = Config(
            output_dir=f"{tmp}/out", per_device_train_batch_size=args.batch_size //
            args.num_minibatches, steps_per_generation=args.num_minibatches,
            num_generations=args.samples_per_prompt,
            num_iterations=args.ppo_epochs, max_steps=updates * args.num_minibatches *
            args.ppo_epochs, max_completion_length=args.response_length,
            temperature=args.temperature, top_p=1.0, top_k=0, beta=0.05,
            learning_rate=3e-6, report_to="none", save_strategy="no", logging_steps=10_000,
            seed=args.seed, use_cpu=not args.device.startswith("cuda"),
            bf16=args.dtype == "bf16", dataloader_num_workers=0, disable_tqdm=True,
            model_init_kwargs={"dtype": torch.float32}, **extra)
        dataset = Dataset.from_dict({"prompt": [" ".join(f"t{i}" for i in p) for p in prompts]})
        trainer = Trainer(model=f"{tmp}/policy", reward_funcs=reward, args=config,
                          train_dataset=dataset, processing_class=tokenizer,
                          reward_processing_classes=tokenizer)
        FLOOR["rss_mb"] = round(_rss_mb())
        started = time.perf_counter()
        trainer.train()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - started


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def account(args) -> None:
    """The work and the memory a run needs, independent of the machine's speed and of the
    C allocator, each from a run of its own: matmul FLOPs per episode
    (``torch.utils.flop_counter``, a dispatch mode: generation, scoring and training
    alike), the peak of live tensor bytes (the profiler's allocation events, models
    included: what a GPU would need, before its caching allocator), and the resident
    floor: the process's memory once imports and models are in, plus what full-weight
    AdamW training cannot do without (a gradient and two moments per trained weight).
    On the CPU only: on a GPU the timed run reports ``peak_gpu_mb``."""
    if args.device != "cpu":
        sys.exit("--account runs on the CPU; on a GPU the timed run reports peak_gpu_mb")
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    run = run_rlhf if args.impl == "rlhf" else trl_runner(args)
    torch.manual_seed(args.seed)
    with FlopCounterMode(display=False) as counter:
        run(args)  # first: its models are built in a process without profiler data
    floor = FLOOR["rss_mb"] + 3 * FLOOR["trained_mb"]
    torch.manual_seed(args.seed)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(args)
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    print(json.dumps({"impl": args.impl, **FLOOR, **{k: v for k, v in vars(args).items()
                                                      if k not in ("compare", "runs", "trl_python")}}))
    print(f"gflop_per_episode={counter.get_total_flops() / 1e9 / args.episodes:.3f} "
          f"peak_tensor_mb={peak / 2**20:.0f} rss_floor_mb={floor:.0f}")


def single(args) -> None:
    import torch

    if args.account:
        return account(args)
    torch.manual_seed(args.seed)
    seconds = (run_rlhf if args.impl == "rlhf" else trl_runner(args))(args)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"impl": args.impl, "seconds": round(seconds, 2), "torch_threads":
                      torch.get_num_threads(), "phases": PHASES,
                      **{k: v for k, v in vars(args).items()
                         if k not in ("compare", "runs", "trl_python")}}))
    gpu = (f" peak_gpu_mb={torch.cuda.max_memory_allocated() / 2**20:.0f}"
           if args.device.startswith("cuda") else "")
    rate = (f" train_tflop_per_s={TRAINING['tflop_per_s']:g}"
            f" matmul_peak_tflop_per_s={matmul_peak(args.device, args.dtype):g}"
            if TRAINING else "")
    print(f"episodes_per_s={args.episodes / seconds:.3f} peak_rss_mb={peak_mb:.0f}{gpu}{rate}")


def trl_runner(args):
    """TRL 1.12's PPOTrainer for ppo, TRL 1.16's RLOO / GRPO trainers for the others."""
    return run_trl if args.algorithm == "ppo" else run_trl_group


def matmul_peak(device: str, dtype: str, n: int = 4096, repeats: int = 10) -> float:
    """The machine's measured matmul rate for the dtype (TFLOP/s): the best of ``repeats``
    n x n x n products after a warm-up, the ceiling the training phase is measured against."""
    import torch

    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    n = n if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=kind)
    b = torch.randn(n, n, device=device, dtype=kind)
    best = float("inf")
    for i in range(repeats + 2):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - started)
    return round(2 * n**3 / best / 1e12, 3)


def compare(args, argv: list[str]) -> None:
    passthrough = [a for a in argv if a not in ("--compare",)]
    drop = {"--runs", "--trl-python"}
    cleaned, skip = [], False
    for a in passthrough:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = True
            continue
        cleaned.append(a)
    # TRL 1.12 (its own venv) has the PPOTrainer; RLOO and GRPO are this environment's TRL
    trl_python, trl_name = ((args.trl_python, "trl-1.12") if args.algorithm == "ppo"
                            else (sys.executable, "trl-" + _trl_version()))
    if args.account:
        fields = {}
        for impl, python in (("rlhf", sys.executable), ("trl", trl_python)):
            fields[impl] = _run(impl, python, cleaned)
            print(f"{impl:<4} {_line(fields[impl])}", flush=True)
        ours, trl = fields["rlhf"], fields["trl"]
        print(f"work: TRL does {trl['gflop_per_episode'] / ours['gflop_per_episode']:.2f}x "
              f"our matmul FLOPs (the speed ratio at equal FLOP rates)")
        print(f"live tensors: {ours['peak_tensor_mb'] / trl['peak_tensor_mb']:.2f}x TRL's peak; "
              f"our resident floor is {ours['rss_floor_mb']:.0f} MB")
        return
    results: dict[str, list[tuple[float, float]]] = {"rlhf": [], "trl": []}
    for run in range(args.runs):
        for impl, python in (("rlhf", sys.executable), ("trl", trl_python)):
            fields = _run(impl, python, cleaned)
            results[impl].append((fields["episodes_per_s"],
                                  fields.get("peak_gpu_mb", fields["peak_rss_mb"])))
            print(f"run {run + 1} {impl:<4} {_line(fields)}", flush=True)
    med = {impl: (statistics.median(e for e, _ in r), statistics.median(m for _, m in r))
           for impl, r in results.items()}
    # memory: the GPU's peak allocation on a GPU, the process's peak RSS on the CPU
    print(f"median of {args.runs}: rlhf {med['rlhf'][0]:.3f} ep/s {med['rlhf'][1]:.0f} MB | "
          f"{trl_name} {med['trl'][0]:.3f} ep/s {med['trl'][1]:.0f} MB")
    print(f"speed ratio {med['rlhf'][0] / med['trl'][0]:.2f}x  "
          f"memory ratio {med['rlhf'][1] / med['trl'][1]:.2f}x")
    print(f"episodes_per_s={med['rlhf'][0]:.3f} peak_rss_mb={med['rlhf'][1]:.0f}")


def _trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def _line(fields: dict[str, float]) -> str:
    """A run's fields as it printed them (peak_gpu_mb too, on a GPU)."""
    return " ".join(f"{k}={v:g}" for k, v in fields.items())


def _run(impl: str, python: str, argv: list[str]) -> dict[str, float]:
    """One implementation in its own process; the fields of its last line."""
    proc = subprocess.run([python, __file__, "--impl", impl, *argv], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"{impl} run failed:\n{proc.stderr[-3000:]}")
    last = proc.stdout.strip().splitlines()[-1]
    return {k: float(v) for k, v in (kv.split("=") for kv in last.split())}


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.compare:
        compare(parsed, sys.argv[1:])
    else:
        single(parsed)
