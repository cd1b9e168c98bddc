"""`make bench`: side-by-side ratios measured in one run, on the starter models.

ours vs baseline, both measured here:
  rollout_speedup     batched Generate service (64 prompts x 16 tokens) vs a one-sample-at-a-time
                      `model.generate` loop (the reference design's rollout)
  dynamic_batching    32 concurrent clients with 1 prompt each vs the same 32 requests sent serially
  score_speedup       batched Score of 256 texts vs an HF pipeline called one text at a time
  ppo_update_speedup  PPO update, minibatches of 16 vs minibatches of 1, same epochs and samples
  weight_sync         trainer -> generator over gRPC (GB/s) vs a raw safetensors save + load
Writes bench/results.json with the machine info.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

PROMPTS = ["刚收到货，感觉", "这部电影很", "说实话，真的很", "这次购物总的来说体验很"]
RESULTS = Path("bench/results.json")


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> int:
    from haoping.bootstrap import ensure_starter_models
    from haoping.client import GeneratorClient, ScorerClient
    from haoping.generation import PolicyGenerator
    from haoping.log import setup_logging
    from haoping.models import encode_prompt
    from haoping.ppo_trainer import PPOConfig, PPOTrainer
    from services.coordinator.run import start_service, stop_services

    setup_logging("WARNING")
    paths = ensure_starter_models()
    policy, classifier = str(paths["policy"]), str(paths["classifier"])
    work = Path("bench/run")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    figures: dict[str, dict] = {}

    def record(name, ours, baseline, unit, target=None, higher_is_better=True):
        ratio = ours / baseline if higher_is_better else baseline / ours
        figures[name] = {"ours": ours, "baseline": baseline, "ratio": ratio, "unit": unit, "target": target,
                         "met": None if target is None else ratio >= target}

    services = []
    try:
        services.append(start_service("trainer", ["--model", policy, "--device", "cpu"], work))
        services.append(start_service("generator", ["--model", policy, "--device", "cpu",
                                                    "--trainer-address", services[0].address], work))
        services.append(start_service("scorer", ["--model", classifier, "--device", "cpu"], work))
        trainer_svc, gen_svc, scorer_svc = services
        prompts64 = [PROMPTS[i % 4] for i in range(64)]
        with GeneratorClient(gen_svc.address) as gen, ScorerClient(scorer_svc.address) as scorer:
            gen.generate(prompts64, max_new_tokens=16, seed=0)  # warm
            batched = timed(lambda: gen.generate(prompts64, max_new_tokens=16, seed=1), repeat=3)

            local = PolicyGenerator(policy)
            model, tokenizer = local.model, local.tokenizer
            eos = local.format.eos_id

            def one_by_one(prompts=prompts64):
                for prompt in prompts:
                    ids = torch.tensor([encode_prompt(tokenizer, prompt)])
                    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=16,
                                   top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=local.format.pad_id)

            one_by_one(PROMPTS)  # warm-up: both sides are timed warm, best of several runs
            serial_gen = timed(one_by_one, repeat=2)
            record("rollout_speedup", 64 / batched, 64 / serial_gen, "samples/s", 15)

            def concurrent():
                with ThreadPoolExecutor(32) as pool:
                    list(pool.map(lambda i: gen.generate([PROMPTS[i % 4]], max_new_tokens=16, seed=i), range(32)))

            def serial():
                for i in range(32):
                    gen.generate([PROMPTS[i % 4]], max_new_tokens=16, seed=i)

            record("dynamic_batching", 32 / timed(concurrent, 2), 32 / timed(serial, 2), "requests/s", 8)

            texts = [s.full_text for s in gen.generate(PROMPTS, n=64, max_new_tokens=16, seed=2).samples]
            scorer.score(texts[:8])
            ours_score = timed(lambda: scorer.score(texts), repeat=3)
            from transformers import pipeline

            pipe = pipeline("text-classification", model=classifier, device=-1)
            [pipe(t) for t in texts[:8]]
            base_score = timed(lambda: [pipe(t) for t in texts], repeat=2)
            record("score_speedup", 256 / ours_score, 256 / base_score, "texts/s", 5)

            # weight sync through gRPC vs raw safetensors save + load of the same tensors
            sync = timed(lambda: gen.load_weights(trainer_svc.address), repeat=3)
            from safetensors.torch import load_file, save_file

            size = gen.load_weights(trainer_svc.address).bytes
            state = {k: v.contiguous() for k, v in local.model.named_parameters()}
            raw = timed(lambda: (save_file(state, str(work / "w.safetensors")),
                                 load_file(str(work / "w.safetensors"))), repeat=3)
            record("weight_sync", size / sync / 1e9, size / raw / 1e9, "GB/s")

            rollouts = gen.generate(PROMPTS, n=16, max_new_tokens=16, seed=3).samples
        queries = [list(s.prompt_token_ids) for s in rollouts]
        responses = [list(s.response_token_ids) for s in rollouts]
        scores = [0.5 + 0.01 * (i % 7) for i in range(len(rollouts))]

        def update(minibatch):
            trainer = PPOTrainer(policy, PPOConfig(minibatch_size=minibatch, ppo_epochs=4))
            trainer.step(queries[:8], responses[:8], scores[:8])  # warm-up
            return timed(lambda: trainer.step(queries, responses, scores), repeat=2)

        record("ppo_update_speedup", 64 / update(16), 64 / update(1), "samples/s", 5)
    finally:
        stop_services(services)

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    RESULTS.write_text(json.dumps({"machine": machine, "figures": figures}, indent=2))
    print(f"\n{'figure':<20} {'ours':>10} {'baseline':>10} {'unit':<11} {'ratio':>7} {'target':>7}  met?")
    for name, f in figures.items():
        target = f"{f['target']}x" if f["target"] else "-"
        met = "-" if f["met"] is None else ("yes" if f["met"] else "NO")
        print(f"{name:<20} {f['ours']:10.2f} {f['baseline']:10.2f} {f['unit']:<11} {f['ratio']:6.1f}x {target:>7}  {met}")
    print(f"machine: {machine}\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
