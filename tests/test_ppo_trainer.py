"""The PPO loop's plumbing on random tiny Llamas: rollouts, model layouts, settings."""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_tasks.config import LoraFields
from rlhf_tasks.generation import collate_prompts, position_ids
from rlhf_tasks.rl import core
from rlhf_tasks.rl.forwards import response_logits, token_values
from rlhf_tasks.rl.models import build_models, random_llama, sequence_classifier_like
from rlhf_tasks.rl.rollout import prompt_batch, rollout
from rlhf_tasks.rl.settings import RLSettings
from rlhf_tasks.rl.trainer import train

VOCAB, PAD, EOS = 120, 0, 2
# the same tests on a GPU: RLHF_TEST_DEVICE=cuda (benchmarks/gpu_check.sh)
DEVICE = os.environ.get("RLHF_TEST_DEVICE", "cpu")


def tiny(lora_rank: int, layout: str, critic: bool = True):
    policy, config = random_llama(VOCAB, 32, 2, 2, seed=0)
    models = build_models(policy, sequence_classifier_like(config),
                          lora=LoraFields(lora_rank=lora_rank), layout=layout, critic=critic)
    for model in filter(None, (models.policy, models.critic, models.reference, models.reward)):
        model.to(DEVICE)
    return models


def prompts(n: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),),
                                generator=g).tolist() for _ in range(n)]


def _rollout_vs_forward(models, settings, stop_ids):
    """Rollout log-probs and the training forward's log-probs of the same tokens."""
    ids, mask = collate_prompts(prompts(8), PAD, DEVICE)
    assert (mask[:, 0] == 0).any(), "some prompts must be left-padded"
    torch.manual_seed(0)
    responses, logprobs = rollout(models.policy, ids, mask, settings, stop_ids, PAD)
    keep, _ = core.response_mask(responses, stop_ids)
    responses = responses.masked_fill(keep == 0, PAD)
    full, full_mask = torch.cat([ids, responses], 1), torch.cat([mask, keep], 1)
    with torch.no_grad():
        logits = response_logits(models.policy, full, full_mask, position_ids(full_mask),
                                 responses.shape[1], settings.temperature)
    return (logprobs * keep, core.selective_logprobs(logits, responses) * keep, responses, keep)


# on a GPU, generate's cached forward and the full forward run different kernels
ATOL = 1e-5 if DEVICE == "cpu" else 1e-4


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_rollout_logprobs_equal_a_forward_pass_over_left_padded_prompts(cache):
    """Left padding + position ids + temperature: what generate sampled from is what the
    training forward computes (the PPO ratio starts at exactly 1), with the default KV
    cache and the static one (compiled on a GPU)."""
    settings = RLSettings(response_length=6, temperature=0.7, rollout_cache=cache)
    recorded, forward, _, _ = _rollout_vs_forward(tiny(4, "shared"), settings, EOS)
    assert torch.allclose(recorded, forward, atol=ATOL)


def test_a_microbatch_cut_to_its_longest_response_computes_the_same():
    """[length buckets]: right padding after the longest response changes nothing before
    it (causal attention), so the trimmed forward equals the full one on every kept
    token, for the policy's log-probs and the critic's values."""
    models = tiny(4, "shared")
    # stop ids common enough that the 8 responses end at different lengths
    _, _, responses, keep = _rollout_vs_forward(models, RLSettings(response_length=8),
                                                [EOS, *range(5, 40)])
    ids, mask = collate_prompts(prompts(8), PAD, DEVICE)
    lengths = keep.sum(1)
    assert lengths.min() < lengths.max(), "responses of different lengths"
    full, full_mask = torch.cat([ids, responses], 1), torch.cat([mask, keep], 1)
    width = responses.shape[1]
    rows = torch.argsort(lengths, descending=True)[4:]  # the shorter half
    w = int(lengths[rows].max())
    cols = ids.shape[1] + w
    with torch.no_grad():
        args = (full[rows], full_mask[rows], position_ids(full_mask)[rows])
        cut = (full[rows, :cols], full_mask[rows, :cols], position_ids(full_mask)[rows, :cols])
        logits_full = response_logits(models.policy, *args, width, 0.7)[:, :w]
        logits_cut = response_logits(models.policy, *cut, w, 0.7)
        values_full = token_values(models.critic, *args, width)[:, :w]
        values_cut = token_values(models.critic, *cut, w)
    kept = keep[rows, :w].bool()
    assert torch.allclose(logits_full[kept], logits_cut[kept], atol=ATOL)
    assert torch.allclose(values_full[kept], values_cut[kept], atol=ATOL)


