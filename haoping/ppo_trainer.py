"""The policy trainer: a causal LM with a value head, a frozen reference model, and the
update step. Pure of gRPC; ``services/trainer`` is a thin adapter over :class:`PPOTrainer`.

One :meth:`PPOTrainer.step` takes a batch of scored rollouts (query ids, response ids, raw
score), shapes the scores (:func:`haoping.algorithms.shape_rewards`), recomputes old log-probs
and reference log-probs, then, by ``PPOConfig.algorithm``:
* ``ppo``: values, KL-penalized per-token rewards, GAE, whitened advantages, clipped policy and
  value losses;
* ``grpo`` / ``rloo``: one advantage per rollout from the other samples of its prompt, clipped
  policy loss plus beta * k3 KL to the reference; the value head never runs;
and ``ppo_epochs`` passes of shuffled minibatches.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save, save_file

from haoping import algorithms, ppo
from haoping.checkpoint import CheckpointError, CheckpointStore, verify_checkpoint
from haoping.distributed import (DataParallel, collective, full_tensor, fully_shard_model, local_tensor,
                                 transformer_blocks)
from haoping.log import get_logger
from haoping.models import TokenFormat, autocast, decode_clean, load_causal_lm, load_tokenizer
from haoping.ppo_config import PPOConfig
from haoping.training import lr_factors

log = get_logger(__name__)
STEP_RESPONSES_KEPT = 1000  # applied Step ids older than this keep their version, not their statistics


class NonFiniteStep(RuntimeError):
    """An update whose loss, gradients or weights were non-finite; it was rolled back."""


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.value_head.bias)

    def forward(self, batch: "RolloutBatch", with_values: bool = True, share_queries: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Response logits [B, R, V] and values [B, R] (None without ``with_values``: the value
        head is skipped), at the positions that predict response tokens."""
        logits, hidden = response_pass(self.lm, batch, want_hidden=with_values, share_queries=share_queries)
        if not with_values:
            return logits, None
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


@dataclass
class RolloutBatch:
    """Queries left-padded, responses right-padded, joined: [pad q q q | r r pad]."""

    input_ids: torch.Tensor       # [B, Q+R]
    attention_mask: torch.Tensor  # [B, Q+R]
    position_ids: torch.Tensor    # [B, Q+R], 0 at each row's first real token
    response_ids: torch.Tensor    # [B, R]
    response_mask: torch.Tensor   # [B, R]
    query_width: int              # Q

    def to(self, device: torch.device) -> "RolloutBatch":
        return RolloutBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                            self.response_ids.to(device), self.response_mask.to(device), self.query_width)

    def rows(self, index: torch.Tensor) -> "RolloutBatch":
        return RolloutBatch(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                            self.response_ids[index], self.response_mask[index], self.query_width)


