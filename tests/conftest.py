"""Shared fixtures: tiny random models saved locally in the hub formats (offline)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXTS = ["刚收到货，感觉很好，质量不错，非常满意", "这部电影很无聊，太差了，不推荐",
              "说实话，真的很失望，包装破了", "这次购物总的来说体验很棒，物流快，好评",
              "ipad mini 256g 屏幕清晰，手感好"]


def write_char_vocab(directory: Path, texts: list[str]) -> Path:
    """vocab.txt + tokenizer_config.json: the layout of uer's hub repos (BertTokenizer)."""
    from haoping.corpus import build_char_vocab

    directory.mkdir(parents=True, exist_ok=True)
    vocab = build_char_vocab(texts, min_count=1)
    (directory / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}))
    return directory


def make_tiny_policy(directory: Path, seed: int = 0) -> Path:
    """A 1-layer GPT-2 with a BERT vocab and [CLS]/[SEP] framing, like uer/gpt2-chinese-cluecorpussmall."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    write_char_vocab(directory, TINY_TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def make_tiny_classifier(directory: Path, seed: int = 0) -> Path:
    """A 1-layer BERT classifier with uer's JD label names (positive is index 1 only by reading them)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    write_char_vocab(directory, TINY_TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "negative (stars 1, 2 and 3)", 1: "positive (stars 4 and 5)"},
                        label2id={"negative (stars 1, 2 and 3)": 0, "positive (stars 4 and 5)": 1})
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    return make_tiny_policy(tmp_path_factory.mktemp("tiny") / "policy")


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("tiny") / "classifier")
