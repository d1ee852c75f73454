"""Bad input through the real CLI: exit code 2, one clear line, no traceback, nothing written.

Every case runs :func:`ppkit.cli.app.main` (the console-script function) in-process, so parsing,
error formatting and exit codes are the real ones; a few run ``python -m ppkit.cli.app`` in a
separate process to prove what a user's terminal shows. Models are tiny random BERT / GPT-2 / T5
directories (with the real MiniLM tokenizer where text is tokenized); data is 48 SST-2 rows.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from cli_support import (
    Workspace,
    assert_usage_error,
    assert_user_error,
    build_workspace,
    copy_tree,
    leftovers,
    run_cli,
    run_cli_subprocess,
    tree_digest,
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return build_workspace(tmp_path_factory.mktemp("cli-errors"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # Deterministic everywhere: a hub name must fail as it does without network, even where there is one.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def prune_args(ws: Workspace, out: Path, *, drop: tuple[str, ...] = (), **over) -> list:
    """``ppkit prune`` on the tiny BERT with the small SST-2 file; ``over`` replaces options (``model=``)."""
    opts = {"--task": "sst2", "--data": ws.data, "--flops": "0.5", "--strategy": "random", "--samples": "16",
            "--out": out}
    model = over.pop("model", ws.bert)
    for key, value in over.items():
        opts["--" + key.replace("_", "-")] = value
    args: list = ["prune", model]
    for key, value in opts.items():
        if key not in drop:
            args += [key, value]
    return args + ["--quiet", "--no-plot"]


def write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------- model


def test_model_path_missing(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, model=tmp_path / "no-such-model"), capsys)
    assert_user_error(r, f"model path not found: {tmp_path / 'no-such-model'}", out)


def test_model_dir_is_not_a_model(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, model=ws.not_model), capsys)
    assert_user_error(r, f"{ws.not_model} is not a model directory (no config.json)", out)


def test_model_path_is_a_file(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, model=ws.data), capsys)
    assert_user_error(r, "is a file, not a model directory", out)


def test_unsupported_architecture(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, model=ws.t5), capsys)
    line = assert_user_error(r, "is a 't5' model, which ppkit does not support; supported model types: ", out)
    from ppkit.adapters import FAMILIES

    assert line.endswith("supported model types: " + ", ".join(FAMILIES)) and "bert, " in line and "llama" in line


@pytest.mark.parametrize("damage, fragment", [
    ("config-not-json", "/model/config.json: Expecting property name enclosed in double quotes: line 1 column 2"),
    ("config-no-type", 'config.json has no "model_type", so it is not a transformers model configuration'),
    ("truncated-weights", "(the weights file is damaged or truncated: copy or re-create the model directory)"),
    ("no-weights", "has no model weights (expected model.safetensors)"),
])
def test_damaged_model_dir(ws, tmp_path, capsys, damage, fragment):
    model = copy_tree(ws.bert, tmp_path / "model")
    if damage == "config-not-json":
        (model / "config.json").write_text("{oops", encoding="utf-8")
    elif damage == "config-no-type":
        config = json.loads((model / "config.json").read_text())
        del config["model_type"]
        (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    elif damage == "truncated-weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        (model / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert_user_error(run_cli(prune_args(ws, out, model=model), capsys), fragment, out)


def test_hub_name_offline_says_pass_a_local_path(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, model="bert-base-uncased"), capsys)
    assert_user_error(r, "'bert-base-uncased' is not a local directory and could not be downloaded (offline?): "
                         "pass a local path to a model directory", out)


def test_pickled_weights_refused_without_allow_pickle(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, model=ws.pickled), capsys)
    line = assert_user_error(r, "has only pickled weights (pytorch_model.bin); loading pickle can run arbitrary code", out)
    assert "--allow-pickle" in line and "safetensors" in line


def test_pickled_weights_accepted_with_allow_pickle(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, model=ws.pickled) + ["--allow-pickle"], capsys)
    assert r.code == 0, r.text
    assert (out / "model.safetensors").is_file() and (out / "plan.json").is_file()
    assert not list(out.glob("*.bin")), "the pruned output must never be pickle"
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------- task, strategy


def test_unknown_task(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, task="sst3"), capsys)
    assert_user_error(r, "unknown task 'sst3': choose one of cola, sst2, mrpc", out)


def test_unknown_strategy_lists_available(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, strategy="magic"), capsys)
    assert_user_error(r, "unknown strategy 'magic'; available strategies: dual-cp, fisher, kcm, random, worst", out)


@pytest.mark.parametrize("pair, fragment", [
    ("oops", "--option expects KEY=VALUE, got 'oops'"),
    ("=1", "--option expects KEY=VALUE, got '=1'"),
    ("rebalnce=false", "strategy 'random' has no option 'rebalnce'; its options: rebalance"),
])
def test_bad_strategy_option(ws, tmp_path, capsys, pair, fragment):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out) + ["--option", pair], capsys)
    assert_user_error(r, fragment, out)


def test_strategy_option_reaches_the_strategy_and_is_listed(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out) + ["--option", "rebalance=false", "--json"], capsys)
    assert r.code == 0, r.text
    assert json.loads(r.out)["options"]["rebalance"] == "false"
    listed = {s["name"]: s["options"] for s in json.loads(run_cli(["strategies", "--json"], capsys).out)}
    assert "rearrange_steps" in listed["fisher"] and "rebalance" in listed["random"]


# ---------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize("value, fragment", [
    ("0", "--flops must be in (0, 1] (the fraction of FLOPs to keep), got 0"),
    ("-0.5", "--flops must be in (0, 1] (the fraction of FLOPs to keep), got -0.5"),
    ("1.5", "--flops must be in (0, 1] (the fraction of FLOPs to keep), got 1.5"),
    ("abc", "--flops must be a number in (0, 1] (the fraction of FLOPs to keep), got 'abc'"),
    ("nan", "--flops must be in (0, 1] (the fraction of FLOPs to keep), got nan"),
    ("inf", "--flops must be in (0, 1] (the fraction of FLOPs to keep), got inf"),
])
def test_bad_flops(ws, tmp_path, capsys, value, fragment):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, flops=value), capsys)
    assert_user_error(r, fragment, out)


@pytest.mark.parametrize("strategy", ["random", "dual-cp"])
def test_unreachable_budget_states_smallest_ratio_which_then_works(ws, tmp_path, capsys, strategy):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, flops="0.01", strategy=strategy), capsys)
    line = assert_user_error(r, "a FLOPs budget of 0.01 cannot be reached: every layer keeps at least 1 head(s) "
                                "and 1 neuron(s), so the smallest reachable ratio is ", out)
    assert f"strategy '{strategy}'" in line and "pass a larger --flops" in line
    smallest = float(re.search(r"smallest reachable ratio is ([0-9.]+)", line).group(1))
    assert 0.01 < smallest < 0.5
    if strategy == "random":  # the ratio the message names is indeed reachable (same data, same seed)
        r = run_cli(prune_args(ws, out, flops=f"{smallest + 1e-4:.4f}", strategy=strategy), capsys)
        assert r.code == 0, r.text
        report = json.loads((out / "report.json").read_text())
        assert report["flops_ratio"] <= smallest + 1e-4


# --------------------------------------------------------------------------------------- samples, tokens


@pytest.mark.parametrize("value, fragment", [
    ("0", "--samples must be a positive integer, got 0"),
    ("-3", "--samples must be a positive integer, got -3"),
])
def test_bad_samples(ws, tmp_path, capsys, value, fragment):
    out = tmp_path / "out"
    assert_user_error(run_cli(prune_args(ws, out, samples=value), capsys), fragment, out)


def test_samples_not_a_number_is_a_usage_error(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, samples="many"), capsys)
    assert_usage_error(r, "Invalid value for '--samples'", out)


def test_more_samples_than_data_warns_and_uses_all(ws, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="ppkit"):
        r = run_cli(prune_args(ws, out, samples="10000"), capsys)
    assert r.code == 0, r.text
    expected = f"{ws.data} has only 48 rows, fewer than the 10000 requested: using all 48, in order"
    assert expected in caplog.text
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 48 and report["samples_requested"] == 10000
    assert report["warnings"] == [expected]


@pytest.mark.parametrize("value, fragment", [
    ("0", "--tokens must be a positive integer or 'all', got 0"),
    ("abc", "--tokens must be a positive integer or 'all', got 'abc'"),
    ("-5", "--tokens must be a positive integer or 'all', got -5"),
])
def test_bad_tokens(ws, tmp_path, capsys, value, fragment):
    out = tmp_path / "out"
    assert_user_error(run_cli(prune_args(ws, out, tokens=value), capsys), fragment, out)


@pytest.mark.parametrize("value", ["0", "lots"])
def test_bad_compensate_tokens(ws, tmp_path, capsys, value):
    out = tmp_path / "out"
    fragment = f"--compensate-tokens must be a positive integer or 'all', got {value if value == '0' else repr(value)}"
    args = prune_args(ws, out, compensate="lstsq", compensate_tokens=value)
    assert_user_error(run_cli(args, capsys), fragment, out)


@pytest.mark.parametrize("option, value, fragment", [
    ("lambda_", "-1", "--lambda must be a finite number >= 0, got -1.0"),
    ("lambda_", "nan", "--lambda must be a finite number >= 0, got nan"),
    ("lambda_", "inf", "--lambda must be a finite number >= 0, got inf"),
    ("flops_seq_len", "0", "--flops-seq-len must be positive, got 0.0"),
    ("batch_size", "0", "batch size must be a positive integer, got 0"),
])
def test_bad_other_options(ws, tmp_path, capsys, option, value, fragment):
    out = tmp_path / "out"
    args = prune_args(ws, out)
    flag = "--lambda" if option == "lambda_" else "--" + option.replace("_", "-")
    assert_user_error(run_cli(args + [flag, value], capsys), fragment, out)


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("name, content, fragment", [
    ("empty.tsv", b"", "empty.tsv is empty"),
    ("header-only.tsv", b"sentence\tlabel\n", "header-only.tsv has a header but no data rows"),
    ("columns.tsv", b"text\tscore\nnice film\t1\n",
     "columns.tsv: wrong or missing columns for task sst2: expected ('sentence'); found tab-separated columns ['text', 'score']"),
    ("ragged.tsv", b"sentence\tlabel\nnice film\t1\nbad\tfilm\t0\n",
     "ragged.tsv:3: malformed row with 3 fields, expected 2 (sentence, label)"),
    ("broken.jsonl", b'{"sentence": "nice film", "label": 1}\n{"sentence": nice\n',
     "broken.jsonl:2: line is not valid JSON (Expecting value, column 14)"),
    ("broken.json", b'{"sentence": "nice film", "label": ', "broken.json: invalid JSON at line 1"),
    ("latin1.tsv", "sentence\tlabel\ncaf\u00e9 au lait\t1\n".encode("latin-1"),
     "latin1.tsv is not UTF-8 text (byte 0xe9 at line 2); convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"),
    ("sheet.xlsx", b"PK\x03\x04", "sheet.xlsx: unsupported file type .xlsx; use one of .tsv .csv .json .jsonl .txt"),
])
def test_bad_data_file(ws, tmp_path, capsys, name, content, fragment):
    out = tmp_path / "out"
    data = write(tmp_path / name, content)
    assert_user_error(run_cli(prune_args(ws, out, data=data), capsys), fragment, out)


def test_data_of_another_task(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, task="mrpc"), capsys)
    assert_user_error(r, "sst2-small.tsv: wrong or missing columns for task mrpc: expected ('sentence1', 'sentence2') or "
                         "('#1 String', '#2 String'); found tab-separated columns ['sentence', 'label']", out)


def test_task_default_length_beyond_model_positions_is_shortened(ws, tmp_path, capsys, caplog):
    """MRPC's default 128 tokens on a 64-position model: not an error the user caused; a warning."""
    out = tmp_path / "out"
    data = write(tmp_path / "pairs.tsv", "#1 String\t#2 String\nA cat sat .\tA cat was sitting .\n"
                                         "It rains .\tThe sun shines .\n")
    with caplog.at_level(logging.WARNING, logger="ppkit"):
        r = run_cli(prune_args(ws, out, task="mrpc", data=data), capsys)
    assert r.code == 0, r.text
    msg = "task mrpc's default max length 128 is longer than the model's 64 positions: using 64"
    assert msg in caplog.text
    report = json.loads((out / "report.json").read_text())
    assert report["max_length"] == 64 and msg in report["warnings"]


