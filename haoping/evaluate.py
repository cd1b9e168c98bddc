"""`haoping evaluate`: held-out generations of two policies, judged by the training scorer
and by an independent one, with the reward-hacking guard figures beside them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from haoping import text_metrics
from haoping.checkpoint import CheckpointError, policy_of
from haoping.generation import PolicyGenerator, SampleSpec, SamplingParams, sample_seed
from haoping.log import get_logger
from haoping.models import ModelLoadError, pick_device
from haoping.prompts import DEFAULT_PROMPTS
from haoping.scorers.backends import build_scorer

log = get_logger(__name__)
HELDOUT_SEED = 777_777  # never used for rollouts


def evaluate_policy(policy_ref: str, prompts: list[str], samples: int, max_new_tokens: int, scorers: dict,
                    device) -> dict:
    generator = PolicyGenerator(policy_ref, device)
    per_prompt = max(1, -(-samples // len(prompts)))
    specs = [SampleSpec(tuple(generator.encode(p)), SamplingParams(max_new_tokens), sample_seed(HELDOUT_SEED, i, j))
             for i, p in enumerate(prompts) for j in range(per_prompt)]
    outputs, _ = generator.generate(specs)
    responses = [generator.decode(o.response_ids) for o in outputs]
    texts = [generator.decode(o.prompt_ids) + r for o, r in zip(outputs, responses)]
    result = {"policy": policy_ref, "samples": len(texts),
              "distinct2": text_metrics.distinct_n(responses, 2),
              "repetition_rate": text_metrics.repetition_rate(responses),
              "empty_rate": text_metrics.empty_rate(responses),
              "examples": texts[:: max(1, len(texts) // 6)][:6]}
    for name, scorer in scorers.items():
        scores = [r.score for r in scorer.score(texts)]
        result[f"{name}_mean"] = sum(scores) / len(scores)
        result[f"{name}_positive_rate"] = sum(s >= 0.5 for s in scores) / len(scores)
    return result


def cmd_evaluate(args) -> int:
    device = pick_device(args.device)
    try:
        scorers = {"scorer": build_scorer(args.scorer_backend, args.scorer_model, device),
                   "evaluator": build_scorer(args.evaluator_backend, args.evaluator_model, device)}
        rows = [evaluate_policy(ref if ref.startswith("starter:") or not Path(ref).exists() else str(policy_of(ref)),
                                args.prompts, args.samples, args.max_new_tokens, scorers, device)
                for ref in (args.before, args.after)]
    except (ModelLoadError, CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'':8} {'scorer':>8} {'evaluator':>10} {'eval pos%':>9} {'distinct2':>9} {'repeat%':>8}  policy")
    for label, row in zip(("before", "after"), rows):
        print(f"{label:8} {row['scorer_mean']:8.3f} {row['evaluator_mean']:10.3f} "
              f"{100 * row['evaluator_positive_rate']:8.1f}% {row['distinct2']:9.3f} "
              f"{100 * row['repetition_rate']:7.1f}%  {row['policy']}")
    report = {"scorer": f"{args.scorer_backend}:{args.scorer_model}",
              "evaluator": f"{args.evaluator_backend}:{args.evaluator_model}", "before": rows[0], "after": rows[1]}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"wrote {args.out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="compare two policies on held-out samples with an independent judge")
    p.add_argument("--before", default="starter:policy", help="policy before training")
    p.add_argument("--after", default="runs/latest",
                   help="policy after training: a run directory (its newest good checkpoint), a checkpoint, or a policy")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--scorer-backend", default="classifier")
    p.add_argument("--scorer-model", default="starter:classifier", help="the scorer PPO trained against")
    p.add_argument("--evaluator-backend", default="snownlp", help="snownlp (naive Bayes), classifier or reward-model")
    p.add_argument("--evaluator-model", default="", help="model for a classifier/reward-model evaluator")
    p.add_argument("--prompts", nargs="+", default=DEFAULT_PROMPTS)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="", help="write the report as JSON here")
    p.set_defaults(func=cmd_evaluate)
