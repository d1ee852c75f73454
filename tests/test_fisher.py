"""The fisher strategy (Kwon et al. 2022): mask Fisher from the model's own sampled labels, and the
FLOPs-constrained mask search keeps the units with the largest Fisher score."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED, make_tiny_bert

import ppkit
from ppkit.adapters import get_adapter
from ppkit.errors import InputError
from ppkit.flops import count_flops
from ppkit.plugins.fisher import fisher_scores, rearrange_layer, removal_cost, search_masks


def _shape():
    return get_adapter(make_tiny_bert("BertModel")).shape()  # 3 layers, 4 heads, 64 neurons


def test_search_keeps_the_largest_scores_and_the_best_split_within_budget():
    shape = _shape()
    rng = np.random.default_rng(0)
    heads, neurons = rng.random((3, 4)), rng.random((3, 64))
    heads[1, 2] = neurons[2, 5] = 100.0  # must survive any budget that keeps a head and a neuron
    plan = search_masks(heads, neurons, shape, 16.0, 0.5)

    assert 2 in plan.layers[1].heads and 5 in plan.layers[2].neurons
    assert count_flops(shape, plan.heads_per_layer, plan.neurons_per_layer, 16.0).ratio <= 0.5 + 1e-9
    # the kept heads / neurons are the top ones by score (no kept unit scores below a pruned one)
    kept_h = [heads[layer, h] for layer, lp in enumerate(plan.layers) for h in lp.heads]
    drop_h = [heads[layer, h] for layer, lp in enumerate(plan.layers) for h in range(4) if h not in lp.heads]
    kept_n = [neurons[layer, n] for layer, lp in enumerate(plan.layers) for n in lp.neurons]
    drop_n = [neurons[layer, n] for layer, lp in enumerate(plan.layers) for n in range(64) if n not in lp.neurons]
    assert min(kept_h) >= max(drop_h, default=-1) and min(kept_n) >= max(drop_n, default=-1)
    # brute force over the number of kept heads: no other prefix split keeps more importance in budget
    best = plan.meta["kept_importance"]
    ho, no = np.sort(heads.ravel())[::-1], np.sort(neurons.ravel())[::-1]
    for h in range(13):
        for n in range(193):
            hp = np.bincount(np.argsort(-heads.ravel(), kind="stable")[:h] // 4, minlength=3)
            npl = np.bincount(np.argsort(-neurons.ravel(), kind="stable")[:n] // 64, minlength=3)
            if count_flops(shape, hp.tolist(), npl.tolist(), 16.0).ratio <= 0.5 + 1e-9:
                assert ho[:h].sum() + no[:n].sum() <= best + 1e-9


def test_units_without_effect_have_zero_fisher():
    model = make_tiny_bert("BertForSequenceClassification", num_labels=3)
    with torch.no_grad():  # head 1 of layer 0 and neuron 7 of layer 2 write nothing to the residual stream
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 8:16] = 0.0
        model.bert.encoder.layer[2].output.dense.weight[:, 7] = 0.0
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 120, (4, 9), generator=g), "attention_mask": torch.ones(4, 9, dtype=torch.long)}]
    heads, neurons = fisher_scores(model, get_adapter(model), batches)
    assert heads[0, 1] == 0.0 and neurons[2, 7] == 0.0
    assert (np.delete(heads.ravel(), 1) > 0).all() and (neurons[0] > 0).all()


@pytest.mark.parametrize("cls,num_labels", [("BertForSequenceClassification", 3), ("BertForSequenceClassification", 1),
                                            ("GPT2LMHeadModel", None), ("BertForQuestionAnswering", None)])
def test_batched_per_example_fisher_equals_one_example_at_a_time(cls, num_labels):
    """The batched pass (a mask copy per example) gives each example's own gradient: the same scores as
    one unpadded example per pass, the paper's definition, for classification, regression, LM and QA."""
    from conftest import make_tiny_gpt2

    model = make_tiny_gpt2(cls) if cls.startswith("GPT2") else make_tiny_bert(cls, **({"num_labels": num_labels} if num_labels else {}))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[3, 4:] = 0, 0  # right padding, as calibration batches have
    together = fisher_scores(model, get_adapter(model), [{"input_ids": ids, "attention_mask": mask}], seed=5, blocks=True)
    alone = [{"input_ids": ids[i:i + 1, :int(mask[i].sum())], "attention_mask": mask[i:i + 1, :int(mask[i].sum())]}
             for i in range(4)]
    one_by_one = fisher_scores(model, get_adapter(model), alone, seed=5, blocks=True)
    for a, b in zip(together, one_by_one):  # diagonal scores and the per-layer Fisher matrices
        assert (b > 0).any()
        # off-diagonal Fisher entries are sums that cancel: judge them against the largest entry
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=(1e-9 if a.ndim == 2 else 1e-6) * np.abs(b).max())
    heads, neurons, head_blocks, neuron_blocks = together
    np.testing.assert_allclose(np.diagonal(head_blocks, axis1=1, axis2=2), heads, rtol=1e-12)
    np.testing.assert_allclose(np.diagonal(neuron_blocks, axis1=1, axis2=2), neurons, rtol=1e-12)


