"""ONNX export: onnxruntime == torch (<= 1e-4) on dense and pruned BERT / GPT-2, dynamic shapes,
uneven / zero-head / zero-neuron layers, directory input, atomic writes, the real MiniLM."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_tiny_bert, make_tiny_gpt2, plan_for

from ppkit.errors import ExportError, InputError, ModelLoadError, OutputError
from ppkit.export import export_onnx, read_onnx_metadata, sample_inputs
from ppkit.surgery import prune_model

ATOL = 1e-4


def ort_vs_torch(path, model, shapes, outputs, inputs_used) -> float:
    """Run the exported file with onnxruntime on each (batch, seq) and return max |ort - torch|.

    Independent of export_onnx's own check: a fresh session, other input sizes and seeds."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == inputs_used
    worst = 0.0
    for k, (batch, seq) in enumerate(shapes):
        feed = sample_inputs(model, batch, seq, seed=1000 + k)
        with torch.no_grad():
            out = model(**{n: feed[n] for n in inputs_used}, **({"use_cache": False} if "gpt2" in type(model).__name__.lower() else {}))
        got = session.run(outputs, {n: feed[n].numpy() for n in inputs_used})
        for name, arr in zip(outputs, got):
            ref = out[name].numpy()
            assert arr.shape == ref.shape, (name, arr.shape, ref.shape)
            worst = max(worst, float(np.abs(arr - ref).max()))
    return worst


def symbolic_dims(path) -> dict[str, list]:
    proto = onnx.load(str(path))
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}


BERT_HEADS = [
    ("BertModel", ["last_hidden_state"]),
    ("BertForSequenceClassification", ["logits"]),
    ("BertForQuestionAnswering", ["start_logits", "end_logits"]),
    ("BertForTokenClassification", ["logits"]),
]


@pytest.mark.parametrize("cls_name,outputs", BERT_HEADS)
def test_pruned_bert_export_matches_torch(tmp_path, cls_name, outputs):
    model = make_tiny_bert(cls_name)
    plan = plan_for(model, seed=3, kind="zeros")  # uneven layers, zero heads, zero neurons
    prune_model(model, plan)
    assert 0 in model.config.ppkit_heads_per_layer and 0 in model.config.ppkit_neurons_per_layer

    report = export_onnx(model, tmp_path / "m.onnx")

    assert report.path == tmp_path / "m.onnx" and report.path.is_file()
    assert report.inputs == ["input_ids", "attention_mask", "token_type_ids"]
    assert report.outputs == outputs
    assert report.max_abs_diff is not None and report.max_abs_diff <= ATOL
    # the two checked sizes differ from each other in batch and sequence length
    (b1, s1), (b2, s2) = report.checked_shapes
    assert b1 != b2 and s1 != s2
    assert symbolic_dims(report.path)["input_ids"] == ["batch", "sequence"]
    # one file, two more sizes, with padding: the dynamic axes really are dynamic
    assert ort_vs_torch(report.path, model, [(4, 9), (1, 31)], outputs, report.inputs) <= ATOL
    meta = read_onnx_metadata(report.path)
    assert meta["head"] == report.head and meta["family"] == "bert"
    assert json.loads(meta["ppkit_heads_per_layer"]) == list(model.config.ppkit_heads_per_layer)


@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "GPT2Model"])
def test_pruned_gpt2_export_matches_torch(tmp_path, cls_name):
    model = make_tiny_gpt2(cls_name)
    prune_model(model, plan_for(model, seed=5, kind="zeros"))

    report = export_onnx(model, tmp_path / "g.onnx")

    outputs = ["logits"] if cls_name == "GPT2LMHeadModel" else ["last_hidden_state"]
    assert report.inputs == ["input_ids", "attention_mask"]  # no token types, no KV cache inputs
    assert report.outputs == outputs
    assert report.max_abs_diff <= ATOL
    proto = onnx.load(str(report.path))
    assert [o.name for o in proto.graph.output] == outputs  # no present key/values
    assert ort_vs_torch(report.path, model, [(2, 17), (5, 3)], outputs, report.inputs) <= ATOL


def test_uneven_gpt2_without_empty_layers(tmp_path):
    model = make_tiny_gpt2()
    prune_model(model, plan_for(model, seed=1, kind="uneven"))
    report = export_onnx(model, tmp_path / "g.onnx")
    assert report.max_abs_diff <= ATOL
    assert ort_vs_torch(report.path, model, [(3, 20)], ["logits"], report.inputs) <= ATOL


