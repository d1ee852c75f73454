"""The families beyond BERT and GPT-2: RoBERTa, XLM-RoBERTa, ELECTRA and DistilBERT (BERT's adapter with
other module names) and the Llama-style decoders Llama, Qwen2 and Mistral (grouped-query attention, gated
FFN). Masked == physically pruned == reloaded with ppkit == reloaded with plain transformers (no ppkit)
== ONNX, FLOPs == FlopCounterMode, greedy generation with a KV cache, and every built-in strategy
through the CLI, on tiny random configs of each family."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cli_support import MINILM, SST2, run_cli
from conftest import SHARED, make_tiny, plan_for
from test_flops import measured_layer_flops
from test_saving import load_without_ppkit

from ppkit.adapters import get_adapter
from ppkit.export import export_onnx, read_onnx_metadata
from ppkit.flops import model_flops
from ppkit.masking import apply_masks
from ppkit.modeling_pruned import (
    AUTO_CLASSES,
    FAMILY_CLASSES,
    EmptyDistilBertSelfAttention,
    EmptyGroupedAttention,
    EmptySelfAttention,
)
from ppkit.models import load_model, load_pruned
from ppkit.saving import save_pruned
from ppkit.surgery import prune_model

ENCODERS = ("roberta", "xlm-roberta", "electra", "distilbert")
DECODERS = ("llama", "qwen2", "mistral")
FAMILIES = ENCODERS + DECODERS
EMPTY_ATTENTION = (EmptySelfAttention, EmptyDistilBertSelfAttention, EmptyGroupedAttention)
CASES = [(family, head, cls) for family in FAMILIES for head, cls in FAMILY_CLASSES[family].items()]
TORCH_TOL = 1e-5
ORT_TOL = 1e-4


def main_outputs(model, inputs) -> list[torch.Tensor]:
    out = model(**inputs, output_hidden_states=True)
    keys = ("logits", "start_logits", "end_logits")
    return [out.hidden_states[-1]] + [out[k] for k in keys if k in out and out[k] is not None]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and a
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["uneven", "zeros"])
@pytest.mark.parametrize("family,head,cls_name", CASES)
def test_masked_pruned_reloaded_and_onnx_agree(tmp_path, family, head, cls_name, kind):
    model = make_tiny(family, cls_name, seed=CASES.index((family, head, cls_name)))
    plan = plan_for(model, seed=len(family), kind=kind)
    inputs = get_adapter(model).dummy_inputs(batch=3, seq=9)
    with torch.no_grad():
        dense = main_outputs(model, inputs)
        with apply_masks(model, plan):
            masked = main_outputs(model, inputs)
        pruned = prune_model(copy.deepcopy(model), plan)
        assert max_diff(masked, main_outputs(pruned, inputs)) <= TORCH_TOL
    assert max_diff(dense, masked) > 1e-3  # the plan changes the function
    if kind == "zeros":  # layer 0 keeps no heads: its attention is the family's empty variant
        layer = get_adapter(pruned).layers[0]
        attention = getattr(layer, "self_attn", None) or getattr(layer.attention, "self", layer.attention)
        assert isinstance(attention, EMPTY_ATTENTION)

    out = tmp_path / "pruned"
    save_pruned(pruned, out, plan=plan)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family == config["ppkit_family"]
    assert config["auto_map"][AUTO_CLASSES[head]].startswith("modeling_ppkit.")
    reloaded = load_pruned(out)
    assert type(reloaded).__name__ == "Ppkit" + cls_name and isinstance(reloaded, type(model))
    again = load_model(out, head=head)
    with torch.no_grad():
        assert max_diff(masked, main_outputs(reloaded, inputs)) <= TORCH_TOL
        assert max_diff(masked, main_outputs(again, inputs)) <= TORCH_TOL

    report = export_onnx(out, tmp_path / "m.onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff <= ORT_TOL
    assert report.family == family and read_onnx_metadata(report.path)["family"] == family
    # RoBERTa-style checkpoints have one token type, so the graph takes no token_type_ids
    assert ("token_type_ids" in report.inputs) == (family == "electra")


@pytest.mark.slow
def test_plain_transformers_loads_every_family_without_ppkit(tmp_path):
    cases = []
    for i, (family, head, cls_name) in enumerate(CASES):
        if head not in ("base", "sequence-classification", "causal-lm"):
            continue
        model = make_tiny(family, cls_name, seed=i)
        plan = plan_for(model, seed=i, kind="zeros")
        inputs = get_adapter(model).dummy_inputs(batch=2, seq=10)
        output = "logits" if head != "base" else "last_hidden_state"
        data = {"inputs": inputs}
        generate = head == "causal-lm"
        with torch.no_grad(), apply_masks(model, plan):
            data["expected"] = getattr(model(**inputs), output)
            if generate:
                data["prompt"] = {"input_ids": torch.tensor([[3, 7, 11]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
                data["tokens"] = model.generate(**data["prompt"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        out = tmp_path / f"{family}-{head}"
        save_pruned(prune_model(model, plan), out, plan=plan)
        torch.save(data, tmp_path / f"{family}-{head}.pt")
        cases.append({"dir": str(out), "auto_class": AUTO_CLASSES[head], "output": output,
                      "data": str(tmp_path / f"{family}-{head}.pt"), "generate": generate})
    result = load_without_ppkit(cases, tmp_path)
    assert len(result) == 2 * len(ENCODERS) + 3 * len(DECODERS)
    for case in cases:
        cls_name, module, diff, *generated = result[case["dir"]]
        assert cls_name.startswith("Ppkit") and "modeling_ppkit" in module
        assert diff <= TORCH_TOL, (case["dir"], diff)
        assert generated == ([True] if case["generate"] else []), case["dir"]


@pytest.mark.parametrize("kind", ["keep_all", "uneven", "zeros"])
@pytest.mark.parametrize("family", FAMILIES)
def test_flops_match_flop_counter(family, kind):
    model = make_tiny(family, FAMILY_CLASSES[family]["base"])
    prune_model(model, plan_for(model, seed=5, kind=kind))
    seq = 11
    assert measured_layer_flops(model, seq) == model_flops(model, seq).total


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """Per family, a tiny model directory to prune through the CLI and the task options to prune it
    with: encoders are 2-label classifiers with the MiniLM tokenizer on 48 SST-2 rows, decoders causal
    LMs with the GPT-2 tokenizer on PTB."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("families")
    data = root / "sst2-small.tsv"
    data.write_text("\n".join((SST2 / "train.tsv").read_text(encoding="utf-8").splitlines()[:49]) + "\n",
                    encoding="utf-8")
    bert_tok, gpt2_tok = AutoTokenizer.from_pretrained(MINILM), AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
    sources = {}
    for family in FAMILIES:
        if family in DECODERS:
            tok, eos = gpt2_tok, gpt2_tok.eos_token_id
            model = make_tiny(family, FAMILY_CLASSES[family]["causal-lm"], vocab_size=len(tok), bos_token_id=eos,
                              eos_token_id=eos, pad_token_id=eos)
            task = ["--task", "ptb", "--data", SHARED / "lm" / "ptb", "--max-length", "32"]
        else:  # DistilBERT's own tokenizer has no token types (its transformers 4.x forward refuses them)
            tok = bert_tok if family != "distilbert" else AutoTokenizer.from_pretrained(
                MINILM, model_input_names=["input_ids", "attention_mask"])
            model = make_tiny(family, FAMILY_CLASSES[family]["sequence-classification"], num_labels=2,
                              vocab_size=tok.vocab_size)
            task = ["--task", "sst2", "--data", data]
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
        sources[family] = (root / family, task)
    return sources


