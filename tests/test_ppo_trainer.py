"""The PPO trainer on a tiny policy: batching, options, checkpoint round trip."""
import math

import pytest
import torch

from haoping import ppo_trainer
from haoping.ppo_trainer import PPOConfig, PPOTrainer, build_rollout_batch, lr_factor, shared_query_groups

QUERIES = [[2, 10, 11], [2, 12], [2, 13, 14, 15]]
RESPONSES = [[20, 21, 3], [22, 23, 24, 25], [26]]
SCORES = [0.9, 0.1, 0.5]
EXPECTED_STATS = ["objective/kl", "objective/kl_coef", "objective/entropy", "ppo/policy/clipfrac",
                  "ppo/policy/approxkl", "ppo/val/vpred", "ppo/val/var_explained", "ppo/returns/mean",
                  "env/reward_mean", "env/reward_std", "ppo/loss/policy", "ppo/loss/value", "time/ppo/total"]


def test_mixed_length_batch_is_left_padded_with_positions_from_first_real_token():
    batch = build_rollout_batch(QUERIES, RESPONSES, pad_id=0)
    assert batch.query_width == 4
    assert batch.input_ids[1].tolist() == [0, 0, 2, 12, 22, 23, 24, 25]
    assert batch.attention_mask[2].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch.position_ids[1].tolist()[2:] == [0, 1, 2, 3, 4, 5]
    assert batch.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_step_reports_trl_statistics_and_advances_version(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=2, ppo_epochs=2))
    stats = trainer.step(QUERIES, RESPONSES, SCORES)
    assert trainer.version == 1
    for key in EXPECTED_STATS:
        assert key in stats and math.isfinite(stats[key]), key
    assert stats["env/reward_mean"] == pytest.approx(0.5)
    assert stats["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # first step: policy == reference


def test_padding_does_not_change_a_rollouts_logprobs(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy))
    alone = trainer._rollout_forward(build_rollout_batch(QUERIES[:1], RESPONSES[:1], trainer.pad_id))
    mixed = trainer._rollout_forward(build_rollout_batch(QUERIES, RESPONSES, trainer.pad_id))
    assert torch.allclose(alone["logp"][0, :3], mixed["logp"][0, :3], atol=1e-5)
    assert torch.allclose(alone["values"][0, :3], mixed["values"][0, :3], atol=1e-5)


def test_logprobs_are_those_of_the_response_tokens(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy))
    query, response = QUERIES[1], RESPONSES[1]
    old = trainer._rollout_forward(build_rollout_batch([query], [response], trainer.pad_id))
    with torch.no_grad():  # independently: one full forward of query + response, no padding
        full = trainer.ref_model(input_ids=torch.tensor([query + response])).logits.log_softmax(-1)[0]
    expected = [full[len(query) - 1 + t, token].item() for t, token in enumerate(response)]
    assert old["logp"][0].tolist() == pytest.approx(expected, abs=1e-5)
    assert old["ref_logp"][0].tolist() == pytest.approx(expected, abs=1e-5)  # policy == reference at start


def test_gradient_accumulation_equals_one_big_minibatch(tiny_policy):
    results = []
    for accumulation in (1, 3):
        trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=3, gradient_accumulation_steps=accumulation,
                                                         ppo_epochs=1, seed=0))
        trainer.step(QUERIES, RESPONSES, SCORES)
        results.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_kl_loss_term_pulls_the_policy_back_toward_the_reference(tiny_policy):
    def distance_to_reference(trainer):
        return sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(trainer.model.lm.parameters(),
                                                               trainer.ref_model.parameters()))

    moved = {}
    for coef in (0.0, 50.0):
        trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=3, ppo_epochs=4, learning_rate=1e-3,
                                                         kl_loss_coef=coef, seed=0, freeze_embeddings=False))
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():  # start away from the reference
            for p in trainer.model.lm.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=noise))
        start = distance_to_reference(trainer)
        stats = trainer.step(QUERIES, RESPONSES, [0.5, 0.5, 0.5])
        assert stats["ppo/loss/kl"] > 0
        moved[coef] = distance_to_reference(trainer) - start
    # Adam moves every weight by about lr per step whatever the gradient; the KL term makes
    # those steps point back toward the reference, so the drift away from it nearly stops
    assert moved[50.0] < 0.1 * moved[0.0]


