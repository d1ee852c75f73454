"""Retraining-free compensation (`--compensate lstsq|merge`): exactness, no-op, safety, parity."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_gpt2, plan_for

from ppkit.adapters import get_adapter
from ppkit.compensate import collect_moments, compensate_model
from ppkit.masking import apply_masks
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.saving import load_pruned, save_pruned
from ppkit.surgery import prune_model


def random_batches(model, n_batches: int = 6, batch: int = 8, seq: int = 12, seed: int = 0):
    adapter = get_adapter(model)
    return [adapter.dummy_inputs(batch=batch, seq=seq, seed=seed + i) for i in range(n_batches)]


def last_hidden(model, batches):
    with torch.no_grad():
        return torch.cat([model(**b, output_hidden_states=True).hidden_states[-1] for b in batches])


def duplicate_neurons(model, pairs: dict[int, int]) -> None:
    """Make FFN neuron j of every layer of a BertModel an exact copy of neuron k (same input weights and bias)."""
    for layer in model.encoder.layer:
        fc = layer.intermediate.dense  # nn.Linear, weight [ffn, hidden]
        with torch.no_grad():
            for j, k in pairs.items():
                fc.weight[j] = fc.weight[k]
                fc.bias[j] = fc.bias[k]


@pytest.mark.parametrize("make", [make_tiny_bert, make_tiny_gpt2], ids=["bert", "gpt2"])
@pytest.mark.parametrize("method", ["lstsq", "merge"])
def test_nothing_pruned_changes_nothing(make, method):
    model = make("BertModel") if make is make_tiny_bert else make("GPT2Model")
    shape = get_adapter(model).shape()
    plan = PruningPlan.keep_all(shape.num_layers, shape.num_heads, shape.ffn_dim)
    batches = random_batches(model)
    before = last_hidden(model, batches)
    report = compensate_model(model, plan, method=method, batches=batches)
    assert report["accepted"] == 0
    assert (last_hidden(model, batches) - before).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method", ["lstsq", "merge"])
def test_linearly_dependent_neurons_are_recovered_exactly(method):
    model = make_tiny_bert("BertModel")
    shape = get_adapter(model).shape()
    pairs = {5: 1, 9: 2, 20: 3}
    duplicate_neurons(model, pairs)
    batches = random_batches(model)
    dense = last_hidden(model, batches)
    keep = tuple(n for n in range(shape.ffn_dim) if n not in pairs)
    plan = PruningPlan([LayerPlan(tuple(range(shape.num_heads)), keep)] * shape.num_layers, shape.num_heads, shape.ffn_dim)

    uncorrected = last_hidden(prune_model(copy.deepcopy(model), plan), batches)
    assert (uncorrected - dense).abs().max().item() > 1e-2  # pruning alone does change the output

    report = compensate_model(model, plan, method=method, batches=batches)
    assert all(l["accepted"] for l in report["layers"] if l["sublayer"] == "ffn")
    pruned = prune_model(model, plan)
    assert (last_hidden(pruned, batches) - dense).abs().max().item() <= 1e-4


def test_compensated_masked_pruned_reloaded_onnx_agree(tmp_path):
    model = make_tiny_gpt2("GPT2LMHeadModel")
    plan = plan_for(model, seed=3, kind="zeros")
    batches = random_batches(model)
    compensate_model(model, plan, method="lstsq", batches=batches)
    with torch.no_grad(), apply_masks(model, plan):
        masked = last_hidden(model, batches)
    pruned = prune_model(model, plan)
    out = save_pruned(pruned, tmp_path / "m", plan=plan)
    reloaded = load_pruned(out)
    assert (last_hidden(pruned, batches) - masked).abs().max().item() <= 1e-5
    assert (last_hidden(reloaded, batches) - masked).abs().max().item() <= 1e-5
    from ppkit.export import export_onnx

    report = export_onnx(out)  # checks onnxruntime against torch on two input sizes, raises above 1e-4
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4


@pytest.mark.slow
def test_random_plan_on_minilm_never_gets_worse(minilm_path, shared_data):
    """The safety rule: on real activations a random plan's correction never raises held-out error."""
    from ppkit.data import calibration_batches
    from ppkit.models import load_model, load_tokenizer

    model = load_model(minilm_path)
    tokenizer = load_tokenizer(minilm_path)
    calib = calibration_batches("sst2", tokenizer, data=shared_data / "glue" / "SST-2", samples=160, seed=0, batch_size=32)
    held_out = calibration_batches("sst2", tokenizer, data=shared_data / "glue" / "SST-2", samples=64, seed=99, batch_size=32)
    shape = get_adapter(model).shape()
    gen = torch.Generator().manual_seed(0)
    layers = [
        LayerPlan(tuple(sorted(torch.randperm(shape.num_heads, generator=gen)[:5].tolist())),
                  tuple(sorted(torch.randperm(shape.ffn_dim, generator=gen)[:500].tolist())))
        for _ in range(shape.num_layers)
    ]
    plan = PruningPlan(layers, shape.num_heads, shape.ffn_dim)

    def pooled(m):
        outs = []
        with torch.no_grad():
            for b in held_out.batches:
                h = m(**b).last_hidden_state
                mask = b["attention_mask"].unsqueeze(-1).float()
                outs.append((h * mask).sum(1) / mask.sum(1))
        return torch.cat(outs)

    dense = pooled(model)
    plain = pooled(prune_model(copy.deepcopy(model), plan))
    moments = collect_moments(model, calib.batches, seed=0)
    report = compensate_model(model, plan, moments, method="lstsq")
    for layer in report["layers"]:
        assert layer["error_after"] <= layer["error_before"]
    corrected = pooled(prune_model(model, plan))
    cos = torch.nn.functional.cosine_similarity
    assert cos(corrected, dense).mean() >= cos(plain, dense).mean()