def test_data_path_missing(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, data=tmp_path / "nowhere.tsv"), capsys)
    assert_user_error(r, f"data path {tmp_path / 'nowhere.tsv'} does not exist: pass an existing directory or file with --data", out)


def test_data_dir_without_train_file(ws, tmp_path, capsys):
    out = tmp_path / "out"
    folder = tmp_path / "SST-2"
    folder.mkdir()
    write(folder / "dev.tsv", "sentence\tlabel\nnice\t1\n")
    r = run_cli(prune_args(ws, out, data=folder), capsys)
    assert_user_error(r, f"no train file for task sst2 in {folder}: looked for train.tsv", out)


def test_hub_data_offline_says_pass_data(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, drop=("--data",)), capsys)
    line = assert_user_error(r, "could not load glue/sst2 (split train) from the Hugging Face hub", out)
    assert "If you are offline, pass --data PATH with a local copy" in line


@pytest.mark.parametrize("value, fragment", [
    ("100", "max length 100 is longer than the model's 64 positions; use --max-length 64 or less"),
    ("0", "max length must be a positive integer, got 0"),
])
def test_bad_max_length(ws, tmp_path, capsys, value, fragment):
    out = tmp_path / "out"
    assert_user_error(run_cli(prune_args(ws, out, max_length=value), capsys), fragment, out)