def test_value_warmup_freezes_policy_and_trains_value_head(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(value_warmup_steps=1, value_learning_rate=1e-2))
    lm_before = [p.detach().clone() for p in trainer.model.lm.parameters()]
    head_before = trainer.model.value_head.weight.detach().clone()
    trainer.step(QUERIES, RESPONSES, SCORES)
    assert all(torch.equal(a, b) for a, b in zip(lm_before, trainer.model.lm.parameters()))
    assert not torch.equal(head_before, trainer.model.value_head.weight)
    trainer.step(QUERIES, RESPONSES, SCORES)  # warm-up over: the policy moves
    assert not all(torch.equal(a, b) for a, b in zip(lm_before, trainer.model.lm.parameters()))


def test_freeze_embeddings_keeps_token_embeddings_and_lm_head_fixed(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(freeze_embeddings=True, learning_rate=1e-2))
    lm = trainer.model.lm
    embeddings = lm.get_input_embeddings().weight.detach().clone()
    head = lm.get_output_embeddings().weight.detach().clone()
    block = next(p for n, p in lm.named_parameters() if ".h.0." in n).detach().clone()
    trainer.step(QUERIES, RESPONSES, SCORES)
    assert torch.equal(embeddings, lm.get_input_embeddings().weight)
    assert torch.equal(head, lm.get_output_embeddings().weight)
    assert not torch.equal(block, next(p for n, p in lm.named_parameters() if ".h.0." in n))
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(lm.get_input_embeddings().weight) not in optimized
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(freeze_embeddings=False, learning_rate=1e-2))
    trainer.step(QUERIES, RESPONSES, SCORES)
    assert not torch.equal(embeddings, trainer.model.lm.get_input_embeddings().weight)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_whole_batch_minibatch_reuses_the_rollout_forward_with_the_same_result(tiny_policy, algorithm):
    results = []
    for fuse in (True, False):
        trainer = PPOTrainer(str(tiny_policy), PPOConfig.from_dict(
            {"algorithm": algorithm, "minibatch_size": len(QUERIES), "learning_rate": 1e-2, "seed": 3}))
        trainer.fuse_first_forward = fuse
        if fuse:  # the separate no-grad rollout forward must not run at all
            trainer._rollout_forward = None
        stats = [trainer.step(QUERIES, RESPONSES, SCORES) for _ in range(2)]
        results.append((stats, [p.detach().clone() for p in trainer.model.parameters()]))
    (fused_stats, fused_params), (plain_stats, plain_params) = results
    for fused, plain in zip(fused_stats, plain_stats):
        for key in ("objective/kl", "objective/entropy", "ppo/policy/entropy", "ppo/loss/policy", "ppo/loss/value",
                    "ppo/val/vpred"):
            if key in plain:
                assert fused[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


SHARED_QUERIES = [QUERIES[0], QUERIES[1], QUERIES[0], QUERIES[2], QUERIES[1], QUERIES[0]]
SHARED_RESPONSES = [[20, 21, 3], [22, 23, 24, 25], [27, 3], [26], [28, 29], [30, 31, 32, 33]]


def test_repeated_queries_are_grouped_and_distinct_ones_are_not():
    batch = build_rollout_batch(SHARED_QUERIES, SHARED_RESPONSES, pad_id=0)
    first, group = shared_query_groups(batch)
    g = group.tolist()
    assert g[0] == g[2] == g[5] and g[1] == g[4] and len({g[0], g[1], g[3]}) == 3
    assert sorted(first.tolist()) == [0, 1, 3]  # each group's first row
    assert all(group[first[k]] == k for k in range(3))
    # a pad-id token inside a query is not padding: such a query is its own group
    assert len(shared_query_groups(build_rollout_batch([[0, 5], [5], [0, 5], [5]], [[6]] * 4, pad_id=0))[0]) == 2
    assert shared_query_groups(build_rollout_batch(QUERIES, RESPONSES, pad_id=0)) is None  # nothing to share


def test_shared_query_pass_gives_the_logits_values_and_gradients_of_one_pass_per_row(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy))
    batch = build_rollout_batch(SHARED_QUERIES, SHARED_RESPONSES, trainer.pad_id)
    results = []
    for shared in (True, False):
        trainer.model.zero_grad()
        logits, values = trainer.model(batch, share_queries=shared)
        mask = batch.response_mask
        ((logits.log_softmax(-1).amax(-1) * mask).sum() + (values * mask).sum()).backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), values.detach(), grads))
    (logits, values, grads), (plain_logits, plain_values, plain_grads) = results
    real = batch.response_mask.bool()
    torch.testing.assert_close(logits[real], plain_logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[real], plain_values[real], atol=1e-5, rtol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_lr_schedules():
    assert lr_factor(0, "constant", 0, 10) == 1.0
    assert lr_factor(0, "linear", 2, 10) == 0.5  # warm-up
    assert lr_factor(6, "linear", 2, 10) == pytest.approx(0.5)
    assert lr_factor(6, "cosine", 2, 10) == pytest.approx(0.5)
    assert lr_factor(10, "cosine", 2, 10) == pytest.approx(0.0)


def test_prompt_mean_baseline_centers_scores_per_prompt(tiny_policy):
    queries = [[2, 10, 11], [2, 10, 11], [2, 12], [2, 12]]
    responses = [[20, 21], [22, 23], [24, 25], [26, 27]]
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(minibatch_size=2, ppo_epochs=1, score_baseline="prompt_mean"))
    stats = trainer.step(queries, responses, [0.9, 0.5, 0.3, 0.1])
    assert stats["env/reward_mean"] == pytest.approx(0.45)  # what the scorer said
    assert stats["objective/scores"] == pytest.approx(0.0, abs=1e-6)  # what PPO optimized: centered


