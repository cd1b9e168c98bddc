"""The held-out check every final policy gets, identically: the same prompts, the same per-sample
seeds, haoping's own sampler (16 new tokens, at least 8, temperature 1, no top-k/top-p) and the
same classifier scorer. Runs in the main venv, after all training runs."""
from __future__ import annotations

from haoping import text_metrics
from haoping.generation import PolicyGenerator, SampleSpec, SamplingParams, sample_seed
from haoping.scorers.classifier import ClassifierScorer

HELDOUT_SEED = 20240601  # services/coordinator/run.py SAMPLES_SEED: bench-learning's before/after samples


def evaluate(policy_dir: str, scorer: ClassifierScorer, prompts: list[str], samples: int, max_new_tokens: int,
             min_new_tokens: int, empty_reward: float = 0.0, seed: int = HELDOUT_SEED) -> dict:
    """``samples`` responses (split evenly over ``prompts``) from the policy in ``policy_dir``, scored."""
    per_prompt = -(-samples // len(prompts))
    generator = PolicyGenerator(policy_dir)
    params = SamplingParams(max_new_tokens, 1.0, 0, 1.0, min_new_tokens)
    specs = [SampleSpec(tuple(generator.encode(prompt)), params, sample_seed(seed, p_index, s_index))
             for p_index, prompt in enumerate(prompts) for s_index in range(per_prompt)]
    generated, _ = generator.generate(specs)
    responses = [generator.decode(s.response_ids) for s in generated]
    full_texts = [generator.decode_prompt(tuple(s.prompt_ids)) + r for s, r in zip(generated, responses)]
    scores = scorer.score(full_texts)
    rewards = [empty_reward if not r.strip() else s.score for r, s in zip(responses, scores)]
    return {
        "samples": len(rewards),
        "reward_mean": sum(rewards) / len(rewards),
        "distinct2": text_metrics.distinct_n(responses, 2),
        "repetition_rate": text_metrics.repetition_rate(responses),
        "empty_rate": text_metrics.empty_rate(responses),
        "examples": full_texts[::per_prompt][:len(prompts)] + full_texts[per_prompt // 2::per_prompt][:len(prompts)],
    }
