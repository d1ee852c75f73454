"""A pruned GPT-2 is still a language model: it keeps its LM head and generation config, `generate`s
after reloading, and its ONNX export returns logits."""

from __future__ import annotations

import json

import torch
from conftest import SHARED, make_tiny_gpt2

import ppkit


def test_pruned_gpt2_keeps_its_lm_head_and_generation_config(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")
    source = tmp_path / "gpt2"
    make_tiny_gpt2("GPT2LMHeadModel", vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.eos_token_id).save_pretrained(source)
    tok.save_pretrained(source)
    assert (source / "generation_config.json").is_file()

    out = tmp_path / "pruned"
    result = ppkit.prune(source, task="ptb", data=SHARED / "lm" / "ptb", flops=0.5, samples=8, max_length=32, out=out,
                         plot=False, progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert (out / "generation_config.json").is_file()
    reloaded = ppkit.load_pruned(out)
    assert type(reloaded).__name__ == "PpkitGPT2LMHeadModel"
    prompt = tok("The market", return_tensors="pt")
    with torch.no_grad():
        expected = result.model.generate(**prompt, max_new_tokens=6, do_sample=False)
        got = reloaded.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert got.shape[1] == prompt["input_ids"].shape[1] + 6 and torch.equal(got, expected)

    report = ppkit.export_onnx(out)
    assert report.outputs == ["logits"] and report.head == "causal-lm" and report.max_abs_diff <= 1e-4
