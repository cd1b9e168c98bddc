"""What the TRL scripts share: the run config, the training clock, the per-step recorder, the
reward (haoping's own classifier scorer) and the KL measurement (haoping's own forward pass).

Runs inside a TRL venv with this repository on PYTHONPATH; imports only haoping's pure library
modules (torch, transformers, safetensors, numpy), never services/ or gRPC.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from bench.peer import metrics
from haoping import text_metrics
from haoping.models import TokenFormat, decode_clean, encode_prompt
from haoping.ppo_trainer import build_rollout_batch, mask_early_eos, response_pass
from haoping.scorers.classifier import ClassifierScorer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def load_config(argv: list[str] | None = None) -> dict:
    """The run's settings, written by ``python -m bench.peer`` (``--config PATH``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "--config":
        raise SystemExit("usage: python -m bench.peer.trl_<algorithm> --config RUN_DIR/config.json")
    return json.loads(Path(argv[1]).read_text())


def start_run(argv: list[str] | None, tokenizer_class):
    """What both TRL scripts do first: read the config, set threads and seed, check the batch
    shape, and load the tokenizer with haoping's prompt encoding (checked). -> (config, run_dir,
    tokenizer)."""
    config = load_config(argv)
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])
    if config["samples_per_step"] % len(config["prompts"]):
        raise SystemExit(f"samples_per_step {config['samples_per_step']} is not a multiple of "
                         f"{len(config['prompts'])} prompts")
    tokenizer = prepare_tokenizer(tokenizer_class.from_pretrained(config["policy"]))
    check_prompt_encoding(tokenizer, config["prompts"])
    return config, Path(config["run_dir"]), tokenizer


class TrainingClock:
    """Seconds of training since :meth:`start`, without the time spent in :meth:`paused`
    (the harness's own measurements: KL forward passes, guard figures, records)."""

    def __init__(self):
        self._started: float | None = None
        self._paused_total = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()
        self._paused_total = 0.0

    @property
    def running(self) -> bool:
        return self._started is not None

    def elapsed(self) -> float:
        if self._started is None:
            return 0.0
        return time.perf_counter() - self._started - self._paused_total

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused_total += time.perf_counter() - t0


def prepare_tokenizer(tokenizer):
    """The starter tokenizer as TRL needs it: an EOS token ([SEP], the policy's EOS) and a BOS,
    left padding, and prompts encoded as haoping encodes them: [CLS] + text, no trailing [SEP]."""
    from tokenizers import processors

    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.bos_token = tokenizer.cls_token
    tokenizer.padding_side = "left"
    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.cls_token} $A", special_tokens=[(tokenizer.cls_token, tokenizer.cls_token_id)])
    return tokenizer


def check_prompt_encoding(tokenizer, prompts: list[str]) -> None:
    """TRL tokenizes with the tokenizer's own special tokens: they must give haoping's prompt ids."""
    for prompt in prompts:
        ids = tokenizer(text=prompt)["input_ids"]
        expected = encode_prompt(tokenizer, prompt)
        if ids != expected:
            raise RuntimeError(f"prompt {prompt!r} encodes as {ids} for TRL but {expected} for haoping")


class Reward:
    """The starter classifier's P(positive) of prompt + response text, as haoping's scorer service
    computes it (same class, same decoding); an empty response earns ``empty_reward``."""

    def __init__(self, classifier_dir: str, tokenizer, empty_reward: float = 0.0):
        self.scorer = ClassifierScorer(classifier_dir)
        self.tokenizer = tokenizer
        self.empty_reward = empty_reward
        self._prompt_texts: dict[str, str] = {}

    def decode(self, ids: list[int]) -> str:
        return decode_clean(self.tokenizer, ids)

    def prompt_text(self, prompt: str) -> str:
        """The prompt as haoping's generator writes it in full_text: decoded from its ids."""
        if prompt not in self._prompt_texts:
            self._prompt_texts[prompt] = decode_clean(self.tokenizer, encode_prompt(self.tokenizer, prompt))
        return self._prompt_texts[prompt]

    def __call__(self, prompt_texts: list[str], response_texts: list[str]) -> list[float]:
        results = self.scorer.score([p + r for p, r in zip(prompt_texts, response_texts)])
        return [self.empty_reward if not r.strip() else s.score for r, s in zip(response_texts, results)]


