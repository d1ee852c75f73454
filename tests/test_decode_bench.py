"""`ppkit bench --decode`: greedy-decode throughput of dense and pruned causal LMs, torch and onnxruntime."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_bert, make_tiny_gpt2, plan_for

from ppkit.decode_bench import decode_throughput
from ppkit.errors import InputError
from ppkit.saving import save_pruned
from ppkit.surgery import prune_model


def test_cli_times_dense_and_pruned_in_both_backends(tmp_path, capsys):
    from cli_support import run_cli

    dense = make_tiny_gpt2("GPT2LMHeadModel")
    dense.save_pretrained(tmp_path / "dense")
    plan = plan_for(dense, seed=3, kind="zeros")
    save_pruned(prune_model(make_tiny_gpt2("GPT2LMHeadModel"), plan), tmp_path / "pruned", plan=plan)
    r = run_cli(["bench", tmp_path / "pruned", "--baseline", tmp_path / "dense", "--decode", "--backend", "both",
                 "--seq-len", "8", "--new-tokens", "5", "--batch-sizes", "1,2", "--repeats", "2", "--json",
                 "--json-out", tmp_path / "decode.json"], capsys)
    assert r.code == 0, r.text
    report = json.loads(r.out)
    assert report == json.loads((tmp_path / "decode.json").read_text(encoding="utf-8"))
    rows = {(x["model"], x["backend"], x["batch"]): x for x in report["results"]}
    assert set(rows) == {(m, b, n) for m in ("dense", "pruned") for b in ("torch", "ort") for n in (1, 2)}
    for (model, backend, batch), row in rows.items():
        assert row["tokens_per_s"] == pytest.approx(batch * 5 / row["seconds"])
        base = rows[("dense", backend, batch)]
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / base["tokens_per_s"])
    assert rows[("pruned", "ort", 1)]["params"] < rows[("dense", "ort", 1)]["params"]
    assert "tokens/s" in r.err


def test_encoders_and_too_long_runs_are_clear_errors():
    with pytest.raises(InputError, match="causal LMs"):
        decode_throughput([("bert", make_tiny_bert("BertForMaskedLM"))], prompt_len=4, new_tokens=2)
    gpt2 = make_tiny_gpt2("GPT2LMHeadModel")
    with pytest.raises(InputError, match="positions"):
        decode_throughput([("gpt2", gpt2)], prompt_len=gpt2.config.n_positions, new_tokens=2)
