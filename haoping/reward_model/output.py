"""What a reward-model run leaves behind: the model with its tokenizer, metrics.json and the
curves, written as one directory that replaces the previous run's only when complete."""
from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from haoping.atomic import atomic_directory, atomic_write_json
from haoping.log import get_logger
from haoping.plots import plot_reward_model_curves

log = get_logger(__name__)


def write_output(out: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_length: int, result: dict) -> None:
    """``out`` as a complete directory; a previous complete one is kept as ``<out>.prev``."""
    with atomic_directory(out) as staging:
        model.save_pretrained(staging)  # safetensors
        tokenizer.model_max_length = max_length  # the scorer reads its window from here
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / "metrics.json", result)
        plot_reward_model_curves(result["history"], staging)
    log.info("reward model saved to %s", out)


def print_summary(result: dict) -> None:
    dev = result["dev"]
    ours = dev["reward_model"]
    chosen = "on held-out lists" if result.get("selected_on") == "held-out" else "on dev"
    print(f"dev ({ours['n_lists']} lists, {ours['n_pairs']} pairs), step {result['best_step']} (chosen {chosen}), "
          f"{result['seconds']:.0f} s:")
    print(f"  reward model            pairwise {ours['pairwise_accuracy']:.3f}  whole-list {ours['list_accuracy']:.3f}")
    if dev.get("baseline"):
        print(f"  baseline P(positive)    pairwise {dev['baseline']['pairwise_accuracy']:.3f}  "
              f"whole-list {dev['baseline']['list_accuracy']:.3f}  ({dev['baseline']['model']})")
    if dev.get("linear"):
        print(f"  n-gram ranker           pairwise {dev['linear']['pairwise_accuracy']:.3f}  "
              f"whole-list {dev['linear']['list_accuracy']:.3f}")
    if dev.get("ensemble"):
        print(f"  blend (not saved)       pairwise {dev['ensemble']['pairwise_accuracy']:.3f}  "
              f"whole-list {dev['ensemble']['list_accuracy']:.3f}  (n-gram weight {dev['ensemble']['weight_linear']:.1f}, "
              f"chosen on held-out lists)")
