"""Batched sampling: per-sample seeds, left padding, EOS, filters."""
import pytest
import torch

from haoping.generation import (EOS, LENGTH, PolicyGenerator, SampleSpec, SamplingParams, filter_logits,
                                generate_batch, sample_seed)


def _specs(gen, prompts, params=SamplingParams(max_new_tokens=8), seed=7):
    return [SampleSpec(tuple(gen.encode(p)), params, sample_seed(seed, i, 0)) for i, p in enumerate(prompts)]


def test_sample_is_independent_of_batch_composition(tiny_policy):
    gen = PolicyGenerator(str(tiny_policy))
    prompts = ["刚收到货，感觉", "这部电影很", "说实话，真的很", "这次购物总的来说体验很"]
    # a batch-mate with a longer limit and a top-p filter changes nothing for the others
    other = SampleSpec(tuple(gen.encode("好")), SamplingParams(max_new_tokens=30, top_p=0.9), 123)
    together, _ = gen.generate(_specs(gen, prompts) + [other])
    for i, prompt in enumerate(prompts):
        alone, _ = gen.generate([SampleSpec(tuple(gen.encode(prompt)), SamplingParams(max_new_tokens=8),
                                            sample_seed(7, i, 0))])
        assert alone[0].response_ids == together[i].response_ids, prompt


def test_rows_sharing_a_prompt_prefill_it_once_and_equal_their_samples_alone(tiny_policy):
    gen = PolicyGenerator(str(tiny_policy))
    prompts = ["这部电影很", "刚收到货，感觉", "这部电影很", "这部电影很", "刚收到货，感觉"]
    specs = [SampleSpec(tuple(gen.encode(p)), SamplingParams(max_new_tokens=8), sample_seed(5, 0, i))
             for i, p in enumerate(prompts)]
    prefill_rows = []

    def record_prefill(module, args, kwargs):
        if kwargs.get("past_key_values") is None:
            prefill_rows.append(kwargs["input_ids"].shape)

    hook = gen.model.register_forward_pre_hook(record_prefill, with_kwargs=True)
    together, _ = gen.generate(specs)
    hook.remove()
    assert prefill_rows == [(2, len(gen.encode("刚收到货，感觉")))]  # two distinct prompts, one pass
    for spec, sample in zip(specs, together):
        alone, _ = gen.generate([spec])
        assert alone[0].response_ids == sample.response_ids


def test_same_seed_same_samples_other_seed_differs(tiny_policy):
    gen = PolicyGenerator(str(tiny_policy))
    a, _ = gen.generate(_specs(gen, ["刚收到货，感觉"] * 4, seed=1))
    b, _ = gen.generate(_specs(gen, ["刚收到货，感觉"] * 4, seed=1))
    c, _ = gen.generate(_specs(gen, ["刚收到货，感觉"] * 4, seed=2))
    assert [s.response_ids for s in a] == [s.response_ids for s in b]
    assert [s.response_ids for s in a] != [s.response_ids for s in c]


def test_each_row_stops_on_its_own_eos(tiny_policy):
    gen = PolicyGenerator(str(tiny_policy))
    eos = gen.format.eos_id
    bias = torch.zeros(len(gen.tokenizer))  # makes EOS certain at every step
    bias[eos] = 1e4

    class EosModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            out = self.inner(**kw)
            out.logits = out.logits + bias
            return out

    specs = _specs(gen, ["好", "刚收到货，感觉"], SamplingParams(max_new_tokens=5))
    samples = generate_batch(EosModel(gen.model), specs, eos, gen.format.pad_id)
    assert all(s.response_ids == [eos] and s.finish_reason == EOS for s in samples)
    held = generate_batch(EosModel(gen.model), _specs(gen, ["好", "刚收到货"], SamplingParams(max_new_tokens=6,
                                                                                        min_new_tokens=3)),
                          eos, gen.format.pad_id)
    assert all(len(s.response_ids) == 4 and s.response_ids[-1] == eos and eos not in s.response_ids[:3] for s in held)
    samples = generate_batch(gen.model, _specs(gen, ["好"], SamplingParams(max_new_tokens=3)), None, gen.format.pad_id)
    assert len(samples[0].response_ids) == 3 and samples[0].finish_reason == LENGTH


def test_filters_top_k_top_p_and_greedy():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]] * 3))
    probs, index = filter_logits(logits, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2, 0, 0]),
                                 torch.tensor([1.0, 0.7, 1.0]))
    assert index[0, :2].tolist() == [1, 3]
    assert probs[0].tolist()[:2] == pytest.approx([0.5 / 0.75, 0.25 / 0.75]) and probs[0, 2:].sum() == 0  # top-2
    assert probs[1, 2:].sum() == 0 and probs[1, :2].sum().item() == pytest.approx(1.0)  # top-p 0.7 keeps 0.5 + 0.25
    assert (probs[2] > 0).all()  # unfiltered


def test_greedy_matches_argmax(tiny_policy):
    gen = PolicyGenerator(str(tiny_policy))
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    a, _ = gen.generate(_specs(gen, ["好"], greedy, seed=1))
    b, _ = gen.generate(_specs(gen, ["好"], greedy, seed=2))
    assert a[0].response_ids == b[0].response_ids
    ids = torch.tensor([gen.encode("好")])
    with torch.no_grad():
        first = gen.model(ids).logits[0, -1].argmax().item()
    assert a[0].response_ids[0] == first