def test_config_rejects_bad_options():
    with pytest.raises(ValueError, match="kl_estimator"):
        PPOConfig(kl_estimator="k9")
    with pytest.raises(ValueError, match="score_baseline"):
        PPOConfig(score_baseline="median")
    with pytest.raises(ValueError, match="multiple"):
        PPOConfig(minibatch_size=5, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="unknown PPO options"):
        PPOConfig.from_dict({"learning_rat": 1.0})


def test_bad_rollouts_are_rejected(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy))
    with pytest.raises(ValueError, match="empty response"):
        trainer.step([[2, 10]], [[]], [1.0])
    with pytest.raises(ValueError, match="not finite"):
        trainer.step([[2, 10]], [[11]], [float("nan")])
    assert trainer.version == 0


def test_checkpoint_resume_round_trip(tiny_policy, tmp_path):
    config = PPOConfig(minibatch_size=3, reward_normalization=True, learning_rate=1e-2)
    trainer = PPOTrainer(str(tiny_policy), config)
    trainer.step(QUERIES, RESPONSES, SCORES)
    trainer.step(QUERIES, RESPONSES, SCORES)
    trainer.save_checkpoint(tmp_path / "ckpt")
    resumed = PPOTrainer.from_checkpoint(tmp_path / "ckpt")
    assert resumed.version == 2 and resumed.steps_done == 2
    assert resumed.kl_ctl.value == pytest.approx(trainer.kl_ctl.value)
    assert resumed.score_moments.mean == pytest.approx(trainer.score_moments.mean)
    for a, b in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    # the reference stays the original policy, not the checkpoint
    for a, b in zip(trainer.ref_model.parameters(), resumed.ref_model.parameters()):
        assert torch.equal(a, b)
    # resumed and original take the identical next step
    torch.manual_seed(5)
    s1 = trainer.step(QUERIES, RESPONSES, SCORES)
    torch.manual_seed(5)
    s2 = resumed.step(QUERIES, RESPONSES, SCORES)
    assert s1["ppo/loss/total"] == pytest.approx(s2["ppo/loss/total"], rel=1e-4)
    # weights the generator would load are the same bytes
    assert trainer.policy_weights()[2] == resumed.policy_weights()[2]


