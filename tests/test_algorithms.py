"""GRPO/RLOO advantages, the critic-free loss and reward shaping, against hand computations."""
import math

import pytest
import torch

from haoping import algorithms, ppo


def test_group_ids_are_dense_in_order_of_first_appearance():
    assert algorithms.group_ids([(2, 5), (2, 6), (2, 5), (7,)]).tolist() == [0, 1, 0, 2]


def test_grpo_advantages_normalize_within_each_prompt():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 2])
    adv = algorithms.grpo_advantages(scores, groups, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.7071 -> +-0.5 / 0.7071
    assert adv[:2].tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)])
    # group 1: identical scores -> 0 (std 0 and centered 0); group 2: one sample -> 0
    adv_eps = algorithms.grpo_advantages(scores, groups)
    assert adv_eps[2:].tolist() == [0.0, 0.0, 0.0]
    assert adv_eps[0].item() == pytest.approx(0.5 / (0.5 ** 0.5 + 1e-4))
    # scale=False: centering only
    assert algorithms.grpo_advantages(scores, groups, scale=False).tolist() == [0.5, -0.5, 0.0, 0.0, 0.0]


def test_grpo_advantages_are_the_same_whatever_the_row_order():
    scores = torch.tensor([0.9, 0.1, 0.3, 0.7, 0.2, 0.6])
    groups = torch.tensor([0, 1, 0, 1, 0, 1])
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    full = algorithms.grpo_advantages(scores, groups)
    assert torch.allclose(algorithms.grpo_advantages(scores[perm], groups[perm]), full[perm])


def test_rloo_advantages_leave_one_out():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.3])
    groups = torch.tensor([0, 0, 0, 1])
    # 1 - (0 + 0.5) / 2 = 0.75; 0 - (1 + 0.5) / 2 = -0.75; 0.5 - (1 + 0) / 2 = 0; alone -> 0
    assert algorithms.rloo_advantages(scores, groups).tolist() == pytest.approx([0.75, -0.75, 0.0, 0.0])


def test_critic_free_loss_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.5, 0.9, 0.9]]))
    ref_logp = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.25, 0.1, 0.1]]))  # ref/p = 1/2 on real tokens
    adv = torch.tensor([2.0, -1.0])
    out = algorithms.critic_free_loss(logp, logp.detach(), ref_logp, adv, mask, clip=0.2, beta=0.5)
    k3 = (0.5 - 1) - math.log(0.5)  # (r - 1) - log r, r = ref/p = 1/2
    assert out.kl.item() == pytest.approx(k3)
    # ratio 1: per-token -A, averaged over the 3 real tokens: (-2 - 2 + 1) / 3
    assert out.policy.item() == pytest.approx(-1.0)
    assert out.loss.item() == pytest.approx(-1.0 + 0.5 * k3)
    assert out.clipfrac.item() == 0.0


def test_critic_free_loss_clips_the_ratio_and_pads_nothing():
    mask = torch.tensor([[1.0, 0.0]])
    old = torch.log(torch.tensor([[0.4, 0.4]]))
    logp = torch.log(torch.tensor([[0.6, 0.01]]))  # ratio 1.5 on the real token; the padding is ignored
    out = algorithms.critic_free_loss(logp, old, logp, torch.tensor([1.0]), mask, clip=0.2, beta=1.0)
    assert out.policy.item() == pytest.approx(-1.2)  # max(-1.5, -1.2)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-7)  # policy == reference
    assert out.clipfrac.item() == 1.0


def test_critic_free_gradient_raises_a_good_sample_and_lowers_a_bad_one():
    logits = torch.zeros(2, 1, 3, requires_grad=True)
    tokens = torch.tensor([[0], [1]])
    logp = ppo.logprobs_from_logits(logits, tokens)
    out = algorithms.critic_free_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0, -1.0]),
                                      torch.ones(2, 1), clip=0.2, beta=0.0)
    out.loss.backward()
    assert logits.grad[0, 0, 0] < 0 and logits.grad[1, 0, 1] > 0  # descent raises token 0 in row 0, lowers 1 in row 1


def shape(scores, empty=None, groups=None, **options):
    scores = torch.tensor(scores)
    defaults = dict(empty_response_reward=None, normalization="none", moments=None, clip=None, baseline="none")
    return algorithms.shape_rewards(scores, torch.tensor(empty or [False] * len(scores)),
                                    groups or list(range(len(scores))), **{**defaults, **options})


def test_shape_rewards_each_step_by_hand():
    assert shape([0.9, 0.8], empty=[False, True], empty_response_reward=0.0).tolist() == pytest.approx([0.9, 0.0])
    assert shape([0.9, 0.8], empty=[False, True]).tolist() == pytest.approx([0.9, 0.8])  # None: keep the score
    assert shape([0.0, 2.0], normalization="sigmoid").tolist() == pytest.approx([0.5, 1 / (1 + math.exp(-2))])
    assert shape([-3.0, 0.5, 3.0], clip=1.0).tolist() == pytest.approx([-1.0, 0.5, 1.0])
    assert shape([0.9, 0.5, 0.3, 0.1], groups=["a", "a", "b", "b"], baseline="prompt_mean").tolist() == \
        pytest.approx([0.2, -0.2, 0.1, -0.1])
    moments = ppo.RunningMoments()
    running = shape([1.0, 3.0], normalization="running", moments=moments)
    assert running.tolist() == pytest.approx([-1.0, 1.0], abs=1e-6) and moments.mean == pytest.approx(2.0)


def test_shape_rewards_order_empty_then_normalize_then_clip_then_baseline():
    out = shape([4.0, 0.0, -4.0, 9.0], empty=[False, False, False, True], groups=["a", "a", "b", "b"],
                empty_response_reward=-4.0, normalization="sigmoid", clip=0.9, baseline="prompt_mean")
    s = [min(1 / (1 + math.exp(-x)), 0.9) for x in (4.0, 0.0, -4.0, -4.0)]  # the empty one is -4, then sigmoid
    assert out.tolist() == pytest.approx([s[0] - (s[0] + s[1]) / 2, s[1] - (s[0] + s[1]) / 2, 0.0, 0.0])


def test_shape_rewards_rejects_unknown_options():
    with pytest.raises(ValueError, match="normalization"):
        shape([1.0], normalization="softmax")
    with pytest.raises(ValueError, match="baseline"):
        shape([1.0], baseline="median")
