"""Benchmark report: fields and arithmetic, interleaved timing, baseline checks, device errors, quality."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_gpt2, plan_for

from ppkit.bench import LatencyStats, benchmark, evaluate_quality, render_table, time_interleaved
from ppkit.errors import InputError
from ppkit.flops import model_flops
from ppkit.surgery import prune_model

FAST = dict(batch_sizes=(1, 2), seq_len=16, repeats=3, warmup=1)


def saved_pair(tmp_path):
    """A dense tiny BERT directory and a pruned copy saved with ppkit (uneven, zero-head layers)."""
    from ppkit.saving import save_pruned

    dense = make_tiny_bert()
    dense.save_pretrained(tmp_path / "dense")
    pruned = prune_model(make_tiny_bert(), plan_for(dense, seed=4, kind="zeros"))
    save_pruned(pruned, tmp_path / "pruned")
    return tmp_path / "dense", tmp_path / "pruned", pruned


def test_bench_json_fields_and_arithmetic(tmp_path):
    dense_dir, pruned_dir, pruned = saved_pair(tmp_path)
    out = tmp_path / "bench.json"

    report = benchmark([pruned_dir], baseline=dense_dir, backend="both", json_out=out, plot=tmp_path / "b.png", **FAST)

    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report.to_dict()))
    assert data["format"] == "ppkit-bench"
    settings = data["settings"]
    assert settings["batch_sizes"] == [1, 2] and settings["seq_len"] == 16 and settings["backends"] == ["ort", "torch"]
    assert settings["baseline"] == "dense" and settings["ort_threads"] >= 1
    for key in ("cpu", "cores_available", "torch", "onnxruntime", "transformers", "ppkit"):
        assert key in data["machine"]
    base, model = data["models"]
    assert (base["role"], model["role"]) == ("baseline", "model")
    assert model["name"] == "pruned" and model["family"] == "bert"
    # FLOPs and parameters come from the real pruned shape
    expected = model_flops(pruned, 16)
    assert model["flops"]["ratio"] == pytest.approx(expected.ratio)
    assert model["flops"]["ratio_vs_baseline"] == pytest.approx(expected.ratio)
    assert base["flops"]["ratio"] == 1.0
    assert model["params"] == sum(p.numel() for p in pruned.parameters())
    assert model["params_ratio"] == pytest.approx(model["params"] / base["params"]) and model["params_ratio"] < 1
    assert model["heads_per_layer"] == list(pruned.config.ppkit_heads_per_layer)
    assert model["export"]["max_abs_diff"] <= 1e-4
    for entry in (base, model):
        rows = entry["latency"]
        assert [(r["backend"], r["batch_size"]) for r in rows] == [("ort", 1), ("ort", 2), ("torch", 1), ("torch", 2)]
        for r in rows:
            assert r["repeats"] == 3 and r["seq_len"] == 16
            assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"]
            assert r["throughput"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"])
    for rb, rm in zip(base["latency"], model["latency"]):
        assert rb["speedup"] == 1.0
        assert rm["speedup"] == pytest.approx(rb["p50_ms"] / rm["p50_ms"])
    assert model["quality"] is None and settings["task"] is None
    assert (tmp_path / "b.png").stat().st_size > 1000

    table = render_table(report)
    assert table.row_count == 2 * 4


def test_baseline_of_other_architecture_or_vocabulary_is_rejected():
    bert, gpt2 = make_tiny_bert(), make_tiny_gpt2()
    with pytest.raises(InputError, match="same architecture"):
        benchmark([gpt2], baseline=bert, **FAST)
    with pytest.raises(InputError, match="vocabulary 120 but .* 200"):
        benchmark([make_tiny_bert(vocab_size=200)], baseline=bert, **FAST)


def test_cuda_without_onnxruntime_gpu_is_a_clear_error(monkeypatch):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(InputError, match="onnxruntime-gpu"):
        benchmark([make_tiny_bert()], device="cuda", backend="ort", **FAST)


def test_bad_arguments_are_input_errors():
    model = make_tiny_bert()
    with pytest.raises(InputError, match="backend"):
        benchmark([model], backend="tensorrt", **FAST)
    with pytest.raises(InputError, match="batch sizes"):
        benchmark([model], batch_sizes=(0,), seq_len=16)
    with pytest.raises(InputError, match="positions"):
        benchmark([model], batch_sizes=(1,), seq_len=65)  # tiny BERT has 64 positions
    with pytest.raises(InputError, match="sequence-classification"):
        benchmark([model], task="sst2", tokenizer=object(), **FAST)  # a BertModel has no classifier


def test_unwritable_outputs_fail_before_any_timing(tmp_path, monkeypatch):
    """From Python too: a json_out / plot that cannot be written is refused before models load."""
    from ppkit import bench
    from ppkit.errors import OutputError

    monkeypatch.setattr(bench, "_load", lambda *a, **k: pytest.fail("models were loaded before the output check"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a directory"):
        benchmark([make_tiny_bert()], json_out=tmp_path, **FAST)
    with pytest.raises(OutputError, match="is a file, not a directory"):
        benchmark([make_tiny_bert()], plot=blocker / "plot.png", **FAST)


def test_interleaved_timing_rotates_and_counts_calls():
    calls: list[str] = []
    runners = [lambda n=n: calls.append(n) for n in "abc"]
    times = time_interleaved(runners, repeats=3, warmup=2)
    assert [len(t) for t in times] == [3, 3, 3]
    assert calls[:6] == list("aabbcc")  # warm-up first
    assert calls[6:] == list("abc" "bca" "cab")  # every model leads one round


def test_latency_stats():
    s = LatencyStats.from_times("ort", 8, 128, [0.010, 0.020, 0.030, 0.040])
    assert s.p50_ms == pytest.approx(25.0) and s.mean_ms == pytest.approx(25.0) and s.min_ms == pytest.approx(10.0)
    assert s.p90_ms == pytest.approx(37.0)
    assert s.throughput == pytest.approx(8 / 0.025)


@pytest.mark.slow
def test_quality_sst2_matches_a_direct_evaluation(shared_data, minilm_path):
    from ppkit.models import load_tokenizer

    tok = load_tokenizer(minilm_path)
    model = make_tiny_bert("BertForSequenceClassification", vocab_size=tok.vocab_size, max_position_embeddings=128)
    data = shared_data / "glue" / "SST-2"

    q = evaluate_quality(model, tok, "sst2", data=data, limit=24)

    with open(data / "dev.tsv", encoding="utf-8") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:25]
    correct = 0
    with torch.no_grad():
        for sentence, label in rows:
            logits = model(**tok(sentence, return_tensors="pt")).logits
            correct += int(logits.argmax(-1).item() == int(label))
    assert q["examples"] == 24
    assert q["accuracy"] == pytest.approx(correct / 24)


@pytest.mark.slow
def test_quality_perplexity_of_random_gpt2_is_near_vocabulary_size(shared_data):
    from ppkit.models import load_tokenizer

    tok = load_tokenizer(shared_data / "tokenizers" / "gpt2")
    model = make_tiny_gpt2(vocab_size=len(tok))
    report = benchmark([model], task="ptb", data=shared_data / "lm" / "ptb", tokenizer=tok, eval_limit=2,
                       batch_sizes=(1,), seq_len=16, repeats=2, warmup=0, backend="torch")
    q = report.models[0].quality
    # a randomly initialised LM is close to uniform over its vocabulary
    assert len(tok) / 2 < q["perplexity"] < len(tok) * 2
    assert q["loss"] == pytest.approx(math.log(q["perplexity"]))
    assert q["tokens"] == 64 + 32  # two windows of the 64-position model, stride 32
    assert report.settings["main_metric"] == "perplexity"


@pytest.mark.slow
def test_quality_squad_reports_exact_match_and_f1(shared_data, minilm_path):
    from ppkit.models import load_tokenizer

    tok = load_tokenizer(minilm_path)
    model = make_tiny_bert("BertForQuestionAnswering", vocab_size=tok.vocab_size, max_position_embeddings=384)
    q = evaluate_quality(model, tok, "squad", data=shared_data / "squad", limit=6, max_length=256)
    assert q["examples"] == 6
    assert set(q) >= {"exact_match", "f1"}
    assert 0.0 <= q["exact_match"] <= q["f1"] <= 100.0  # token F1 is never below exact match


def test_bench_labels_model_states_and_warns_about_an_untrained_baseline_head(tmp_path, shared_data, minilm_path):
    from ppkit.bench import benchmark, render_table
    from ppkit.models import load_tokenizer

    tok = load_tokenizer(minilm_path)
    dense, tuned = tmp_path / "dense", tmp_path / "tuned"
    make_tiny_bert("BertModel", vocab_size=tok.vocab_size, max_position_embeddings=128).save_pretrained(dense)
    make_tiny_bert("BertForSequenceClassification", vocab_size=tok.vocab_size,
                   max_position_embeddings=128).save_pretrained(tuned)
    for folder in (dense, tuned):
        tok.save_pretrained(folder)

    with pytest.warns(UserWarning, match="baseline dense has an untrained sst2 head, so its quality is chance level"):
        report = benchmark([tuned], baseline=dense, task="sst2", data=shared_data / "glue" / "SST-2", eval_limit=8,
                           batch_sizes=[1], seq_len=16, repeats=1, warmup=0, backend="torch",
                           plot=tmp_path / "bench.png")
    assert [(m.name, m.state) for m in report.models] == [("dense", "untrained head"), ("tuned", "fine-tuned")]
    assert len(report.settings["notes"]) == 1 and (tmp_path / "bench.png").is_file()
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(render_table(report))
    text = console.export_text()
    assert "dense (baseline) · untrained head" in text and "tuned · fine-tuned" in text


def test_bench_prints_the_flops_ratio_prune_reported_beside_its_own(tmp_path, shared_data, minilm_path):
    """prune counts FLOPs at the mean calibration length, bench at its --seq-len: both are shown, labelled."""
    import ppkit
    from ppkit.bench import benchmark, render_table
    from ppkit.models import load_tokenizer

    tok = load_tokenizer(minilm_path)
    model = make_tiny_bert("BertModel", vocab_size=tok.vocab_size, max_position_embeddings=128)
    result = ppkit.prune(model, tokenizer=tok, task="sst2", data=shared_data / "glue" / "SST-2", flops=0.6, samples=16,
                         out=tmp_path / "pruned", plot=False, progress=False)
    report = benchmark([tmp_path / "pruned"], batch_sizes=[1], seq_len=64, repeats=1, warmup=0, backend="torch")

    flops = report.models[0].flops
    assert flops["at_prune"] == {"ratio": pytest.approx(result.report["flops_ratio"]),
                                 "seq_len": pytest.approx(result.report["flops_seq_len"])}
    assert flops["seq_len"] == 64 and flops["ratio"] != pytest.approx(result.report["flops_ratio"], abs=1e-4)
    from rich.console import Console

    console = Console(record=True, width=250)
    console.print(render_table(report))
    text = console.export_text()
    assert "FLOPs @64" in text
    assert f"({result.report['flops_ratio']:.1%} @{result.report['flops_seq_len']:.0f} in prune)" in text


def test_bench_times_int8_and_fp16_variants_in_the_same_rounds_and_scores_them_in_onnxruntime(tmp_path, shared_data, minilm_path):
    from ppkit.bench import benchmark, evaluate_quality
    from ppkit.models import load_model, load_tokenizer

    tok = load_tokenizer(minilm_path)
    dense, tuned = tmp_path / "dense", tmp_path / "tuned"
    for folder, seed in ((dense, 0), (tuned, 1)):
        make_tiny_bert("BertForSequenceClassification", seed=seed, vocab_size=tok.vocab_size,
                       max_position_embeddings=128).save_pretrained(folder)
        tok.save_pretrained(folder)
    sst2 = shared_data / "glue" / "SST-2"
    report = benchmark([tuned], baseline=dense, task="sst2", data=sst2, eval_limit=32, batch_sizes=[1, 4], seq_len=16,
                       repeats=2, warmup=0, int8=True, fp16=True, plot=tmp_path / "b.png")

    assert [(m.name, m.precision, m.role) for m in report.models] == [
        ("dense", "fp32", "baseline"), ("dense · int8", "int8", "model"), ("dense · fp16", "fp16", "model"),
        ("tuned", "fp32", "model"), ("tuned · int8", "int8", "model"), ("tuned · fp16", "fp16", "model")]
    assert all(len(m.latency) == 2 and m.latency[0].speedup for m in report.models)
    assert report.models[1].export["quantization"]["min_cosine"] >= 0.9
    assert report.models[2].export["quantization"]["min_cosine"] >= 0.999
    # int8 / fp16 quality comes from onnxruntime and stays near the fp32 model's (same 32 dev sentences)
    fp32 = evaluate_quality(load_model(tuned, head="sequence-classification"), tok, "sst2", data=sst2, limit=32)
    assert report.models[3].quality["accuracy"] == pytest.approx(fp32["accuracy"])
    assert abs(report.models[4].quality["accuracy"] - fp32["accuracy"]) <= 0.1
    assert abs(report.models[5].quality["accuracy"] - fp32["accuracy"]) <= 1 / 32
    assert any("fp16 variants on CPU" in note for note in report.settings["notes"])
    assert (tmp_path / "b.png").is_file() and (tmp_path / "b-pareto.png").is_file()
    with pytest.raises(InputError, match="int8 variants run in onnxruntime"):
        benchmark([tuned], backend="torch", int8=True, batch_sizes=[1], seq_len=8, repeats=1)
    with pytest.raises(InputError, match="fp16 variants run in one backend"):
        benchmark([tuned], backend="both", fp16=True, batch_sizes=[1], seq_len=8, repeats=1)


def test_bench_torch_fp16_variant_runs_a_half_copy_and_scores_it_in_torch(tmp_path, shared_data, minilm_path):
    """--backend torch --fp16 (torch CUDA without onnxruntime-gpu): each model's variant is a .half() copy
    of it, pruned uneven heads included; the fp32 model stays fp32 and the half copy's SST-2 predictions
    match it (same 32 dev sentences)."""
    from ppkit.models import load_tokenizer

    tok = load_tokenizer(minilm_path)
    dense = make_tiny_bert("BertForSequenceClassification", seed=0, vocab_size=tok.vocab_size, max_position_embeddings=128)
    pruned = prune_model(make_tiny_bert("BertForSequenceClassification", seed=0, vocab_size=tok.vocab_size,
                                        max_position_embeddings=128), plan_for(dense, seed=4, kind="zeros"))
    report = benchmark([pruned], baseline=dense, names=["pruned"], baseline_name="dense", tokenizer=tok, task="sst2",
                       data=shared_data / "glue" / "SST-2", eval_limit=32, backend="torch", fp16=True,
                       batch_sizes=[2], seq_len=16, repeats=2, warmup=0)

    assert [(m.name, m.precision) for m in report.models] == [
        ("dense", "fp32"), ("dense · fp16", "fp16"), ("pruned", "fp32"), ("pruned · fp16", "fp16")]
    assert all(m.latency[0].backend == "torch" and m.latency[0].speedup for m in report.models)
    assert next(pruned.parameters()).dtype == torch.float32 and next(dense.parameters()).dtype == torch.float32
    assert report.models[3].params == report.models[2].params < report.models[0].params
    for fp32, half in ((report.models[0], report.models[1]), (report.models[2], report.models[3])):
        assert abs(half.quality["accuracy"] - fp32.quality["accuracy"]) <= 1 / 32
    assert any("torch has few fast half-precision CPU kernels" in note for note in report.settings["notes"])
    from ppkit.bench import _Loaded, _variant

    entry = _Loaded("pruned", "in memory", pruned)
    half = _variant(entry, "fp16", "torch").model
    assert half is not pruned and {p.dtype for p in half.parameters()} == {torch.float16}
    assert _variant(entry, "fp16", "ort").model is pruned  # onnxruntime converts at export