def test_min_response_tokens_masks_eos_like_the_generator(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(min_response_tokens=2))
    eos = trainer.eos_id
    with pytest.raises(ValueError, match="EOS before"):
        trainer.step([[2, 10]], [[eos]], [1.0])
    batch = build_rollout_batch([[2, 10]], [[11, 12, eos]], trainer.pad_id)
    masked = trainer._rollout_forward(batch)
    trainer.config.min_response_tokens = 0
    free = trainer._rollout_forward(batch)
    # EOS impossible at t < 2 puts its mass on the other tokens: their log-probs rise there, not after
    assert (masked["logp"][0, :2] > free["logp"][0, :2]).all()
    assert torch.allclose(masked["logp"][0, 2], free["logp"][0, 2])


GROUP_QUERIES = [QUERIES[0]] * 3 + [QUERIES[1]] * 3
GROUP_RESPONSES = [[20, 21, 3], [22, 23], [24, 25, 26], [27, 28], [29, 30, 3], [31]]
GROUP_SCORES = [0.9, 0.1, 0.5, 0.8, 0.2, 0.5]


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_algorithms_skip_the_value_head(tiny_policy, algorithm, monkeypatch):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig.from_dict({"algorithm": algorithm}))
    head = trainer.model.value_head
    before = [p.detach().clone() for p in head.parameters()]
    monkeypatch.setattr(head, "forward", lambda *a: pytest.fail("the value head ran"))
    stats = trainer.step(GROUP_QUERIES, GROUP_RESPONSES, GROUP_SCORES)
    assert trainer.version == 1 and math.isfinite(stats["ppo/loss/total"])
    assert not any(key.startswith("ppo/val/") for key in stats)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in head.parameters()}
    assert all(not trainer.optimizer.state.get(p) for p in head.parameters())  # no Adam moments either
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters()))


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_critic_free_step_favours_the_better_sample_of_a_prompt(tiny_policy, algorithm):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig.from_dict({"algorithm": algorithm, "learning_rate": 1e-2,
                                                                "init_kl_coef": 0.0, "adaptive_kl": False}))
    batch = build_rollout_batch(GROUP_QUERIES, GROUP_RESPONSES, trainer.pad_id)

    def sequence_logp():
        old = trainer._rollout_forward(batch)
        return (old["logp"] * batch.response_mask).sum(1)

    start = sequence_logp()
    trainer.step(GROUP_QUERIES, GROUP_RESPONSES, GROUP_SCORES)
    moved = sequence_logp() - start
    assert moved[0] > moved[1] and moved[3] > moved[4]  # best vs worst response of each prompt


def test_algorithm_presets_fill_what_the_options_leave_out():
    assert PPOConfig.from_dict({"algorithm": "grpo"}).ppo_epochs == 1
    assert PPOConfig.from_dict({"algorithm": "grpo", "ppo_epochs": 3}).ppo_epochs == 3
    assert PPOConfig.from_dict({}).ppo_epochs == PPOConfig().ppo_epochs == 4
    with pytest.raises(ValueError, match="algorithm must be ppo or grpo or rloo"):
        PPOConfig(algorithm="dpo")
    assert PPOConfig(reward_normalization=True).reward_normalization == "running"  # the older JSON form


def test_each_step_carries_its_own_eos_minimum(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(min_response_tokens=0))
    eos = trainer.eos_id
    with pytest.raises(ValueError, match="EOS before min_response_tokens=2"):
        trainer.step([[2, 10]], [[11, eos]], [1.0], min_response_tokens=2)
    assert trainer.version == 0
    batch = build_rollout_batch([[2, 10]], [[11, 12, eos]], trainer.pad_id)
    masked = trainer._rollout_forward(batch, min_tokens=2)
    free = trainer._rollout_forward(batch)
    assert (masked["logp"][0, :2] > free["logp"][0, :2]).all()  # the step's minimum, not the config's 0
    trainer.step([[2, 10]], [[11, 12, eos]], [1.0], min_response_tokens=2)
    assert trainer.version == 1


