"""Reward model: rank losses and metrics, rank-list parsing, training, saving and scoring.

Models here are tiny BERTs (hidden 32, 2 layers) written to tmp dirs, so the file runs in
well under a minute on 2 CPU cores and never needs the starter models or the network.
"""
from __future__ import annotations

import argparse
import json
import math
import random

import grpc
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from haoping import reward_model
from haoping.atomic import atomic_directory
from haoping.corpus import build_char_vocab, load_reviews
from haoping.rank_loss import (
    batch_rank_loss,
    list_accuracy,
    pairwise_accuracy,
    pairwise_rank_loss,
    ranking_metrics,
)
from haoping.ranklists import RankList, RankListError, build_starter_ranklists, parse_ranklists, read_ranklists
from haoping.reward_model import TrainConfig, load_reward_base, train_reward_model
from haoping.client import ScorerClient
from haoping.scorers import ScoreResult, in_unit_interval
from haoping.scorers.reward_model import RewardModelScorer
from haoping.v1 import haoping_pb2 as pb
from services.coordinator.run import start_service, stop_services
from services.reward_model_cli import add_cli

CLEARLY_POSITIVE = "非常好，质量很好，很满意，物流也快，推荐购买！"
CLEARLY_NEGATIVE = "太差了，质量很差，非常失望，不会再买了，差评！"


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and do not crawl when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus_slice():
    """A fixed, balanced slice of the corpus: 400 positive and 400 negative reviews."""
    reviews = load_reviews()
    rng = random.Random(0)
    positives = rng.sample([r for r in reviews if r.label == 1], 400)
    negatives = rng.sample([r for r in reviews if r.label == 0], 400)
    return positives + negatives


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, corpus_slice):
    """A tiny untrained char-level BERT sentiment classifier (2 labels) with its tokenizer."""
    directory = tmp_path_factory.mktemp("tiny_base")
    texts = [r.text for r in corpus_slice] + [CLEARLY_POSITIVE, CLEARLY_NEGATIVE, "优良中差的了是在我有这个"]
    tokenizer = BertTokenizerFast(vocab=build_char_vocab(texts, min_count=1), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                        pad_token_id=tokenizer.pad_token_id)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def tiny_config(base: str, **overrides) -> TrainConfig:
    settings = dict(base=base, baseline=base, steps=60, lists_per_batch=8, lr=3e-3, warmup_steps=5,
                    eval_every=20, max_length=64, seed=0, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="haoping")
    add_cli(parser.add_subparsers(required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# --- losses and metrics -------------------------------------------------------------------

def test_logsigmoid_loss_equals_hand_computed_value():
    scores = torch.tensor([2.0, 0.5, -1.0])
    # ordered pairs (0,1), (0,2), (1,2): differences 1.5, 3.0, 1.5; −log σ(d) = log(1 + e^−d)
    expected = (math.log(1 + math.exp(-1.5)) * 2 + math.log(1 + math.exp(-3.0))) / 3
    assert pairwise_rank_loss(scores, "logsigmoid").item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_rank_loss(torch.tensor([0.0, 0.0])).item() == pytest.approx(math.log(2))
    # a wrongly ordered pair costs more than the same pair in order
    assert pairwise_rank_loss(torch.tensor([-1.0, 1.0])) > pairwise_rank_loss(torch.tensor([1.0, -1.0]))


def test_sigmoid_loss_equals_hand_computed_value():
    scores = torch.tensor([2.0, 0.5, -1.0])
    expected = -(2 / (1 + math.exp(-1.5)) + 1 / (1 + math.exp(-3.0))) / 3
    assert pairwise_rank_loss(scores, "sigmoid").item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_rank_loss(torch.tensor([0.0, 0.0]), "sigmoid").item() == pytest.approx(-0.5)


def test_loss_gradient_raises_better_and_lowers_worse_texts():
    scores = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    pairwise_rank_loss(scores).backward()
    # gradient descent moves scores against the gradient: the best text up, the worst down
    assert scores.grad[0] < 0 < scores.grad[2]
    assert scores.grad[1] == pytest.approx(0.0, abs=1e-7)


def test_batch_loss_weighs_each_list_equally():
    short, long = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 2.0, 1.0, 0.0])
    expected = (pairwise_rank_loss(short) + pairwise_rank_loss(long)) / 2
    assert batch_rank_loss([short, long]).item() == pytest.approx(expected.item())