# ---------------------------------------------------------------------------------------------- output


def test_output_exists_is_refused_and_untouched(ws, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "keep.txt", "earlier results\n")
    before = tree_digest(out)
    r = run_cli(prune_args(ws, out), capsys)
    assert_user_error(r, f"output {out} exists; choose another --out or pass --overwrite")
    assert tree_digest(out) == before and leftovers(tmp_path) == []


def test_output_exists_with_overwrite_is_replaced(ws, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "keep.txt", "earlier results\n")
    r = run_cli(prune_args(ws, out) + ["--overwrite"], capsys)
    assert r.code == 0, r.text
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_output_under_a_file(ws, tmp_path, capsys):
    blocker = write(tmp_path / "results", "a file, not a folder\n")
    out = blocker / "sub"
    r = run_cli(prune_args(ws, out), capsys)
    assert_user_error(r, f"cannot create {out}: {blocker} is a file, not a directory; choose another --out")
    assert blocker.read_text() == "a file, not a folder\n" and leftovers(tmp_path) == []


def test_output_is_an_existing_file_even_with_overwrite(ws, tmp_path, capsys):
    out = write(tmp_path / "out", "precious\n")
    r = run_cli(prune_args(ws, out) + ["--overwrite"], capsys)
    assert_user_error(r, f"output {out} exists and is not a directory")
    assert out.read_text() == "precious\n" and leftovers(tmp_path) == []


