"""The starter-model recipes, shrunk: real corpus slice, real training code, loadable results."""
import json
import math

import pytest

from haoping.bootstrap import (STARTER_REPORT, ClassifierRecipe, PolicyRecipe, _train_into, build_tokenizer,
                               train_classifier, train_policy)
from haoping.corpus import build_char_vocab, load_reviews, split_reviews
from haoping.models import decode_clean, encode_prompt, load_causal_lm, load_tokenizer
from haoping.scorers.classifier import ClassifierScorer


def test_corpus_is_deduplicated_and_split_without_overlap():
    reviews = load_reviews()
    texts = [r.text for r in reviews]
    assert len(texts) == len(set(texts)) > 15000
    train, heldout = split_reviews(reviews)
    assert not {r.text for r in train} & {r.text for r in heldout}
    vocab = build_char_vocab(texts[:200])
    assert list(vocab)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "##a" in vocab


def test_tiny_recipes_train_and_load_through_the_model_path(tmp_path):
    reviews = load_reviews()
    small = reviews[:150] + reviews[-150:]  # both sentiments
    train, heldout = split_reviews(small, heldout_fraction=0.2)
    tokenizer = build_tokenizer(small, tmp_path / "tokenizer")
    policy = train_policy(tokenizer, train, heldout, tmp_path / "policy",
                          PolicyRecipe(n_layer=1, n_embd=32, n_head=2, steps=3, warmup=1))
    assert math.isfinite(policy["heldout_loss"]) and policy["parameters"] > 0
    classifier = train_classifier(tokenizer, train, heldout, tmp_path / "classifier",
                                  ClassifierRecipe(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, steps=3, warmup=1),
                                  policy_dir=None)
    assert 0.0 <= classifier["heldout_accuracy"] <= 1.0
    lm_tokenizer = load_tokenizer(str(tmp_path / "policy"))
    ids = encode_prompt(lm_tokenizer, "刚收到货，感觉")
    assert decode_clean(lm_tokenizer, ids) == "刚收到货，感觉"
    assert load_causal_lm(str(tmp_path / "policy")).config.n_layer == 1
    scorer = ClassifierScorer(str(tmp_path / "classifier"))
    assert scorer.positive_index == 1 and len(scorer.score(["好", "差"])) == 2


def test_a_starter_model_is_replaced_only_by_a_complete_one_and_the_earlier_copy_is_kept(tmp_path):
    target = tmp_path / "policy"
    target.mkdir()  # a cache written before directories carried a completion marker
    (target / "model.safetensors").write_text("old weights")
    (target / STARTER_REPORT).write_text('{"seconds": 1}')

    def crash(directory):
        (directory / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-training")

    with pytest.raises(RuntimeError):
        _train_into(target, crash)
    assert (target / "model.safetensors").read_text() == "old weights"
    assert not [p for p in tmp_path.iterdir() if p.name not in ("policy",)]  # no staging left behind

    def train(directory):
        (directory / "model.safetensors").write_text("new weights")
        return {"loss": 0.5}

    report = _train_into(target, train)
    assert report["loss"] == 0.5 and json.loads((target / STARTER_REPORT).read_text())["loss"] == 0.5
    assert (target / "model.safetensors").read_text() == "new weights"
    assert (tmp_path / "policy.prev" / "model.safetensors").read_text() == "old weights"


def test_a_directory_that_is_not_a_starter_model_is_never_replaced(tmp_path):
    target = tmp_path / "classifier"
    target.mkdir()
    (target / "notes.txt").write_text("somebody's files")
    with pytest.raises(FileExistsError):
        _train_into(target, lambda directory: {})
    assert (target / "notes.txt").read_text() == "somebody's files"