def test_unknown_loss_and_too_short_lists_are_rejected():
    with pytest.raises(ValueError, match="unknown loss"):
        pairwise_rank_loss(torch.tensor([1.0, 0.0]), "hinge")
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_rank_loss(torch.tensor([1.0]))


def test_pairwise_and_list_accuracy():
    assert pairwise_accuracy(torch.tensor([3.0, 2.0, 1.0])) == 1.0
    assert list_accuracy(torch.tensor([3.0, 2.0, 1.0])) == 1.0
    assert pairwise_accuracy(torch.tensor([3.0, 1.0, 2.0])) == pytest.approx(2 / 3)
    assert list_accuracy(torch.tensor([3.0, 1.0, 2.0])) == 0.0
    assert pairwise_accuracy(torch.tensor([1.0, 1.0])) == 0.0  # a tie is not a correct order
    metrics = ranking_metrics([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.0, 1.0])])
    assert metrics == {"pairwise_accuracy": 2 / 4, "list_accuracy": 0.0, "n_lists": 2, "n_pairs": 4}


# --- rank-list files ----------------------------------------------------------------------

BAD_FILE = b"".join([
    "好\t一般\t差\n".encode(),          # 1 good
    "只有一条\n".encode(),               # 2 a single text
    "好\t\t差\n".encode(),              # 3 an empty field
    b"\n",                               # 4 an empty line
    b"\xff\xfe\xfd\tabc\n",              # 5 not UTF-8
    "同样\t同样\n".encode(),             # 6 the same text twice
    "很好\t不好\r\n".encode(),           # 7 good, Windows line end
])


def test_bad_lines_are_reported_with_line_numbers_and_skipped(tmp_path):
    path = tmp_path / "lists.tsv"
    path.write_bytes(BAD_FILE)
    lists, problems = read_ranklists(path)
    assert [r.texts for r in lists] == [("好", "一般", "差"), ("很好", "不好")]
    assert [r.line for r in lists] == [1, 7]
    reasons = {p.line: p.reason for p in problems}
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert "only 1 text" in reasons[2]
    assert "empty text in field 2" in reasons[3]
    assert "empty line" in reasons[4]
    assert "UTF-8" in reasons[5]
    assert "same text" in reasons[6]


def test_strict_mode_rejects_a_file_with_bad_lines(tmp_path):
    path = tmp_path / "lists.tsv"
    path.write_bytes(BAD_FILE)
    with pytest.raises(RankListError) as caught:
        read_ranklists(path, strict=True)
    assert [p.line for p in caught.value.problems] == [2, 3, 4, 5, 6]
    assert "line 2" in str(caught.value) and "line 6" in str(caught.value)
    good = tmp_path / "good.tsv"
    good.write_text("好\t差\n很好\t一般\t很差\n", encoding="utf-8")
    lists, problems = read_ranklists(good, strict=True)
    assert len(lists) == 2 and problems == []


def test_unusable_files_give_clear_errors(tmp_path):
    with pytest.raises(RankListError, match="not found"):
        read_ranklists(tmp_path / "missing.tsv")
    utf16 = tmp_path / "utf16.tsv"
    utf16.write_bytes("好\t差\n".encode("utf-16"))
    with pytest.raises(RankListError, match="UTF-16"):
        read_ranklists(utf16)
    with pytest.raises(RankListError, match="no usable rank lists"):
        parse_ranklists("只有一条\n".encode(), "one.tsv")


