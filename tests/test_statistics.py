"""Activation statistics: padding excluded, one shared token sample, streaming Gram matrices."""

from __future__ import annotations

import pytest
import torch

from ppkit.adapters import get_adapter
from ppkit.clustering import unit_cosine
from ppkit.errors import DataError, InputError
from ppkit.statistics import ActivationStats, collect_statistics

VOCAB = 120


def make_batches(seed: int = 0, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (6, 12), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate([12, 7, 3, 12, 9, 5]):
        mask[row, length:] = 0
        ids[row, length:] = pad_id
    return [{"input_ids": ids[i:i + 3], "attention_mask": mask[i:i + 3]} for i in (0, 3)]


def capture(model, batches):
    """Independent reference: every layer's full module inputs, non-padding rows in (instance, position) order."""
    adapter = get_adapter(model)
    layers = adapter.shape().num_layers
    seen = {("head", l): [] for l in range(layers)} | {("neuron", l): [] for l in range(layers)}
    handles = []
    for l in range(layers):
        for kind, mod in (("head", adapter.head_context_module(l)), ("neuron", adapter.ffn_activation_module(l))):
            handles.append(mod.register_forward_pre_hook(lambda m, a, key=(kind, l): seen[key].append(a[0].detach().clone())))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    masks = [b["attention_mask"].bool() for b in batches]
    return {key: torch.cat([x[m] for x, m in zip(xs, masks)]) for key, xs in seen.items()}


@pytest.mark.parametrize("fixture", ["tiny_bert", "tiny_gpt2"])
def test_samples_are_the_same_tokens_in_every_layer_and_module(fixture, request):
    model = request.getfixturevalue(fixture)
    batches = make_batches()
    stats = collect_statistics(model, batches, tokens=25, seed=3, progress=False)
    ref = capture(model, batches)
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    assert stats.num_tokens == total == 48
    assert stats.mean_seq_len == pytest.approx(48 / 6)
    idx = stats.sample_index
    assert idx.shape == (25,) and torch.equal(idx, idx.unique()) and int(idx.max()) < total
    for l, layer in enumerate(stats.layers):
        assert torch.allclose(layer.head_samples, ref[("head", l)][idx], atol=1e-6)
        assert torch.allclose(layer.neuron_samples, ref[("neuron", l)][idx], atol=1e-6)
        assert layer.head_gram is None and layer.neuron_gram is None
        # centroid scores are over the sampled tokens (per head: over T x dh)
        h = layer.head_samples.abs().double().view(25, stats.num_heads, stats.head_dim).mean(dim=(0, 2))
        assert torch.allclose(layer.head_abs_mean, h)
        assert torch.allclose(layer.neuron_abs_mean, layer.neuron_samples.abs().double().mean(0))
        assert torch.allclose(layer.neuron_sq_mean, (layer.neuron_samples.double() ** 2).mean(0))
        # running sums are over all non-padding tokens
        assert torch.allclose(layer.neuron_sum, ref[("neuron", l)].double().sum(0), rtol=1e-4, atol=1e-5)
        assert layer.num_tokens == total


def test_padding_is_excluded(tiny_bert):
    a = collect_statistics(tiny_bert, make_batches(pad_id=0), tokens=None, progress=False)
    b = collect_statistics(tiny_bert, make_batches(pad_id=77), tokens=None, progress=False)
    for la, lb in zip(a.layers, b.layers):
        assert torch.allclose(la.neuron_gram, lb.neuron_gram, rtol=1e-5, atol=1e-6)
        assert torch.allclose(la.head_sum, lb.head_sum, rtol=1e-5, atol=1e-6)


def test_all_tokens_mode_keeps_streaming_gram(tiny_gpt2):
    batches = make_batches(seed=1)
    stats = collect_statistics(tiny_gpt2, batches, tokens=None, progress=False)
    ref = capture(tiny_gpt2, batches)
    assert stats.tokens is None and stats.num_sampled is None and stats.sample_index is None
    for l, layer in enumerate(stats.layers):
        assert layer.head_samples is None and layer.neuron_samples is None
        x = ref[("neuron", l)].double()
        assert layer.neuron_gram.dtype == torch.float64
        assert torch.allclose(layer.neuron_gram, x.T @ x, rtol=1e-5, atol=1e-6)
        assert torch.allclose(layer.neuron_abs_mean, x.abs().mean(0), rtol=1e-5)
        assert torch.allclose(layer.neuron_sq_mean, (x * x).mean(0), rtol=1e-5)
    # every token sampled gives the same |cos| as the Gram matrix
    full = collect_statistics(tiny_gpt2, batches, tokens=10_000, progress=False)
    assert full.num_sampled == stats.num_tokens
    for ls, lg in zip(full.layers, stats.layers):
        assert torch.allclose(unit_cosine(samples=ls.head_samples).double(), unit_cosine(gram=lg.head_gram), atol=1e-5)


def test_sampling_is_seeded(tiny_bert):
    batches = make_batches()
    a = collect_statistics(tiny_bert, batches, tokens=10, seed=0, progress=False)
    b = collect_statistics(tiny_bert, batches, tokens=10, seed=0, progress=False)
    c = collect_statistics(tiny_bert, batches, tokens=10, seed=1, progress=False)
    assert torch.equal(a.sample_index, b.sample_index)
    assert torch.equal(a.layers[1].neuron_samples, b.layers[1].neuron_samples)
    assert not torch.equal(a.sample_index, c.sample_index)


def test_keep_gram_in_sampled_mode(tiny_bert):
    stats = collect_statistics(tiny_bert, make_batches(), tokens=5, keep_gram=True, progress=False)
    assert stats.layers[0].head_samples.shape[0] == 5
    assert stats.layers[0].neuron_gram.shape == (64, 64)


def test_bad_inputs(tiny_bert):
    with pytest.raises(InputError):
        collect_statistics(tiny_bert, make_batches(), tokens=0, progress=False)
    with pytest.raises(DataError):
        collect_statistics(tiny_bert, [], progress=False)
    empty = [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4, dtype=torch.long)}]
    with pytest.raises(DataError, match="no non-padding"):
        collect_statistics(tiny_bert, empty, progress=False)


def test_from_samples_matches_given_rows():
    hs = [torch.randn(30, 8)]
    ns = [torch.randn(30, 5)]
    stats = ActivationStats.from_samples(hs, ns, num_heads=2, head_dim=4)
    assert torch.equal(stats.layers[0].neuron_samples, ns[0])
    assert torch.allclose(stats.layers[0].head_abs_mean, hs[0].abs().double().view(30, 2, 4).mean(dim=(0, 2)))
    with pytest.raises(InputError):
        ActivationStats.from_samples(hs, [torch.randn(29, 5)], num_heads=2, head_dim=4)