@pytest.mark.parametrize("strategy", ["dual-cp", "kcm", "random", "worst", "fisher"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_strategy_prunes_every_family_through_the_cli(tiny_sources, tmp_path, capsys, family, strategy):
    source, task = tiny_sources[family]
    out = tmp_path / "out"
    result = run_cli(["prune", source, *task, "--flops", "0.6", "--strategy", strategy, "--samples", "16", "--out", out,
                      "--quiet", "--no-plot"], capsys)
    assert result.code == 0, result.text
    pruned = load_pruned(out)
    assert pruned.config.model_type == family
    head = "causal-lm" if family in DECODERS else "sequence-classification"
    assert type(pruned).__name__ == "Ppkit" + FAMILY_CLASSES[family][head]
    report = json.loads((out / "report.json").read_text())
    assert report["family"] == family and report["strategy"] == strategy
    assert report["flops_ratio"] <= 0.6 + 1e-9
    assert model_flops(pruned, report["flops_seq_len"]).ratio == pytest.approx(report["flops_ratio"])


@pytest.mark.parametrize("family", ENCODERS)
def test_optimized_export_writes_each_layers_heads(tmp_path, family):
    model = make_tiny(family, FAMILY_CLASSES[family]["base"])
    adapter = get_adapter(model)
    with torch.no_grad():  # peaked attention, so that a wrong head split would show in the hidden states
        for layer in adapter.layers:
            for path in adapter.qkv_paths[:2]:
                layer.get_submodule(path).weight.mul_(25.0)
    plan = plan_for(model, seed=2, kind="uneven")
    prune_model(model, plan)
    report = export_onnx(model, tmp_path / "fused.onnx", optimize=True)
    import transformers

    # onnxruntime's fusion patterns do not match transformers 4.x's DistilBERT attention graph: nothing fused
    old_distilbert = family == "distilbert" and int(transformers.__version__.split(".")[0]) < 5
    assert report.optimization["attention_heads"] == ([] if old_distilbert else plan.heads_per_layer)
    assert report.optimization["max_abs_diff_vs_unfused"] <= ORT_TOL and report.max_abs_diff <= ORT_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_family_fine_tunes_exports_and_benches(tiny_sources, tmp_path, capsys, family):
    source, task = tiny_sources[family]
    pruned, tuned = tmp_path / "pruned", tmp_path / "tuned"
    steps = [
        ["prune", source, *task, "--flops", "0.6", "--strategy", "random", "--samples", "16", "--out", pruned,
         "--quiet", "--no-plot"],
        ["finetune", pruned, *task, "--epochs", "1", "--train-limit", "32", "--eval-limit", "16", "--out", tuned],
        ["export", tuned, "--onnx"],
        ["bench", tuned, "--baseline", source, *task[:4], "--seq-len", "16", "--batch-sizes", "2", "--repeats", "2",
         "--warmup", "1", "--eval-limit", "16", "--backend", "both", "--json-out", tmp_path / "bench.json"],
    ]
    for args in steps:
        result = run_cli(args, capsys)
        assert result.code == 0, result.text
    bench = json.loads((tmp_path / "bench.json").read_text())
    metric = "perplexity" if family in DECODERS else "accuracy"
    assert [m["family"] for m in bench["models"]] == [family, family]
    for m in bench["models"]:  # both backends timed, quality scored, the ONNX parity checked
        assert {row["backend"] for row in m["latency"]} == {"ort", "torch"} and metric in m["quality"]
        assert m["export"]["max_abs_diff"] <= ORT_TOL
    model = load_pruned(tuned)
    head = "causal-lm" if family in DECODERS else "sequence-classification"
    assert type(model).__name__ == "Ppkit" + FAMILY_CLASSES[family][head]
    assert get_adapter(model).shape().heads_per_layer == get_adapter(load_pruned(pruned)).shape().heads_per_layer
    assert (tuned / "model.onnx").is_file()


@pytest.mark.parametrize("kind", ["uneven", "zeros"])
@pytest.mark.parametrize("family", DECODERS)
def test_grouped_query_generate_with_cache_matches_masked(family, kind):
    model = make_tiny(family, FAMILY_CLASSES[family]["causal-lm"], seed=3)
    plan = plan_for(model, seed=7, kind=kind)
    prompt = {"input_ids": torch.tensor([[5, 9, 14, 2], [8, 3, 21, 40]]), "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    options = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True)
    with torch.no_grad():
        with apply_masks(model, plan):
            expected = model.generate(**prompt, **options)
        dense = model.generate(**prompt, **options)
        pruned = prune_model(copy.deepcopy(model), plan)
        got = pruned.generate(**prompt, **options)
    assert torch.equal(got, expected)
    assert not torch.equal(dense, expected)  # the plan changes what is generated


def test_grouped_query_unit_is_a_key_value_group():
    """A Llama plan's "heads" are key/value groups: keeping group 1 keeps key/value head 1 and its
    query heads 2 and 3 (2 query heads per group), with their exact weights."""
    from ppkit.plan import LayerPlan, PruningPlan

    model = make_tiny("llama", "LlamaModel")
    shape = get_adapter(model).shape()
    assert (shape.num_heads, shape.head_dim, shape.kv_dim, shape.ffn_projections) == (2, 16, 8, 3)
    attention = model.layers[0].self_attn
    q, k, o = attention.q_proj.weight.clone(), attention.k_proj.weight.clone(), attention.o_proj.weight.clone()
    plan = PruningPlan([LayerPlan((1,), tuple(range(64)))] + [LayerPlan((0, 1), tuple(range(64)))] * 2, 2, 64)
    prune_model(model, plan)
    attention = model.layers[0].self_attn
    assert torch.equal(attention.q_proj.weight, q[16:32]) and torch.equal(attention.k_proj.weight, k[8:16])
    assert torch.equal(attention.o_proj.weight, o[:, 16:32])


def test_decoders_refuse_output_reconstruction_clearly(tiny_sources, tmp_path, capsys):
    source, task = tiny_sources["llama"]
    out = tmp_path / "out"
    result = run_cli(["prune", source, *task, "--flops", "0.6", "--samples", "16", "--compensate", "lstsq", "--out", out,
                      "--quiet", "--no-plot"], capsys)
    assert result.code == 2 and "llama projections have no output bias" in result.err, result.text
    assert not out.exists()