def test_starter_lists_are_graded_best_first(corpus_slice):
    lists = build_starter_ranklists(corpus_slice, 200, seed=3)
    assert lists == build_starter_ranklists(corpus_slice, 200, seed=3)  # reproducible
    assert all(2 <= len(r.texts) <= 4 and len(set(r.texts)) == len(r.texts) for r in lists)
    assert {len(r.texts) for r in lists} == {2, 3, 4}
    labels = {r.text: r.label for r in corpus_slice}
    # a plain review ranks above every plain review of lower sentiment in its list
    for ranklist in lists:
        plain = [labels[t] for t in ranklist.texts if t in labels]
        assert plain == sorted(plain, reverse=True)
    assert any(labels.get(r.texts[0]) == 1 or labels.get(r.texts[-1]) == 0 for r in lists)


# --- training, saving, scoring ------------------------------------------------------------

def synthetic_lists(count: int, seed: int) -> list[RankList]:
    """Filler text with one grade marker each: 优 > 良 > 中 > 差, in lists of 2–4."""
    rng = random.Random(seed)
    filler = "的了是在我有这个"
    lists = []
    for _ in range(count):
        grades = sorted(rng.sample(range(4), rng.randint(2, 4)), reverse=True)
        texts = []
        for grade in grades:
            words = [rng.choice(filler) for _ in range(rng.randint(3, 6))]
            words.insert(rng.randint(0, len(words)), "差中良优"[grade])
            texts.append("".join(words))
        lists.append(RankList(tuple(texts)))
    return lists


def test_training_on_a_tiny_synthetic_set_reaches_full_pairwise_accuracy(tiny_base, tmp_path):
    lists = synthetic_lists(32, seed=1)
    # 8 seeds tried: all reach 1.0 by step 100 of these 200
    result = train_reward_model(lists, lists, tmp_path / "rm", tiny_config(tiny_base, steps=200, eval_every=50, baseline=None))
    assert result["untrained"]["pairwise_accuracy"] < 0.9  # the model had something to learn
    assert result["dev"]["reward_model"]["pairwise_accuracy"] == 1.0
    assert result["dev"]["reward_model"]["list_accuracy"] == 1.0


def test_bfloat16_training_and_the_sigmoid_loss_run(tiny_base, tmp_path):
    lists = synthetic_lists(8, seed=2)
    result = train_reward_model(lists, lists, tmp_path / "rm", tiny_config(
        tiny_base, steps=3, eval_every=3, baseline=None, dtype="bfloat16", loss="sigmoid"))
    assert -1.0 < result["dev"]["reward_model"]["loss"] < 0.0  # −mean σ(·) lies in (−1, 0)
    assert all(math.isfinite(x) for x in result["history"]["train_loss"])


