"""The one loading path: hub-format directories, clean text, label discovery, offline errors."""
import pytest
import torch

from haoping.models import (ModelLoadError, TokenFormat, decode_clean, encode_prompt, load_causal_lm,
                            load_sequence_classifier, load_tokenizer, parse_dtype, positive_label_index)


def test_hub_format_policy_loads_offline_with_cls_framing(tiny_policy):
    tokenizer = load_tokenizer(str(tiny_policy))
    fmt = TokenFormat.of(tokenizer)
    assert fmt.wordpiece and fmt.bos_id == tokenizer.cls_token_id and fmt.eos_id == tokenizer.sep_token_id
    ids = encode_prompt(tokenizer, "刚收到货，感觉")
    assert ids[0] == tokenizer.cls_token_id and tokenizer.sep_token_id not in ids
    model = load_causal_lm(str(tiny_policy))
    assert model(torch.tensor([ids])).logits.shape[-1] == len(tokenizer)


def test_gpt2_tanh_gelu_loads_as_the_fused_kernel_with_the_same_outputs(tiny_policy):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_policy)).eval()
    assert plain.config.activation_function == "gelu_new"
    fused = load_causal_lm(str(tiny_policy))
    assert fused.config.activation_function == "gelu_pytorch_tanh"
    ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


def test_lm_head_gets_a_contiguous_copy_of_the_kept_positions_with_the_same_logits(tiny_policy):
    model = load_causal_lm(str(tiny_policy))
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0]))
    ids = torch.tensor([[1, 5, 9, 12, 7, 3], [1, 6, 8, 2, 4, 3]])
    with torch.no_grad():
        kept = model(ids, logits_to_keep=3).logits
        full = model(ids).logits
    assert seen[0].is_contiguous() and seen[0].shape[1] == 3
    torch.testing.assert_close(kept, full[:, -3:], atol=1e-6, rtol=1e-6)


def test_decode_clean_has_no_spaces_or_special_tokens(tiny_policy):
    tokenizer = load_tokenizer(str(tiny_policy))
    ids = encode_prompt(tokenizer, "刚收到货，感觉很好 ipad mini 256g") + [tokenizer.sep_token_id, tokenizer.pad_token_id]
    text = decode_clean(tokenizer, ids)
    assert text == "刚收到货，感觉很好ipad mini 256g"
    for special in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"):
        assert special not in text


def test_a_continuation_reads_right_after_the_text_it_continues(tiny_policy):
    tokenizer = load_tokenizer(str(tiny_policy))
    mini = tokenizer(" mini 256g", add_special_tokens=False)["input_ids"]
    assert decode_clean(tokenizer, mini, after="ipad") == " mini 256g"  # two Latin words: a space between
    assert decode_clean(tokenizer, mini, after="刚收到货") == "mini 256g"  # none after a Chinese character
    chinese = tokenizer("很好", add_special_tokens=False)["input_ids"]
    assert decode_clean(tokenizer, chinese, after="ipad") == "很好"


def test_positive_label_is_read_from_config(tiny_classifier):
    model = load_sequence_classifier(str(tiny_classifier))
    assert positive_label_index(model.config.id2label) == 1
    assert positive_label_index({0: "positive (stars 4 and 5)", 1: "negative (stars 1, 2 and 3)"}) == 0
    assert positive_label_index({"0": "NEGATIVE", "1": "POSITIVE"}) == 1
    with pytest.raises(ModelLoadError):
        positive_label_index({0: "spam", 1: "ham"})


def test_unreachable_hub_id_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_tokenizer("uer/this-model-is-not-cached-anywhere")


def test_unknown_dtype_is_rejected():
    assert parse_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ModelLoadError):
        parse_dtype("float8")


DETERMINISM_PROBE = """
import argparse, hashlib, sys, torch
from services.common.config import add_common_server_flags
from services.common.server import configure_torch
parser = argparse.ArgumentParser()
add_common_server_flags(parser, port=0, metrics_port=0)
configure_torch(parser.parse_args(["--threads", "2", *sys.argv[1:]]))
torch.manual_seed(0)
index, source = torch.randint(0, 300, (20000,)), torch.randn(20000, 64)
# the backward of advanced indexing: sums in thread order unless deterministic
sums = {hashlib.sha256(torch.zeros(300, 64).index_put_((index,), source, accumulate=True).numpy().tobytes()).digest()
        for _ in range(10)}
print(len(sums))
"""


@pytest.mark.parametrize("flags, deterministic", [([], True), (["--no-deterministic"], False)])
def test_services_use_kernels_that_give_the_same_bits_every_time(flags, deterministic):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", DETERMINISM_PROBE, *flags], capture_output=True, text=True,
                          timeout=120, check=True)
    distinct = int(done.stdout.split()[-1])
    if deterministic:
        assert distinct == 1
    else:  # shows the probe can tell: the default kernel's sums differ from call to call
        assert distinct > 1


def test_length_sorted_batches_group_similar_lengths_and_cover_every_index_once():
    from haoping.scorers.base import length_sorted_batches

    lengths = [9, 3, 7, 3, 12, 1, 8]
    batches = length_sorted_batches(lengths, batch_size=3)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [[lengths[i] for i in batch] for batch in batches] == [[1, 3, 3], [7, 8, 9], [12]]


def test_classifier_scores_come_back_in_request_order_whatever_the_batching(tiny_classifier):
    from haoping.scorers.classifier import ClassifierScorer

    scorer = ClassifierScorer(str(tiny_classifier), batch_size=2)
    texts = ["质量很好，物流也快，非常满意，下次还来", "差", "还行吧", "包装破了，客服不理人", "好", "一般般，不算好也不算差"]
    together = scorer.score(texts)
    alone = [scorer.score([text])[0] for text in texts]
    for a, b in zip(together, alone):
        assert a.label == b.label
        assert a.score == pytest.approx(b.score, abs=1e-7) and a.raw_score == pytest.approx(b.raw_score, abs=1e-7)
    raw = sorted(r.raw_score for r in alone)
    assert min(b - a for a, b in zip(raw, raw[1:])) > 1e-6  # each text scores apart, so a mix-up shows
