"""Batched sampling from a causal LM with a KV cache. Pure of gRPC.

Every sample carries its own sampling parameters and its own random stream (seeded from
the request seed, prompt index and sample index), so a sample comes out the same whether
it is generated alone or merged into a larger batch with other requests.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from haoping.log import get_logger
from haoping.models import TokenFormat, decode_clean, encode_prompt, load_causal_lm, load_tokenizer

log = get_logger(__name__)

EOS, LENGTH = "eos", "length"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    min_new_tokens: int = 0   # EOS is masked before this many tokens (the trainer masks it too)


@dataclass(frozen=True)
class SampleSpec:
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    seed: int


@dataclass
class GeneratedSample:
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # EOS or LENGTH


def sample_seed(request_seed: int, prompt_index: int, sample_index: int) -> int:
    """A well-mixed 63-bit seed per sample, independent of batch composition."""
    return int(np.random.SeedSequence([request_seed, prompt_index, sample_index]).generate_state(2, np.uint64)[0] >> 1)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row temperature / top-k / top-p. logits [B, V]; params [B].

    Returns (sorted_probs [B, V], sorted_index [B, V]): each row's distribution over its
    tokens in descending order, with filtered tokens at probability 0.
    Rows with temperature 0 are left to the caller (greedy).
    """
    scaled = logits.float() / temperature.clamp(min=1e-6).unsqueeze(1)
    sorted_logits, sorted_index = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, logits.shape[1])).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs
    # keeps at least the top token; top_p >= 1 filters nothing, not even float round-off
    probs = probs.masked_fill((mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1), 0.0)
    return probs / probs.sum(-1, keepdim=True), sorted_index


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row [B] by inverse-CDF sampling with the row's own uniform draw [B].

    Rows without top-k/top-p skip the vocabulary sort (the costliest step of decoding on CPU);
    each row takes the same path whatever else is in the batch.
    """
    tokens = logits.argmax(-1)
    sampled = torch.empty_like(tokens)
    filtered = (top_k > 0) | (top_p < 1)
    plain = ~filtered
    if bool(plain.any()):
        probs = torch.softmax(logits[plain].float() / temperature[plain].clamp(min=1e-6).unsqueeze(1), dim=-1)
        picks = torch.searchsorted(probs.cumsum(-1), uniforms[plain].unsqueeze(1).float())
        sampled[plain] = picks.squeeze(1).clamp(max=logits.shape[1] - 1)
    if bool(filtered.any()):
        probs, index = filter_logits(logits[filtered], temperature[filtered], top_k[filtered], top_p[filtered])
        picks = torch.searchsorted(probs.cumsum(-1), uniforms[filtered].unsqueeze(1).to(probs.dtype))
        sampled[filtered] = index.gather(1, picks.clamp(max=logits.shape[1] - 1)).squeeze(1)
    return torch.where(temperature > 0, sampled, tokens)


class Cancelled(Exception):
    """The caller no longer wants the result; generation stopped early."""


@torch.inference_mode()
def generate_batch(model, specs: list[SampleSpec], eos_id: int | None, pad_id: int,
                   on_step: Callable[[list[list[int]], list[bool]], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> list[GeneratedSample]:
    """Sample continuations for all specs in one batch with a KV cache.

    Prompts are left-padded; position ids count from each row's first real token, so a
    prompt's continuation does not depend on the other prompts' lengths. Each row stops on
    its own EOS or its own max_new_tokens.
    """
    device = next(model.parameters()).device
    batch = len(specs)
    width = max(len(s.prompt_ids) for s in specs)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for i, spec in enumerate(specs):
        input_ids[i, width - len(spec.prompt_ids):] = torch.tensor(spec.prompt_ids, device=device)
        attention_mask[i, width - len(spec.prompt_ids):] = 1
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    temperature = torch.tensor([s.params.temperature for s in specs], device=device)
    top_k = torch.tensor([s.params.top_k for s in specs], device=device)
    top_p = torch.tensor([s.params.top_p for s in specs], device=device)
    limits = [s.params.max_new_tokens for s in specs]
    min_new = torch.tensor([s.params.min_new_tokens for s in specs], device=device)
    steps = max(limits)
    # each row's uniform draws for every step up front: one RNG call per row, not per token
    # (a row draws exactly its own max_new_tokens values, so its stream ignores the rest of the batch)
    uniforms_by_step = torch.zeros((steps, batch))  # [T, B]
    for i, spec in enumerate(specs):
        uniforms_by_step[:limits[i], i] = torch.rand(limits[i], generator=torch.Generator().manual_seed(spec.seed))
    uniforms_by_step = uniforms_by_step.to(device)
    # the mask for the whole generation, sliced per step instead of grown by concatenation
    full_mask = torch.cat([attention_mask, torch.ones((batch, steps), dtype=torch.long, device=device)], 1)

    responses: list[list[int]] = [[] for _ in specs]
    finish: list[str | None] = [None] * batch
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    next_position = position_ids[:, -1:] + 1
    for step in range(steps):
        if should_stop is not None and should_stop():
            raise Cancelled()
        uniforms = uniforms_by_step[step]
        logits = out.logits[:, -1]
        if eos_id is not None and bool((min_new > step).any()):
            logits = logits.clone()
            logits[min_new > step, eos_id] = float("-inf")
        tokens = sample_next(logits, temperature, top_k, top_p, uniforms)
        for i, token in enumerate(tokens.tolist()):
            if finish[i] is not None:
                continue
            responses[i].append(token)
            if token == eos_id:
                finish[i] = EOS
            elif len(responses[i]) >= limits[i]:
                finish[i] = LENGTH
        if on_step is not None:
            on_step(responses, [f is not None for f in finish])
        if all(f is not None for f in finish):
            break
        out = model(input_ids=tokens.unsqueeze(1), attention_mask=full_mask[:, :width + step + 1],
                    position_ids=next_position,
                    past_key_values=out.past_key_values, use_cache=True)
        next_position = next_position + 1
    return [GeneratedSample(list(s.prompt_ids), r, f or LENGTH) for s, r, f in zip(specs, responses, finish)]


class PolicyGenerator:
    """A policy that writes continuations and can swap in new weights atomically."""

    def __init__(self, model_ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        self.model_ref = model_ref
        self.device = torch.device(device)
        self.dtype = dtype
        self.tokenizer = load_tokenizer(model_ref)
        self.format = TokenFormat.of(self.tokenizer)
        self.model = load_causal_lm(model_ref, self.device, dtype)
        self.max_context = int(getattr(self.model.config, "n_positions", None)
                               or getattr(self.model.config, "max_position_embeddings", 1024))
        self.version = 0
        self._lock = threading.Lock()  # weights never change in the middle of a batch

    def encode(self, prompt: str) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def decode(self, ids: list[int]) -> str:
        return decode_clean(self.tokenizer, ids)

    def generate(self, specs: list[SampleSpec], **callbacks) -> tuple[list[GeneratedSample], int]:
        """Returns the samples and the policy version that produced all of them."""
        with self._lock:
            samples = generate_batch(self.model, specs, self.format.eos_id, self.format.pad_id, **callbacks)
            return samples, self.version

    def load_weights(self, data: bytes, version: int) -> None:
        """Load a safetensors file of the policy's parameters (tied weights stored once)."""
        state = load_safetensors(data)
        expected = dict(self.model.named_parameters())
        unexpected = set(state) - set(self.model.state_dict())
        missing = set(expected) - set(state)
        if unexpected or missing:
            raise ValueError(f"weights do not fit the policy: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise ValueError(f"weights do not fit the policy: {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(expected[name].shape)}")
        with self._lock, torch.no_grad():
            for name, tensor in state.items():
                expected[name].copy_(tensor.to(expected[name].dtype))
            self.version = version
