"""Masking (paper m^A / m^F) == physical surgery, for BERT and GPT-2, uneven and empty layers."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_gpt2, plan_for

from ppkit.adapters import get_adapter
from ppkit.errors import PlanError, UnsupportedModelError
from ppkit.flops import count_params
from ppkit.masking import apply_masks
from ppkit.modeling_pruned import EmptyBertSelfAttention, EmptyGPT2Attention
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.surgery import prune_model

TOL = 1e-5

MODELS = [
    ("bert", "BertModel"),
    ("bert", "BertForSequenceClassification"),
    ("bert", "BertForQuestionAnswering"),
    ("bert", "BertForMaskedLM"),
    ("gpt2", "GPT2Model"),
    ("gpt2", "GPT2LMHeadModel"),
]


def build(family: str, cls_name: str, **overrides):
    return make_tiny_bert(cls_name, **overrides) if family == "bert" else make_tiny_gpt2(cls_name, **overrides)


def outputs(model, inputs) -> list[torch.Tensor]:
    """Every tensor output a model produces (last hidden states, pooler, logits, QA start/end logits)."""
    out = model(**inputs, output_hidden_states=True)
    keys = ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits")
    return [out.hidden_states[-1]] + [out[k] for k in keys if k in out and out[k] is not None]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and a
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("family,cls_name", MODELS)
@pytest.mark.parametrize("kind", ["uneven", "zeros", "keep_all"])
def test_masked_equals_pruned(family, cls_name, kind):
    model = build(family, cls_name)
    plan = plan_for(model, seed=MODELS.index((family, cls_name)), kind=kind)
    adapter = get_adapter(model)
    inputs = adapter.dummy_inputs(batch=3, seq=9)
    with torch.no_grad():
        dense = outputs(model, inputs)
        with apply_masks(model, plan):
            masked = outputs(model, inputs)
        after_remove = outputs(model, inputs)
        pruned_model = prune_model(copy.deepcopy(model), plan)
        pruned = outputs(pruned_model, inputs)
    assert max_diff(masked, pruned) <= TOL
    assert max_diff(dense, after_remove) == 0.0  # hooks really removed
    if kind == "keep_all":
        assert max_diff(dense, pruned) <= TOL
    else:
        assert max_diff(dense, masked) > 1e-3  # the plan actually changes the function
    shape = get_adapter(pruned_model).shape()
    assert list(shape.heads_per_layer) == plan.heads_per_layer
    assert list(shape.neurons_per_layer) == plan.neurons_per_layer
    assert pruned_model.config.ppkit_heads_per_layer == plan.heads_per_layer
    assert pruned_model.config.ppkit_neurons_per_layer == plan.neurons_per_layer


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_empty_layers_use_empty_modules_and_add_only_bias(family):
    model = build(family, "BertModel" if family == "bert" else "GPT2Model")
    plan = plan_for(model, kind="zeros")
    prune_model(model, plan)
    adapter = get_adapter(model)
    empty_cls = EmptyBertSelfAttention if family == "bert" else EmptyGPT2Attention
    layers = adapter.layers
    attn0 = layers[0].attention.self if family == "bert" else layers[0].attn
    assert isinstance(attn0, empty_cls)
    x = torch.randn(2, 5, model.config.hidden_size)
    # zero heads: the attention output projection only adds its bias
    ctx = x.new_zeros(2, 5, 0)
    w, b = adapter.attention_output_weight(0)
    assert w.shape == (0, model.config.hidden_size)
    assert torch.equal(adapter.head_context_module(0)(ctx), b.expand(2, 5, -1))
    # zero neurons: the FFN down projection only adds its bias
    assert torch.equal(adapter.ffn_activation_module(1)(ctx), adapter.ffn_output_weight(1)[1].expand(2, 5, -1))


def test_param_count_drops_as_planned(tiny_bert, tiny_gpt2):
    for model in (tiny_bert, tiny_gpt2):
        shape = get_adapter(model).shape()
        plan = plan_for(model, seed=3, kind="zeros")
        before = sum(p.numel() for p in model.parameters())
        prune_model(model, plan)
        after = sum(p.numel() for p in model.parameters())
        expected = count_params(shape, shape.heads_per_layer, shape.neurons_per_layer) - count_params(
            shape, plan.heads_per_layer, plan.neurons_per_layer
        )
        assert before - after == expected > 0


@pytest.mark.parametrize("family,cls_name", [("bert", "BertForSequenceClassification"), ("gpt2", "GPT2LMHeadModel")])
def test_pruned_model_trains(family, cls_name):
    model = build(family, cls_name)
    plan = plan_for(model, seed=5, kind="zeros")
    prune_model(model, plan)
    model.train()
    inputs = get_adapter(model).dummy_inputs(batch=2, seq=8)
    labels = torch.tensor([0, 1]) if family == "bert" else inputs["input_ids"]
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    missing = {n for n, p in model.named_parameters() if p.numel() > 0 and p.grad is None}
    # GPT-2's ln_1 only feeds the attention, so it gets no gradient when the layer has no heads
    empty = [l for l, h in enumerate(plan.heads_per_layer) if h == 0]
    allowed = {f"transformer.h.{l}.ln_1.{w}" for l in empty for w in ("weight", "bias")} if family == "gpt2" else set()
    assert missing <= allowed
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the bias of an empty attention block is still trained
    layer0 = get_adapter(model).head_context_module(0)
    assert layer0.bias.grad is not None and layer0.bias.grad.abs().sum() > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert torch.isfinite(model(**inputs, labels=labels).loss)


@pytest.mark.parametrize("kind", ["zeros", "uneven"])
def test_gpt2_generate_with_cache_matches_masked(kind):
    model = make_tiny_gpt2("GPT2LMHeadModel")
    plan = plan_for(model, seed=11, kind=kind)
    pruned = prune_model(copy.deepcopy(model), plan)
    prompt = torch.tensor([[5, 17, 3, 44], [9, 9, 1, 2]])
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        with apply_masks(model, plan):
            masked_tokens = model.generate(prompt, use_cache=True, **kwargs)
        cached = pruned.generate(prompt, use_cache=True, **kwargs)
        uncached = pruned.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, masked_tokens)
    assert torch.equal(cached, uncached)


def test_gpt2_cache_length_with_empty_first_layer():
    model = make_tiny_gpt2("GPT2LMHeadModel")
    plan = plan_for(model, kind="zeros")  # layer 0 has no heads
    prune_model(model, plan)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        assert out.past_key_values.get_seq_length() == 5
        # transformers 5.24 renamed the model's `past_key_values` argument to `cache` (the old name warns)
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        step = model(torch.tensor([[6]]), **{cache_arg: out.past_key_values}, use_cache=True)
        assert out.past_key_values.get_seq_length() == 6
        full = model(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    assert (step.logits[0, -1] - full.logits[0, -1]).abs().max() <= TOL


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_sdpa_pruned_matches_eager_masked(family):
    eager = build(family, "BertModel" if family == "bert" else "GPT2Model")
    sdpa = build(family, "BertModel" if family == "bert" else "GPT2Model", attn_implementation="sdpa")
    plan = plan_for(eager, seed=2, kind="zeros")
    inputs = get_adapter(eager).dummy_inputs(batch=2, seq=7)
    with torch.no_grad(), apply_masks(eager, plan):
        masked = outputs(eager, inputs)
    prune_model(sdpa, plan)
    with torch.no_grad():
        assert max_diff(masked, outputs(sdpa, inputs)) <= TOL


def test_minilm_masked_equals_pruned(minilm_path):
    from transformers import BertModel

    model = BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    shape = get_adapter(model).shape()
    assert (shape.num_layers, shape.num_heads, shape.hidden_size, shape.ffn_dim) == (6, 12, 384, 1536)
    plan = plan_for(model, seed=7, kind="zeros")
    inputs = get_adapter(model).dummy_inputs(batch=2, seq=16)
    with torch.no_grad():
        with apply_masks(model, plan):
            masked = outputs(model, inputs)
        pruned = outputs(prune_model(model, plan), inputs)
    assert max_diff(masked, pruned) <= TOL


# --------------------------------------------------------------------------- errors
def test_plan_must_fit_model(tiny_bert):
    with pytest.raises(PlanError, match="layers"):
        prune_model(tiny_bert, PruningPlan.keep_all(5, 4, 64))
    with pytest.raises(PlanError, match="heads"):
        prune_model(tiny_bert, PruningPlan.keep_all(3, 6, 64))
    with pytest.raises(PlanError, match="out of range"):
        prune_model(tiny_bert, PruningPlan([LayerPlan((0, 4), (1,))] * 3, 4, 64))
    with pytest.raises(PlanError, match="heads"):
        apply_masks(tiny_bert, PruningPlan.keep_all(3, 6, 64))


def test_already_pruned_model_is_refused(tiny_gpt2):
    plan = plan_for(tiny_gpt2, kind="uneven")
    prune_model(tiny_gpt2, plan)
    with pytest.raises(PlanError, match="already pruned"):
        prune_model(tiny_gpt2, plan)
    with pytest.raises(PlanError, match="already pruned"):
        apply_masks(tiny_gpt2, plan)


def test_prune_layer_validates_indices(tiny_bert):
    adapter = get_adapter(tiny_bert)
    with pytest.raises(PlanError, match="sorted and unique"):
        adapter.prune_layer(0, [2, 1], [0])
    with pytest.raises(PlanError, match="0..63"):
        adapter.prune_layer(0, [0], [64])


def test_unsupported_model_names_supported_classes():
    from transformers import T5Config, T5Model

    model = T5Model(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(UnsupportedModelError, match="T5Model.*BertForSequenceClassification.*DistilBertModel.*GPT2LMHeadModel"):
        get_adapter(model)
    with pytest.raises(UnsupportedModelError):
        get_adapter(torch.nn.Linear(2, 2))


def test_adapter_output_weights_roundtrip(tiny_bert, tiny_gpt2):
    for model in (tiny_bert, tiny_gpt2):
        adapter = get_adapter(model)
        x = torch.randn(3, model.config.hidden_size)
        w, b = adapter.attention_output_weight(1)
        assert torch.allclose(adapter.head_context_module(1)(x), x @ w + b, atol=1e-6)
        wf, bf = adapter.ffn_output_weight(2)
        a = torch.randn(3, wf.shape[0])
        assert torch.allclose(adapter.ffn_activation_module(2)(a), a @ wf + bf, atol=1e-6)
        w, b = w.detach().clone(), b.detach().clone()  # the adapter returns views of the parameters
        adapter.set_attention_output(1, w * 2, b + 1)
        w2, b2 = adapter.attention_output_weight(1)
        assert torch.equal(w2, w * 2) and torch.equal(b2, b + 1)
        with pytest.raises(PlanError, match="shape"):
            adapter.set_ffn_output(2, wf[:-1], bf)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_output_attentions_with_empty_layers(family):
    model = build(family, "BertModel" if family == "bert" else "GPT2Model")
    plan = plan_for(model, kind="zeros")
    prune_model(model, plan)
    with torch.no_grad():
        out = model(**get_adapter(model).dummy_inputs(batch=2, seq=6), output_attentions=True)
    assert [a.shape[1] for a in out.attentions] == plan.heads_per_layer
    assert all(a.shape[-2:] == (6, 6) for a in out.attentions)