def test_output_parent_not_writable(ws, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root ignores permission bits: make os.access answer as for a normal user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real(p, mode, **kw))
    out = parent / "out"
    try:
        r = run_cli(prune_args(ws, out), capsys)
        assert_user_error(r, f"cannot write to {parent} (permission denied): choose a writable --out", out)
    finally:
        parent.chmod(0o755)


# ----------------------------------------------------------------------------- saved plans, load_pruned


def _edit_plan(ws: Workspace, tmp_path: Path, edit) -> Path:
    target = copy_tree(ws.pruned, tmp_path / "edited")
    plan = json.loads((target / "plan.json").read_text())
    text = edit(plan)
    (target / "plan.json").write_text(text if isinstance(text, str) else json.dumps(plan), encoding="utf-8")
    return target


def _set_layer0_heads(plan, heads):
    plan["layers"][0]["heads"] = heads


@pytest.mark.parametrize("edit, fragment", [
    (lambda p: _set_layer0_heads(p, [0, 1, 7]), "is not a valid pruning plan: layer 0 heads: index 7 is out of range 0..3"),
    (lambda p: _set_layer0_heads(p, [2, 1]), "layer 0 heads: indices must be sorted and unique (got 1 after 2)"),
    (lambda p: p.__setitem__("layers", p["layers"][:1]), "does not fit the saved model: plan has 1 layers but the model has 3"),
    (lambda p: p.__setitem__("num_heads", 6), "does not fit the saved model: plan is for 6 heads per layer but the model has 4"),
    (lambda p: p["layers"][1].__setitem__("neurons", [0]), "does not match the saved weights: it keeps"),
    (lambda p: "{\"format\": \"ppkit-plan\", \"layers\": [", "is not a valid pruning plan: plan is not valid JSON"),
    (lambda p: p.__delitem__("format"), "is not a valid pruning plan: not a ppkit plan"),
])
def test_hand_edited_plan_is_a_plan_error(ws, tmp_path, edit, fragment):
    import ppkit
    from ppkit.errors import PlanError

    target = _edit_plan(ws, tmp_path, edit)
    with pytest.raises(PlanError) as info:
        ppkit.load_pruned(target)
    assert fragment in str(info.value) and str(target / "plan.json") in str(info.value)
    assert "restore the file or delete it" in str(info.value)