def test_rollouts_ignore_the_checkpoints_generation_config(monkeypatch):
    """A real checkpoint's generation_config (repetition penalty, top-k/top-p, min-p,
    min_new_tokens) must not reach the rollouts: the recorded log-probs stay those of the
    training forward pass, and a response may stop at once."""
    models = tiny(4, "shared")
    gen = models.policy.get_base_model().generation_config
    gen.repetition_penalty, gen.top_k, gen.top_p, gen.min_p = 1.8, 5, 0.5, 0.2
    gen.min_new_tokens, gen.no_repeat_ngram_size, gen.do_sample = 4, 2, True
    gen.suppress_tokens = list(range(20, 60))  # a knob our settings leave unset
    settings = RLSettings(response_length=6, temperature=0.7)
    stops = [EOS, 7, 11]  # several stop ids, as Llama 3 and chat templates have
    recorded, forward, responses, keep = _rollout_vs_forward(models, settings, stops)
    assert torch.allclose(recorded, forward, atol=ATOL)
    # the checkpoint's settings are still there for anyone else
    assert models.policy.get_base_model().generation_config.repetition_penalty == 1.8
    # every response is cut after its first stop id
    for row, kept in zip(responses.tolist(), keep.sum(1).tolist()):
        assert not set(row[:kept - 1]) & set(stops)

    # the same rollout with the checkpoint's defaults let through (its unset knobs filled
    # from the checkpoint): the recorded log-probs no longer match the forward pass
    import contextlib

    from rlhf_tasks import generation

    monkeypatch.setattr(generation, "checkpoint_defaults_off", lambda m: contextlib.nullcontext())
    recorded, forward, _, _ = _rollout_vs_forward(models, settings, stops)
    assert not torch.allclose(recorded, forward, atol=1e-3)


@pytest.mark.parametrize("lora_rank,layout", [(4, "shared"), (4, "separate"), (0, "separate")])
def test_every_layout_trains_and_keeps_the_reference_fixed(lora_rank, layout):
    models = tiny(lora_rank, layout)
    assert (models.reward is None) == (layout == "shared" and lora_rank > 0)
    assert (models.reference is None) == (lora_rank > 0)
    before = {n: p.detach().clone() for n, p in models.policy.named_parameters()}
    reference = None if models.reference is None else {
        n: p.detach().clone() for n, p in models.reference.named_parameters()}
    settings = RLSettings(train_steps=2, batch_size=8, num_minibatches=2, microbatch_size=2,
                           ppo_epochs=2, response_length=5, learning_rate=1e-2)
    result = train(models, prompts(), settings, eos_token_id=EOS, pad_token_id=PAD,
                   device=DEVICE)
    assert result.updates == 2 and len(result.history) == 2
    changed = [n for n, p in models.policy.named_parameters()
               if p.requires_grad and not torch.equal(p, before[n])]
    assert changed, "the policy must have moved"
    frozen = [n for n, p in models.policy.named_parameters()
              if not p.requires_grad and not torch.equal(p, before[n])]
    assert frozen == [], "LoRA must not touch the base weights (they are the reference)"
    if reference is not None:
        for n, p in models.reference.named_parameters():
            assert torch.equal(p, reference[n]), n


def test_prompt_order_is_seeded_and_reshuffles_each_pass():
    data = [[i] for i in range(5)]
    first = prompt_batch(data, 0, 5, seed=3)
    assert sorted(first) == data
    assert prompt_batch(data, 0, 5, seed=3) == first
    # positions 5..9 are the second pass, in another order, and position 3 continues it
    second = prompt_batch(data, 5, 5, seed=3)
    assert sorted(second) == data and second != first
    assert prompt_batch(data, 3, 4, seed=3) == first[3:] + second[:2]


