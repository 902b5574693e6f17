"""PPO math against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_tasks.rl import core

T = torch.tensor


def close(a, b, tol=1e-6):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), atol=tol), (a, b)


VALUES = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = T([[1, 1, 0], [1, 0, 0]])  # kept entries: 1, 2, 4


def test_masked_mean_and_var():
    close(core.masked_mean(VALUES, MASK), 7 / 3)                     # (1 + 2 + 4) / 3
    close(core.masked_mean(VALUES, MASK, dim=1), [1.5, 4.0])
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares sum to 42/9 = 14/3
    close(core.masked_var(VALUES, MASK, unbiased=False), 14 / 9)
    close(core.masked_var(VALUES, MASK), 7 / 3)                      # 14/3 / (3 - 1)


def test_masked_whiten_keeps_padding_zero():
    out = core.masked_whiten(VALUES, MASK)
    sd = math.sqrt(7 / 3)
    close(out, [[(1 - 7 / 3) / sd, (2 - 7 / 3) / sd, 0.0], [(4 - 7 / 3) / sd, 0.0, 0.0]], 1e-5)
    # reward whitening: the scale changes, the mean stays
    out = core.masked_whiten(VALUES, MASK, shift_mean=False)
    close(out, [[(1 - 7 / 3) / sd + 7 / 3, (2 - 7 / 3) / sd + 7 / 3, 0.0],
                [(4 - 7 / 3) / sd + 7 / 3, 0.0, 0.0]], 1e-5)


def test_selective_logprobs_and_entropy():
    logits = T([[0.0, math.log(3.0)]])          # softmax = [1/4, 3/4]
    close(core.selective_logprobs(logits, T([1])), [math.log(0.75)])
    close(core.selective_logprobs(logits, T([0])), [math.log(0.25)])
    close(core.entropy_from_logits(torch.zeros(1, 4)), [math.log(4.0)])   # uniform over 4
    # -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.562335
    close(core.entropy_from_logits(logits), [0.5623351446])
    big = torch.randn(2, 5, 11)
    tokens = torch.randint(11, (2, 5))
    close(core.selective_logprobs(big, tokens),
          torch.log_softmax(big, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1), 1e-5)


def test_selective_logprobs_gradient_matches_log_softmax():
    logits = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(7, (3, 4))
    weights = torch.randn(3, 4, dtype=torch.float64)
    (core.selective_logprobs(logits, tokens, rows_per_chunk=5) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    reference = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (reference * weights).sum().backward()
    close(ours, logits.grad, 1e-12)
    # by hand: d/dz log softmax(z)[k] = onehot(k) - softmax(z); z = [0, ln 3], k = 1
    z = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    core.selective_logprobs(z, T([1])).sum().backward()
    close(z.grad, [[-0.25, 0.25]])


def test_selective_logprobs_consuming_its_logits_writes_the_same_gradient_in_place():
    """consume=True: the gradient reaching the (non-leaf) logits is written into their own
    storage, so a training step holds one vocabulary-wide tensor instead of two."""
    weights = torch.randn(3, 4, dtype=torch.float64)
    tokens = torch.randint(7, (3, 4))
    base = torch.randn(3, 4, 7, dtype=torch.float64)
    grads = []
    for consume in (False, True):
        x = base.clone().requires_grad_(True)
        logits = x * 2.0  # a non-leaf, as a model's output is
        seen = {}
        logits.register_hook(lambda g: seen.update(ptr=g.data_ptr()))
        (core.selective_logprobs(logits, tokens, rows_per_chunk=5, consume=consume)
         * weights).sum().backward()
        assert (seen["ptr"] == logits.data_ptr()) is consume
        grads.append(x.grad)
    x = base.clone().requires_grad_(True)
    (torch.log_softmax(x * 2.0, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
     * weights).sum().backward()
    close(grads[0], x.grad, 1e-12)
    close(grads[1], x.grad, 1e-12)


def test_kl_estimators():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    close(core.kl_penalty(logp, ref, "k1"), [math.log(2.0)])              # ln .5 - ln .25
    close(core.kl_penalty(logp, ref, "k3"), [-0.5 + math.log(2.0)])       # (r - 1) - ln r, r=.5
    close(core.kl_penalty(ref, ref, "k3"), [0.0])
    with pytest.raises(ValueError, match="k2"):
        core.kl_penalty(logp, ref, "k2")


def test_token_rewards_put_the_score_on_the_last_token():
    kl = T([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    out = core.token_rewards(T([1.0, 2.0]), kl, 0.5, mask)
    close(out, [[-0.05, -0.10, -0.15 + 1.0], [-0.20, -0.25 + 2.0, 0.0]])


def test_gae_by_hand():
    rewards, values = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.5, 0.5]])
    adv, ret = core.gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.5, 0.5]])                 # every A_t = 1 - 0.5
    close(ret, [[1.0, 1.0, 1.0]])
    adv, _ = core.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    # d2 = 1 - .5 = .5; d1 = .9*.5 - .5 = -.05; A1 = -.05 + .45*.5 = .175; A0 = -.05 + .45*.175
    close(adv, [[0.02875, 0.175, 0.5]])
    # padding (value 9 at a masked position) must not leak into the advantages
    adv, ret = core.gae(T([[0.0, 1.0, 0.0]]), T([[0.5, 0.5, 9.0]]), T([[1, 1, 0]]), 1.0, 1.0)
    close(adv, [[0.5, 0.5, 0.0]])
    close(ret, [[1.0, 1.0, 0.0]])


def test_policy_loss_clips():
    old = torch.zeros(1, 2)
    new = old + math.log(1.5)                       # ratio 1.5 on both tokens
    loss, stats = core.policy_loss(new, old, T([[1.0, -1.0]]), torch.ones(1, 2), clip=0.2)
    # token 1: max(-1.5, -1.2) = -1.2; token 2: max(1.5, 1.2) = 1.5; mean = 0.15
    close(loss, 0.15)
    close(stats["clipfrac"], 0.5)
    # k3 of KL(rollout || current) with r = p_current / p_rollout = 1.5: (r - 1) - log r
    close(stats["approx_kl"], 0.5 - math.log(1.5))
    close(stats["ratio"], 1.5)


def test_approx_kl_is_oriented_and_ignores_what_follows_the_stop_token():
    """r = 0.5 on the one kept token: (0.5 - 1) - log 0.5 = 0.19315 (the mirrored k3,
    (1/r - 1) + log r, would give 0.30685); the padding after the stop token carries a
    log-prob of -200 (exp overflows in float32) and changes nothing."""
    old = T([[math.log(0.5), 0.0]])
    new = T([[math.log(0.25), -200.0]])
    mask = T([[1, 0]])
    loss, stats = core.policy_loss(new, old, T([[1.0, 0.0]]), mask, clip=0.2)
    close(stats["approx_kl"], -0.5 + math.log(2))
    assert torch.isfinite(loss) and torch.isfinite(stats["approx_kl"])
    assert torch.isfinite(stats["ratio"])


def test_a_token_mean_over_the_minibatch_weighs_every_token_the_same():
    """Two microbatches of a minibatch: 4 tokens of advantage 1 and 1 token of advantage 3,
    ratio 1.  The minibatch's token mean is (4 * -1 + 1 * -3) / 5 = -1.4; the old
    per-microbatch means rescaled by rows gave (-1 + -3) / 2 = -2 (the short row's token
    4x the weight of each long one)."""
    zeros = torch.zeros(1, 4)
    long_loss, _ = core.policy_loss(zeros, zeros, T([[1.0, 1, 1, 1]]), torch.ones(1, 4),
                                    clip=0.2, tokens=5.0)
    short_loss, _ = core.policy_loss(zeros, zeros, T([[3.0, 0, 0, 0]]), T([[1, 0, 0, 0]]),
                                     clip=0.2, tokens=5.0)
    close(long_loss + short_loss, -1.4)
    v_long, _ = core.value_loss(torch.ones(1, 4), torch.ones(1, 4), torch.zeros(1, 4),
                                torch.ones(1, 4), clip=10.0, tokens=5.0)
    close(v_long, 0.5 * 4 / 5)


def test_reward_whitening_keeps_the_mean_not_each_sign():
    """[-1, 11]: mean 5, unbiased variance 72; (x - 5) / sqrt(72) + 5 -> 4.2929, 5.7071."""
    out = core.masked_whiten(T([[-1.0, 11.0]]), torch.ones(1, 2), shift_mean=False)
    close(out, [[5 - 6 / math.sqrt(72), 5 + 6 / math.sqrt(72)]], tol=1e-5)
    assert out[0, 0] > 0


def test_value_loss_clips():
    loss, stats = core.value_loss(T([[2.0]]), T([[1.0]]), T([[3.0]]), torch.ones(1, 1), clip=0.5)
    close(loss, 1.125)                              # 0.5 * max((2-3)^2, (1.5-3)^2)
    close(stats["clipfrac"], 1.0)
    loss, stats = core.value_loss(T([[1.2]]), T([[1.0]]), T([[3.0]]), torch.ones(1, 1), clip=0.5)
    close(loss, 0.5 * 1.8 ** 2)
    close(stats["clipfrac"], 0.0)


def test_explained_variance():
    returns, mask = T([[1.0, 2.0, 3.0]]), torch.ones(1, 3)
    assert core.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert core.explained_variance(T([[2.0, 2.0, 2.0]]), returns, mask) == pytest.approx(0.0)


def test_kl_controller():
    fixed = core.KLController(0.1)
    fixed.update(50.0, 100)
    assert fixed.value == 0.1
    adaptive = core.KLController(0.1, target=6.0, horizon=10000)
    adaptive.update(12.0, 100)                      # error clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    adaptive.load_state_dict({"value": 0.1, "target": 6.0, "horizon": 10000})
    adaptive.update(5.4, 100)                       # error -0.1
    assert adaptive.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10000))


def test_response_mask_truncates_at_eos():
    mask, has_eos = core.response_mask(T([[5, 2, 7], [5, 6, 7], [2, 2, 2]]), eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_linear_schedule():
    schedule = core.linear_schedule(4)
    assert [schedule(i) for i in (0, 2, 4, 5)] == [1.0, 0.5, 0.0, 0.0]


def test_slope_by_hand():
    # y = 0.1, 0.3, 0.5: slope 0.2; x mean 1, y mean 0.3: (-1)(-0.2) + (1)(0.2) / 2 = 0.2
    assert core.slope([0.1, 0.3, 0.5]) == pytest.approx(0.2)
    assert core.slope([0.4]) == 0.0
    assert core.slope([1.0, 0.0, 1.0, 0.0]) == pytest.approx(-0.2)


def test_drift_warnings_name_what_crossed_its_bound():
    from rlhf_tasks.config import DriftBounds
    from rlhf_tasks.steps.ppo import drift_warnings

    first = {"kl": 0.0, "kl_slope": 0.0, "entropy": 2.0, "policy_clipfrac": 0.05,
             "response_length": 20.0}
    calm = dict(first, kl=0.3, kl_slope=0.05, response_length=25.0)
    assert drift_warnings([first, calm], DriftBounds()) == []
    wild = dict(first, kl=3.0, kl_slope=0.4, entropy=0.01, policy_clipfrac=0.5,
                response_length=8.0)
    warnings = drift_warnings([first, wild], DriftBounds())
    assert warnings == [
        "ppo: KL to the reference 3.000 is above 2.0",
        "ppo: KL still grows by 0.400 per update (above 0.25)",
        "ppo: policy clip fraction 0.500 is above 0.3",
        "ppo: entropy 0.010 is below 0.05 (the policy is collapsing onto few answers)",
        "ppo: mean response length went from 20.0 to 8.0 tokens (more than 2.0x)"]
    off = DriftBounds(kl_above=None, kl_slope_above=None, entropy_below=None,
                      clipfrac_above=None, length_ratio_above=None)
    assert drift_warnings([first, wild], off) == []