def test_export_of_edited_plan_is_one_line(ws, tmp_path, capsys):
    target = _edit_plan(ws, tmp_path, lambda p: _set_layer0_heads(p, [0, 9]))
    r = run_cli(["export", target, "--onnx"], capsys)
    assert_user_error(r, "layer 0 heads: index 9 is out of range 0..3")
    assert not (target / "model.onnx").exists() and leftovers(target) == []


def test_load_pruned_on_a_dense_model_dir(ws):
    import ppkit
    from ppkit.errors import ModelLoadError, PlanError

    with pytest.raises(PlanError, match=r"is not a ppkit-pruned model \(config.json has no ppkit_heads_per_layer\); use load_model"):
        ppkit.load_pruned(ws.bert)
    with pytest.raises(ModelLoadError, match=r"is not a model directory \(no config.json\)"):
        ppkit.load_pruned(ws.not_model)
    with pytest.raises(ModelLoadError, match=r"pruned model directory not found"):
        ppkit.load_pruned(ws.root / "missing")


# ---------------------------------------------------------------------------------------- export, bench


def test_export_truncated_weights(ws, tmp_path, capsys):
    target = copy_tree(ws.pruned, tmp_path / "damaged")
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = run_cli(["export", target, "--onnx"], capsys)
    assert_user_error(r, f"cannot load the pruned model in {target}: ")
    assert "(the weights file is damaged or truncated: copy or re-create the model directory)" in r.err
    assert not (target / "model.onnx").exists() and leftovers(target) == []


def test_export_refuses_an_existing_file_without_overwrite(ws, tmp_path, capsys):
    target = copy_tree(ws.pruned, tmp_path / "again")
    (target / "model.onnx").write_bytes(b"earlier export")
    r = run_cli(["export", target, "--onnx"], capsys)
    assert_user_error(r, f"{target / 'model.onnx'} exists already; choose another --out or pass --overwrite (overwrite=True)")
    assert (target / "model.onnx").read_bytes() == b"earlier export" and leftovers(target) == []
    assert run_cli(["export", target, "--onnx", "--overwrite"], capsys).code == 0
    assert (target / "model.onnx").read_bytes() != b"earlier export"


def test_export_fp16_writes_its_own_file_and_refuses_with_int8(ws, tmp_path, capsys):
    target = copy_tree(ws.pruned, tmp_path / "half")
    r = run_cli(["export", target, "--onnx", "--dtype", "fp16"], capsys)
    assert r.code == 0 and re.search(r"fp16 vs fp32: min cosine (0\.999|1\.000)", " ".join(r.err.split()))
    assert (target / "model-fp16.onnx").is_file() and not (target / "model.onnx").exists()
    r = run_cli(["export", target, "--onnx", "--dtype", "fp16", "--quantize", "int8"], capsys)
    assert_user_error(r, "--quantize int8 quantizes the fp32 graph: leave out --dtype fp16")
    assert not (target / "model-int8.onnx").exists() and leftovers(target) == []