def test_untrained_scalar_head_is_the_classifier_logit_difference(tiny_base):
    classifier = BertForSequenceClassification.from_pretrained(tiny_base).eval()
    reward = load_reward_base(tiny_base, classifier=classifier).eval()
    assert reward.config.num_labels == 1
    tokenizer = BertTokenizerFast.from_pretrained(tiny_base)
    encoded = tokenizer([CLEARLY_POSITIVE, CLEARLY_NEGATIVE], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = classifier(**encoded).logits
        rewards = reward(**encoded).logits[:, 0]
    torch.testing.assert_close(rewards, logits[:, 1] - logits[:, 0], rtol=1e-4, atol=1e-5)


def test_the_checkpoint_is_chosen_on_the_selection_lists_and_dev_only_measures_it(tiny_base, tmp_path):
    lists = synthetic_lists(32, seed=1)
    # dev ranks the markers backwards, so the better the model, the worse its dev figures
    backwards = [RankList(tuple(reversed(r.texts))) for r in lists]
    config = tiny_config(tiny_base, steps=200, eval_every=50, baseline=None)
    on_dev = train_reward_model(lists, backwards, tmp_path / "on_dev", config)
    assert on_dev["selected_on"] == "dev" and on_dev["select"] is None
    assert on_dev["best_step"] == 0  # dev picks the untrained model, the one that ranks worst

    result = train_reward_model(lists, backwards, tmp_path / "held_out", config, select_lists=lists)
    history = result["history"]
    assert result["selected_on"] == "held-out" and result["best_step"] > 0
    assert result["select"]["reward_model"]["pairwise_accuracy"] == 1.0
    at = history["eval_step"].index(result["best_step"])
    assert history["select_pairwise_accuracy"][at] == 1.0
    # the dev figures reported are the chosen checkpoint's, however bad
    assert result["dev"]["reward_model"]["pairwise_accuracy"] == history["dev_pairwise_accuracy"][at] == 0.0
    metrics = json.loads((tmp_path / "held_out" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["selected_on"] == "held-out" and len(metrics["history"]["select_list_accuracy"]) == 5
    with pytest.raises(ValueError, match="selection set"):
        train_reward_model(lists, lists, tmp_path / "none", config, select_lists=[])


def test_selection_lists_hold_out_a_seeded_slice_or_use_held_out_starter_reviews(tmp_path):
    lists = synthetic_lists(50, seed=4)
    kept, chosen, info = reward_model.selection_lists("auto", "lists.tsv", lists, False, 0.1, 400, seed=2)
    assert len(chosen) == 5 and len(kept) == 45 and info["lists"] == 5
    assert sorted(kept + chosen, key=lists.index) == lists  # a split: nothing lost, nothing in both
    assert reward_model.selection_lists("slice", "lists.tsv", lists, False, 0.1, 400, seed=2)[1] == chosen
    assert reward_model.selection_lists("slice", "lists.tsv", lists, False, 0.1, 400, seed=3)[1] != chosen

    assert reward_model.selection_lists("dev", "lists.tsv", lists, False, 0.1, 400, seed=2) == (lists, None, {"source": "dev"})
    few = lists[:9]
    assert reward_model.selection_lists("slice", "lists.tsv", few, False, 0.1, 400, seed=2)[:2] == (few, None)
    with pytest.raises(ValueError, match="select-fraction"):
        reward_model.selection_lists("slice", "lists.tsv", lists, False, 1.5, 400, seed=2)

    kept, chosen, info = reward_model.selection_lists("auto", "starter", lists, False, 0.1, 30, seed=2)
    assert kept == lists and len(chosen) == 30 and info["source"] == "starter:heldout"
    train_reviews = {t for r in reward_model.starter_ranklists("train", 300, seed=0) for t in r.texts}
    assert not train_reviews & {t for r in chosen for t in r.texts}  # held-out reviews only

    path = tmp_path / "select.tsv"
    path.write_text("好\t差\n很好\t一般\t很差\n", encoding="utf-8")
    kept, chosen, info = reward_model.selection_lists(str(path), "lists.tsv", lists, False, 0.1, 400, seed=2)
    assert kept == lists and [r.texts for r in chosen] == [("好", "差"), ("很好", "一般", "很差")]


@pytest.fixture(scope="module")
def trained_on_starter_lists(tiny_base, corpus_slice, tmp_path_factory):
    """A tiny reward model trained a few seconds on starter lists from the corpus slice."""
    out = tmp_path_factory.mktemp("starter_rm") / "rm"
    train = build_starter_ranklists(corpus_slice[:300] + corpus_slice[400:700], 400, seed=0)
    dev = build_starter_ranklists(corpus_slice[300:400] + corpus_slice[700:], 40, seed=1)
    result = train_reward_model(train, dev, out, tiny_config(tiny_base, steps=150, eval_every=50))
    return out, result


def test_training_writes_a_loadable_model_with_metrics_and_curves(trained_on_starter_lists):
    out, result = trained_on_starter_lists
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.json", "loss.png", "accuracy.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    ours, baseline = metrics["dev"]["reward_model"], metrics["dev"]["baseline"]
    assert ours == result["dev"]["reward_model"]
    assert 0.0 <= baseline["pairwise_accuracy"] <= 1.0 and baseline["n_pairs"] == ours["n_pairs"]
    assert ours["pairwise_accuracy"] > 0.6  # learned beyond chance on held-out starter lists
    assert metrics["history"]["eval_step"] == [0, 50, 100, 150]
    assert not list(out.parent.glob(".rm.*"))  # no temp dirs left behind


def test_scorer_ranks_a_clearly_positive_text_above_a_clearly_negative_one(trained_on_starter_lists):
    out, _ = trained_on_starter_lists
    scorer = RewardModelScorer(str(out))
    assert scorer.model_id == str(out) and scorer.max_length == 64
    positive, negative = scorer.score([CLEARLY_POSITIVE, CLEARLY_NEGATIVE])
    assert positive.label == negative.label == "reward"
    assert positive.score == positive.raw_score  # the raw scalar
    assert positive.raw_score > negative.raw_score


def test_the_scorer_service_returns_raw_scores_unless_a_request_asks_for_the_unit_interval(
        trained_on_starter_lists, tmp_path):
    out, _ = trained_on_starter_lists
    texts = [CLEARLY_POSITIVE, CLEARLY_NEGATIVE, "还行吧", "一般般，凑合用"]
    raw = [r.raw_score for r in RewardModelScorer(str(out)).score(texts)]
    (tmp_path / "logs").mkdir()
    service = start_service("scorer", ["--backend", "reward-model", "--model", str(out), "--device", "cpu"],
                            tmp_path, timeout=120)
    try:
        with ScorerClient(service.address) as client:
            plain = client.score(texts)
            squashed = client.score(texts, pb.SCORE_NORMALIZATION_SIGMOID)
            with pytest.raises(grpc.RpcError) as unknown:
                client.score(texts, 7)
    finally:
        stop_services([service])
    assert [s.score for s in plain.scores] == pytest.approx(raw, abs=1e-5)  # raw: shaping is the trainer's
    assert [s.raw_score for s in squashed.scores] == pytest.approx(raw, abs=1e-5)
    assert [s.score for s in squashed.scores] == pytest.approx([1 / (1 + math.exp(-x)) for x in raw], abs=1e-5)
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "normalization" in unknown.value.details()


def test_unit_interval_leaves_bounded_scores_and_squashes_unbounded_ones_without_overflow():
    results = [ScoreResult(score=x, label="reward", raw_score=x) for x in (-1000.0, 0.0, 2.0, 1000.0)]
    assert in_unit_interval(results, scores_in_unit_interval=True) == results
    squashed = [r.score for r in in_unit_interval(results, scores_in_unit_interval=False)]
    assert squashed == pytest.approx([0.0, 0.5, 1 / (1 + math.exp(-2.0)), 1.0])
    assert [r.raw_score for r in in_unit_interval(results, False)] == [-1000.0, 0.0, 2.0, 1000.0]


def test_scorer_refuses_a_classifier_with_two_labels(tiny_base):
    from haoping.models import ModelLoadError

    with pytest.raises(ModelLoadError, match="scalar head"):
        RewardModelScorer(tiny_base)


# --- command line -------------------------------------------------------------------------

def test_cli_reports_bad_lines_and_strict_fails_without_touching_the_old_output(tiny_base, tmp_path, capsys, caplog):
    lists = tmp_path / "lists.tsv"
    lists.write_bytes(BAD_FILE)
    out = tmp_path / "rm"
    with atomic_directory(out) as earlier:  # a complete earlier output, as a run writes it
        (earlier / "keep.txt").write_text("an earlier good model")
    common = ["train-reward-model", "--train", str(lists), "--dev", str(lists), "--base", tiny_base,
              "--baseline", tiny_base, "--out", str(out), "--steps", "2", "--eval-every", "1",
              "--lists-per-batch", "2", "--device", "cpu"]

    assert cli(common + ["--strict"]) == 2
    stderr = capsys.readouterr().err
    assert "5 bad line(s)" in stderr and "line 2" in stderr
    assert (out / "keep.txt").is_file()

    assert cli(common[:2] + [str(tmp_path / "missing.tsv")] + common[3:]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli(common[:6] + [str(tmp_path / "no-such-model")] + common[7:]) == 2
    assert (out / "keep.txt").is_file()

    with caplog.at_level("WARNING", logger="haoping.reward_model"):
        assert cli(common) == 0
    assert "line 2" in caplog.text and "line 6" in caplog.text
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    skipped = json.loads((out / "metrics.json").read_text())["data"]["train"]["skipped_lines"]
    assert [s["line"] for s in skipped] == [2, 3, 4, 5, 6]
    # 2 good lists are too few to hold some out: dev chooses, and metrics.json says so
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selected_on"] == "dev" and metrics["data"]["select"] == {"source": "dev"}


def test_starter_ranklists_command_writes_a_readable_file(tmp_path):
    path = tmp_path / "starter.tsv"
    assert cli(["starter-ranklists", "--out", str(path), "--count", "50", "--split", "heldout"]) == 0
    lists, problems = read_ranklists(path, strict=True)
    assert len(lists) == 50 and problems == []


# --- rank lists from a file: the n-gram ranker, distillation, checkpoint selection -----------

def write_lists(path, lists: list[RankList]):
    path.write_text("".join("\t".join(r.texts) + "\n" for r in lists), encoding="utf-8")
    return path


def test_char_ngram_ranker_learns_the_grade_markers_and_scores_unseen_lists():
    from haoping.reward_model.linear import NgramRanker, ordered_pairs

    train, heldout = synthetic_lists(60, seed=5), synthetic_lists(30, seed=6)
    better, worse = ordered_pairs(train[:2])
    n0 = len(train[0].texts)
    assert len(better) == n0 * (n0 - 1) // 2 + len(train[1].texts) * (len(train[1].texts) - 1) // 2
    assert all(b < w for b, w in zip(better, worse))  # best first: the better text comes first
    assert set(better[n0 * (n0 - 1) // 2:]) >= {n0}   # the second list's indices start after the first's

    ranker = NgramRanker().fit(train)
    scores = ranker.score([t for r in heldout for t in r.texts])
    metrics = ranking_metrics(list(torch.split(torch.as_tensor(scores), [len(r.texts) for r in heldout])))
    assert metrics["pairwise_accuracy"] > 0.95  # markers inside random filler, so not every pair
    assert ranker.score(["优的了"])[0] > ranker.score(["差的了"])[0]
    with pytest.raises(RuntimeError, match="fit"):
        NgramRanker().score(["好"])


def test_word_ngrams_come_from_the_jieba_dictionary_and_can_be_turned_off():
    from haoping.reward_model.linear import NgramRanker, NgramRankerConfig, jieba_words

    assert jieba_words("质量很好 物流很快") == ["质量", "很", "好", "物流", "很快"]  # dictionary words, no spaces
    train = synthetic_lists(30, seed=5)
    with_words = NgramRanker(NgramRankerConfig(word_ngram_max=2)).fit(train)
    names = with_words.vectorizer.get_feature_names_out()
    assert any(name.startswith("word__") for name in names) and any(name.startswith("char__") for name in names)
    chars_only = NgramRanker().fit(train)  # the default: char n-grams alone
    assert all(name.startswith("char__") for name in chars_only.vectorizer.get_feature_names_out())
    assert len(chars_only.weights) < len(with_words.weights)


def _noisy_rankers(count: int, noise: float, seed: int):
    """Lists of 4 and two rankers that each see the true grade through independent noise."""
    generator = torch.Generator().manual_seed(seed)
    lists = [RankList(tuple(f"{i}-{k}" for k in range(4))) for i in range(count)]
    truth = torch.tensor([3.0, 2.0, 1.0, 0.0]).repeat(count)
    model = truth + noise * torch.randn(4 * count, generator=generator)
    linear = truth + noise * torch.randn(4 * count, generator=generator)
    return lists, model, linear


def test_the_blend_weight_is_chosen_on_the_given_lists_and_ignores_each_rankers_scale():
    from haoping.reward_model.ensemble import blend, blend_metrics, choose_blend_weight

    lists, model, linear = _noisy_rankers(300, noise=1.0, seed=0)
    weight, chosen_on, model_spread, linear_spread = choose_blend_weight(model, linear, lists)
    alone = [ranking_metrics(list(torch.split(s, 4)))["pairwise_accuracy"] for s in (model, linear)]
    assert 0.2 <= weight <= 0.8  # two equally good rankers: a blend, not one of them
    assert chosen_on["pairwise_accuracy"] > max(alone) + 0.02  # independent errors partly cancel
    # each ranker is divided by its spread: scaling one by 1000 chooses the same weight
    assert choose_blend_weight(model, 1000 * linear, lists)[0] == weight
    assert blend_metrics(model, linear, lists, weight, model_spread, linear_spread) == chosen_on
    assert torch.equal(blend(model, linear, 0.0, 1.0, 1.0), model.double())  # weight 0: the reward model alone
    # a useless second ranker gets weight 0
    assert choose_blend_weight(model, torch.zeros_like(model), lists)[0] == 0.0
    with pytest.raises(ValueError, match="one score per text"):
        choose_blend_weight(model[:-1], linear[:-1], lists)
    with pytest.raises(ValueError, match="blend weight"):
        blend(model, linear, 1.5, 1.0, 1.0)


def test_training_from_a_list_file_distills_the_ngram_teacher_and_reports_three_scorers(
        tiny_base, tmp_path, monkeypatch):
    """The file path end to end through the CLI; the unlabeled texts are synthetic too."""
    import services.reward_model_cli as rm_cli

    train = write_lists(tmp_path / "train.tsv", synthetic_lists(40, seed=7))
    dev = write_lists(tmp_path / "dev.tsv", synthetic_lists(12, seed=8))
    unlabeled = [t for r in synthetic_lists(60, seed=9) for t in r.texts]
    monkeypatch.setattr(rm_cli, "transfer_texts", lambda: unlabeled)
    out = tmp_path / "rm"
    assert cli(["train-reward-model", "--train", str(train), "--dev", str(dev), "--base", tiny_base,
                "--baseline", tiny_base, "--out", str(out), "--steps", "60", "--eval-every", "20",
                "--lists-per-batch", "8", "--lr", "3e-3", "--warmup-steps", "5", "--max-length", "64",
                "--teacher", "ngram", "--texts-per-batch", "16", "--linear-word-ngrams", "2", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["transfer_texts"] == len(unlabeled) and metrics["config"]["teacher"] == "ngram"
    assert metrics["train_lists"] == 36 and metrics["data"]["select"]["lists"] == 4  # a 10% slice held out
    for scorer in ("reward_model", "baseline", "linear"):
        assert metrics["dev"][scorer]["n_pairs"] == metrics["dev"]["reward_model"]["n_pairs"], scorer
    assert metrics["dev"]["linear"]["pairwise_accuracy"] > 0.9  # the teacher ranks by the markers
    assert "word 1-2-gram" in metrics["dev"]["linear"]["model"]  # --linear-word-ngrams reached the ranker
    ensemble = metrics["dev"]["ensemble"]  # the blend, its weight chosen on the held-out slice
    assert 0.0 <= ensemble["weight_linear"] <= 1.0 and ensemble["chosen_on"]["n_lists"] == 4
    assert ensemble["n_pairs"] == metrics["dev"]["reward_model"]["n_pairs"]
    assert metrics["dev"]["reward_model"]["pairwise_accuracy"] > metrics["untrained"]["pairwise_accuracy"]
    model = BertForSequenceClassification.from_pretrained(out)  # plain transformers, a scalar head
    assert model.config.num_labels == 1


def test_checkpoint_selection_never_reads_the_dev_file(tiny_base, tmp_path, monkeypatch):
    """The dev file is deleted right after it was loaded, and ranks every list backwards: a run
    that went back to it fails, and one that chose its checkpoint on dev keeps step 0."""
    from haoping.reward_model import data

    lists = synthetic_lists(40, seed=1)
    train = write_lists(tmp_path / "train.tsv", lists)
    dev = write_lists(tmp_path / "dev.tsv", [RankList(tuple(reversed(r.texts))) for r in lists[:12]])
    real_read = data.read_ranklists

    def read_then_delete_dev(path, strict=False):
        result = real_read(path, strict=strict)
        if str(path) == str(dev):
            dev.unlink()
        return result

    monkeypatch.setattr(data, "read_ranklists", read_then_delete_dev)
    out = tmp_path / "rm"
    assert cli(["train-reward-model", "--train", str(train), "--dev", str(dev), "--base", tiny_base,
                "--no-linear-baseline", "--baseline", "none", "--out", str(out), "--steps", "100",
                "--eval-every", "50", "--lists-per-batch", "8", "--lr", "3e-3", "--warmup-steps", "5",
                "--max-length", "64", "--device", "cpu"]) == 0
    assert not dev.exists()
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["selected_on"] == "held-out" and metrics["best_step"] > 0
    assert metrics["dev"]["reward_model"]["pairwise_accuracy"] < 0.5  # dev only measured it (backwards)


def test_an_output_directory_not_written_by_a_run_is_refused_and_left_alone(tiny_base, tmp_path, capsys):
    train = write_lists(tmp_path / "train.tsv", synthetic_lists(8, seed=2))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a model")
    assert cli(["train-reward-model", "--train", str(train), "--dev", str(train), "--base", tiny_base,
                "--baseline", "none", "--no-linear-baseline", "--out", str(out), "--steps", "1",
                "--eval-every", "1", "--device", "cpu"]) == 2
    assert "not written by haoping" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_every_training_option_is_a_typed_flag_with_help_and_an_environment_fallback(capsys, monkeypatch):
    import dataclasses

    with pytest.raises(SystemExit) as exit_info:
        cli(["train-reward-model", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in text and f"HAOPING_{field.name.upper()}" in text, flag
    parser = argparse.ArgumentParser(prog="haoping")
    add_cli(parser.add_subparsers(required=True))
    args = parser.parse_args(["train-reward-model", "--steps", "7", "--baseline", "none", "--no-linear-baseline"])
    assert (args.steps, args.baseline, args.linear_baseline, args.lr) == (7, None, False, TrainConfig().lr)
    with pytest.raises(SystemExit):
        parser.parse_args(["train-reward-model", "--steps", "many"])  # typed: not an int
    monkeypatch.setenv("HAOPING_LISTS_PER_BATCH", "5")
    parser = argparse.ArgumentParser(prog="haoping")
    add_cli(parser.add_subparsers(required=True))
    assert parser.parse_args(["train-reward-model"]).lists_per_batch == 5


def test_soft_pair_distillation_pulls_the_student_towards_the_teacher_order():
    from haoping.reward_model.training import soft_pair_distillation_loss

    teacher = torch.tensor([2.0, -1.0, 0.5])
    partner = torch.tensor([1, 2, 0])  # pairs (0, 1), (1, 2), (2, 0)
    student = torch.zeros(3, requires_grad=True)
    loss = soft_pair_distillation_loss(student, teacher, partner)
    torch.testing.assert_close(loss, torch.log(torch.tensor(2.0)))  # at s = 0 every pair's BCE is log 2
    loss.backward()
    assert student.grad[0] < 0 < student.grad[1]  # descent raises the teacher's best, lowers its worst
    agreeing = soft_pair_distillation_loss(teacher * 3, teacher, partner)
    assert agreeing < soft_pair_distillation_loss(-teacher * 3, teacher, partner)
