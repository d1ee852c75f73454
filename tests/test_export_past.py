"""GPT-2 with its KV cache in ONNX (`ppkit export --with-past`): onnxruntime decodes what torch generates."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_tiny_bert, make_tiny_gpt2, plan_for

from ppkit.adapters import get_adapter
from ppkit.errors import InputError, OutputError
from ppkit.export_past import export_with_past, greedy_decode
from ppkit.saving import save_pruned
from ppkit.surgery import prune_model


def pruned_lm(kind: str = "zeros", seed: int = 3):
    model = make_tiny_gpt2("GPT2LMHeadModel")
    plan = plan_for(model, seed=seed, kind=kind)
    return prune_model(model, plan).eval(), plan


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("kind", ["zeros", "uneven"])
def test_greedy_decoding_in_onnxruntime_equals_torch_generate(tmp_path, kind):
    """32 greedy steps from the cache, uneven heads per layer and (``zeros``) layers with no heads."""
    model, _ = pruned_lm(kind)
    heads = get_adapter(model).shape().heads_per_layer
    if kind == "zeros":
        assert 0 in heads and any(heads)
    report = export_with_past(model, tmp_path / "lm.onnx")
    assert report.cache_heads == list(heads) and report.max_abs_diff <= 1e-4
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(greedy_decode(session(report.path), ids.numpy(), 32), expected.numpy())


def test_left_padded_batch_decodes_like_torch(tmp_path):
    """Position ids follow the attention mask, as transformers' generate computes them."""
    model, _ = pruned_lm()
    report = export_with_past(model, tmp_path / "lm.onnx")
    ids = torch.randint(1, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # the second prompt is 3 tokens shorter, padded on the left
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    got = greedy_decode(session(report.path), ids.numpy(), 16, attention_mask=mask.numpy())
    np.testing.assert_array_equal(got, expected.numpy())


def test_cli_exports_a_saved_pruned_directory_and_refuses_to_overwrite(tmp_path, capsys):
    from cli_support import run_cli

    model, plan = pruned_lm("uneven", seed=5)
    folder = save_pruned(model, tmp_path / "gpt2-pruned", plan=plan)
    r = run_cli(["export", str(folder), "--with-past", "--json"], capsys)
    assert r.code == 0, r.text
    info = json.loads(r.out)
    assert info["path"] == str(folder / "model-with-past.onnx") and info["max_abs_diff"] <= 1e-4
    names = [i.name for i in session(folder / "model-with-past.onnx").get_inputs()]
    assert names[:4] == ["input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.0.value"]
    again = run_cli(["export", str(folder), "--with-past"], capsys)
    assert again.code != 0 and "--overwrite" in again.text


def test_encoder_and_existing_file_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="causal LM"):
        export_with_past(make_tiny_bert("BertModel"), tmp_path / "bert.onnx")
    model, _ = pruned_lm()
    (tmp_path / "lm.onnx").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists"):
        export_with_past(model, tmp_path / "lm.onnx")
    assert (tmp_path / "lm.onnx").read_bytes() == b"keep me"


@pytest.mark.parametrize("kind", ["zeros", "uneven"])
@pytest.mark.parametrize("family,cls_name", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_grouped_query_decoders_decode_in_onnxruntime_like_torch(tmp_path, family, cls_name, kind):
    """Llama-style decoders cache one key/value head per kept group; left padding included."""
    from conftest import make_tiny

    model = make_tiny(family, cls_name, seed=2)
    plan = plan_for(model, seed=5, kind=kind)
    prune_model(model, plan)
    report = export_with_past(model, tmp_path / "lm.onnx")
    assert report.cache_heads == plan.heads_per_layer and report.max_abs_diff <= 1e-4
    ids = torch.randint(1, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    model.generation_config.eos_token_id = None  # plain greedy: no stopping, no end-of-sequence suppression
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    got = greedy_decode(session(report.path), ids.numpy(), 24, attention_mask=mask.numpy())
    np.testing.assert_array_equal(got, expected.numpy())