def test_settings_and_config_refuse_batches_that_do_not_divide():
    from rlhf_tasks import config
    from rlhf_tasks.errors import BadInput

    with pytest.raises(ValueError, match="num_minibatches"):
        RLSettings(batch_size=30, num_minibatches=4)
    with pytest.raises(BadInput, match="microbatch_size 3"):
        config.validate({"ppo": {"batch_size": 32, "num_minibatches": 4, "microbatch_size": 3}})


class _Payload:
    ran = False

    def __reduce__(self):  # what a tampered checkpoint would carry
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return "pwned"


def test_resume_loads_checkpoints_without_running_their_code(tmp_path):
    """The optimizer/scheduler state is loaded with weights_only=True: a pickled object in
    state.pt is refused, not executed; an honest checkpoint still resumes."""
    import pickle

    from rlhf_tasks.rl.checkpoints import load_checkpoint, save_checkpoint, trainable_state
    from rlhf_tasks.rl.forwards import PolicyAndValue

    models = tiny(4, "shared")
    wrapped = PolicyAndValue(models.policy, models.critic)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, core.linear_schedule(4))
    kl = core.KLController(0.05, 0.5, 1000)
    folder = save_checkpoint(tmp_path / "update-1", update=1,
                             weights=trainable_state(wrapped),
                             optimizer_state=optimizer.state_dict(), scheduler=scheduler,
                             kl_ctl=kl, data_position=8, history=[{"update": 1, "kl": 0.1}])
    state = load_checkpoint(folder, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                            kl_ctl=kl)
    assert state["update"] == 1 and state["data_position"] == 8
    # tamper: the same file with a code-running object inside
    honest = torch.load(folder / "state.pt", weights_only=True)
    torch.save({**honest, "history": [_Payload()]}, folder / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(folder, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler,
                        kl_ctl=kl)
    assert not _Payload.ran


def test_sampling_by_inverse_transform_draws_the_softmax_distribution():
    """[sampling] the recorder's draw: 40,000 rows of softmax([log .1, log .2, log .3,
    log .4, -inf]) come out .1/.2/.3/.4 (within 4 standard errors, about .01) and never
    the token of probability 0; at temperature T the probabilities are those of logits / T."""
    from rlhf_tasks.rl.rollout import sample_tokens

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.0]])).repeat(40_000, 1)
    drawn = sample_tokens(logits, torch.logsumexp(logits, -1)).squeeze(1)
    freq = torch.bincount(drawn, minlength=5).double() / len(drawn)
    assert freq[4] == 0
    assert torch.allclose(freq[:4], torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64),
                          atol=0.01)
    scaled = torch.log(torch.tensor([[0.2, 0.8]])).repeat(40_000, 1) / 0.5  # T = 0.5
    drawn = sample_tokens(scaled, torch.logsumexp(scaled, -1)).squeeze(1)
    # softmax(log p / 0.5) = p^2 / sum p^2 = (.04, .64) / .68
    assert abs(drawn.double().mean().item() - 0.64 / 0.68) < 0.01


class _GradientRecorder:
    """An optimizer stand-in that keeps the gradients of each step instead of stepping."""

    def __init__(self, params):
        self.params, self.steps = list(params), []

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None

    def step(self):
        self.steps.append([p.grad.detach().clone() for p in self.params])


def _minibatch_gradient(microbatch_size: int, loss_tokens: str = "batch",
                        return_tokens: bool = False):
    """The gradient of one PPO minibatch of 8 episodes of different lengths (and, with
    ``return_tokens``, the minibatch's response tokens)."""
    from rlhf_tasks.rl.distributed import Processes
    from rlhf_tasks.rl.forwards import PolicyAndValue
    from rlhf_tasks.rl.rollout import collect_rollouts
    from rlhf_tasks.rl.trainer import compute_advantages, score_rollouts
    from rlhf_tasks.rl.update import update_policy

    models = tiny(4, "shared")
    s = RLSettings(batch_size=8, num_minibatches=1, microbatch_size=microbatch_size,
                    ppo_epochs=1, response_length=8, max_grad_norm=1e9)
    ids, mask = collate_prompts(prompts(8), PAD, DEVICE)
    torch.manual_seed(0)
    wrapped = PolicyAndValue(models.policy, models.critic)
    batch = collect_rollouts(wrapped, ids, mask, s, [EOS, *range(5, 40)], PAD, DEVICE)
    assert batch.lengths.min() < batch.lengths.max(), "responses of different lengths"
    scored = score_rollouts(models, wrapped, batch, s, DEVICE)
    exp = compute_advantages(batch, scored, s, s.kl_coef, lambda t: t)
    # a ratio away from 1, so that clipping and the token weights matter
    exp.logprobs = exp.logprobs - 0.3 * batch.maskf
    params = [p for p in wrapped.parameters() if p.requires_grad]
    recorder = _GradientRecorder(params)
    update_policy(wrapped, wrapped, recorder, params, batch, exp, s, Processes(), 1, DEVICE,
                  loss_tokens=loss_tokens)
    if return_tokens:
        return recorder.steps[0], batch.maskf.sum().item()
    return recorder.steps[0]