def test_fisher_prunes_a_fine_tuned_classifier_and_refuses_a_headless_model():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "models" / "all-MiniLM-L6-v2")
    kw = dict(tokenizer=tok, task="sst2", data=SHARED / "glue" / "SST-2", flops=0.6, samples=16, strategy="fisher",
              plot=False, progress=False)
    model = make_tiny_bert("BertForSequenceClassification", vocab_size=tok.vocab_size)
    result = ppkit.prune(model, **kw)
    assert result.report["flops_ratio"] <= 0.6 + 1e-9 and result.plan.meta["strategy"] == "fisher"
    with pytest.raises(InputError, match="needs a model with a task head"):
        ppkit.prune(make_tiny_bert("BertModel", vocab_size=tok.vocab_size), **kw)


def test_rearrangement_prunes_one_of_two_redundant_units_instead_of_both():
    """Units 0 and 1 have the same per-example gradients (they do the same work), unit 2 its own, slightly
    larger. Keeping one unit, the diagonal Fisher keeps unit 2 and drops both twins: removal cost
    (1+1)^2 = 4. With the block Fisher, keeping a twin and dropping unit 2 costs 1 + 1.5 = 2.5."""
    grads = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.5 ** 0.5]])  # two examples' gradients
    fisher = grads.T @ grads
    assert np.allclose(np.diag(fisher), [1.0, 1.0, 1.5])
    kept = rearrange_layer(fisher, [2])
    assert kept in ([0], [1])
    pruned = np.ones(3, dtype=bool)
    pruned[kept] = False
    assert removal_cost(fisher, pruned) == pytest.approx(2.5)
    assert rearrange_layer(fisher, [2], max_steps=0) == [2]  # no steps: the search's choice


def test_rearranged_plan_keeps_the_counts_and_lowers_the_removal_cost():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "models" / "all-MiniLM-L6-v2")
    model = make_tiny_bert("BertForSequenceClassification", vocab_size=tok.vocab_size)
    kw = dict(tokenizer=tok, task="sst2", data=SHARED / "glue" / "SST-2", flops=0.5, samples=32, strategy="fisher",
              plot=False, progress=False, compensate="none")
    searched = ppkit.prune(model, **kw, options={"rearrange_steps": 0}).plan
    rearranged = ppkit.prune(make_tiny_bert("BertForSequenceClassification", vocab_size=tok.vocab_size), **kw).plan
    assert rearranged.heads_per_layer == searched.heads_per_layer
    assert rearranged.neurons_per_layer == searched.neurons_per_layer
    meta = rearranged.meta
    assert meta["rearrange_steps"] == 200 and "removal_cost_before_rearrange" not in searched.meta
    assert meta["removal_cost_after_rearrange"] < meta["removal_cost_before_rearrange"]
    assert rearranged.layers != searched.layers
