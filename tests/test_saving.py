"""save_pruned / load_pruned / remote-code loading / atomic_output_dir / load_model."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import SHARED, make_tiny_bert, make_tiny_gpt2, plan_for

from ppkit.adapters import get_adapter
from ppkit.errors import (
    InputError,
    ModelLoadError,
    OutputError,
    PlanError,
    UnsupportedModelError,
)
from ppkit.masking import apply_masks
from ppkit.models import is_pruned_dir, load_model, load_pruned, load_tokenizer
from ppkit.plan import PruningPlan
from ppkit.saving import atomic_output_dir, save_pruned
from ppkit.surgery import prune_model

TOL = 1e-5


def _main_output(out) -> torch.Tensor:
    for key in ("logits", "start_logits", "last_hidden_state"):
        if key in out and out[key] is not None:
            return out[key]
    raise AssertionError("no output")


def _prune_and_save(model, out_dir: Path, kind: str, seed: int = 0, tokenizer=None):
    """Masked reference output, then prune + save; returns (inputs, masked output, pruned model)."""
    plan = plan_for(model, seed=seed, kind=kind)
    inputs = get_adapter(model).dummy_inputs(batch=2, seq=10)
    with torch.no_grad(), apply_masks(model, plan):
        masked = _main_output(model(**inputs))
    pruned = prune_model(copy.deepcopy(model), plan)
    save_pruned(pruned, out_dir, plan=plan, tokenizer=tokenizer, extra_files={"NOTES.txt": "hello\n"})
    return inputs, masked, pruned, plan


@pytest.mark.parametrize(
    "family,cls_name,kind",
    [
        ("bert", "BertForSequenceClassification", "zeros"),
        ("bert", "BertForQuestionAnswering", "uneven"),
        ("bert", "BertForMaskedLM", "zeros"),
        ("gpt2", "GPT2LMHeadModel", "zeros"),
        ("gpt2", "GPT2Model", "keep_all"),
    ],
)
def test_save_and_load_pruned(tmp_path, family, cls_name, kind):
    model = make_tiny_bert(cls_name) if family == "bert" else make_tiny_gpt2(cls_name)
    out = tmp_path / "pruned"
    inputs, masked, pruned, plan = _prune_and_save(model, out, kind)
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "modeling_ppkit.py", "plan.json", "NOTES.txt"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family and config["ppkit_family"] == family
    assert config["architectures"] == [cls_name]
    assert config["ppkit_heads_per_layer"] == plan.heads_per_layer
    assert config["ppkit_neurons_per_layer"] == plan.neurons_per_layer
    from ppkit import modeling_pruned

    for ref in config["auto_map"].values():  # every entry is a ppkit class of the shipped modeling file
        module, name = ref.split(".")
        assert module == "modeling_ppkit"
        assert any(c.__name__.startswith("Ppkit") for c in getattr(modeling_pruned, name).__mro__)
    assert PruningPlan.from_json(out / "plan.json").layers == plan.layers
    assert is_pruned_dir(out)

    reloaded = load_pruned(out)
    assert type(reloaded).__name__ == "Ppkit" + cls_name
    assert isinstance(reloaded, type(model))
    with torch.no_grad():
        assert (_main_output(reloaded(**inputs)) - masked).abs().max() <= TOL
    # load_model recognises a pruned directory by itself
    head = {"BertForSequenceClassification": "sequence-classification", "BertForQuestionAnswering": "question-answering",
            "BertForMaskedLM": "masked-lm", "GPT2LMHeadModel": "causal-lm", "GPT2Model": "base"}[cls_name]
    again = load_model(out, head=head)
    with torch.no_grad():
        assert (_main_output(again(**inputs)) - masked).abs().max() <= TOL


def test_pruned_base_loads_under_a_new_head(tmp_path, tiny_bert):
    out = tmp_path / "base"
    _, _, pruned, plan = _prune_and_save(tiny_bert, out, "uneven")
    cls_model = load_pruned(out, head="sequence-classification", num_labels=3)
    assert type(cls_model).__name__ == "PpkitBertForSequenceClassification"
    assert cls_model.classifier.out_features == 3
    assert get_adapter(cls_model).shape().heads_per_layer == tuple(plan.heads_per_layer)
    for name, param in pruned.state_dict().items():
        assert torch.equal(cls_model.bert.state_dict()[name], param), name
    with pytest.raises(InputError, match="causal-lm"):
        load_pruned(out, head="causal-lm")


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    # ppkit must not be importable here: drop the editable-install finder and poison the name.
    sys.meta_path[:] = [f for f in sys.meta_path if "ppkit" not in repr(f).lower()]
    sys.modules["ppkit"] = None
    try:
        import ppkit  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("ppkit is importable in the isolated interpreter")
    import torch
    import transformers
    cases = json.loads(sys.argv[1])
    diffs = {}
    for case in cases:
        auto = getattr(transformers, case["auto_class"])
        model = auto.from_pretrained(case["dir"], trust_remote_code=True).eval()
        data = torch.load(case["data"])
        with torch.no_grad():
            out = model(**data["inputs"])
        got = getattr(out, case["output"])
        ppkit_base = next(c.__name__ for c in type(model).__mro__ if c.__name__.startswith("Ppkit"))
        diffs[case["dir"]] = [ppkit_base, type(model).__module__, float((got - data["expected"]).abs().max())]
        if case.get("generate"):
            tokens = model.generate(**data["prompt"], max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
            diffs[case["dir"]].append(bool(torch.equal(tokens, data["tokens"])))
    print("RESULT" + json.dumps(diffs))
    """
)