def test_load_weights_rejects_wrong_shapes_and_keeps_old(tiny_policy):
    from safetensors.torch import save

    gen = PolicyGenerator(str(tiny_policy))
    before = {k: v.clone() for k, v in gen.model.state_dict().items()}
    bad = {name: torch.zeros(1) for name, _ in gen.model.named_parameters()}
    try:
        gen.load_weights(save(bad), 5)
        raise AssertionError("accepted wrong shapes")
    except ValueError as err:
        assert "shape" in str(err)
    assert gen.version == 0
    assert all(torch.equal(before[k], v) for k, v in gen.model.state_dict().items())


def test_sampling_follows_the_distribution_with_and_without_filters():
    from haoping.generation import sample_next

    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    logits = torch.log(probs).repeat(20000, 1)
    ones = torch.ones(20000)
    u = torch.rand(20000)
    plain = sample_next(logits, ones, torch.zeros(20000, dtype=torch.long), ones, u)
    freq = torch.bincount(plain, minlength=4).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
    top2 = sample_next(logits, ones, torch.full((20000,), 2), ones, u)
    freq = torch.bincount(top2, minlength=4).float() / 20000
    assert torch.allclose(freq, torch.tensor([0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75]), atol=0.015)


def test_a_sample_joining_a_running_batch_equals_it_alone(tiny_policy):
    """Continuous batching: rows join mid-flight (prompts shorter and longer than the running
    width), others leave early or are removed; every sample equals the one generated alone."""
    from haoping.generation import DecodeBatch

    gen = PolicyGenerator(str(tiny_policy))
    eos, pad = gen.format.eos_id, gen.format.pad_id

    def spec(prompt, seed, **params):
        return SampleSpec(tuple(gen.encode(prompt)), SamplingParams(**{"max_new_tokens": 12, **params}), seed)

    first = [spec("刚收到货，感觉", 1), spec("好", 2, max_new_tokens=3), spec("这部电影很", 3, top_p=0.9)]
    joiners = [[spec("这次购物总的来说体验很棒，物流快", 4, max_new_tokens=20),  # longer than the running width
                spec("说", 5, temperature=0.7, top_k=5)],
               [spec("说实话，真的很", 6, min_new_tokens=4), spec("刚收到货", 7, temperature=0.0)]]
    removed = spec("ipad mini", 8)
    batch = DecodeBatch(gen.model, eos, pad)
    keys = dict(zip(batch.add(first + [removed]), first + [removed]))
    results = {}
    for round_, group in enumerate(joiners):
        for _ in range(4 + round_):
            results.update(batch.step())
        keys.update(zip(batch.add(group), group))
    results.update(batch.step())
    batch.remove([k for k, s in keys.items() if s is removed])
    while len(batch):
        results.update(batch.step())
    assert len(results) == len(keys) - 1
    for key, sample in results.items():
        alone = generate_batch(gen.model, [keys[key]], eos, pad)[0]
        assert (sample.response_ids, sample.finish_reason) == (alone.response_ids, alone.finish_reason), key


def test_load_weights_refuses_non_finite_other_dtypes_and_older_versions_and_keeps_serving(tiny_policy):
    from safetensors.torch import save

    gen = PolicyGenerator(str(tiny_policy))
    good = {name: p.detach().clone() for name, p in gen.model.named_parameters()}
    gen.load_weights(save(good), 3)
    before = {k: v.clone() for k, v in gen.model.state_dict().items()}
    name = next(iter(good))
    nan = dict(good, **{name: torch.full_like(good[name], float("nan"))})
    inf = dict(good, **{name: torch.full_like(good[name], float("inf"))})
    as_int = dict(good, **{name: good[name].to(torch.int32)})
    as_double = dict(good, **{name: good[name].double()})
    for bad, version, words in [(nan, 4, "non-finite"), (inf, 4, "non-finite"), (as_int, 4, "torch.int32"),
                                (as_double, 4, "torch.float64"), (good, 2, "older")]:
        with pytest.raises(ValueError, match=words):
            gen.load_weights(save(bad), version)
        assert gen.version == 3
        assert all(torch.equal(before[k], v) for k, v in gen.model.state_dict().items())
    with pytest.raises(ValueError, match="safetensors"):
        gen.load_weights(b"not a safetensors file", 4)
    gen.load_weights(save(good), 3)  # the same version again is fine
    assert gen.version == 3


def test_safetensors_views_read_a_file_in_place_and_refuse_malformed_headers():
    import json
    import struct

    from safetensors.torch import load, save

    from haoping.generation import safetensors_views

    tensors = {"w": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "h": torch.randn(4).half(),
               "empty": torch.zeros(0, 2), "flag": torch.tensor([True, False])}
    data = bytearray(save(tensors, metadata={"policy_version": "3"}))
    views = safetensors_views(data)
    expected = load(bytes(data))
    assert set(views) == set(expected)
    for name, tensor in expected.items():
        assert views[name].dtype == tensor.dtype and torch.equal(views[name], tensor), name
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert start <= views["w"].data_ptr() < start + len(data)  # a view into the buffer, not a copy

    def file(header: dict, body: bytes = b"\0" * 16) -> bytes:
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + body

    for bad, words in [(b"short", "shorter"), (struct.pack("<Q", 1 << 40) + b"{}", "header of"),
                       (struct.pack("<Q", 2) + b"[]", "not a JSON object"), (struct.pack("<Q", 2) + b"{x", "not JSON"),
                       (file({"t": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}), "dtype"),
                       (file({"t": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]}}), "do not fit"),
                       (file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}), "do not fit"),
                       (file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}), "do not fit"),
                       (file({"t": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}), "malformed")]:
        with pytest.raises(ValueError, match=words):
            safetensors_views(bad)