def test_stale_rollouts_are_counted_or_rejected(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy))
    stats = trainer.step(QUERIES, RESPONSES, SCORES, policy_versions=[0, 0, 0])
    assert stats["rollouts/stale"] == 0.0
    stats = trainer.step(QUERIES, RESPONSES, SCORES, policy_versions=[1, 0, 1])  # trainer serves 1
    assert stats["rollouts/stale"] == 1.0 and trainer.version == 2
    strict = PPOTrainer(str(tiny_policy), PPOConfig(stale_rollouts="reject"))
    with pytest.raises(ppo_trainer.StaleRolloutsError, match="rollout 1 comes from policy version 7"):
        strict.step(QUERIES, RESPONSES, SCORES, policy_versions=[0, 7, 0])
    assert strict.version == 0


def test_empty_responses_earn_the_empty_response_reward_in_the_trainer(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig(empty_response_reward=-1.0, minibatch_size=3))
    eos = trainer.eos_id
    responses = [[20, 21, eos], [eos], [26]]  # the second has no visible text
    stats = trainer.step(QUERIES, responses, [0.9, 0.8, 0.5])
    assert stats["env/reward_mean"] == pytest.approx((0.9 + 0.8 + 0.5) / 3)  # what the scorer said
    assert stats["objective/scores"] == pytest.approx((0.9 - 1.0 + 0.5) / 3)  # what the update used
    assert stats["env/empty_rate"] == pytest.approx(1 / 3)


def test_target_reward_lowers_the_policy_learning_rate_while_reached(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig.from_dict({"algorithm": "grpo", "target_reward": 0.6,
                                                                "learning_rate": 1e-3, "target_reward_lr_factor": 0.0}))
    assert trainer.step(QUERIES, RESPONSES, [0.5, 0.5, 0.5])["ppo/learning_rate"] == pytest.approx(1e-3)
    before = [p.detach().clone() for p in trainer.model.lm.parameters()]
    high = trainer.step(QUERIES, RESPONSES, [0.9, 0.9, 0.9])  # mean of the last batches 0.7 >= 0.6: hold
    assert high["ppo/learning_rate"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.lm.parameters()))
    assert trainer.step(QUERIES, RESPONSES, [0.0, 0.0, 0.0])["ppo/learning_rate"] == pytest.approx(1e-3)


def test_grpo_kl_penalty_in_the_reward_instead_of_the_loss(tiny_policy):
    trainer = PPOTrainer(str(tiny_policy), PPOConfig.from_dict({"algorithm": "grpo", "kl_penalty": "reward",
                                                                "init_kl_coef": 0.5, "adaptive_kl": False}))
    noise = torch.Generator().manual_seed(2)
    with torch.no_grad():  # away from the reference, so the rollouts have a KL
        for p in trainer.model.lm.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    stats = trainer.step(GROUP_QUERIES, GROUP_RESPONSES, GROUP_SCORES)
    assert abs(stats["objective/kl"]) > 1e-3
    assert stats["objective/non_score_reward"] == pytest.approx(-0.5 * stats["objective/kl"], rel=1e-4)
    assert stats["ppo/loss/total"] == pytest.approx(stats["ppo/loss/policy"])  # no k3 term in the loss
    in_loss = PPOTrainer(str(tiny_policy), PPOConfig.from_dict({"algorithm": "grpo", "kl_penalty": "loss",
                                                                "init_kl_coef": 0.5, "adaptive_kl": False}))
    stats = in_loss.step(GROUP_QUERIES, GROUP_RESPONSES, GROUP_SCORES)
    assert stats["objective/non_score_reward"] == 0.0
    assert stats["ppo/loss/total"] == pytest.approx(stats["ppo/loss/policy"] + 0.5 * stats["ppo/loss/kl"], rel=1e-4)
