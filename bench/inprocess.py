"""The services' pipeline as direct calls in one process: the baseline for gRPC's overhead.

The same library classes the services wrap (PolicyGenerator, the scorer backend, PPOTrainer),
built with the same settings the coordinator gives the services, driven through the same cycle:
rollout -> score -> PPO step -> weight sync. Only gRPC is gone: the new weights are copied
tensor by tensor instead of streamed as a safetensors file. With the same seeds it draws the
same samples as the services do.
"""
from __future__ import annotations

import time

import torch

from bench.breakdown import ModelClock
from haoping.generation import PolicyGenerator, SampleSpec, SamplingParams, sample_seed
from haoping.models import resolve_model
from haoping.ppo_trainer import PPOConfig, PPOTrainer
from haoping.scorers.backends import build_scorer
from services.coordinator.run import cycle_seed, trainer_ppo_config


def rollout_specs(generator: PolicyGenerator, args, seed: int, samples_per_prompt: int) -> list[SampleSpec]:
    """What the Generator service builds from the coordinator's request (``args``: its run flags)."""
    params = SamplingParams(args.max_new_tokens, 1.0, 0, 1.0, args.min_new_tokens)
    return [SampleSpec(tuple(generator.encode(prompt)), params, sample_seed(seed, p, s))
            for p, prompt in enumerate(args.prompts) for s in range(samples_per_prompt)]


class InProcessPipeline:
    def __init__(self, args):
        """``args``: the coordinator's run flags."""
        self.args = args
        policy = resolve_model(args.policy)
        self.generator = PolicyGenerator(policy)
        self.scorer = build_scorer(args.scorer_backend, resolve_model(args.scorer_model))  # raw scores
        self.trainer = PPOTrainer(policy, PPOConfig.from_dict(trainer_ppo_config(args)))
        # the trainer's own random stream (minibatch shuffles), as if it ran in its own process:
        # the reference pipeline sharing this process draws from torch's global generator too
        self._trainer_rng = torch.get_rng_state()
        self.last_batch: tuple[list, list, list] | None = None  # (queries, responses, rewards)
        # seconds inside the models' forward and backward calls, per phase (bench/breakdown.py)
        self.clock = ModelClock().watch(self.generator.model, self.scorer.model, self.trainer.model,
                                        self.trainer.ref_model)

    def step(self, queries: list[list[int]], responses: list[list[int]], rewards: list[float]) -> dict:
        with torch.random.fork_rng():
            torch.set_rng_state(self._trainer_rng)
            stats = self.trainer.step(queries, responses, rewards)
            self._trainer_rng = torch.get_rng_state()
        return stats

    def specs(self, seed: int, samples_per_prompt: int) -> list[SampleSpec]:
        return rollout_specs(self.generator, self.args, seed, samples_per_prompt)

    def sync_weights(self) -> None:
        state = self.trainer.policy_state()
        with torch.no_grad():
            for name, param in self.generator.model.named_parameters():
                param.copy_(state[name])
        self.generator.version = self.trainer.version

    def cycle(self, index: int, samples_per_prompt: int | None = None) -> dict:
        a = self.args
        clock = self.clock
        clock.read()
        t0 = time.perf_counter()
        samples, _ = self.generator.generate(self.specs(cycle_seed(a.seed, index),
                                                        samples_per_prompt or a.samples_per_prompt))
        t1 = time.perf_counter()
        model_rollout = clock.read()
        responses = [self.generator.decode(s.response_ids) for s in samples]
        texts = [self.generator.decode_prompt(s.prompt_ids) + r for s, r in zip(samples, responses)]
        scores = self.scorer.score(texts)
        t2 = time.perf_counter()
        model_score = clock.read()
        rewards = [s.score for s in scores]  # raw: the trainer shapes them
        self.last_batch = ([s.prompt_ids for s in samples], [s.response_ids for s in samples], rewards)
        with clock.backward_timed():
            stats = self.step(*self.last_batch)
        t3 = time.perf_counter()
        model_update = clock.read()
        self.sync_weights()
        t4 = time.perf_counter()
        return {"samples": len(samples), "seconds": t4 - t0, "time/rollout": t1 - t0, "time/score": t2 - t1,
                "time/update": t3 - t2, "time/weight_sync": t4 - t3, "reward_mean": stats["env/reward_mean"],
                "time/ppo/total": stats["time/ppo/total"],  # the step alone, as the trainer service reports it
                "model": {"rollout": model_rollout, "score": model_score, "update": model_update},
                "examples": [texts[i] for i in (0, len(texts) // 2)]}
