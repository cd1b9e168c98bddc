"""The reference design's algorithm, run in-process: the baseline `make bench` compares against.

The reference design (the single-process recipe this project re-designs as services) works one
sample at a time wherever it can:

* rollout: HF ``model.generate`` on one prompt at a time, with the policy being trained
  (one model object, so there is no weight sync);
* scoring: an HF ``text-classification`` pipeline called on one text at a time;
* update: PPO with minibatches of a single sample.

Everything else is held equal to the pipelines it is compared with: the same starter models,
prompts, batch, sampling settings (16 new tokens, EOS masked before ``--min-new-tokens``), reward
(the positive-class probability) and PPO math (our :class:`PPOTrainer`, 4 epochs), so the ratios
measure batching and serving, not different algorithms.
"""
from __future__ import annotations

import time

import torch
from transformers import pipeline

from bench.breakdown import ModelClock
from haoping.models import TokenFormat, decode_clean, encode_prompt, positive_label_index, resolve_model
from haoping.ppo_trainer import PPOConfig, PPOTrainer
from services.coordinator.run import cycle_seed, trainer_ppo_config


def one_by_one_rollout(model, tokenizer, args, seed: int, samples_per_prompt: int) -> list[tuple[list[int], list[int]]]:
    """The reference design's rollout: (prompt ids, response ids) per sample, each from its own
    HF ``model.generate`` call. ``args``: the coordinator's run flags."""
    token_format = TokenFormat.of(tokenizer)
    torch.manual_seed(seed)
    rollouts = []
    for prompt in args.prompts:
        prompt_ids = encode_prompt(tokenizer, prompt)
        for _ in range(samples_per_prompt):
            ids = torch.tensor([prompt_ids])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 top_p=1.0, max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.min_new_tokens,
                                 eos_token_id=token_format.eos_id, pad_token_id=token_format.pad_id)
            rollouts.append((prompt_ids, out[0, len(prompt_ids):].tolist()))
    return rollouts


class ReferencePipeline:
    def __init__(self, args):
        """``args``: the coordinator's run flags (prompts, samples per prompt, lengths, seeds)."""
        self.args = args
        self.trainer = PPOTrainer(resolve_model(args.policy),
                                  PPOConfig.from_dict({**trainer_ppo_config(args), "minibatch_size": 1}))
        self.model = self.trainer.model.lm  # the policy being trained writes the rollouts
        self.tokenizer = self.trainer.tokenizer
        self.format = TokenFormat.of(self.tokenizer)
        classifier = resolve_model(args.scorer_model)
        self.classify = pipeline("text-classification", model=classifier, device=-1)
        self.positive_label = self.classify.model.config.id2label[
            positive_label_index(self.classify.model.config.id2label)]
        self.clock = ModelClock().watch(self.trainer.model, self.trainer.ref_model, self.model, self.classify.model)

    def rollout(self, seed: int, samples_per_prompt: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) per sample, each from its own ``model.generate`` call."""
        return one_by_one_rollout(self.model, self.tokenizer, self.args, seed, samples_per_prompt)

    def score_one(self, text: str) -> float:
        """The positive-class probability, as the Scorer's classifier backend defines the reward."""
        return next(r["score"] for r in self.classify(text, top_k=None) if r["label"] == self.positive_label)

    def cycle(self, index: int, samples_per_prompt: int | None = None) -> dict:
        a = self.args
        clock = self.clock
        clock.read()
        t0 = time.perf_counter()
        rollouts = self.rollout(cycle_seed(a.seed, index), samples_per_prompt or a.samples_per_prompt)
        t1 = time.perf_counter()
        model_rollout = clock.read()
        responses = [decode_clean(self.tokenizer, r) for _, r in rollouts]
        texts = [decode_clean(self.tokenizer, q) + r for (q, _), r in zip(rollouts, responses)]
        scores = [self.score_one(text) for text in texts]
        t2 = time.perf_counter()
        model_score = clock.read()
        rewards = list(scores)  # raw: the trainer shapes them
        with clock.backward_timed():
            stats = self.trainer.step([q for q, _ in rollouts], [r for _, r in rollouts], rewards)
        t3 = time.perf_counter()
        model_update = clock.read()
        return {"samples": len(rollouts), "seconds": t3 - t0, "time/rollout": t1 - t0, "time/score": t2 - t1,
                "time/update": t3 - t2, "time/weight_sync": 0.0, "reward_mean": stats["env/reward_mean"],
                "model": {"rollout": model_rollout, "score": model_score, "update": model_update}}