def test_export_without_onnx(ws, capsys):
    assert_user_error(run_cli(["export", ws.pruned, "--no-onnx"], capsys), "only ONNX export is available: pass --onnx")


def test_bench_baseline_of_another_architecture(ws, tmp_path, capsys):
    json_out = tmp_path / "bench.json"
    r = run_cli(["bench", ws.pruned, "--baseline", ws.gpt2, "--batch-sizes", "1", "--repeats", "1",
                 "--backend", "torch", "--json-out", json_out], capsys)
    assert_user_error(r, f"baseline {ws.gpt2.name} is a gpt2 model but {ws.pruned.name} is bert: compare models of the same architecture")
    assert not json_out.exists()


def test_bench_baseline_of_another_vocabulary(ws, tmp_path, capsys):
    json_out = tmp_path / "bench.json"
    r = run_cli(["bench", ws.pruned, "--baseline", ws.bert_vocab120, "--batch-sizes", "1", "--repeats", "1",
                 "--backend", "torch", "--json-out", json_out], capsys)
    assert_user_error(r, f"baseline {ws.bert_vocab120.name} has vocabulary 120 but {ws.pruned.name} has 30522")
    assert not json_out.exists()


def test_bench_output_file_under_a_file_fails_before_timing(ws, tmp_path, capsys):
    blocker = write(tmp_path / "results", "a file\n")
    r = run_cli(["bench", ws.pruned, "--batch-sizes", "1", "--repeats", "1", "--backend", "torch",
                 "--json-out", blocker / "bench.json"], capsys)
    assert_user_error(r, f"{blocker} is a file, not a directory; choose another --json-out")
    assert "latency" not in r.text.lower()  # refused before any timing


def test_export_bad_opset(ws, capsys):
    r = run_cli(["export", ws.pruned, "--opset", "3"], capsys)
    assert_user_error(r, "--opset must be between 7 and ")
    assert not (ws.pruned / "model.onnx").exists()


def test_export_out_under_a_file(ws, tmp_path, capsys):
    blocker = write(tmp_path / "results", "a file\n")
    r = run_cli(["export", ws.pruned, "--out", blocker / "model.onnx"], capsys)
    assert_user_error(r, f"{blocker} is a file, not a directory; choose another --out")


def test_bench_bad_batch_sizes(ws, capsys):
    r = run_cli(["bench", ws.pruned, "--batch-sizes", "1,x"], capsys)
    assert_user_error(r, "--batch-sizes must be comma-separated positive integers, got '1,x'")


# ----------------------------------------------------------------------------------------- usage errors


def test_unknown_option_is_a_usage_error(ws, tmp_path, capsys):
    out = tmp_path / "out"
    assert_usage_error(run_cli(prune_args(ws, out) + ["--colour"], capsys), "No such option: --colour", out)


def test_bad_choice_is_a_usage_error(ws, tmp_path, capsys):
    out = tmp_path / "out"
    assert_usage_error(run_cli(prune_args(ws, out, linkage="single"), capsys), "Invalid value for '--linkage'", out)


def test_missing_required_option_is_a_usage_error(ws, tmp_path, capsys):
    out = tmp_path / "out"
    assert_usage_error(run_cli(prune_args(ws, out, drop=("--task",)), capsys), "Missing option '--task'", out)


# ---------------------------------------------------------------------------------------------- plugins


@pytest.fixture
def plugin(monkeypatch):
    """Register a one-strategy test plugin in the default registry for one test."""
    from ppkit import registry
    from ppkit.hookspecs import hookimpl
    from ppkit.registry import Strategy

    names = []

    def add(name: str, prune) -> str:
        class Plugin:
            @hookimpl
            def ppkit_strategies(self):
                return [Strategy(name=name, description="test strategy", prune=prune)]

        names.append(registry.register_plugin(Plugin(), name=name, package="ppkit-test-plugins", version="0.0.1"))
        return name

    yield add
    for n in names:
        registry.unregister_plugin(n)


