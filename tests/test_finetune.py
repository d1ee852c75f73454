"""Fine-tuning: real MiniLM learns SST-2, best-epoch selection, LM/QA heads, torchrun with 2 CPU processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppkit.data import load_task_dataset
from ppkit.errors import InputError, OutputError
from ppkit.training import evaluate_model, finetune

REPO = Path(__file__).resolve().parents[1]


def _tiny_bert_dir(path: Path, tok, **overrides) -> Path:
    from conftest import make_tiny_bert

    model = make_tiny_bert("BertModel", vocab_size=tok.vocab_size, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_arguments_are_checked_before_any_work(tmp_path, minilm_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="exists"):
        finetune(minilm_path, "sst2", out_dir=tmp_path / "out", data=tmp_path)
    with pytest.raises(InputError, match="epochs"):
        finetune(minilm_path, "sst2", out_dir=tmp_path / "new", epochs=0)
    with pytest.raises(InputError, match=r"dropout must be in \[0, 1\), got 1.0"):
        finetune(minilm_path, "sst2", out_dir=tmp_path / "new", dropout=1.0)
    from conftest import make_tiny_bert

    with pytest.raises(InputError, match="sequence-classification head"):
        finetune(make_tiny_bert("BertModel"), "sst2", out_dir=tmp_path / "new", tokenizer=object())


@pytest.mark.parametrize("family,cls_name", [("bert", "BertForSequenceClassification"), ("gpt2", "GPT2LMHeadModel"),
                                             ("llama", "LlamaForCausalLM"), ("distilbert", "DistilBertModel")])
def test_set_dropout_reaches_every_dropout_of_a_pruned_model(family, cls_name):
    """--dropout: 0 makes a pruned model in train mode deterministic, 0.5 makes it random, and the
    config (saved with the fine-tuned model) says so."""
    from conftest import make_tiny, plan_for

    from ppkit.surgery import prune_model
    from ppkit.training import set_dropout

    model = make_tiny(family, cls_name)
    model = prune_model(model, plan_for(model)).train()
    ids = torch.randint(0, 90, (2, 9))

    def twice() -> tuple[torch.Tensor, torch.Tensor]:
        out = [model(input_ids=ids) for _ in range(2)]
        return tuple(o.logits if hasattr(o, "logits") else o.last_hidden_state for o in out)

    set_dropout(model, 0.5)
    assert not torch.equal(*twice())
    set_dropout(model, 0.0)
    assert torch.equal(*twice())
    fields = [v for k, v in model.config.to_dict().items() if "drop" in k and isinstance(v, float)]
    assert fields and all(v == 0.0 for v in fields)


@pytest.mark.slow
def test_finetune_improves_real_minilm_on_sst2(tmp_path, minilm_path, shared_data, bert_tok):
    out = tmp_path / "sst2-minilm"
    sst2 = shared_data / "glue" / "SST-2"
    result = finetune(minilm_path, "sst2", data=sst2, out_dir=out, epochs=1, batch_size=16, learning_rate=2e-4,
                      max_length=64, train_limit=512, eval_limit=400, seed=0, eval_before=True, progress=False)
    before, after = result.initial_metrics["accuracy"], result.best_metrics["accuracy"]
    # fresh head on a sentence-embedding model: chance level before, clearly better after 32 steps
    assert before < 0.6
    assert after >= before + 0.1 and after >= 0.65
    assert result.metric == "accuracy" and result.best_metric == after and result.best_epoch == 1
    assert len(result.epochs) == 1 and result.epochs[0].train_seconds > 0 and result.epochs[0].eval_seconds > 0
    assert result.settings["train_examples"] == 512 and result.settings["eval_examples"] == 400

    written = json.loads((out / "finetune.json").read_text())
    assert written["best_metric"] == pytest.approx(after) and written["epochs"][0]["epoch"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != out.name]
    assert leftovers == []  # trainer checkpoints and temp dirs are gone

    # the saved model is the fine-tuned one: reloading it reproduces the dev accuracy
    from ppkit.models import load_model

    reloaded = load_model(out, head="sequence-classification")
    dev = load_task_dataset("sst2", bert_tok, "dev", data=sst2, max_length=64, limit=400)
    assert evaluate_model(reloaded, dev)["accuracy"] == pytest.approx(after)


def test_lm_finetune_keeps_the_lowest_loss_epoch(tmp_path, shared_data, capsys):
    from conftest import tiny_lm_on_ptb

    tok, data, model_dir = tiny_lm_on_ptb(tmp_path, shared_data)

    out = tmp_path / "out"
    capsys.readouterr()
    result = finetune(model_dir, "ptb", data=data, out_dir=out, epochs=2, batch_size=8, learning_rate=3e-3,
                      max_length=32, seed=0, eval_before=True, progress=False)
    assert "Writing model shards" not in capsys.readouterr().err  # no transformers bar per checkpoint
    losses = [r.metrics["loss"] for r in result.epochs]
    assert result.metric == "loss" and result.best_metric == min(losses)
    assert result.best_epoch == 1 + losses.index(min(losses))
    for r in result.epochs:
        assert r.metrics["perplexity"] == pytest.approx(math.exp(r.metrics["loss"]))
    assert result.best_metrics["perplexity"] < 0.5 * result.initial_metrics["perplexity"]

    from ppkit.models import load_model

    reloaded = load_model(out, head="causal-lm")
    dev = load_task_dataset("ptb", tok, "dev", data=data, max_length=32)
    assert evaluate_model(reloaded, dev)["loss"] == pytest.approx(result.best_metric, rel=1e-4)


def test_qa_finetune_scores_with_squad_metrics(tmp_path, shared_data, bert_tok, capsys):
    model_dir = _tiny_bert_dir(tmp_path / "bert", bert_tok, max_position_embeddings=128)
    squad = shared_data / "squad" / "dev-v1.1.json"  # one file serves as train and dev
    capsys.readouterr()
    result = finetune(model_dir, "squad", data=squad, out_dir=tmp_path / "out", epochs=1, batch_size=8,
                      learning_rate=1e-3, max_length=128, train_limit=12, eval_limit=6, progress=True, dropout=0.0)
    printed = capsys.readouterr()
    assert printed.out == ""  # progress bars go to stderr, logs to logging
    assert "epoch 1/1" in printed.err and "Writing model shards" not in printed.err
    assert result.metric == "f1" and set(result.best_metrics) >= {"loss", "exact_match", "f1"}
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["hidden_dropout_prob"] == saved["attention_probs_dropout_prob"] == 0.0
    assert json.loads((tmp_path / "out" / "finetune.json").read_text())["settings"]["dropout"] == 0.0
    from ppkit.models import load_model

    reloaded = load_model(tmp_path / "out", head="question-answering")
    dev = load_task_dataset("squad", bert_tok, "dev", data=squad, max_length=128, limit=6)
    again = evaluate_model(reloaded, dev)
    assert again["f1"] == pytest.approx(result.best_metrics["f1"])
    assert again["exact_match"] == pytest.approx(result.best_metrics["exact_match"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes_pruned_model(tmp_path, shared_data, bert_tok):
    from ppkit.models import load_pruned
    from ppkit.plan import PruningPlan

    pruned = _pruned_tiny_bert(tmp_path / "pruned", bert_tok)

    out, res = tmp_path / "out", tmp_path / "res"
    stdout = _torchrun(pruned, shared_data / "glue" / "SST-2", out, res)
    assert stdout.strip() == ""  # nothing printed by the library

    r0, r1 = (json.loads((tmp_path / f"res.rank{i}.json").read_text()) for i in (0, 1))
    assert r0["dist"] == 2 and r1["dist"] == 2
    assert r0["settings"]["world_size"] == 2 and r0["settings"]["per_device_batch_size"] == 4
    assert r0["settings"]["pruned"] and r0["settings"]["heads_per_layer"] == [2, 0, 3]
    assert [e["metrics"] for e in r0["epochs"]] == [e["metrics"] for e in r1["epochs"]]
    assert len(r0["epochs"]) == 2
    # one output written once; no checkpoints or temp dirs left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pruned", "res.rank0.json", "res.rank1.json"]
    assert json.loads((out / "finetune.json").read_text())["settings"]["world_size"] == 2
    assert PruningPlan.from_json(out / "plan.json").heads_per_layer == [2, 0, 3]

    # the pruned structure survived fine-tuning, and plain transformers loads it too
    tuned = load_pruned(out)
    assert type(tuned).__name__ == "PpkitBertForSequenceClassification"
    assert tuned.config.ppkit_heads_per_layer == [2, 0, 3] and tuned.config.ppkit_neurons_per_layer == [32, 10, 64]
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    dev = load_task_dataset("sst2", bert_tok, "dev", data=shared_data / "glue" / "SST-2", max_length=32, limit=24)
    batch = dev.collator(bert_tok)(dev.features)
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, tuned(**batch).logits)
    # and it is the best epoch's model
    assert evaluate_model(tuned, dev)["accuracy"] == pytest.approx(r0["best_metric"])


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_a_teacher(tmp_path, shared_data, bert_tok):
    """Distillation runs unchanged under torchrun: each process holds the teacher, both ranks agree."""
    from conftest import make_tiny_bert

    teacher = tmp_path / "teacher"
    make_tiny_bert("BertForSequenceClassification", vocab_size=bert_tok.vocab_size, seed=1).save_pretrained(teacher)
    pruned = _pruned_tiny_bert(tmp_path / "pruned", bert_tok)
    _torchrun(pruned, shared_data / "glue" / "SST-2", tmp_path / "out", tmp_path / "res", teacher)
    r0, r1 = (json.loads((tmp_path / f"res.rank{i}.json").read_text()) for i in (0, 1))
    assert r0["dist"] == 2 and [e["metrics"] for e in r0["epochs"]] == [e["metrics"] for e in r1["epochs"]]
    assert r0["settings"]["teacher"] == str(teacher)
    assert r0["settings"]["distill"] == {"weight": 0.5, "temperature": 2.0, "hidden_weight": 0.5}


def _pruned_tiny_bert(out: Path, tok) -> Path:
    """A tiny BERT pruned to uneven heads (layer 1 without heads) and neurons, saved with the tokenizer."""
    from conftest import make_tiny_bert

    from ppkit.plan import LayerPlan, PruningPlan
    from ppkit.saving import save_pruned
    from ppkit.surgery import prune_model

    model = make_tiny_bert("BertModel", vocab_size=tok.vocab_size)
    plan = PruningPlan(layers=[LayerPlan(heads=(0, 2), neurons=tuple(range(0, 64, 2))),
                               LayerPlan(heads=(), neurons=tuple(range(10))),
                               LayerPlan(heads=(1, 2, 3), neurons=tuple(range(64)))], num_heads=4, ffn_dim=64)
    prune_model(model, plan)
    return save_pruned(model, out, plan=plan, tokenizer=tok)


def _torchrun(*args) -> str:
    """Run tests/finetune_launch.py ARGS on two CPU processes; return its stdout (fails the test on error)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "finetune_launch.py"), *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the launcher and both workers
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return stdout