def load_without_ppkit(cases: list[dict], tmp_path: Path) -> dict:
    """Run ``REMOTE_SCRIPT`` on ``cases`` in an isolated interpreter (``python -I``, offline, ppkit not
    importable, another working directory); return its per-directory results."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PPKIT"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HOME=str(tmp_path / "hf_home"))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, json.dumps(cases)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.slow
def test_remote_code_loading_without_ppkit(tmp_path, minilm_path):
    from transformers import BertModel

    cases = []

    def add(model, name, auto_class, output, kind, seed, generate=False):
        out = tmp_path / name
        inputs, masked, pruned, _ = _prune_and_save(model, out, kind, seed)
        data = {"inputs": inputs, "expected": masked}
        if generate:
            prompt = {"input_ids": torch.tensor([[3, 7, 11]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
            with torch.no_grad():
                data["tokens"] = pruned.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            data["prompt"] = prompt
        torch.save(data, tmp_path / f"{name}.pt")
        cases.append({"dir": str(out), "auto_class": auto_class, "output": output, "data": str(tmp_path / f"{name}.pt"),
                      "generate": generate})

    add(make_tiny_bert("BertForSequenceClassification"), "bert_cls", "AutoModelForSequenceClassification", "logits", "zeros", 1)
    add(make_tiny_gpt2("GPT2LMHeadModel"), "gpt2_lm", "AutoModelForCausalLM", "logits", "zeros", 2, generate=True)
    add(make_tiny_gpt2("GPT2Model"), "gpt2_base", "AutoModel", "last_hidden_state", "uneven", 3)
    minilm = BertModel.from_pretrained(minilm_path, attn_implementation="eager").eval()
    add(minilm, "minilm", "AutoModel", "last_hidden_state", "zeros", 4)

    result = load_without_ppkit(cases, tmp_path)
    for case in cases:
        cls_name, module, diff, *generated = result[case["dir"]]
        assert cls_name.startswith("Ppkit") and "modeling_ppkit" in module
        assert diff <= TOL, (case["dir"], diff)
        assert generated in ([], [True])


def test_modeling_file_is_self_contained():
    import ast

    import ppkit.modeling_pruned as mp

    tree = ast.parse(Path(mp.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in modeling_pruned.py"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "warnings", "typing", "torch", "transformers"}


def test_save_rejects_mismatched_plan_and_bad_names(tmp_path, tiny_bert):
    plan = plan_for(tiny_bert, kind="uneven")
    with pytest.raises(PlanError, match="prune the model"):
        save_pruned(tiny_bert, tmp_path / "a", plan=plan)
    prune_model(tiny_bert, plan)
    with pytest.raises(OutputError, match="plain file name"):
        save_pruned(tiny_bert, tmp_path / "b", plan=plan, extra_files={"../x.txt": "no"})


def test_load_pruned_errors(tmp_path, tiny_bert):
    with pytest.raises(ModelLoadError, match="not found"):
        load_pruned(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_pruned(tmp_path / "empty")
    tiny_bert.save_pretrained(tmp_path / "dense")
    with pytest.raises(PlanError, match="not a ppkit-pruned model"):
        load_pruned(tmp_path / "dense")


# --------------------------------------------------------------------------- atomic_output_dir
def test_atomic_output_dir_success_and_overwrite(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and not target.exists()
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(OutputError, match="exists"):
        with atomic_output_dir(target):
            pass
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or backup dirs left


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_output_dir_failure_keeps_old_output(tmp_path, exc):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(exc)):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "half.txt").write_text("partial")
            raise exc
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(ValueError):
        with atomic_output_dir(tmp_path / "new"):
            raise ValueError
    assert not (tmp_path / "new").exists()


def test_atomic_output_dir_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        with atomic_output_dir(tmp_path / "f", overwrite=True):
            pass


# --------------------------------------------------------------------------- load_model / load_tokenizer
def test_load_model_local_minilm(minilm_path):
    model = load_model(minilm_path)
    assert type(model).__name__ == "BertModel" and not model.training
    cls_model = load_model(str(minilm_path), head="sequence-classification", num_labels=3)
    assert cls_model.classifier.out_features == 3
    assert torch.equal(cls_model.bert.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)
    with pytest.raises(InputError, match="causal-lm"):
        load_model(minilm_path, head="causal-lm")
    with pytest.raises(InputError, match="unknown head"):
        load_model(minilm_path, head="seq2seq")


@pytest.mark.parametrize("offline", [None, "1"])
def test_offline_hub_name_fails_fast(monkeypatch, offline):
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="pass a local path"):
        load_model("bert-base-uncased")
    with pytest.raises(ModelLoadError, match="pass a local path"):
        load_tokenizer("bert-base-uncased")
    assert time.monotonic() - start < 15


def test_load_model_path_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("./definitely/not/here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path / "empty")
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(UnsupportedModelError, match="'t5'.*bert, roberta, xlm-roberta, electra, distilbert, gpt2, llama, qwen2, mistral"):
        load_model(tmp_path / "t5")


def test_pickled_weights_need_allow_pickle(tmp_path):
    model = make_tiny_bert()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle.*allow_pickle"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, allow_pickle=True)
    assert torch.equal(loaded.encoder.layer[0].output.dense.weight, model.encoder.layer[0].output.dense.weight)


def test_load_tokenizer_sets_padding():
    tok = load_tokenizer(SHARED / "tokenizers" / "gpt2")
    assert tok.pad_token == tok.eos_token is not None
    batch = tok(["a b c", "a"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2


def test_plain_save_pretrained_of_pruned_model_loads_with_load_pruned(tmp_path, tiny_bert_cls):
    # e.g. a Trainer checkpoint: config.json carries the ppkit sizes recorded by prune_model
    plan = plan_for(tiny_bert_cls, seed=8, kind="zeros")
    prune_model(tiny_bert_cls, plan)
    tiny_bert_cls.save_pretrained(tmp_path / "ckpt")
    model = load_model(tmp_path / "ckpt", head="sequence-classification")
    inputs = get_adapter(model).dummy_inputs()
    with torch.no_grad():
        assert (model(**inputs).logits - tiny_bert_cls(**inputs).logits).abs().max() <= TOL
