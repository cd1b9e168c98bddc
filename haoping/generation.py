"""Batched sampling from a causal LM with a KV cache. Pure of gRPC.

Every sample carries its own sampling parameters and its own random stream (seeded from
the request seed, prompt index and sample index), so a sample comes out the same whether
it is generated alone or merged into a larger batch with other requests.
"""
from __future__ import annotations

import functools
import json
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from haoping.errors import Cancelled
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
    each row takes the same path whatever else is in the batch. When every row is plain, the
    vocabulary-wide gathers and scatters by row are skipped too (same values: they only select).
    """
    filtered = (top_k > 0) | (top_p < 1)
    if not bool(filtered.any()):
        sampled = _plain_inverse_cdf(logits, temperature, uniforms)
    else:
        sampled = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        plain = ~filtered
        if bool(plain.any()):
            sampled[plain] = _plain_inverse_cdf(logits[plain], temperature[plain], uniforms[plain])
        probs, index = filter_logits(logits[filtered], temperature[filtered], top_k[filtered], top_p[filtered])
        picks = torch.searchsorted(probs.cumsum(-1), uniforms[filtered].unsqueeze(1).to(probs.dtype))
        sampled[filtered] = index.gather(1, picks.clamp(max=logits.shape[1] - 1)).squeeze(1)
    greedy = temperature <= 0
    if bool(greedy.any()):
        sampled = torch.where(greedy, logits.argmax(-1), sampled)
    return sampled


def _plain_inverse_cdf(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    scaled = logits.float()
    if not bool((temperature == 1).all()):  # dividing by 1 changes nothing: skip a vocabulary-wide pass
        scaled = scaled / temperature.clamp(min=1e-6).unsqueeze(1)
    picks = torch.searchsorted(torch.softmax(scaled, dim=-1).cumsum(-1), uniforms.unsqueeze(1).float())
    return picks.squeeze(1).clamp(max=logits.shape[1] - 1)




def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` widened to ``width`` along ``dim`` by zeros on the left."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


class DecodeBatch:
    """A running batch that samples join and leave between token steps (continuous batching).

    :meth:`add` prefills new samples (left-padded among themselves) and merges their KV cache into
    the running one, padded on the left to the longest row; masked pad columns and per-row
    position ids keep every row's attention exactly its own. :meth:`step` samples one token for
    every row and answers the rows that finished (their own EOS or max_new_tokens) at once; they
    leave the batch. Each row draws its uniforms from its own seed, by its own step count, so a
    sample is the same whether it ran alone, in a batch, or joined one mid-flight.
    """

    def __init__(self, model, eos_id: int | None, pad_id: int):
        self.model = model
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.device = next(model.parameters()).device
        self.keys: list[int] = []           # row -> the id add() handed out
        self.specs: list[SampleSpec] = []
        self.responses: list[list[int]] = []
        self._next_key = 0
        self._cache = None                  # DynamicCache, [rows, heads, width, head_dim] per layer
        self._mask = self._logits = None    # [rows, width]; next-token logits [rows, vocab]
        self._rows: dict[str, torch.Tensor] = {}  # per-row state and parameters, all [rows, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def partial(self, key: int) -> list[int]:
        """The tokens a running row has so far."""
        return self.responses[self.keys.index(key)]

    @torch.inference_mode()
    def add(self, specs: list[SampleSpec]) -> list[int]:
        """Prefill ``specs`` and merge them into the running batch; returns one key per spec."""
        if not specs:
            return []
        n, width = len(specs), max(len(s.prompt_ids) for s in specs)
        # a prompt that several rows share (samples per prompt, popular prompts) is prefilled once
        distinct = list(dict.fromkeys(s.prompt_ids for s in specs))
        input_ids = torch.full((len(distinct), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for i, prompt in enumerate(distinct):
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        logits = out.logits[:, -1]
        if len(distinct) < n:  # each row gets its prompt's KV cache, mask and logits
            row_of = {prompt: i for i, prompt in enumerate(distinct)}
            index = torch.tensor([row_of[s.prompt_ids] for s in specs], device=self.device)
            out.past_key_values.reorder_cache(index)
            mask, positions, logits = mask[index], positions[index], logits[index]
        limits = [s.params.max_new_tokens for s in specs]
        # each row's uniform draws for all its steps up front: one RNG call per row, not per token
        # (a row draws exactly its own max_new_tokens values, so its stream ignores the rest of the batch)
        uniforms = torch.zeros((n, max(limits)))
        for i, spec in enumerate(specs):
            uniforms[i, :limits[i]] = torch.rand(limits[i], generator=torch.Generator().manual_seed(spec.seed))
        rows = {
            "temperature": torch.tensor([s.params.temperature for s in specs]),
            "top_k": torch.tensor([s.params.top_k for s in specs]),
            "top_p": torch.tensor([s.params.top_p for s in specs]),
            "min_new": torch.tensor([s.params.min_new_tokens for s in specs]),
            "limit": torch.tensor(limits),
            "done": torch.zeros(n, dtype=torch.long),  # tokens generated so far
            "position": positions[:, -1].cpu() + 1,    # position id of the row's next token
        }
        rows = {name: value.to(self.device) for name, value in rows.items()}
        rows["uniforms"] = uniforms.to(self.device)
        if not self.keys:
            self._cache, self._mask, self._logits, self._rows = out.past_key_values, mask, logits, rows
        else:
            total = max(self._mask.shape[1], width)
            for old, new in zip(self._cache.layers, out.past_key_values.layers):
                old.keys = torch.cat([_pad_left(old.keys, total, -2), _pad_left(new.keys, total, -2)])
                old.values = torch.cat([_pad_left(old.values, total, -2), _pad_left(new.values, total, -2)])
            self._mask = torch.cat([_pad_left(self._mask, total, 1), _pad_left(mask, total, 1)])
            self._logits = torch.cat([self._logits, logits])
            steps = max(self._rows["uniforms"].shape[1], uniforms.shape[1])
            for name, value in rows.items():
                old = self._rows[name]
                if name == "uniforms":
                    old = torch.nn.functional.pad(old, (0, steps - old.shape[1]))
                    value = torch.nn.functional.pad(value, (0, steps - value.shape[1]))
                self._rows[name] = torch.cat([old, value])
        keys = list(range(self._next_key, self._next_key + n))
        self._next_key += n
        self.keys += keys
        self.specs += specs
        self.responses += [[] for _ in specs]
        return keys

    def remove(self, keys) -> None:
        """Drop rows (their callers are gone): no more work is spent on them."""
        gone = set(keys)
        self._keep([i for i, key in enumerate(self.keys) if key not in gone])

    def _keep(self, kept: list[int]) -> None:
        if len(kept) == len(self.keys):
            return
        self.keys = [self.keys[i] for i in kept]
        self.specs = [self.specs[i] for i in kept]
        self.responses = [self.responses[i] for i in kept]
        if not kept:
            self._cache = self._mask = self._logits = None
            self._rows = {}
            return
        index = torch.tensor(kept, device=self.device)
        mask = self._mask[index]
        first = int(mask.any(0).nonzero()[0])  # columns that are padding for every remaining row go
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
        self._logits = self._logits[index]
        self._rows = {name: value[index] for name, value in self._rows.items()}

    @torch.inference_mode()
    def step(self) -> dict[int, GeneratedSample]:
        """One token for every row; returns the rows that finished (they leave the batch)."""
        if not self.keys:
            return {}
        r = self._rows
        logits = self._logits
        if self.eos_id is not None:
            held = r["min_new"] > r["done"]
            if bool(held.any()):
                logits = logits.clone()
                logits[held, self.eos_id] = float("-inf")
        uniforms = r["uniforms"].gather(1, r["done"].unsqueeze(1)).squeeze(1)
        tokens = sample_next(logits, r["temperature"], r["top_k"], r["top_p"], uniforms)
        r["done"] = r["done"] + 1
        ended = r["done"] >= r["limit"]
        if self.eos_id is not None:
            ended = ended | (tokens == self.eos_id)
        for response, token in zip(self.responses, tokens.tolist()):
            response.append(token)
        finished: dict[int, GeneratedSample] = {}
        if bool(ended.any()):
            ended_list = ended.tolist()
            for i, end in enumerate(ended_list):
                if end:
                    reason = EOS if self.responses[i][-1] == self.eos_id else LENGTH
                    finished[self.keys[i]] = GeneratedSample(list(self.specs[i].prompt_ids), self.responses[i],
                                                             reason)
            kept = [i for i, end in enumerate(ended_list) if not end]
            tokens = tokens[kept] if kept else tokens[:0]
            self._keep(kept)
        if self.keys:
            r = self._rows
            self._mask = torch.cat([self._mask, self._mask.new_ones((len(self.keys), 1))], 1)
            out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=self._mask,
                             position_ids=r["position"].unsqueeze(1), past_key_values=self._cache, use_cache=True)
            self._logits = out.logits[:, -1]
            r["position"] = r["position"] + 1
        return finished


def generate_batch(model, specs: list[SampleSpec], eos_id: int | None, pad_id: int,
                   on_step: Callable[[list[list[int]], list[bool]], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> list[GeneratedSample]:
    """Sample continuations for all specs in one batch with a KV cache.

    Prompts are left-padded; position ids count from each row's first real token, so a
    prompt's continuation does not depend on the other prompts' lengths. Each row stops on
    its own EOS or its own max_new_tokens (and leaves the batch then).
    """
    batch = DecodeBatch(model, eos_id, pad_id)
    keys = batch.add(specs)
    row_of = {key: i for i, key in enumerate(keys)}
    responses = list(batch.responses)  # the rows' own lists: they grow as the rows decode
    results: list[GeneratedSample | None] = [None] * len(specs)
    while len(batch):
        if should_stop is not None and should_stop():
            raise Cancelled()
        for key, sample in batch.step().items():
            results[row_of[key]] = sample
        if on_step is not None:
            on_step(responses, [r is not None for r in results])
    return results


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_views(data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in memory, as views into ``data``: no copy.

    The format (an 8-byte little-endian header length, a JSON header of name -> dtype, shape
    and data offsets, then the data) is checked entry by entry: ValueError for a header that
    does not parse, an unknown dtype, or offsets that leave the buffer or disagree with the
    shape. The views share ``data``'s memory (read them, copy them out; do not keep them)."""
    size = len(data)
    if size < 8:
        raise ValueError("shorter than a safetensors header")
    header_bytes = int.from_bytes(data[:8], "little")
    if header_bytes > size - 8:
        raise ValueError(f"header of {header_bytes} bytes in a file of {size}")
    try:
        header = json.loads(bytes(data[8:8 + header_bytes]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    start, body = 8 + header_bytes, size - 8 - header_bytes
    views = {}
    with warnings.catch_warnings():  # a read-only bytes object: the views are only read
        warnings.simplefilter("ignore", UserWarning)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
                raise ValueError(f"{name}: no known dtype")
            shape, offsets = entry.get("shape"), entry.get("data_offsets")
            if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                    or not isinstance(offsets, list) or len(offsets) != 2
                    or not all(isinstance(o, int) for o in offsets)):
                raise ValueError(f"{name}: malformed shape or data_offsets")
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = offsets
            count = math.prod(shape)
            if not 0 <= begin <= end <= body or end - begin != count * dtype.itemsize:
                raise ValueError(f"{name}: data_offsets {offsets} do not fit shape {shape} in {body} bytes of data")
            flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=start + begin) if count
                    else torch.empty(0, dtype=dtype))
            views[name] = flat.view(shape)
    return views


