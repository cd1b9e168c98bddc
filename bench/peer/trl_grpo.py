"""TRL GRPOTrainer on the starter models for a fixed training budget (run in the trl-1.16 venv).

`python -m bench.peer.trl_grpo --config RUN_DIR/config.json`; writes RUN_DIR/steps.jsonl,
RUN_DIR/policy (the final policy) and RUN_DIR/result.json. The reward is a Python function over
haoping's classifier scorer; every step's KL is measured by haoping's definition (see
trl_common.haoping_kl) while the clock is paused.
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from bench.peer.trl_common import (Reward, StepRecorder, TrainingClock, haoping_kl, save_policy, start_run,
                                       versions, warm_up)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from haoping.atomic import atomic_write_json

    config, run_dir, tokenizer = start_run(argv, AutoTokenizer)
    prompts, samples_per_step = config["prompts"], config["samples_per_step"]
    min_tokens, max_tokens = config["min_new_tokens"], config["max_new_tokens"]
    model = AutoModelForCausalLM.from_pretrained(config["policy"])
    ref_for_kl = AutoModelForCausalLM.from_pretrained(config["policy"]).eval()  # the measurement's own copy
    for p in ref_for_kl.parameters():
        p.requires_grad_(False)
    reward = Reward(config["classifier"], tokenizer, config["empty_response_reward"])
    clock = TrainingClock()
    recorder = StepRecorder(run_dir, clock)

    def classifier_reward(prompts, completions, completion_ids, **kwargs):
        # TRL's decoded completions put spaces between BERT tokens; decode as haoping does instead
        with clock.paused():
            prompt_texts = [reward.prompt_text(p) for p in prompts]
            response_texts = [reward.decode(ids) for ids in completion_ids]
        rewards = reward(prompt_texts, response_texts)
        with clock.paused():
            recorder.add(prompt_texts, response_texts, rewards)
        return rewards

    class MeasuredGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            with clock.paused():
                queries = [row[m.bool()].tolist() for row, m in zip(output["prompt_ids"], output["prompt_mask"])]
                responses = [row[m.bool()].tolist()
                             for row, m in zip(output["completion_ids"], output["completion_mask"])]
                recorder.add_kl(haoping_kl(self.model, ref_for_kl, queries, responses, tokenizer, min_tokens))
            return output

    class Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.end_step()
            if clock.elapsed() >= config["budget_seconds"]:
                control.should_training_stop = True

    args = GRPOConfig(
        output_dir=str(run_dir / "trl"), use_cpu=True, seed=config["seed"], report_to="none",
        save_strategy="no", disable_tqdm=True, logging_steps=1, max_steps=10 ** 6,
        learning_rate=config["learning_rate"], lr_scheduler_type="constant", beta=config["beta"],
        per_device_train_batch_size=samples_per_step, gradient_accumulation_steps=1,
        num_generations=samples_per_step // len(prompts),
        max_completion_length=max_tokens, generation_kwargs={"min_new_tokens": min_tokens},
        temperature=1.0, top_k=0, top_p=1.0, dataloader_num_workers=0,
    )
    trainer = MeasuredGRPOTrainer(model=model, reward_funcs=classifier_reward, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}),
                                  processing_class=tokenizer, callbacks=[Budget()])
    warm_up(trainer.model, tokenizer, reward, prompts, max_tokens)
    trainer.train()
    save_policy(trainer.model, config["policy"], run_dir / "policy")
    result = {"steps_done": len(recorder.steps), "train_seconds": clock.elapsed(), "versions": versions(),
              "trl_config": {k: v for k, v in args.to_dict().items()
                             if k in ("learning_rate", "beta", "loss_type", "scale_rewards", "epsilon",
                                      "num_iterations", "num_generations", "per_device_train_batch_size",
                                      "max_grad_norm", "adam_epsilon", "weight_decay", "lr_scheduler_type")}}
    atomic_write_json(run_dir / "result.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
