"""FLOPs accounting: the paper's formulas, checked against torch's FlopCounterMode on real forwards."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_gpt2, plan_for
from torch.utils.flop_counter import FlopCounterMode

from ppkit.adapters import get_adapter
from ppkit.errors import InputError, PlanError
from ppkit.flops import count_flops, count_params, head_flops, model_flops, neuron_flops, plan_flops
from ppkit.plan import PruningPlan
from ppkit.surgery import prune_model


def measured_layer_flops(model, seq_len: int, batch: int = 1) -> float:
    """FLOPs FlopCounterMode attributes to the transformer layer modules (sum over layers)."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    root = type(model).__name__
    layer_names = [f"{root}.{names[id(layer)]}" for layer in adapter.layers]
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    counts = counter.get_flop_counts()
    return float(sum(sum(counts[name].values()) for name in layer_names if name in counts))


def test_formulas_by_hand():
    # BERT-base, s=128: per head 2*(4*128*768*64 + 2*128^2*64), per neuron 2*2*128*768
    assert head_flops(768, 64, 128) == 2 * (4 * 128 * 768 * 64 + 2 * 128 * 128 * 64)
    assert neuron_flops(768, 128) == 4 * 128 * 768
    # fractional average lengths (the paper uses mean dev-set length) are allowed
    assert head_flops(768, 64, 25.16) == pytest.approx(2 * (4 * 25.16 * 768 * 64 + 2 * 25.16**2 * 64))
    with pytest.raises(InputError):
        head_flops(768, 64, 0)
    with pytest.raises(InputError):
        neuron_flops(768, -1)


def test_report_ratios(tiny_bert):
    shape = get_adapter(tiny_bert).shape()
    dense = plan_flops(PruningPlan.keep_all(3, 4, 64), shape, 16)
    assert dense.ratio == dense.mha_ratio == dense.ffn_ratio == 1.0
    assert dense.total == dense.dense_total == 3 * (4 * head_flops(32, 8, 16) + 64 * neuron_flops(32, 16))
    plan = plan_for(tiny_bert, seed=1, kind="zeros")
    report = plan_flops(plan, shape, 16)
    fh, fn = head_flops(32, 8, 16), neuron_flops(32, 16)
    assert report.mha == sum(plan.heads_per_layer) * fh
    assert report.ffn == sum(plan.neurons_per_layer) * fn
    assert report.per_layer[2] == (0.0, 0.0)  # "zeros" plan: layer 2 keeps nothing
    assert report.ratio == pytest.approx(report.total / report.dense_total)
    assert report.mha_ratio == pytest.approx(sum(plan.heads_per_layer) / 12)
    assert report.to_dict()["per_layer"][0] == list(report.per_layer[0])
    with pytest.raises(PlanError):
        plan_flops(PruningPlan.keep_all(2, 4, 64), shape, 16)
    with pytest.raises(PlanError):
        count_flops(shape, [4, 4], [64, 64, 64], 16)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("kind", ["keep_all", "uneven", "zeros"])
def test_matches_flop_counter(family, kind):
    model = make_tiny_bert() if family == "bert" else make_tiny_gpt2("GPT2Model")
    plan = plan_for(model, seed=4, kind=kind)
    prune_model(model, plan)
    seq = 11
    report = model_flops(model, seq)
    assert report.total == pytest.approx(plan_flops(plan, get_adapter(model).shape(), seq).total, rel=0)
    # exact: the formula counts exactly the mm/addmm/bmm work of the layers (biases excluded by both)
    assert measured_layer_flops(model, seq) == report.total
    assert measured_layer_flops(model, seq, batch=3) == 3 * report.total


def test_minilm_flops_match_counter(minilm_path):
    from transformers import BertModel

    model = BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    plan = plan_for(model, seed=9, kind="uneven")
    dense = model_flops(model, 24)
    assert measured_layer_flops(model, 24) == dense.total
    prune_model(model, plan)
    pruned = model_flops(model, 24)
    assert measured_layer_flops(model, 24) == pruned.total
    assert pruned.dense_total == dense.total and pruned.ratio < 1.0


def test_count_params_matches_physical_parameters():
    model = make_tiny_gpt2("GPT2Model")
    shape = get_adapter(model).shape()
    layer_params = sum(p.numel() for layer in get_adapter(model).layers for n, p in layer.named_parameters() if "ln_" not in n)
    assert count_params(shape, shape.heads_per_layer, shape.neurons_per_layer) == layer_params
