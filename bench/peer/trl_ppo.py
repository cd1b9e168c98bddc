"""TRL PPOTrainer on the starter models for a fixed training budget (run in the trl-1.12 venv:
PPOTrainer left TRL in 1.13; in 1.12 it is ``trl.experimental.ppo``).

`python -m bench.peer.trl_ppo --config RUN_DIR/config.json`; writes RUN_DIR/steps.jsonl,
RUN_DIR/policy and RUN_DIR/result.json. The reward model is :class:`ClassifierScoreModel`, a
wrapper with the ``score`` head TRL's get_reward calls, whose value is haoping's classifier
scorer's P(positive) of the decoded prompt + response. TRL's PPO loop takes no per-rollout hook,
so the wrapper, called once per rollout chunk with the current (sampling) policy, also records
the texts and measures KL by haoping's definition, with the clock paused.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import torch.nn as nn


class BudgetReached(Exception):
    """TRL's PPO loop ignores control.should_training_stop; the budget callback raises this."""


class ClassifierScoreModel(nn.Module):
    """What TRL's ``get_reward(model, query_responses, pad_token_id, context_length)`` needs:
    ``getattr(model, model.base_model_prefix)(input_ids=..., ...)`` returning hidden states and a
    ``score`` head. The "hidden state" is the reward itself at every position (width 1) and the
    head is the identity, so TRL reads the classifier's P(positive) at the sequence's last token."""

    base_model_prefix = "backbone"

    def __init__(self, on_rows):
        super().__init__()
        self.backbone = _RewardBackbone(on_rows)
        self.score = nn.Identity()


class _RewardBackbone(nn.Module):
    def __init__(self, on_rows):
        super().__init__()
        self.on_rows = on_rows  # (input_ids [B, T], attention_mask [B, T]) -> rewards [B]

    def forward(self, input_ids, attention_mask, **kwargs):
        rewards = torch.tensor(self.on_rows(input_ids, attention_mask), dtype=torch.float32)
        hidden = rewards.view(-1, 1, 1).expand(input_ids.shape[0], input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=(hidden,))


def main(argv: list[str] | None = None) -> int:
    from bench.peer.trl_common import (Reward, StepRecorder, TrainingClock, haoping_kl, save_policy, start_run,
                                       versions, warm_up)
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              GenerationConfig, TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from haoping.atomic import atomic_write_json

    config, run_dir, tokenizer = start_run(argv, AutoTokenizer)
    prompts, samples_per_step = config["prompts"], config["samples_per_step"]
    min_tokens, max_tokens = config["min_new_tokens"], config["max_new_tokens"]
    policy = AutoModelForCausalLM.from_pretrained(config["policy"])
    ref_model = AutoModelForCausalLM.from_pretrained(config["policy"])
    # TRL's PPO keeps the critic in a separate model; initialised from the policy, as TRL's examples do
    value_model = AutoModelForSequenceClassification.from_pretrained(config["policy"], num_labels=1)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    reward = Reward(config["classifier"], tokenizer, config["empty_response_reward"])
    clock = TrainingClock()
    recorder = StepRecorder(run_dir, clock)
    # every step's batch is the whole dataset (each prompt samples_per_step / len(prompts) times),
    # left-padded by the collator to the longest prompt: the query width is known up front
    query_width = max(len(tokenizer(text=p)["input_ids"]) for p in prompts)
    holder: dict = {}

    def score_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[float]:
        with clock.paused():
            queries, responses, prompt_texts, response_texts = [], [], [], []
            for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
                query = [t for t, m in zip(row[:query_width], mask[:query_width]) if m]
                response = []
                for t, m in zip(row[query_width:], mask[query_width:]):
                    if not m:  # TRL fills everything after the first EOS with pad
                        break
                    response.append(t)
                queries.append(query)
                responses.append(response)
                prompt_texts.append(reward.decode(query))
                response_texts.append(reward.decode(response))
        rewards = reward(prompt_texts, response_texts)
        with clock.paused():
            recorder.add(prompt_texts, response_texts, rewards)
            # inside TRL's rollout phase: the policy is still the one that sampled these rollouts
            recorder.add_kl(haoping_kl(holder["trainer"].model.policy, ref_for_kl, queries,
                                       [r or [tokenizer.pad_token_id] for r in responses], tokenizer, min_tokens))
        return rewards

    ref_for_kl = AutoModelForCausalLM.from_pretrained(config["policy"]).eval()
    for p in ref_for_kl.parameters():
        p.requires_grad_(False)

    class MinTokensGenerationConfig(GenerationConfig):
        """TRL's PPO builds its sampling config inside train(), with no way to pass min_new_tokens:
        this adds it (and names the EOS) so it samples exactly what the other runs sample."""

        def __init__(self, **kwargs):
            kwargs.setdefault("min_new_tokens", min_tokens)
            kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            super().__init__(**kwargs)

    ppo_module.GenerationConfig = MinTokensGenerationConfig

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.end_step()
            if clock.elapsed() >= config["budget_seconds"]:
                raise BudgetReached()

    n_per_prompt = samples_per_step // len(prompts)
    dataset = Dataset.from_dict({"input_ids": [tokenizer(text=p)["input_ids"] for p in prompts for _ in
                                               range(n_per_prompt)]})
    args = PPOConfig(
        output_dir=str(run_dir / "trl"), use_cpu=True, seed=config["seed"], report_to="none",
        save_strategy="no", disable_tqdm=True, logging_steps=1,
        learning_rate=config["learning_rate"], lr_scheduler_type="constant",
        per_device_train_batch_size=samples_per_step, gradient_accumulation_steps=1,
        num_mini_batches=config["ppo_minibatches"], num_ppo_epochs=config["ppo_epochs"],
        local_rollout_forward_batch_size=64, total_episodes=10 ** 8, num_sample_generations=0,
        response_length=max_tokens, temperature=1.0, stop_token="eos", kl_coef=config["kl_coef"],
        dataloader_num_workers=0,
    )
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref_model,
                         reward_model=ClassifierScoreModel(score_rows), value_model=value_model,
                         train_dataset=dataset, eval_dataset=dataset, callbacks=[Budget()])
    holder["trainer"] = trainer
    warm_up(trainer.model.policy, tokenizer, reward, prompts, max_tokens)
    try:
        trainer.train()
    except BudgetReached:
        pass
    save_policy(trainer.model.policy, config["policy"], run_dir / "policy")
    result = {"steps_done": len(recorder.steps), "train_seconds": clock.elapsed(), "versions": versions(),
              "trl_config": {k: v for k, v in args.to_dict().items()
                             if k in ("learning_rate", "kl_coef", "kl_estimator", "num_ppo_epochs",
                                      "num_mini_batches", "per_device_train_batch_size", "cliprange", "vf_coef",
                                      "whiten_rewards", "gamma", "lam", "adam_epsilon", "lr_scheduler_type")}}
    atomic_write_json(run_dir / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