def test_export_from_saved_pruned_directory(tmp_path):
    from ppkit.saving import save_pruned

    model = make_tiny_bert("BertForSequenceClassification", num_labels=3)
    plan = plan_for(model, seed=2, kind="zeros")
    prune_model(model, plan)
    save_pruned(model, tmp_path / "pruned", plan=plan)

    report = export_onnx(tmp_path / "pruned")

    assert report.path == tmp_path / "pruned" / "model.onnx"
    assert report.head == "sequence-classification" and report.outputs == ["logits"]
    assert report.max_abs_diff <= ATOL
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    feed = sample_inputs(model, 2, 6)
    logits = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    assert logits.shape == (2, 3)
    with torch.no_grad():
        assert np.abs(logits - model(**feed).logits.numpy()).max() <= ATOL


def test_head_base_exports_the_body_and_mismatch_is_an_input_error(tmp_path):
    model = make_tiny_bert("BertForSequenceClassification")
    report = export_onnx(model, tmp_path / "body.onnx", head="base")
    assert report.outputs == ["last_hidden_state"] and report.max_abs_diff <= ATOL
    with pytest.raises(InputError, match="question-answering"):
        export_onnx(model, tmp_path / "qa.onnx", head="question-answering")
    with pytest.raises(InputError, match="unknown head"):
        export_onnx(model, tmp_path / "x.onnx", head="nonsense")
    with pytest.raises(InputError, match="out_file"):
        export_onnx(model)


def test_missing_model_path_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        export_onnx(tmp_path / "no-such-model", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_restores_training_mode_and_attention(tmp_path):
    model = make_tiny_bert(attn_implementation="sdpa").train()
    export_onnx(model, tmp_path / "m.onnx")
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_failed_check_leaves_previous_file_and_no_temp_files(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    model = make_tiny_bert()
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(model, target, atol=-1.0, overwrite=True)  # impossible tolerance: the check must fail
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(OutputError, match="exists"):
        export_onnx(model, target)  # like every other output: not replaced without overwrite
    assert target.read_bytes() == b"previous"
    report = export_onnx(model, target, overwrite=True)
    assert report.max_abs_diff <= ATOL and onnx.load(str(target)).graph.node


def test_check_false_skips_verification(tmp_path):
    report = export_onnx(make_tiny_gpt2(), tmp_path / "g.onnx", check=False)
    assert report.max_abs_diff is None and report.checked_shapes == []
    assert report.path.is_file()


@pytest.mark.slow
def test_dynamo_exporter_on_dense_bert(tmp_path):
    model = make_tiny_bert("BertForQuestionAnswering")
    report = export_onnx(model, tmp_path / "d.onnx", exporter="dynamo")
    assert report.exporter == "dynamo" and report.opset >= 18
    assert report.max_abs_diff <= ATOL
    assert ort_vs_torch(report.path, model, [(2, 11)], report.outputs, report.inputs) <= ATOL


@pytest.mark.slow
def test_minilm_pruned_at_random_plan_exports(tmp_path, minilm_path):
    from ppkit.models import load_model

    dense = load_model(minilm_path)
    model = prune_model(copy.deepcopy(dense), plan_for(dense, seed=11, kind="zeros"))
    report = export_onnx(model, tmp_path / "minilm.onnx")
    assert report.max_abs_diff <= ATOL
    assert ort_vs_torch(report.path, model, [(2, 40)], ["last_hidden_state"], report.inputs) <= ATOL
    # pruning really shrank the graph: the file is smaller than the dense export
    dense_report = export_onnx(dense, tmp_path / "dense.onnx", check=False)
    assert report.path.stat().st_size < 0.9 * dense_report.path.stat().st_size


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_int8_export_of_a_pruned_model_stays_close_to_fp32(tmp_path, family):
    model = make_tiny_bert("BertForSequenceClassification") if family == "bert" else make_tiny_gpt2("GPT2LMHeadModel")
    prune_model(model, plan_for(model, seed=3, kind="zeros"))
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    report = export_onnx(model, tmp_path / "int8.onnx", quantize="int8")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "int8.onnx"]  # no quantizer leftovers
    q = report.quantization
    # the stated tolerance: every example's output points where fp32's does (cosine >= 0.99)
    assert q["min_cosine"] >= 0.99 and q["examples"] >= 4 and q["max_abs_diff"] > 0
    graph = onnx.load(str(report.path)).graph
    assert any(node.op_type in ("DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul") for node in graph.node)
    assert not any(node.op_type in ("DynamicQuantizeLinear", "MatMulInteger") for node in onnx.load(str(fp32.path)).graph.node)
    # an independent run on another input size agrees with torch at int8 precision
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    feed = sample_inputs(model, 2, 9, seed=7)
    with torch.no_grad():
        ref = model(**{n: feed[n] for n in report.inputs}).logits.numpy()
    (got,) = session.run(["logits"], {n: feed[n].numpy() for n in report.inputs})
    cos = (ref * got).reshape(2, -1).sum(1) / (np.linalg.norm(ref.reshape(2, -1), axis=1) * np.linalg.norm(got.reshape(2, -1), axis=1))
    assert cos.min() >= 0.99
    with pytest.raises(InputError, match="unknown quantization"):
        export_onnx(model, tmp_path / "x.onnx", quantize="int4")


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_fp16_export_of_a_pruned_model_is_half_size_and_agrees_with_torch(tmp_path, family):
    model = make_tiny_bert("BertForSequenceClassification") if family == "bert" else make_tiny_gpt2("GPT2LMHeadModel")
    prune_model(model, plan_for(model, seed=3, kind="zeros"))  # a layer with no heads and one with no neurons
    fp32 = export_onnx(model, tmp_path / "fp32.onnx")
    report = export_onnx(model, tmp_path / "fp16.onnx", dtype="fp16")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16.onnx", "fp32.onnx"]
    q = report.quantization
    assert q["precision"] == "fp16" and q["min_cosine"] >= 0.999 and q["examples"] >= 4
    assert q["bytes"] < q["fp32_bytes"]  # a tiny graph's file is mostly structure; its weights halve:
    graph = onnx.load(str(report.path)).graph
    weights = [init for init in graph.initializer if len(init.dims) == 2 and 0 not in init.dims]
    assert weights and all(init.data_type == onnx.TensorProto.FLOAT16 for init in weights)
    weight_bytes = [sum(len(init.raw_data) for init in onnx.load(str(path)).graph.initializer)
                    for path in (report.path, fp32.path)]
    assert weight_bytes[0] == pytest.approx(weight_bytes[1] / 2, rel=0.05)
    # clients feed and read the fp32 model's arrays
    assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.FLOAT]
    assert len(onnx.load(str(fp32.path)).graph.initializer) and fp32.quantization is None
    # an independent run on another input size agrees with torch at half precision
    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    feed = sample_inputs(model, 2, 9, seed=7)
    with torch.no_grad():
        ref = model(**{n: feed[n] for n in report.inputs}).logits.numpy()
    (got,) = session.run(["logits"], {n: feed[n].numpy() for n in report.inputs})
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 2e-2 * max(1.0, float(np.abs(ref).max()))