def _keep(ctx, heads, neurons, layers=None):
    from ppkit.plan import LayerPlan, PruningPlan

    n = ctx.shape.num_layers if layers is None else layers
    return PruningPlan([LayerPlan(tuple(heads), tuple(neurons))] * n, ctx.shape.num_heads, ctx.shape.ffn_dim)


def _raise(ctx):
    raise RuntimeError("boom in the plugin")


@pytest.mark.parametrize("prune, fragment", [
    (_raise, "failed: RuntimeError: boom in the plugin"),
    (lambda ctx: None, "returned NoneType, not a PruningPlan"),
    (lambda ctx: _keep(ctx, [0], [0], layers=1), "returned an invalid plan: plan has 1 layers but the model has 3"),
    (lambda ctx: _keep(ctx, [0, 99], [0]), "returned an invalid plan: layer 0 heads: index 99 is out of range 0..3"),
    (lambda ctx: _keep(ctx, [0], [-1, 0]), "returned an invalid plan: layer 0 neurons: index -1 is out of range 0..63"),
    (lambda ctx: _keep(ctx, range(4), range(64)), "returned a plan that keeps 1.000000 of the FLOPs, over the budget 0.500000"),
])
def test_misbehaving_plugin_is_named(ws, tmp_path, capsys, plugin, prune, fragment):
    out = tmp_path / "out"
    name = plugin("ppkit-test-bad", prune)
    r = run_cli(prune_args(ws, out, strategy=name), capsys)
    line = assert_user_error(r, f"strategy 'ppkit-test-bad' (package ppkit-test-plugins 0.0.1) {fragment}", out)
    assert line.startswith("error: strategy 'ppkit-test-bad'")


class _BrokenPluginDist(importlib.metadata.Distribution):
    """An installed-looking distribution whose two ``ppkit`` entry points cannot be imported."""

    FILES = {
        "METADATA": "Metadata-Version: 2.1\nName: ppkit-broken-plugins\nVersion: 6.6.6\n",
        "entry_points.txt": "[ppkit]\nmissing-mod = ppkit_test_no_such_module\nraising-mod = ppkit_test_raising_plugin\n",
    }

    def read_text(self, filename):
        return self.FILES.get(filename)

    def locate_file(self, path):
        return Path(path)


def test_plugin_package_that_fails_to_import_is_skipped_with_a_warning(ws, tmp_path, capsys, monkeypatch):
    from ppkit import registry

    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    write(module_dir / "ppkit_test_raising_plugin.py", "raise RuntimeError('plugin init failed')\n")
    monkeypatch.syspath_prepend(str(module_dir))
    real = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda *a, **k: [*real(*a, **k), _BrokenPluginDist()])
    registry.reset_registry()
    try:
        r = run_cli(["strategies", "--json"], capsys)
        assert r.code == 0, r.text
        assert {"dual-cp", "kcm", "random", "worst"} <= {s["name"] for s in json.loads(r.out)}
        warnings = [line for line in r.err.splitlines() if line.startswith("warning:")]
        assert any("ppkit plugin 'missing-mod' (ppkit_test_no_such_module) from package ppkit-broken-plugins 6.6.6 "
                   "could not be loaded and is skipped: ModuleNotFoundError" in w for w in warnings), r.err
        assert any("ppkit plugin 'raising-mod'" in w and "RuntimeError: plugin init failed" in w for w in warnings), r.err
        assert "Traceback" not in r.text

        registry.reset_registry()  # a prune with a built-in strategy still works
        out = tmp_path / "out"
        r = run_cli(prune_args(ws, out), capsys)
        assert r.code == 0, r.text
        assert "missing-mod" in r.err and (out / "plan.json").is_file()
    finally:
        monkeypatch.setattr(importlib.metadata, "distributions", real)
        sys.modules.pop("ppkit_test_raising_plugin", None)
        registry.reset_registry()


# -------------------------------------------------------------------------------------------- finetune


