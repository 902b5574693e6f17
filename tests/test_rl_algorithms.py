"""The algorithms beside PPO: the advantage estimators by hand on small tensors, the
registry's rules, the config's, and the loop training without a value model."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_tasks.rl import core
from rlhf_tasks.rl.advantages import ESTIMATORS, GROUP_STD_EPS, estimator
from rlhf_tasks.rl.settings import RLSettings

# three samples of one prompt: scores 1, 2, 6; token masks of lengths 2, 3, 1
SCORES = torch.tensor([1.0, 2.0, 6.0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
NO_KL = torch.zeros(3, 3)


def estimate(name: str, scores=SCORES, kl=NO_KL, mask=MASK, values=None, beta=0.0, group=3,
             **settings):
    return ESTIMATORS[name].estimate(scores, kl, mask, values, beta=beta, group=group,
                                     settings=RLSettings(**settings), reduce=lambda t: t)


def test_rloo_subtracts_the_mean_of_the_other_samples():
    advantages, returns = estimate("rloo")
    # 1 - (2 + 6) / 2 = -3;  2 - (1 + 6) / 2 = -1.5;  6 - (1 + 2) / 2 = 4.5
    expected = torch.tensor([-3.0, -1.5, 4.5])
    assert returns is None
    assert torch.allclose(advantages, expected[:, None] * MASK)
    assert advantages.sum() == pytest.approx(-3 * 2 - 1.5 * 3 + 4.5)  # masked tokens: 0


def test_the_kl_penalty_comes_off_each_samples_reward_before_the_comparison():
    # summed KL per response 0.5, 0, 1 with beta 2: rewards 0, 2, 4
    kl = torch.tensor([[0.25, 0.25, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    advantages, _ = estimate("rloo", kl=kl, beta=2.0)
    # 0 - 3 = -3;  2 - 2 = 0;  4 - 1 = 3
    assert torch.allclose(advantages[:, 0], torch.tensor([-3.0, 0.0, 3.0]))
    centred, _ = estimate("dr_grpo", kl=kl, beta=2.0)  # mean 2
    assert torch.allclose(centred[:, 0], torch.tensor([-2.0, 0.0, 2.0]))


def test_grpo_normalises_within_the_group_and_dr_grpo_only_centres():
    # mean 3; std with Bessel's correction: sqrt((4 + 1 + 9) / 2) = sqrt(7)
    scaled, returns = estimate("grpo")
    assert returns is None
    expected = torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(7) + GROUP_STD_EPS)
    assert torch.allclose(scaled[:, 0], expected)
    centred, _ = estimate("dr_grpo")
    assert torch.allclose(centred, torch.tensor([-2.0, -1.0, 3.0])[:, None] * MASK)
    # a group whose samples all score the same teaches nothing (and divides by eps, not 0)
    flat, _ = estimate("grpo", scores=torch.tensor([0.5, 0.5, 0.5]))
    assert torch.equal(flat, torch.zeros(3, 3))


def test_groups_are_compared_only_within_themselves():
    # two prompts, two samples each: rows (0, 1) and (2, 3)
    scores = torch.tensor([1.0, 3.0, 10.0, 14.0])
    mask = torch.ones(4, 2)
    advantages, _ = estimate("rloo", scores=scores, kl=torch.zeros(4, 2), mask=mask, group=2)
    assert torch.allclose(advantages[:, 0], torch.tensor([-2.0, 2.0, -4.0, 4.0]))
    grpo, _ = estimate("grpo", scores=scores, kl=torch.zeros(4, 2), mask=mask, group=2)
    # (1, 3): mean 2, std sqrt(2); (10, 14): mean 12, std sqrt(8): -+1/sqrt(2) in both
    expected = torch.tensor([-1.0, 1.0, -1.0, 1.0]) / math.sqrt(2)
    assert torch.allclose(grpo[:, 0], expected, atol=1e-3)
    with pytest.raises(ValueError, match="groups of 3"):
        estimate("rloo", scores=scores, kl=torch.zeros(4, 2), mask=mask, group=3)


def test_ppo_is_gae_on_per_token_rewards_whitened():
    values = torch.tensor([[0.5, 0.2, 0.0], [0.1, 0.3, 0.2], [0.4, 0.0, 0.0]]) * MASK
    kl = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.1, 0.3], [0.2, 0.0, 0.0]])
    advantages, returns = estimate("ppo", kl=kl, values=values, beta=0.5, gamma=1.0, lam=0.9)
    rewards = core.token_rewards(SCORES, kl, 0.5, MASK)
    raw, expected_returns = core.gae(rewards, values, MASK, 1.0, 0.9)
    assert torch.allclose(returns, expected_returns)
    assert torch.allclose(advantages, core.masked_whiten(raw, MASK))
    # by hand, the one-token response (row 2): reward 6 - 0.5 * 0.2 = 5.9 at its only
    # token, value 0.4: advantage 5.5 before whitening, return 5.9
    assert raw[2, 0] == pytest.approx(5.5) and returns[2, 0] == pytest.approx(5.9)


def test_the_registry_says_which_estimators_need_a_critic():
    assert {n: e.need_critic for n, e in ESTIMATORS.items()} == {
        "ppo": True, "rloo": False, "grpo": False, "dr_grpo": False}
    assert ESTIMATORS["dr_grpo"].loss_tokens == "constant"
    assert {e.loss_tokens for n, e in ESTIMATORS.items() if n != "dr_grpo"} == {"batch"}
    with pytest.raises(ValueError, match="unknown algorithm 'reinforce'"):
        estimator("reinforce")


def test_the_config_refuses_groups_that_cannot_be_compared():
    from rlhf_tasks import config
    from rlhf_tasks.errors import BadInput

    with pytest.raises(BadInput, match="samples_per_prompt must be 2 or more"):
        config.validate({"ppo": {"algorithm": "grpo"}})
    with pytest.raises(BadInput, match="multiple of samples_per_prompt 3"):
        config.validate({"ppo": {"algorithm": "rloo", "samples_per_prompt": 3}})
    with pytest.raises(BadInput, match="ppo.algorithm"):
        config.validate({"ppo": {"algorithm": "reinforce"}})
    cfg = config.validate({"ppo": {"algorithm": "rloo", "samples_per_prompt": 4}})
    assert cfg.ppo.algorithm == "rloo"


def test_one_source_for_the_settings_names_and_defaults():
    """The loop's settings are the config section's fields (same names, same defaults)
    plus the derived values."""
    from rlhf_tasks.config import PPOSection

    section, settings = PPOSection(), RLSettings()
    shared = set(PPOSection.model_fields) - {"response_length", "checkpoint_every"}
    assert shared <= set(RLSettings.model_fields)
    assert {n: getattr(settings, n) for n in shared} == {n: getattr(section, n) for n in shared}
    assert {"learning_rate", "score_mean", "score_std", "dtype", "seed"} <= set(
        RLSettings.model_fields) - set(PPOSection.model_fields)
    with pytest.raises(ValueError, match="no loss scaling"):
        RLSettings(dtype="fp16")


def test_a_constant_loss_divisor_scales_the_gradient_by_the_token_count():
    """[Dr. GRPO] the loss over rows x response_length instead of the minibatch's response
    tokens: the same direction, scaled by tokens / (rows x response_length)."""
    from test_ppo_trainer import _minibatch_gradient

    batch_mean, tokens = _minibatch_gradient(2, return_tokens=True)
    constant, _ = _minibatch_gradient(2, loss_tokens="constant", return_tokens=True)
    scale = tokens / (8 * 8)  # 8 rows, response_length 8
    assert 0 < scale < 1
    for a, b in zip(batch_mean, constant):
        assert torch.allclose(a * scale, b, atol=1e-7, rtol=1e-4), (a * scale - b).abs().max()


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "dr_grpo"])
def test_the_loop_trains_without_a_value_model_and_resumes_exactly(algorithm, tmp_path,
                                                                    monkeypatch):
    """No critic is built or trained; each update samples every prompt k times in a row
    (a group); a run stopped after one update and resumed ends with the weights of one
    that ran straight through."""
    from test_ppo_trainer import DEVICE, EOS, PAD, prompts, tiny

    from rlhf_tasks.rl import trainer
    from rlhf_tasks.rl.checkpoints import weights_digest

    settings = RLSettings(algorithm=algorithm, samples_per_prompt=4, train_steps=2,
                          batch_size=8, num_minibatches=2, microbatch_size=4, ppo_epochs=1,
                          response_length=5, learning_rate=1e-2, checkpoint_every=1)
    queries = []
    collect = trainer.collect_rollouts
    monkeypatch.setattr(trainer, "collect_rollouts", lambda unwrapped, ids, mask, *a: (
        queries.append((ids * mask).tolist()) or collect(unwrapped, ids, mask, *a)))

    def run(folder, **kwargs):
        models = tiny(4, "shared", critic=False)
        assert models.critic is None and models.reward is not None
        return models, trainer.train(models, prompts(), settings, eos_token_id=EOS,
                                     pad_token_id=PAD, device=DEVICE,
                                     checkpoint_dir=tmp_path / folder, **kwargs)

    straight, result = run("straight")
    assert result.updates == 2
    assert not {"value_loss", "value_clipfrac", "explained_variance"} & set(result.history[-1])
    assert {"policy_loss", "kl", "entropy", "reward_mean"} <= set(result.history[-1])
    for rows in queries:  # 2 prompts x 4 samples per update
        assert len(rows) == 8 and all(rows[i] == rows[i - i % 4] for i in range(8))
        assert rows[0] != rows[4]
    run("resumed", stop_after=1)
    resumed, again = run("again", resume_from=tmp_path / "resumed" / "update-000001")
    assert again.resumed_from == 1 and again.updates == 2
    assert weights_digest(resumed.policy) == weights_digest(straight.policy)


def test_the_loop_refuses_models_that_do_not_fit_the_algorithm():
    from test_ppo_trainer import EOS, PAD, prompts, tiny

    from rlhf_tasks.rl.trainer import train

    with pytest.raises(ValueError, match="grpo trains no value model"):
        train(tiny(4, "shared"), prompts(), RLSettings(algorithm="grpo", samples_per_prompt=2),
              eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(ValueError, match="ppo needs a value model"):
        train(tiny(4, "shared", critic=False), prompts(), RLSettings(), eos_token_id=EOS,
              pad_token_id=PAD)