class PolicyGenerator:
    """A policy that writes continuations and can swap in new weights atomically.

    Weights never change under a running batch: every batch holds them (and their version) from
    its first token to its last; a weight load waits until the running batches drained, and
    new batches wait for the load. Batches ask :meth:`PolicyBatch.accepting` before taking new
    rows, so a pending load is not starved by rows that keep joining.
    """

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
        # prompts repeat (samples per prompt, templates); the tokenizer never changes under a generator
        cache = functools.lru_cache(maxsize=4096)
        self._encode_cached = cache(lambda prompt: tuple(encode_prompt(self.tokenizer, prompt)))
        self._decode_cached = cache(lambda ids: decode_clean(self.tokenizer, list(ids)))
        self._weights = threading.Condition()
        self._holds = 0          # open batches reading the weights
        self._loads_waiting = 0  # weight loads waiting for them to close

    def encode(self, prompt: str) -> list[int]:
        return list(self._encode_cached(prompt))

    def decode(self, ids: list[int], after: str = "") -> str:
        """Clean text of ``ids``; ``after``: the text they continue (see :func:`decode_clean`)."""
        return decode_clean(self.tokenizer, ids, after)

    def decode_prompt(self, ids: tuple[int, ...]) -> str:
        """:meth:`decode` for prompts, which repeat: cached."""
        return self._decode_cached(tuple(ids))

    @property
    def load_pending(self) -> bool:
        """A weight load is waiting for the running batches to finish."""
        return self._loads_waiting > 0

    def _hold(self) -> int:
        with self._weights:
            while self._loads_waiting:
                self._weights.wait()
            self._holds += 1
            return self.version

    def _release(self) -> None:
        with self._weights:
            self._holds -= 1
            self._weights.notify_all()

    def open_batch(self) -> PolicyBatch:
        """A running batch for continuous batching on the current weights (blocks during a load)."""
        return PolicyBatch(self)

    def generate(self, specs: list[SampleSpec], **callbacks) -> tuple[list[GeneratedSample], int]:
        """Returns the samples and the policy version that produced all of them."""
        version = self._hold()
        try:
            return generate_batch(self.model, specs, self.format.eos_id, self.format.pad_id, **callbacks), version
        finally:
            self._release()

    def load_weights(self, data: bytes | bytearray, version: int) -> None:
        """Load a safetensors file of the policy's parameters (tied weights stored once).

        The tensors are read in place from ``data`` and copied once, into the parameters.
        Waits for running batches to finish (they take no new rows meanwhile). ValueError, with
        the old weights still serving, for weights :func:`check_weights` refuses."""
        try:
            state = safetensors_views(data)
        except ValueError as err:
            raise ValueError(f"weights are not a readable safetensors file: {err}") from None
        self.check_state(state, version)
        self.swap_in(state, version)

    def check_state(self, state: dict[str, torch.Tensor], version: int) -> None:
        """ValueError unless ``state`` (name -> tensor) of ``version`` may replace the serving weights."""
        check_weights(state, dict(self.model.named_parameters()), set(self.model.state_dict()), version,
                      self.version)

    def swap_in(self, state: dict[str, torch.Tensor], version: int, adopt: bool = False) -> None:
        """Copy a ``state`` that :meth:`check_state` passed into the model once the running batches
        finished; ValueError (old weights serving) if a newer version was loaded meanwhile.

        ``adopt``: the tensors are the generator's to keep (nobody else writes them): when each has
        its parameter's dtype, device and shape, they become the parameters themselves, no copy."""
        expected = dict(self.model.named_parameters())
        adopt = adopt and all(name in state and state[name].dtype == p.dtype and state[name].device == p.device
                              and state[name].shape == p.shape for name, p in expected.items())
        with self._weights:
            self._loads_waiting += 1
            try:
                while self._holds:
                    self._weights.wait()
                if version < self.version:  # another load went first meanwhile
                    raise ValueError(f"weights of policy version {version} are older than the version "
                                     f"{self.version} this generator serves")
                with torch.no_grad():
                    for name, tensor in state.items():
                        if name not in expected:
                            continue
                        if adopt:
                            expected[name].data = tensor
                        else:
                            expected[name].copy_(tensor.to(expected[name].dtype))
                self.version = version
            finally:
                self._loads_waiting -= 1
                self._weights.notify_all()