def build_rollout_batch(queries: list[list[int]], responses: list[list[int]], pad_id: int) -> RolloutBatch:
    q_width = max(len(q) for q in queries)
    r_width = max(len(r) for r in responses)
    batch = len(queries)
    input_ids = torch.full((batch, q_width + r_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, (q, r) in enumerate(zip(queries, responses)):
        input_ids[i, q_width - len(q):q_width] = torch.tensor(q)
        input_ids[i, q_width:q_width + len(r)] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, q_width - len(q):q_width + len(r)] = 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    response_mask = attention_mask[:, q_width:].float()
    return RolloutBatch(input_ids, attention_mask, position_ids, input_ids[:, q_width:], response_mask, q_width)


def shared_query_groups(batch: "RolloutBatch", force: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows with the same query can share one forward pass over it (several samples per prompt).

    Returns (a row holding each distinct query [U], each row's query index [B]), or None when
    most queries are distinct and sharing would not pay for its second pass (unless ``force``)."""
    q = batch.query_width
    # the mask too: a real pad-id token at a query's start is not padding
    queries = torch.cat([batch.input_ids[:, :q], batch.attention_mask[:, :q]], 1)
    distinct, group = torch.unique(queries, dim=0, return_inverse=True)
    rows = len(group)
    if 2 * len(distinct) > rows and not force:
        return None
    first = torch.full((len(distinct),), rows, dtype=torch.long, device=group.device)
    first = first.scatter_reduce(0, group, torch.arange(rows, device=group.device), "amin")
    return first, group


def response_pass(lm: nn.Module, batch: "RolloutBatch", want_hidden: bool = False, share_queries: bool | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM's logits that predict the response tokens [B, R, V], and with ``want_hidden`` the
    last hidden states at those positions [B, R, H].

    Only the R predicting positions go through the vocabulary projection, the costliest matmul of
    a small model. When queries repeat, each distinct query runs once and its KV cache is
    gathered per row (gradients flow back through the gather): with 16 samples per prompt that
    is about a third fewer tokens through the model than one pass over [query | response] rows.
    ``share_queries`` True/False takes or skips that path whatever the rows (None: by the rows):
    under FSDP every process must call the model as often as the others.
    """
    q, r = batch.query_width, batch.response_ids.shape[1]
    groups = None if share_queries is False else shared_query_groups(batch, force=bool(share_queries))
    if groups is None:
        out = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False, output_hidden_states=want_hidden, logits_to_keep=r + 1)
        return out.logits[:, :-1], out.hidden_states[-1][:, q - 1:-1] if want_hidden else None
    first, group = groups
    prefix = lm(input_ids=batch.input_ids[first, :q], attention_mask=batch.attention_mask[first, :q],
                position_ids=batch.position_ids[first, :q], use_cache=True, output_hidden_states=want_hidden,
                logits_to_keep=1)
    logits = [prefix.logits[group]]  # [B, 1, V]: the last query token predicts the first response token
    hidden = [prefix.hidden_states[-1][group, -1:]] if want_hidden else []
    if r > 1:
        cache = prefix.past_key_values
        cache.reorder_cache(group)  # [U, ...] -> [B, ...] by index_select
        rest = lm(input_ids=batch.response_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                  position_ids=batch.position_ids[:, q:-1], past_key_values=cache, use_cache=True,
                  output_hidden_states=want_hidden)
        logits.append(rest.logits)
        if want_hidden:
            hidden.append(rest.hidden_states[-1])
    return torch.cat(logits, 1), torch.cat(hidden, 1) if want_hidden else None


def mask_early_eos(logits: torch.Tensor, eos_id: int | None, min_tokens: int) -> torch.Tensor:
    """Response logits [B, R, V] with EOS impossible at the first min_tokens positions: the same
    constrained policy the generator sampled from (min_new_tokens)."""
    if eos_id is None or min_tokens <= 0:
        return logits
    logits = logits.clone()
    logits[:, :min_tokens, eos_id] = float("-inf")
    return logits


SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def lr_schedule(schedule: str, warmup: int, total: int):
    """step -> learning-rate factor of ``constant``, ``linear`` or ``cosine`` (with warm-up)."""
    return lr_factors(SCHEDULER_NAMES[schedule], warmup, total)


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    return lr_schedule(schedule, warmup, total)(step)


class StaleRolloutsError(ValueError):
    """A Step whose rollouts come from another policy version than the trainer serves."""


class PPOTrainer:
    def __init__(self, policy_ref: str, config: PPOConfig = PPOConfig(), device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, ref_model_ref: str | None = None,
                 parallel: DataParallel | None = None, fsdp: bool = False):
        self.config = config
        self.parallel = parallel  # None: one process, torch.distributed untouched
        # FSDP2: each process holds a shard of the parameters, gradients and optimizer state
        self.fsdp = fsdp and parallel is not None
        self.device = torch.device(device)
        self.dtype = dtype  # autocast dtype for forward passes; master weights stay float32
        self.policy_ref = policy_ref
        self.ref_model_ref = ref_model_ref or policy_ref
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(policy_ref)
        self.pad_id = TokenFormat.of(self.tokenizer).pad_id
        self.eos_id = TokenFormat.of(self.tokenizer).eos_id
        self.model = PolicyWithValueHead(load_causal_lm(policy_ref, self.device, torch.float32)).to(self.device)
        self.model.eval()  # no dropout: old and new log-probs must come from the same function
        self.ref_model = load_causal_lm(self.ref_model_ref, self.device, dtype).eval()
        for p in self.ref_model.parameters():
            p.requires_grad_(False)
        if parallel is not None:
            parallel.broadcast_module(self.model)
        if config.freeze_embeddings:
            for module in (self.model.lm.get_input_embeddings(), self.model.lm.get_output_embeddings()):
                for p in module.parameters() if module is not None else ():
                    p.requires_grad_(False)
        if self.fsdp:  # after freezing (shards keep requires_grad), before the optimizer takes the shards
            fully_shard_model(self.model, transformer_blocks(self.model.lm), parallel, dtype)
            fully_shard_model(self.ref_model, transformer_blocks(self.ref_model), parallel)
        self.optimizer = self._make_optimizer()
        self.kl_ctl = (ppo.AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
                       if config.adaptive_kl else ppo.FixedKLController(config.init_kl_coef))
        self.score_moments = ppo.RunningMoments() if config.reward_normalization == "running" else None
        self._lr_factor = lr_schedule(config.lr_schedule, config.lr_warmup_steps, config.total_steps)
        self.version = 0
        self.steps_done = 0
        self.recent_rewards: list[float] = []  # the last 3 batches' mean raw score (target_reward)
        self._weights_cache: tuple[int, bytes, str] | None = None
        self._full_policy: dict[str, torch.Tensor] | None = None  # FSDP: rank 0's full copy it exports
        self._gather_policy()
        self.fuse_first_forward = True  # see _rollout_forward_with_grad; tests compare both paths
        self.applied_steps: dict[str, dict] = {}  # Step id -> its answer, in the order applied (exactly once)

    # ------------------------------------------------------------ setup

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        groups = [{"params": [p for p in self.model.lm.parameters() if p.requires_grad], "lr": c.learning_rate,
                   "name": "policy"}]
        if c.uses_value_head:  # critic-free algorithms keep no optimizer state for it
            groups.append({"params": list(self.model.value_head.parameters()),
                           "lr": c.value_learning_rate or c.learning_rate, "name": "value_head"})
        return torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0)  # decay would pull toward zero, not the reference

    def _set_learning_rates(self, reward_mean: float) -> float:
        """Set this step's learning rates; ``reward_mean``: the batch's mean raw score."""
        c = self.config
        factor = self._lr_factor(self.steps_done)
        policy_frozen = self.steps_done < c.value_warmup_steps
        self.recent_rewards = (self.recent_rewards + [reward_mean])[-3:]
        policy_factor = ppo.target_reward_factor(self.recent_rewards, c.target_reward, c.target_reward_lr_factor)
        for group in self.optimizer.param_groups:
            if group["name"] == "policy":
                group["lr"] = 0.0 if policy_frozen else c.learning_rate * factor * policy_factor
            else:
                group["lr"] = (c.value_learning_rate or c.learning_rate) * factor
        return self.optimizer.param_groups[0]["lr"]

    def _autocast(self):
        return autocast(self.device, self.dtype)

    # ------------------------------------------------------------ forward passes
    # ``min_tokens``: EOS is impossible before it, as at sampling (None: the config's minimum).

    @torch.no_grad()
    def _rollout_forward(self, batch: RolloutBatch, min_tokens: int | None = None, total_rows: int | None = None):
        """Old log-probs, values (without a value head: none), entropies and reference log-probs,
        in chunks. Each [B, R]. ``total_rows``: the rows over all processes, ``batch`` this one's
        share of them (with several processes)."""
        chunks = {"logp": [], "values": [], "entropy": [], "ref_logp": []}
        n = batch.input_ids.shape[0]
        for rows in self._parts(torch.arange(n), self.config.forward_batch_size, total_rows or n):
            if not len(rows):  # FSDP: a chunk another process has; this one's forward takes part, unused
                part = batch.rows(torch.zeros(1, dtype=torch.long))
                self._policy_forward(part, min_tokens)
                self._ref_logprobs(part, min_tokens)
                continue
            part = batch.rows(rows)
            logp_all, values = self._policy_forward(part, min_tokens)
            chunks["logp"].append(ppo.token_logprobs(logp_all, part.response_ids))
            chunks["entropy"].append(ppo.entropy_from_logprobs(logp_all))
            if values is not None:
                chunks["values"].append(values.float())
            chunks["ref_logp"].append(self._ref_logprobs(part, min_tokens))
        return {k: torch.cat(v) if v else None for k, v in chunks.items()}

    def _min_tokens(self, min_tokens: int | None) -> int:
        return self.config.min_response_tokens if min_tokens is None else min_tokens

    @torch.no_grad()
    def _ref_logprobs(self, part: RolloutBatch, min_tokens: int | None = None) -> torch.Tensor:
        """The frozen reference model's log-probs of the response tokens [B, R]."""
        with self._autocast():
            ref_logits, _ = response_pass(self.ref_model, part, share_queries=self._share_queries(part))
        ref_logits = mask_early_eos(ref_logits, self.eos_id, self._min_tokens(min_tokens))
        return ppo.logprobs_from_logits(ref_logits, part.response_ids)

    def _policy_forward(self, part: RolloutBatch, min_tokens: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-softmax over the vocabulary [B, R, V] (EOS masked as the sampler did) and values [B, R]
        (None for a critic-free algorithm: the value head does not run)."""
        with self._autocast():
            logits, values = self.model(part, with_values=self.config.uses_value_head,
                                        share_queries=self._share_queries(part))
        logits = mask_early_eos(logits, self.eos_id, self._min_tokens(min_tokens))
        return F.log_softmax(logits.float(), -1), values

    def _share_queries(self, part: RolloutBatch) -> bool | None:
        """Under FSDP, whether this forward takes the shared-query path, agreed by all processes
        (each pass all-gathers the weights, so all must make as many; a process whose rows have
        no repeated query then passes each query alone). Otherwise None: each decides by its rows."""
        if not self.fsdp:
            return None
        return self.parallel.any(shared_query_groups(part) is not None)

    def _parts(self, rows: torch.Tensor, size: int, total: int) -> list[torch.Tensor]:
        """``rows`` (this process's share of ``total`` rows) in parts of ``size``. Under FSDP every
        process takes as many parts as the one with the most rows (``row_shard``: ceil(total /
        world)), some of them empty: each forward and backward is a collective there."""
        most = -(-total // self.parallel.world) if self.fsdp else len(rows)
        return [rows[start:start + size] for start in range(0, most, size)]

    def _rollout_forward_with_grad(self, batch: RolloutBatch, min_tokens: int | None = None):
        """When one minibatch is the whole batch, the first epoch's forward runs on the same rows
        with the same weights as the rollout forward: one pass with grad serves both, saving a
        policy forward per step. Returns (old statistics as in _rollout_forward, the pass)."""
        logp_all, values = self._policy_forward(batch, min_tokens)
        with torch.no_grad():
            old = {"logp": ppo.token_logprobs(logp_all, batch.response_ids),
                   "values": values.float().detach() if values is not None else None,
                   "entropy": ppo.entropy_from_logprobs(logp_all),
                   "ref_logp": self._ref_logprobs(batch, min_tokens)}
        return old, (logp_all, values)

    # ------------------------------------------------------------ the update

    def step(self, queries: list[list[int]], responses: list[list[int]], scores: list[float],
             min_response_tokens: int | None = None, policy_versions: list[int] | None = None) -> dict[str, float]:
        """One update on B scored rollouts (raw scores: shaping happens here). Returns TRL-style statistics.

        ``min_response_tokens``: the EOS minimum the sampler used for these rollouts (None: the
        config's). ``policy_versions``: the policy version that generated each rollout; those that
        differ from :attr:`version` are counted, or the step is refused (``stale_rollouts``).
        """
        validate_rollouts(queries, responses, scores)
        if self.parallel and len(queries) < self.parallel.world:
            raise ValueError(f"{len(queries)} rollouts for {self.parallel.world} trainer processes: each needs one")
        c = self.config
        min_tokens = self._min_tokens(min_response_tokens)
        if min_tokens < 0:
            raise ValueError(f"min_response_tokens must be >= 0, not {min_tokens}")
        for i, response in enumerate(responses):
            if self.eos_id is not None and self.eos_id in response[:min_tokens]:
                raise ValueError(f"rollout {i}: EOS before min_response_tokens={min_tokens}")
        stale = sum(v != self.version for v in policy_versions) if policy_versions is not None else 0
        if stale and c.stale_rollouts == "reject":
            first = next(i for i, v in enumerate(policy_versions) if v != self.version)
            raise StaleRolloutsError(f"{stale} of {len(queries)} rollouts are stale: rollout {first} comes from "
                                     f"policy version {policy_versions[first]}, the trainer serves {self.version}")
        t_start = time.perf_counter()
        batch = build_rollout_batch(queries, responses, self.pad_id).to(self.device)
        mask = batch.response_mask
        raw_scores = torch.tensor(scores, dtype=torch.float32, device=self.device)
        prompt_keys = [tuple(q) for q in queries]
        empty = torch.tensor([c.empty_response_reward is not None and not decode_clean(self.tokenizer, r).strip()
                              for r in responses], dtype=torch.bool, device=self.device)
        scores_t = algorithms.shape_rewards(
            raw_scores, empty, prompt_keys, empty_response_reward=c.empty_response_reward,
            normalization=c.reward_normalization, moments=self.score_moments, clip=c.reward_clip,
            baseline=c.score_baseline)

        n = len(queries)
        # with several processes each runs the rollout forward on its rows; the rest is gathered
        local_rows = self.parallel.local_rows(n) if self.parallel else torch.arange(n, device=self.device)
        local_batch = batch.rows(local_rows) if self.parallel else batch
        first_forward = None  # (log-softmax, values) with grad, reused by the first minibatch
        if self.fuse_first_forward and c.minibatch_size >= n and c.gradient_accumulation_steps == 1:
            old, first_forward = self._rollout_forward_with_grad(local_batch, min_tokens)
        else:
            old = self._rollout_forward(local_batch, min_tokens, total_rows=n)
        if self.parallel:
            old = {k: self.parallel.gather_rows(v, n) if v is not None else None for k, v in old.items()}
        t_forward = time.perf_counter()
        kl_coef = self.kl_ctl.value
        if c.uses_value_head:
            rewards, kl, non_score = ppo.compute_rewards(scores_t, old["logp"], old["ref_logp"], mask, kl_coef,
                                                         c.kl_estimator)
            advantages, returns = ppo.gae(rewards, old["values"], mask, c.gamma, c.lam)
            if c.whiten_advantages:
                advantages = ppo.whiten(advantages, mask)
        else:  # critic-free: one advantage per sequence [B], KL in the loss (beta = kl_coef)
            kl = ppo.kl_estimate(old["logp"], old["ref_logp"], c.kl_estimator) * mask
            in_reward = c.kl_penalty == "reward"
            non_score = -kl_coef * kl if in_reward else torch.zeros_like(kl)
            groups = algorithms.group_ids(prompt_keys).to(self.device)
            returns_t = scores_t + non_score.sum(1)  # [B]: the score, less the KL penalty when it is in the reward
            advantages = (algorithms.grpo_advantages(returns_t, groups, scale=c.scale_advantages)
                          if c.algorithm == "grpo" else algorithms.rloo_advantages(returns_t, groups))
            returns = None

        # critic-free: beta of the k3 term in the loss (0 when the KL penalty is in the reward)
        loss_kl_coef = kl_coef if not c.uses_value_head and c.kl_penalty == "loss" else 0.0
        learning_rate = self._set_learning_rates(raw_scores.mean().item())
        mb_stats: list[dict[str, float]] = []
        micro = max(1, c.minibatch_size // c.gradient_accumulation_steps)
        stat_keys = self._loss_stat_keys()
        for _ in range(c.ppo_epochs):
            order = torch.randperm(n, device=self.device)
            for mb_start in range(0, n, c.minibatch_size):
                mb_index = order[mb_start:mb_start + c.minibatch_size]
                self.optimizer.zero_grad(set_to_none=True)
                # the whole minibatch's real tokens (every process holds the whole mask): a
                # process's share of the loss is weighted by its tokens over this global count
                mb_tokens = mask[mb_index].sum().clamp(min=1)
                share = self.parallel.share(mb_index) if self.parallel else mb_index
                parts = []
                for index in self._parts(share, micro, len(mb_index)):
                    if first_forward is not None:  # the whole batch, before any update: same rows, same weights
                        index = local_rows
                        parts.append(self._loss(local_batch, old, advantages, returns, index,
                                                mask[index].sum() / mb_tokens, loss_kl_coef, min_tokens, first_forward))
                        first_forward = None
                        continue
                    # weight each micro-batch by its share of real tokens: accumulation == one big batch
                    weight = mask[index].sum() / mb_tokens
                    if not len(index):  # FSDP: a forward and backward with the others', weighted 0
                        index = index.new_zeros(1)
                    parts.append(self._loss(batch.rows(index), old, advantages, returns, index, weight, loss_kl_coef,
                                            min_tokens))
                if self.parallel and not self.fsdp:  # FSDP's backward reduce-scattered (summed) them
                    self.parallel.sum_gradients(self._trained_parameters())
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                self.optimizer.step()
                mb_stats.append({k: sum(p[k] * p["weight"] for p in parts) for k in stat_keys})
        if self.parallel:  # each process summed its parts' weighted statistics; the minibatch's are their sum
            summed = self.parallel.sum_values(torch.tensor([[s[k] for k in stat_keys] for s in mb_stats],
                                                           dtype=torch.float64))
            mb_stats = [dict(zip(stat_keys, row)) for row in summed.tolist()]
        t_optimize = time.perf_counter()

        seq_kl = kl.sum(1)  # [B] nats per sequence
        mean_kl = seq_kl.mean().item()
        self.kl_ctl.update(mean_kl, n)
        self.steps_done += 1
        self.version += 1
        self._weights_cache = None
        self._gather_policy()

        stats = {
            "objective/kl": mean_kl,
            "objective/kl_coef": kl_coef,
            "objective/entropy": ppo.masked_sum(old["entropy"], mask, dim=1).mean().item(),
            "objective/non_score_reward": non_score.sum(1).mean().item(),
            "objective/scores": scores_t.mean().item(),
            "env/reward_mean": raw_scores.mean().item(),
            "env/reward_std": raw_scores.std().item() if n > 1 else 0.0,
            "env/empty_rate": empty.float().mean().item(),
            "rollouts/stale": float(stale),
            "ppo/learning_rate": learning_rate,
            "tokens/responses_len_mean": mask.sum(1).mean().item(),
            "time/ppo/forward_passes": t_forward - t_start,
            "time/ppo/optimize_step": t_optimize - t_forward,
            "time/ppo/total": time.perf_counter() - t_start,
        }
        if c.uses_value_head:
            values, ret = old["values"], returns
            var_explained = 1.0 - (ppo.masked_var(ret - values, mask)
                                   / ppo.masked_var(ret, mask).clamp(min=1e-8)).item()
            stats.update({
                "ppo/returns/mean": ppo.masked_mean(ret, mask).item(),
                "ppo/returns/var": ppo.masked_var(ret, mask).item(),
                "ppo/val/vpred": ppo.masked_mean(values, mask).item(),
                "ppo/val/var_explained": var_explained,
            })
        else:
            stats["ppo/advantages/mean_abs"] = advantages.abs().mean().item()
        for key in mb_stats[0]:
            stats[key] = float(np.mean([s[key] for s in mb_stats]))
        return stats

    def _loss_stat_keys(self) -> list[str]:
        """The statistics :meth:`_loss` returns (besides its weight), in its order."""
        common = ["ppo/loss/policy"] + (["ppo/loss/value"] if self.config.uses_value_head else [])
        common += ["ppo/loss/total", "ppo/loss/kl", "ppo/policy/clipfrac", "ppo/policy/approxkl",
                   "ppo/policy/entropy"]
        return common + (["ppo/val/clipfrac", "ppo/val/error"] if self.config.uses_value_head else [])

    def _trained_parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _loss(self, part: RolloutBatch, old: dict, advantages, returns, index, weight, loss_kl_coef: float,
              min_tokens: int | None = None,
              forward: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict[str, float]:
        """Backward of one micro-batch's loss (scaled by ``weight``); returns its statistics."""
        c = self.config
        mask = part.response_mask
        logp_all, values = forward if forward is not None else self._policy_forward(part, min_tokens)
        logp = ppo.token_logprobs(logp_all, part.response_ids)
        # the fused first pass is the rollout forward itself: its entropy is already in ``old``
        token_entropy = old["entropy"][index] if forward is not None else None
        if not c.uses_value_head:
            out = algorithms.critic_free_loss(logp, old["logp"][index], old["ref_logp"][index], advantages[index],
                                              mask, c.cliprange, loss_kl_coef)
            (out.loss * weight).backward()
            with torch.no_grad():
                entropy = ppo.masked_mean(ppo.entropy_from_logprobs(logp_all) if token_entropy is None
                                          else token_entropy, mask)
            return {"weight": float(weight), "ppo/loss/policy": out.policy.item(), "ppo/loss/total": out.loss.item(),
                    "ppo/loss/kl": out.kl.item(), "ppo/policy/clipfrac": out.clipfrac.item(),
                    "ppo/policy/approxkl": out.approxkl.item(), "ppo/policy/entropy": entropy.item()}
        values = values.float()
        pg = ppo.policy_loss(logp, old["logp"][index], advantages[index], mask, c.cliprange)
        vf = ppo.value_loss(values, old["values"][index], returns[index], mask, c.cliprange_value)
        loss = pg.loss + c.vf_coef * vf.loss
        # a direct, low-variance pull toward the reference, besides the KL penalty in the reward
        kl_to_ref = ppo.masked_mean(ppo.kl_estimate(logp, old["ref_logp"][index], "k3"), mask)
        if c.kl_loss_coef > 0:
            loss = loss + c.kl_loss_coef * kl_to_ref
        (loss * weight).backward()
        with torch.no_grad():
            entropy = ppo.masked_mean(ppo.entropy_from_logprobs(logp_all) if token_entropy is None
                                      else token_entropy, mask)
        return {
            "weight": float(weight),
            "ppo/loss/policy": pg.loss.item(),
            "ppo/loss/value": vf.loss.item(),
            "ppo/loss/total": loss.item(),
            "ppo/loss/kl": kl_to_ref.item(),
            "ppo/policy/clipfrac": pg.clipfrac.item(),
            "ppo/policy/approxkl": pg.approxkl.item(),
            "ppo/policy/entropy": entropy.item(),
            "ppo/val/clipfrac": vf.clipfrac.item(),
            "ppo/val/error": ppo.masked_mean((values - returns[index]) ** 2, mask).item(),
        }

    # ------------------------------------------------------------ weights and checkpoints

    def policy_tensors(self) -> dict[str, torch.Tensor]:
        """The LM weights only (no value head), tied weights once, where they are (on the GPU for
        NCCL) and not copied: what a generator loads. Under FSDP: rank 0's full copy, gathered at
        the end of each Step (:meth:`_gather_policy`); the other processes export nothing."""
        if self.fsdp:
            if self._full_policy is None:
                raise RuntimeError("under FSDP only trainer rank 0 holds the full policy")
            return dict(self._full_policy)
        return {name: p.detach() for name, p in self.model.lm.named_parameters()}

    def policy_state(self) -> dict[str, torch.Tensor]:
        """:meth:`policy_tensors` on the CPU."""
        return {name: t.to("cpu").contiguous() for name, t in self.policy_tensors().items()}

    def _gather_policy(self) -> None:
        """Under FSDP, every process all-gathers the policy's shards (a collective: each calls
        this at the same points, after each Step and on loading) and rank 0 keeps the whole on
        the CPU. So GetWeights, the weight broadcast and save_pretrained on rank 0 need no
        collective of their own, which the other processes could not join outside a Step."""
        if not self.fsdp:
            return
        full = {}
        with torch.no_grad():
            for name, p in self.model.lm.named_parameters():
                whole = collective(full_tensor)(p)
                if self.parallel.is_leader:
                    full[name] = whole.detach().to("cpu", copy=True)
                del whole
        self._full_policy = full if self.parallel.is_leader else None

    def _policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The LM's state_dict for save_pretrained: None (its own) in one process; under FSDP
        every key of it from rank 0's full copy (tied keys share a tensor), buffers as they are."""
        if not self.fsdp:
            return None
        names = {id(p): name for name, p in self.model.lm.named_parameters()}
        full = self.policy_tensors()
        return {key: full[names[id(value)]] if id(value) in names else value.detach().cpu()
                for key, value in self.model.lm.state_dict(keep_vars=True).items()}

    def policy_weights(self) -> tuple[int, bytes, str]:
        """(version, safetensors bytes, sha256), cached per version."""
        if self._weights_cache is None or self._weights_cache[0] != self.version:
            data = save(self.policy_state(), metadata={"policy_version": str(self.version)})
            self._weights_cache = (self.version, data, hashlib.sha256(data).hexdigest())
        return self._weights_cache

    def write_policy_file(self, path: str | Path) -> None:
        """The policy as a safetensors file at ``path``: the bytes :meth:`policy_weights` holds,
        written straight to the file (no copy in memory, no hash)."""
        save_file(self.policy_state(), str(path), metadata={"policy_version": str(self.version)})

    def save_checkpoint(self, directory: str | Path, extra_files: dict[str, bytes] | None = None) -> Path:
        """Everything needed to continue as if nothing happened: policy (save_pretrained), value
        head, optimizer, KL controller, normalizer, the torch, Python and numpy RNG states and the
        applied Step ids; plus ``extra_files`` (e.g. the coordinator's own state).

        A new verified checkpoint directory (see :mod:`haoping.checkpoint`): staged under a temp
        name, fsynced, with a manifest of sizes and sha256, renamed; the previous one is kept.

        With several processes (every one calls this, rank 0 names the directory) the model and
        optimizer are a torch.distributed.checkpoint folder ``dcp/`` that every process writes
        its part of, inside the same staging directory; rank 0 writes the rest, ``policy/``
        (save_pretrained) included. It loads at any number of processes.
        """
        directory = Path(directory)
        if self.parallel:
            return self._save_sharded_checkpoint(directory, extra_files)
        store = CheckpointStore(directory.parent)
        with store.writing(directory.name, sequence=self.steps_done,
                           extra={"policy_version": self.version, "steps_done": self.steps_done}) as tmp:
            save_file(self.model.value_head.state_dict(), tmp / "value_head.safetensors")
            tensors, meta = optimizer_to_flat(self.optimizer)
            save_file(tensors, tmp / "optimizer.safetensors")
            self._write_checkpoint_files(tmp, {"optimizer": meta}, extra_files)
        return directory

    def _write_checkpoint_files(self, tmp: Path, state: dict, extra_files: dict[str, bytes] | None) -> None:
        """What one process writes in either layout: policy, RNG, the trainer's state, extras."""
        self.model.lm.save_pretrained(tmp / "policy", state_dict=self._policy_state_dict())
        self.tokenizer.save_pretrained(tmp / "policy")
        save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
        state = {
            "version": self.version, "steps_done": self.steps_done, "kl_coef": self.kl_ctl.value,
            "score_moments": self.score_moments.state_dict() if self.score_moments else None,
            "policy_ref": self.policy_ref, "ref_model_ref": self.ref_model_ref,
            "config": asdict(self.config), **state,
            "python_rng": _python_rng_to_json(random.getstate()),
            "numpy_rng": _numpy_rng_to_json(np.random.get_state()),
            "applied_steps": self.applied_steps,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)

    def _save_sharded_checkpoint(self, directory: Path, extra_files: dict[str, bytes] | None) -> Path:
        import torch.distributed.checkpoint as dcp

        state = sharded_state(self.model, self.optimizer)
        problem = non_finite_tensor(state)
        p = self.parallel
        if p.any(bool(problem)):  # under FSDP each checks its own shards: all refuse together
            raise ValueError(f"not checkpointing: {problem or 'a tensor in another trainer process'} is non-finite")
        if not p.is_leader:
            staging = p.broadcast_json()
            if staging:  # None: rank 0 could not start the checkpoint
                collective(dcp.save)(state, checkpoint_id=Path(staging) / SHARDED_DIR)
            return directory
        store = CheckpointStore(directory.parent)
        announced = False
        try:
            with store.writing(directory.name, sequence=self.steps_done,
                               extra={"policy_version": self.version, "steps_done": self.steps_done,
                                      "world_size": p.world}) as tmp:
                p.broadcast_json(str(tmp))
                announced = True
                collective(dcp.save)(state, checkpoint_id=tmp / SHARDED_DIR)
                self._write_checkpoint_files(tmp, {"sharded": SHARDED_DIR, "world_size": p.world}, extra_files)
        finally:
            if not announced:
                p.broadcast_json(None)
        return directory

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, config: PPOConfig | None = None,
                        parallel: DataParallel | None = None, fsdp: bool = False) -> "PPOTrainer":
        """Resume: the policy, value head, optimizer, KL coefficient, version, RNGs and applied Step
        ids come back; the reference model is the original one, not the checkpoint. Either layout
        (one process's or the sharded one) loads at any number of processes (each calls this).

        The checkpoint is verified first (manifest sizes and sha256, every tensor finite):
        :class:`haoping.checkpoint.CheckpointError` names the file and the reason."""
        directory = Path(directory)
        verify_checkpoint(directory)
        state = json.loads((directory / "trainer_state.json").read_text())
        config = config or PPOConfig.from_dict(state["config"])
        trainer = cls(str(directory / "policy"), config, device, dtype, ref_model_ref=state["ref_model_ref"],
                      parallel=parallel, fsdp=fsdp)
        trainer.policy_ref = state["policy_ref"]
        if state.get("sharded"):
            load_sharded_state(trainer.model, trainer.optimizer, directory / state["sharded"], parallel)
        elif trainer.fsdp:  # one process's files, whole tensors: each process takes its shards
            load_full_state(trainer.model, trainer.optimizer, load_file(directory / "value_head.safetensors"),
                            load_file(directory / "optimizer.safetensors"), state["optimizer"])
        else:
            trainer.model.value_head.load_state_dict(load_file(directory / "value_head.safetensors"))
            optimizer_from_flat(trainer.optimizer, load_file(directory / "optimizer.safetensors"), state["optimizer"])
        trainer._gather_policy()  # policy/ is the same weights; gathered again so all ranks did alike
        torch.set_rng_state(load_file(directory / "rng.safetensors")["torch_rng"])
        if state.get("python_rng"):
            random.setstate(_python_rng_from_json(state["python_rng"]))
        if state.get("numpy_rng"):
            np.random.set_state(_numpy_rng_from_json(state["numpy_rng"]))
        trainer.version, trainer.steps_done = state["version"], state["steps_done"]
        trainer.kl_ctl.value = state["kl_coef"]
        if trainer.score_moments and state["score_moments"]:
            trainer.score_moments.load_state_dict(state["score_moments"])
        trainer.applied_steps = dict(state.get("applied_steps", {}))
        return trainer

    # ------------------------------------------------------------ guarded, exactly-once updates

    def guarded_step(self, queries: list[list[int]], responses: list[list[int]], scores: list[float],
                     *args, **kwargs) -> dict[str, float]:
        """:meth:`step`, undone when its loss, gradients or updated weights are non-finite (or it
        raises): the policy, value head, optimizer, KL controller, normalizer, counters and RNG
        are then exactly as before, and :class:`NonFiniteStep` says what was non-finite."""
        snapshot = self._snapshot()
        try:
            stats = self.step(queries, responses, scores, *args, **kwargs)
        except BaseException:
            self._restore(snapshot)
            raise
        problem = self._non_finite_problem(stats)
        if self.parallel and self.parallel.any(bool(problem)):  # every process rolls back, or none
            problem = problem or "non-finite update in another trainer process"
        if problem:
            self._restore(snapshot)
            raise NonFiniteStep(f"update rolled back: {problem}")
        return stats

    def apply_step(self, step_id: str, queries: list[list[int]], responses: list[list[int]], scores: list[float],
                   *args, **kwargs) -> tuple[dict[str, float], int, bool]:
        """(statistics, policy version, repeated): a ``step_id`` already applied gets its stored
        answer and no second update; an empty id is always applied."""
        if step_id and step_id in self.applied_steps:
            answer = self.applied_steps[step_id]
            return dict(answer["stats"]), answer["policy_version"], True
        stats = self.guarded_step(queries, responses, scores, *args, **kwargs)
        if step_id:
            self.applied_steps[step_id] = {"policy_version": self.version, "stats": stats}
            if len(self.applied_steps) > STEP_RESPONSES_KEPT:
                oldest = next(itertools.islice(self.applied_steps, len(self.applied_steps) - STEP_RESPONSES_KEPT - 1,
                                               None))
                self.applied_steps[oldest]["stats"] = {}
        return stats, self.version, False

    def _snapshot(self) -> dict:
        """What a step can change, copied: the parameters the optimizer updates (frozen ones and
        buffers a step never writes), the optimizer's per-parameter state and hyperparameters,
        the KL controller, normalizer, counters and RNG. The parameter copies reuse buffers kept
        from the last step: no allocation of a model-sized copy on the hot path."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        copies = getattr(self, "_snapshot_buffers", None)
        if copies is None or len(copies) != len(params) or any(c.shape != p.shape for c, p in zip(copies, params)):
            copies = self._snapshot_buffers = [torch.empty_like(p, memory_format=torch.preserve_format)
                                               for p in params]
        with torch.no_grad():
            for copy_, p in zip(copies, params):
                copy_.copy_(p)
        optimizer_state = {}
        for p in params:
            if p in self.optimizer.state:
                optimizer_state[p] = {k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v)
                                      for k, v in self.optimizer.state[p].items()}
        return {"params": list(zip(params, copies)), "optimizer_state": optimizer_state,
                "param_groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                                 for g in self.optimizer.param_groups],
                "kl_ctl": copy.deepcopy(self.kl_ctl.__dict__),
                "score_moments": copy.deepcopy(self.score_moments.__dict__) if self.score_moments else None,
                "counters": (self.version, self.steps_done, self._weights_cache, self._full_policy),
                "rng": torch.get_rng_state()}

    def _restore(self, snapshot: dict) -> None:
        with torch.no_grad():
            for p, saved in snapshot["params"]:
                p.copy_(saved)
        for p, _ in snapshot["params"]:
            if p in snapshot["optimizer_state"]:
                self.optimizer.state[p] = snapshot["optimizer_state"][p]
            else:  # no state before this step (the first): none after the rollback either
                self.optimizer.state.pop(p, None)
        for group, saved in zip(self.optimizer.param_groups, snapshot["param_groups"]):
            group.update(saved)
        self.optimizer.zero_grad(set_to_none=True)
        self.kl_ctl.__dict__.update(snapshot["kl_ctl"])
        if self.score_moments is not None:
            self.score_moments.__dict__.update(snapshot["score_moments"])
        self.version, self.steps_done, self._weights_cache, self._full_policy = snapshot["counters"]
        torch.set_rng_state(snapshot["rng"])

    def _non_finite_problem(self, stats: dict[str, float]) -> str:
        """What is non-finite after an update ('' when nothing): a loss, a gradient, a weight.
        Under FSDP each process checks its own shards (no collective), and ``guarded_step``
        agrees the answer."""
        losses = sorted(k for k, v in stats.items() if "loss" in k and not math.isfinite(v))
        if losses:
            return f"non-finite {', '.join(losses)}"
        for name, p in self.model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(local_tensor(p.grad)).all()):
                return f"non-finite gradient of {name}"
            if not bool(torch.isfinite(local_tensor(p)).all()):
                return f"non-finite weights in {name}"
        return ""


SHARDED_DIR = "dcp"


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Model and optimizer state keyed by parameter name (torch.distributed.checkpoint.state_dict):
    what ``dcp/`` holds, independent of how many processes wrote it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                       parallel: DataParallel | None = None) -> None:
    """Load a ``dcp/`` folder into ``model`` and ``optimizer`` (collective when a process group
    is up; under FSDP each process reads its shards); :class:`CheckpointError` on every process
    when a tensor in it is non-finite."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=folder, no_dist=not torch.distributed.is_initialized())
    problem = non_finite_tensor(state)
    if parallel is not None and parallel.any(bool(problem)):
        problem = problem or "in another trainer process's shard"
    if problem:
        raise CheckpointError(folder, f"tensor {problem} has non-finite values")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, value_head: dict[str, torch.Tensor],
                    optimizer_tensors: dict[str, torch.Tensor], optimizer_meta: dict) -> None:
    """A one-process checkpoint's value head and optimizer (whole tensors, the optimizer's keyed
    by parameter position) into a sharded (FSDP) model and optimizer: renamed to parameter names
    and given to ``set_state_dict`` as a full state dict, which keeps each process's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    positions = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    per_param: dict[str, dict] = {}
    for key, value in list(optimizer_tensors.items()) + list(optimizer_meta["scalars"].items()):
        if key != "_empty":
            position, field = key.split(".", 1)
            per_param.setdefault(positions[int(position)], {})[field] = value
    groups = [{**group, "params": [positions[i] for i in group["params"]]} for group in optimizer_meta["param_groups"]]
    set_state_dict(model, optimizer, model_state_dict={f"value_head.{k}": v for k, v in value_head.items()},
                   optim_state_dict={"state": per_param, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True, strict=False))


def non_finite_tensor(tree, prefix: str = "") -> str:
    """The name of the first floating-point tensor in a nested dict/list with a non-finite value, or ''."""
    if torch.is_tensor(tree):  # a sharded tensor: this process's shard
        return prefix if tree.is_floating_point() and not bool(torch.isfinite(local_tensor(tree)).all()) else ""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{prefix}.{key}" if prefix else str(key))
        if found:
            return found
    return ""


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(value: list) -> tuple:
    return value[0], tuple(value[1]), value[2]


def _numpy_rng_to_json(state: tuple) -> list:
    kind, keys, pos, has_gauss, cached = state
    return [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _numpy_rng_from_json(value: list) -> tuple:
    kind, keys, pos, has_gauss, cached = value
    return kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached


def validate_rollouts(queries: list[list[int]], responses: list[list[int]], scores: list[float]) -> None:
    """Reject a batch the update cannot use, with a message naming the rollout."""
    if not queries:
        raise ValueError("no rollouts")
    if not (len(queries) == len(responses) == len(scores)):
        raise ValueError("queries, responses and scores differ in length")
    for i, (q, r, s) in enumerate(zip(queries, responses, scores)):
        if not q:
            raise ValueError(f"rollout {i}: empty query")
        if not r:
            raise ValueError(f"rollout {i}: empty response")
        if not math.isfinite(s):
            raise ValueError(f"rollout {i}: reward {s} is not finite")


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors for safetensors, plus JSON-able metadata."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    if not tensors:  # safetensors refuses an empty file
        tensors["_empty"] = torch.zeros(0)
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    per_param: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        if name == "_empty":
            continue
        param_id, key = name.split(".", 1)
        per_param.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