@torch.no_grad()
def haoping_kl(policy, ref_model, queries: list[list[int]], responses: list[list[int]], tokenizer,
               min_response_tokens: int) -> list[float]:
    """objective/kl exactly as haoping's trainer computes it (nats per sequence): position ids
    counted from each row's first real token, EOS masked on the first ``min_response_tokens``
    positions for both models (the distribution the sampler drew from), k1 summed over the
    response tokens. Uses haoping's own batch layout and forward pass."""
    fmt = TokenFormat.of(tokenizer)
    device = next(policy.parameters()).device
    batch = build_rollout_batch(queries, responses, fmt.pad_id).to(device)
    mask = batch.response_mask

    def logprobs(model) -> torch.Tensor:
        logits, _ = response_pass(model, batch)
        logits = mask_early_eos(logits, fmt.eos_id, min_response_tokens)
        return torch.gather(torch.log_softmax(logits.float(), -1), 2, batch.response_ids.unsqueeze(-1)).squeeze(-1)

    was_training = policy.training
    policy.eval()  # dropout off for a measurement; the starter models have none anyway
    try:
        logp, ref_logp = logprobs(policy), logprobs(ref_model)
    finally:
        policy.train(was_training)
    rows_logp = [row[m.bool()].tolist() for row, m in zip(logp, mask)]
    rows_ref = [row[m.bool()].tolist() for row, m in zip(ref_logp, mask)]
    return metrics.sequence_kl(rows_logp, rows_ref)


class StepRecorder:
    """Collects one training step's rollouts (texts, rewards, KL) and writes a record per step
    to steps.jsonl, in the schema of :mod:`bench.peer.metrics`."""

    def __init__(self, run_dir: Path, clock: TrainingClock):
        self.path = run_dir / "steps.jsonl"
        self.path.write_text("")
        self.clock = clock
        self.steps: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.rewards: list[float] = []
        self.responses: list[str] = []
        self.full_texts: list[str] = []
        self.kls: list[float] = []

    def add(self, prompt_texts: list[str], response_texts: list[str], rewards: list[float]) -> None:
        self.responses += response_texts
        self.full_texts += [p + r for p, r in zip(prompt_texts, response_texts)]
        self.rewards += rewards

    def add_kl(self, kls: list[float]) -> None:
        self.kls += kls

    def end_step(self) -> dict | None:
        """Close the step at the clock's current reading; None if it had no rollouts."""
        seconds = self.clock.elapsed()
        with self.clock.paused():
            if not self.rewards:
                return None
            if len(self.kls) != len(self.rewards):
                raise RuntimeError(f"step {len(self.steps)}: {len(self.rewards)} rewards but {len(self.kls)} KLs")
            n = len(self.rewards)
            record = {
                "step": len(self.steps), "seconds": seconds, "samples": n,
                "reward_mean": sum(self.rewards) / n, "kl": sum(self.kls) / n,
                "distinct2": text_metrics.distinct_n(self.responses, 2),
                "repetition_rate": text_metrics.repetition_rate(self.responses),
                "empty_rate": text_metrics.empty_rate(self.responses),
                "examples": [self.full_texts[0], self.full_texts[n // 2]],
            }
            self.steps.append(record)
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            print(f"step {record['step']:3d}  {seconds:6.1f}s  reward {record['reward_mean']:.3f}  "
                  f"kl {record['kl']:6.2f}  distinct2 {record['distinct2']:.2f}  {record['examples'][0]}",
                  flush=True)
            self._reset()
            return record


def warm_up(model, tokenizer, reward: Reward, prompts: list[str], max_new_tokens: int) -> None:
    """One generate and one scoring call before the clock starts, as haoping's generator and
    scorer services each answer a warm-up request before they report SERVING."""
    with torch.no_grad():
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, top_k=0, top_p=1.0,
                             pad_token_id=tokenizer.pad_token_id)
    reward(prompts, [decode_clean(tokenizer, row.tolist()) for row in out[:, enc["input_ids"].shape[1]:]])


def save_policy(model, policy_dir: str, out_dir: Path) -> None:
    """The final policy as a plain HF directory, with the starter tokenizer files unchanged."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (Path(policy_dir) / name).exists():
            shutil.copy2(Path(policy_dir) / name, out_dir / name)


def versions() -> dict:
    import transformers
    import trl

    return {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