def test_the_minibatch_gradient_does_not_depend_on_the_microbatch_size():
    """One token mean over the minibatch: microbatches of 1 and of 8 episodes give the same
    gradient (a per-microbatch mean weighted by rows gave short answers' tokens more)."""
    one, eight = _minibatch_gradient(1), _minibatch_gradient(8)
    for a, b in zip(one, eight):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), (a - b).abs().max()


def test_dropout_kept_as_a_float_attribute_is_switched_off_too():
    """OPT keeps its dropout probabilities as floats (``self.dropout``) and calls
    ``F.dropout`` itself: those are zeroed as well as ``nn.Dropout`` modules."""
    from transformers import OPTConfig, OPTForCausalLM

    from rlhf_tasks.rl.forwards import disable_dropout

    model = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     ffn_dim=32, num_attention_heads=2, dropout=0.3,
                                     attention_dropout=0.2, activation_dropout=0.1,
                                     max_position_embeddings=32, word_embed_proj_dim=16))
    floats = [(m, n) for m in model.modules() for n, v in vars(m).items()
              if "dropout" in n and isinstance(v, float) and v > 0]
    assert floats, "OPT keeps dropout probabilities as float attributes"
    disable_dropout(model)
    model.train()
    ids = torch.randint(3, 50, (2, 10))
    assert torch.equal(model(ids).logits, model(ids).logits), "training forward is deterministic"


def test_the_critic_starts_on_the_normalised_reward_scale():
    """At the start the critic's value at the last token is (score - mean) / std, the
    reward PPO gives; with the adapter disabled the reward model still reads raw scores."""
    from rlhf_tasks.reward_model import sequence_scores
    from rlhf_tasks.rl.forwards import adapters_disabled

    policy, config = random_llama(VOCAB, 32, 2, 2, seed=0)
    reward = sequence_classifier_like(config)
    ids, mask = collate_prompts(prompts(4), PAD, "cpu")  # the models stay on the CPU here
    last = mask.sum(1) * 0 + ids.shape[1] - 1
    with torch.no_grad():
        raw = sequence_scores(reward, ids, mask, position_ids(mask), last)
    for layout in ("shared", "separate"):
        models = build_models(policy if layout == "shared" else random_llama(
            VOCAB, 32, 2, 2, seed=0)[0], sequence_classifier_like(config) if layout ==
            "separate" else reward, lora=LoraFields(lora_rank=4), layout=layout, score_mean=0.7, score_std=2.0)
        with torch.no_grad():
            value = sequence_scores(models.critic, ids, mask, position_ids(mask), last)
            if models.reward is None:
                with adapters_disabled(models.critic):
                    still_raw = sequence_scores(models.critic, ids, mask, position_ids(mask),
                                                last)
            else:
                still_raw = sequence_scores(models.reward, ids, mask, position_ids(mask), last)
        assert torch.allclose(value, (raw - 0.7) / 2.0, atol=1e-5), layout
        assert torch.allclose(still_raw, raw, atol=1e-5), layout


def test_fp16_is_refused_with_one_line_before_any_step_runs():
    from rlhf_tasks import config
    from rlhf_tasks.errors import BadInput

    with pytest.raises(BadInput, match="no loss scaling"):
        config.validate({"compute": {"dtype": "fp16"}})
    with pytest.raises(ValueError, match="no loss scaling"):
        RLSettings(dtype="fp16")
