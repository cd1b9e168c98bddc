"""PPO math against hand-computed values."""
import math

import pytest
import torch

from haoping import ppo


def test_gae_matches_hand_computation_and_ignores_padding():
    # one row of 3 real tokens then 1 pad; gamma=1, lam=0.5 to make every term visible
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    d2 = 1.0 + 0 - 0.4            # last real token: next value is 0, not the pad's 7
    d1 = 0.0 + 0.4 - 0.2
    d0 = 0.0 + 0.2 - 0.5
    a2 = d2
    a1 = d1 + 0.5 * a2
    a0 = d0 + 0.5 * a1
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2, 0.0])
    assert ret.tolist()[0] == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0])


def test_gae_gamma_lambda_defaults_reduce_to_discounted_sums():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.zeros(1, 3)
    mask = torch.ones(1, 3)
    adv, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # with zero values: A_t = r_t + 0.95 * A_{t+1}
    a2 = 0.3
    a1 = 0.2 + 0.95 * a2
    a0 = 0.1 + 0.95 * a1
    assert adv.tolist()[0] == pytest.approx([a0, a1, a2])


def test_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = ppo.whiten(x, mask)
    # mean 2, unbiased var 1 -> (x - 2) / 1
    assert w.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert ppo.whiten(x, mask, shift_mean=False).tolist()[0][:3] == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


def test_policy_loss_clips_ratio():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.25, 0.55]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    mask = torch.ones(1, 3)
    out = ppo.policy_loss(new, old, adv, mask, clip=0.2)
    # token 0: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 1: max(1*0.5, 1*0.8) = 0.8 (clipped)
    # token 2: max(-2*1.1, -2*1.1) = -2.2
    assert out.loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-5)
    assert out.clipfrac.item() == pytest.approx(2 / 3)
    log_ratio = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    assert out.approxkl.item() == pytest.approx(0.5 * (log_ratio ** 2).mean().item(), abs=1e-6)


def test_policy_loss_ignores_padding():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.1, 5.0]])
    adv = torch.tensor([[1.0, 100.0]])
    out = ppo.policy_loss(new, old, adv, torch.tensor([[1.0, 0.0]]), clip=0.2)
    assert out.loss.item() == pytest.approx(-math.exp(0.1), abs=1e-5)


def test_value_loss_clips_around_old_values():
    old_values = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    out = ppo.value_loss(values, old_values, returns, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-1)^2=0, clipped (0.2-1)^2=0.64 -> 0.64; token 1: both (0.1-1)^2=0.81
    assert out.loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2, abs=1e-6)
    assert out.clipfrac.item() == pytest.approx(0.5)


def test_adaptive_kl_controller_moves_toward_target():
    ctl = ppo.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=64)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 64 / 10000))
    ctl = ppo.AdaptiveKLController(0.2, 6.0, 10000)
    ctl.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert ctl.value == pytest.approx(0.2 * (1 - 0.1 * 100 / 10000))
    fixed = ppo.FixedKLController(0.3)
    fixed.update(100.0, 64)
    assert fixed.value == 0.3


def test_kl_estimators():
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    k1 = ppo.kl_estimate(logp, ref, "k1")
    assert k1.tolist()[0] == pytest.approx([math.log(2), math.log(0.5)])
    k3 = ppo.kl_estimate(logp, ref, "k3")
    # r = q/p: 0.5 and 2 -> (r - 1) - log r
    assert k3.tolist()[0] == pytest.approx([(0.5 - 1) - math.log(0.5), (2 - 1) - math.log(2)])
    assert (k3 >= 0).all()
    with pytest.raises(ValueError):
        ppo.kl_estimate(logp, ref, "k2")


def test_compute_rewards_puts_score_on_last_real_token():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # row 1 ended early (EOS at t=0)
    rewards, kl, _ = ppo.compute_rewards(torch.tensor([2.0, 3.0]), logp, ref, mask, kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.0, 2.0 - 0.1])
    assert rewards[1].tolist() == pytest.approx([3.0, 0.0, 0.0])
    assert kl[1, 1:].abs().sum().item() == 0.0


def test_reward_normalization_and_clipping():
    moments = ppo.RunningMoments()
    first = ppo.normalize_scores(torch.tensor([1.0, 3.0]), moments, clip=None)
    assert moments.mean == pytest.approx(2.0)
    assert first.tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)
    moments.update(torch.tensor([5.0, 7.0]))  # all four: mean 4, population var 5
    assert moments.mean == pytest.approx(4.0)
    assert moments.var == pytest.approx(5.0)
    clipped = ppo.normalize_scores(torch.tensor([-10.0, 0.5, 10.0]), None, clip=1.0)
    assert clipped.tolist() == [-1.0, 0.5, 1.0]


def test_center_by_group_subtracts_each_prompts_mean():
    scores = torch.tensor([0.9, 0.1, 0.4, 0.8, 0.5])
    groups = ["a", "b", "a", "b", "c"]  # a: mean 0.65, b: mean 0.45, c alone
    centered = ppo.center_by_group(scores, groups)
    assert centered.tolist() == pytest.approx([0.25, -0.35, -0.25, 0.35, 0.0])
    assert scores.tolist() == pytest.approx([0.9, 0.1, 0.4, 0.8, 0.5])  # input untouched


def test_entropy_and_logprobs():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    assert ppo.entropy_from_logits(logits).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    assert ppo.logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.25))
    masked = torch.tensor([[[0.0, 0.0, float("-inf")]]])  # e.g. EOS masked before min_new_tokens
    assert ppo.entropy_from_logits(masked).item() == pytest.approx(math.log(2))


def test_target_reward_factor_slows_learning_once_the_recent_mean_reaches_the_target():
    assert ppo.target_reward_factor([0.8, 0.9, 0.95], None, 0.1) == 1.0  # no target
    assert ppo.target_reward_factor([0.8, 0.9, 0.95], 0.9, 0.1) == 1.0  # mean 0.883 < 0.9
    assert ppo.target_reward_factor([0.9, 0.9, 0.95], 0.9, 0.1) == 0.1
    assert ppo.target_reward_factor([], 0.9, 0.0) == 1.0