def all_finite(tensor: torch.Tensor) -> bool:
    """Every value finite. A NaN or infinity anywhere makes the sum non-finite, so a finite sum
    (one fast pass, no mask the size of the tensor) proves it; only a sum that overflowed needs
    the element-wise check."""
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


def check_weights(state: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor], known: set[str],
                  version: int, serving_version: int) -> None:
    """ValueError unless ``state`` can replace ``parameters``: every parameter present and nothing
    unknown (``known``: the model's state-dict names, tied weights included), the same shapes,
    the serving dtype or float32 (the trainer's master weights, cast on load), every value
    finite, and ``version`` not older than ``serving_version``."""
    if version < serving_version:
        raise ValueError(f"weights of policy version {version} are older than the version {serving_version} "
                         "this generator serves")
    unexpected = set(state) - known
    missing = set(parameters) - set(state)
    if unexpected or missing:
        raise ValueError(f"weights do not fit the policy: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, tensor in state.items():
        if name not in parameters:
            continue  # a tied alias (state_dict name) that is not a parameter of its own
        target = parameters[name]
        if tensor.shape != target.shape:
            raise ValueError(f"weights do not fit the policy: {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(target.shape)}")
        if tensor.dtype not in (target.dtype, torch.float32):
            raise ValueError(f"weights do not fit the policy: {name} is {tensor.dtype}, expected {target.dtype} "
                             "or float32")
        if not all_finite(tensor):
            raise ValueError(f"weights of policy version {version} hold non-finite values in {name}")


class PolicyBatch(DecodeBatch):
    """A :class:`DecodeBatch` on a :class:`PolicyGenerator`'s weights, which stay fixed (and
    ``version`` with them) until :meth:`close`."""

    def __init__(self, generator: PolicyGenerator):
        super().__init__(generator.model, generator.format.eos_id, generator.format.pad_id)
        self.generator = generator
        self.version = generator._hold()
        self._open = True

    def accepting(self) -> bool:
        """False while a weight load waits: the batch takes no new rows and drains, so the load can go ahead."""
        return not self.generator.load_pending

    def close(self) -> None:
        if self._open:
            self._open = False
            self.generator._release()