def test_fp16_and_int8_are_separate_exports(tmp_path):
    model = make_tiny_bert("BertModel")
    with pytest.raises(InputError, match="--quantize int8 quantizes the fp32 graph: leave out --dtype fp16"):
        export_onnx(model, tmp_path / "x.onnx", quantize="int8", dtype="fp16")
    with pytest.raises(InputError, match="unknown dtype 'bf16': use fp32, fp16"):
        export_onnx(model, tmp_path / "x.onnx", dtype="bf16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("heads", [[3, 1, 2], [0, 4, 2]])
def test_optimize_writes_each_layers_head_count_and_matches_the_unfused_graph(tmp_path, heads):
    from onnxruntime.transformers import optimizer

    from ppkit.plan import LayerPlan, PruningPlan

    model = make_tiny_bert("BertModel")  # the hidden states show a wrong attention; logits squash it
    with torch.no_grad():  # peaked attention: with near-uniform attention any head split gives the same output
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(25.0)
            layer.attention.self.key.weight.mul_(25.0)
    plan = PruningPlan([LayerPlan(tuple(range(h)), tuple(range(0, 64, 3))) for h in heads], num_heads=4, ffn_dim=64)
    prune_model(model, plan)
    plain = export_onnx(model, tmp_path / "plain.onnx")
    report = export_onnx(model, tmp_path / "fused.onnx", optimize=True)

    opt = report.optimization
    assert opt["attention_heads"] == [h for h in heads if h]  # a layer without heads has no attention to fuse
    assert opt["fused_operators"]["Attention"] == sum(1 for h in heads if h)
    assert opt["max_abs_diff_vs_unfused"] <= ATOL and report.max_abs_diff <= ATOL
    attention = [n for n in onnx.load(str(report.path)).graph.node if n.op_type == "Attention"]
    assert [onnx.helper.get_attribute_value(a) for n in attention for a in n.attribute if a.name == "num_heads"] == opt["attention_heads"]
    assert ort_vs_torch(report.path, model, [(4, 9), (1, 31)], ["last_hidden_state"], report.inputs) <= ATOL
    # what ppkit fixes: where the optimizer writes the config's head count into a layer with fewer heads
    # (it does for transformers 5 exports), the graph is wrong or does not load
    generic = optimizer.optimize_model(str(plain.path), model_type="bert", num_heads=4, hidden_size=32, opt_level=0)
    generic.save_model_to_file(str(tmp_path / "generic.onnx"))
    written = [a.i for n in generic.model.graph.node if n.op_type == "Attention" for a in n.attribute if a.name == "num_heads"]
    if written != opt["attention_heads"]:
        try:
            broken = ort_vs_torch(tmp_path / "generic.onnx", model, [(4, 9)], ["last_hidden_state"], report.inputs)
        except Exception:  # noqa: BLE001 - onnxruntime refuses to load it
            broken = float("inf")
        assert broken > 1e-2