def test_finetune_output_exists(ws, tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    write(out / "keep.txt", "earlier\n")
    r = run_cli(["finetune", ws.pruned, "--task", "sst2", "--data", ws.data, "--out", out, "-q"], capsys)
    assert_user_error(r, "exists")
    assert (out / "keep.txt").read_text() == "earlier\n" and leftovers(tmp_path) == []


def test_finetune_output_under_a_file(ws, tmp_path, capsys):
    blocker = write(tmp_path / "results", "a file\n")
    r = run_cli(["finetune", ws.pruned, "--task", "sst2", "--data", ws.data, "--out", blocker / "ft", "-q"], capsys)
    assert_user_error(r, f"{blocker} is a file, not a directory; choose another --out")
    assert leftovers(tmp_path) == []


def test_prune_of_an_already_pruned_model(ws, tmp_path, capsys):
    out = tmp_path / "out"
    r = run_cli(prune_args(ws, out, model=ws.pruned), capsys)
    assert_user_error(r, "the model is already pruned: P-pruning starts from a dense pre-trained model", out)


def test_finetune_bad_epochs(ws, tmp_path, capsys):
    out = tmp_path / "ft"
    r = run_cli(["finetune", ws.pruned, "--task", "sst2", "--data", ws.data, "--out", out, "--epochs", "0", "-q"], capsys)
    assert_user_error(r, "epochs must be a positive integer, got 0", out)


@pytest.mark.parametrize("flag, value, message", [
    ("--warmup-ratio", "1.5", "warmup ratio must be in [0, 1), got 1.5"),
    ("--weight-decay", "-0.1", "weight decay must be zero or positive, got -0.1"),
])
def test_finetune_bad_schedule(ws, tmp_path, capsys, flag, value, message):
    out = tmp_path / "ft"
    r = run_cli(["finetune", ws.pruned, "--task", "sst2", "--data", ws.data, "--out", out, flag, value, "-q"], capsys)
    assert_user_error(r, message, out)


def test_finetune_schedule_options_reach_the_trainer(ws, tmp_path, capsys):
    """--warmup-ratio / --weight-decay are recorded in finetune.json, and the run keeps the pruned shape."""
    out = tmp_path / "ft"
    r = run_cli(["finetune", ws.pruned, "--task", "sst2", "--data", ws.data, "--out", out, "--epochs", "1",
                 "--train-limit", "16", "--eval-limit", "8", "--batch-size", "8", "--warmup-ratio", "0.25",
                 "--weight-decay", "0.01", "--json", "-q"], capsys)
    assert r.code == 0, r.err
    settings = json.loads((out / "finetune.json").read_text())["settings"]
    assert settings["warmup_ratio"] == 0.25 and settings["weight_decay"] == 0.01 and settings["pruned"]
    assert json.loads(r.out)["settings"] == settings


# ------------------------------------------------------------------------------- a real separate process


def test_console_offline_hub_name(ws, tmp_path):
    out = tmp_path / "out"
    r = run_cli_subprocess(prune_args(ws, out, model="bert-base-uncased"), cwd=tmp_path)
    assert_user_error(r, "could not be downloaded (offline?): pass a local path to a model directory", out)
    assert r.err.strip().count("\n") == 0, r.err  # exactly one line on the terminal


def test_console_usage_error(ws, tmp_path):
    out = tmp_path / "out"
    r = run_cli_subprocess(prune_args(ws, out) + ["--colour"], cwd=tmp_path)
    assert_usage_error(r, "No such option: --colour", out)
    assert "Usage: ppkit prune" in r.err and "Try 'ppkit prune --help' for help." in r.err


def test_console_debug_shows_traceback(ws, tmp_path):
    out = tmp_path / "out"
    r = run_cli_subprocess(["--debug", *prune_args(ws, out, flops="abc")], cwd=tmp_path)
    assert r.code != 0 and "Traceback" in r.err and "InputError: --flops must be a number" in r.err
    assert not out.exists()


def test_console_more_samples_than_data_warns(ws, tmp_path):
    out = tmp_path / "out"
    r = run_cli_subprocess(prune_args(ws, out, samples="10000"), cwd=tmp_path)
    assert r.code == 0, r.text
    assert f"WARNING ppkit.data: {ws.data} has only 48 rows, fewer than the 10000 requested: using all 48, in order" in r.err
    assert (out / "report.json").is_file() and "Traceback" not in r.text
