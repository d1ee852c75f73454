"""Fine-tuning that learns: the default recipe, a head that starts at the labels, mean pooling through
save / reload / ONNX, distillation from a teacher, and --threads."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_bert, plan_for, tiny_bert_config

from ppkit.data import load_task_dataset
from ppkit.distill import (
    DistillSettings,
    distillation_trainer,
    hidden_loss,
    prediction_loss,
)
from ppkit.errors import InputError
from ppkit.masking import apply_masks
from ppkit.modeling_pruned import PpkitBertForSequenceClassification, mean_pool
from ppkit.models import load_pruned
from ppkit.recipe import default_recipe
from ppkit.saving import save_pruned
from ppkit.surgery import prune_model
from ppkit.tasks import get_task
from ppkit.training import evaluate_model, finetune, init_head, predict


def toy_sst2(folder: Path, rows: int = 240, seed: int = 0) -> Path:
    """An SST-2-format task a tiny model learns in a few epochs: the label says whether the sentence
    has a positive or a negative word."""
    rng = random.Random(seed)
    filler = "the a film story actor scene plot music it was and of".split()
    lines = ["sentence\tlabel"]
    for i in range(rows):
        label = i % 2
        words = rng.sample(filler, 5) + [rng.choice(("great", "lovely", "superb") if label else ("awful", "dull", "bad"))]
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "dev.tsv").write_text("\n".join(lines[:1] + lines[1:81]) + "\n", encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------ the recipe


def test_default_recipe_scales_with_model_width_and_train_size():
    glue = get_task("mrpc")
    small = default_recipe(glue, hidden_size=384, train_examples=3668)
    assert (small.learning_rate, small.batch_size, small.epochs) == (5e-5, 16, 5)  # 230 steps/epoch -> 1000 steps
    regression = default_recipe(get_task("stsb"), hidden_size=384, train_examples=5749)
    assert (regression.learning_rate, regression.epochs) == (1e-4, 3)  # a larger step for a small model's regression
    assert (small.warmup_ratio, small.weight_decay) == (0.1, 0.01)
    base = default_recipe(get_task("sst2"), hidden_size=768, train_examples=67349)
    assert (base.learning_rate, base.batch_size, base.epochs) == (2e-5, 32, 3)
    tiny_set = default_recipe(glue, hidden_size=384, train_examples=100)
    assert tiny_set.epochs == 10  # capped
    assert default_recipe(glue, hidden_size=384, train_examples=100, min_steps=0).epochs == 3
    assert default_recipe(glue, hidden_size=384, train_examples=100, epochs=2, learning_rate=3e-5).epochs == 2
    squad = default_recipe(get_task("squad"), hidden_size=384, train_examples=1000)
    assert (squad.learning_rate, squad.batch_size, squad.epochs, squad.name) == (2e-5, 12, 3, "paper")


# ------------------------------------------------------------------------------------ head initialisation


def test_regression_head_starts_at_the_label_mean(shared_data, bert_tok):
    stsb = shared_data / "glue" / "STS-B"
    train = load_task_dataset("stsb", bert_tok, "train", data=stsb, limit=128, limit_seed=0)
    dev = load_task_dataset("stsb", bert_tok, "dev", data=stsb, limit=64)
    model = make_tiny_bert("BertForSequenceClassification", num_labels=1, vocab_size=bert_tok.vocab_size)
    mean = float(np.mean([f["labels"] for f in train.features]))
    assert 1.5 < mean < 3.5 and abs(float(predict(model, dev).mean())) < 0.5  # a fresh head starts near 0

    info = init_head(model, train)

    assert info == {"bias": "label mean", "value": pytest.approx(mean)}
    assert float(model.classifier.bias.detach()) == pytest.approx(mean)
    assert abs(float(predict(model, dev).mean()) - mean) < 0.25


def test_classification_head_starts_at_the_class_prior(shared_data, bert_tok):
    train = load_task_dataset("mrpc", bert_tok, "train", data=shared_data / "glue" / "MRPC", limit=200, limit_seed=0)
    model = make_tiny_bert("BertForSequenceClassification", num_labels=2, vocab_size=bert_tok.vocab_size)
    init_head(model, train)
    counts = np.bincount([f["labels"] for f in train.features], minlength=2)
    prior = (counts + 1) / (counts.sum() + 2)
    assert torch.softmax(model.classifier.bias.detach(), 0).numpy() == pytest.approx(prior, abs=1e-6)


def test_finetune_inits_a_fresh_head_but_not_a_trained_one(tmp_path, shared_data, bert_tok):
    source = tmp_path / "tiny"
    make_tiny_bert("BertModel", vocab_size=bert_tok.vocab_size).save_pretrained(source)
    bert_tok.save_pretrained(source)
    stsb = shared_data / "glue" / "STS-B"
    kw = dict(task="stsb", data=stsb, train_limit=64, eval_limit=32, epochs=1, progress=False)
    first = finetune(source, out_dir=tmp_path / "ft1", **kw)
    train = load_task_dataset("stsb", bert_tok, "train", data=stsb, limit=64, limit_seed=0)
    assert first.settings["head_init"]["value"] == pytest.approx(np.mean([f["labels"] for f in train.features]))
    again = finetune(tmp_path / "ft1", out_dir=tmp_path / "ft2", **kw)  # its head is trained now: kept
    assert again.settings["head_init"] is None
    assert finetune(source, out_dir=tmp_path / "ft3", init_head_bias=False, **kw).settings["head_init"] is None


# ------------------------------------------------------------------------------------------ mean pooling


def _padded_inputs(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_mean_pooling_classifier_masked_pruned_reloaded_onnx(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from ppkit.export import export_onnx

    torch.manual_seed(0)
    config = tiny_bert_config(num_labels=3)
    config.ppkit_pooling = "mean"
    model = PpkitBertForSequenceClassification(config).eval()
    inputs = _padded_inputs(config.vocab_size)
    with torch.no_grad():
        out = model(**inputs).logits
        hidden = model.bert(**inputs).last_hidden_state
        assert out == pytest.approx(model.classifier(mean_pool(hidden, inputs["attention_mask"])), abs=1e-6)
        model.config.ppkit_pooling = "cls"
        assert (model(**inputs).logits - out).abs().max() > 1e-3  # the [CLS] head gives something else
        model.config.ppkit_pooling = "mean"

    plan = plan_for(model, seed=3, kind="zeros")
    with torch.no_grad(), apply_masks(model, plan):
        masked = model(**inputs).logits
    pruned = prune_model(copy.deepcopy(model), plan)
    save_pruned(pruned, tmp_path / "pruned", plan=plan)
    reloaded = load_pruned(tmp_path / "pruned")
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned", trust_remote_code=True).eval()
    assert json.loads((tmp_path / "pruned" / "config.json").read_text())["ppkit_pooling"] == "mean"
    with torch.no_grad():
        for other in (pruned, reloaded, remote):
            assert (other(**inputs).logits - masked).abs().max() <= 1e-5

    report = export_onnx(reloaded, tmp_path / "m.onnx")
    assert report.max_abs_diff <= 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})
    assert np.abs(got - masked.numpy()).max() <= 1e-4


def test_finetune_defaults_to_the_checkpoints_pooling(tmp_path, shared_data, bert_tok):
    source = tmp_path / "st-model"
    make_tiny_bert("BertModel", vocab_size=bert_tok.vocab_size).save_pretrained(source)
    bert_tok.save_pretrained(source)
    minilm = shared_data / "models" / "all-MiniLM-L6-v2"
    for name in ("modules.json", "sentence_bert_config.json"):
        (source / name).write_bytes((minilm / name).read_bytes())
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_bytes((minilm / "1_Pooling" / "config.json").read_bytes())
    kw = dict(task="sst2", data=shared_data / "glue" / "SST-2", train_limit=32, eval_limit=16, epochs=1,
              progress=False)

    result = finetune(source, out_dir=tmp_path / "ft", **kw)

    assert result.settings["pooling"] == "mean"
    saved = tmp_path / "ft"
    assert json.loads((saved / "config.json").read_text())["ppkit_pooling"] == "mean"
    assert (saved / "1_Pooling" / "config.json").is_file() and (saved / "modules.json").is_file()
    assert finetune(source, out_dir=tmp_path / "ft-cls", pooling="cls", **kw).settings["pooling"] == "cls"
    with pytest.raises(InputError, match="pooling"):
        finetune(source, out_dir=tmp_path / "bad", pooling="max", **kw)


# ------------------------------------------------------------------------------------------ distillation


def test_distillation_loss_is_zero_when_the_teacher_is_the_student(shared_data, bert_tok):
    student = make_tiny_bert("BertForSequenceClassification", num_labels=2, vocab_size=bert_tok.vocab_size)
    teacher = copy.deepcopy(student)
    inputs = _padded_inputs(bert_tok.vocab_size)
    with torch.no_grad():
        s = student(**inputs, output_hidden_states=True)
        t = teacher(**inputs, output_hidden_states=True)
    assert float(prediction_loss(s.logits, t.logits, "classification", 2.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(prediction_loss(s.logits[:, :1], t.logits[:, :1], "regression", 2.0)) == 0.0
    assert float(hidden_loss(s.hidden_states, t.hidden_states, inputs["attention_mask"])) == 0.0
    # and through the trainer's loss: weight 1 and hidden weight 1 leave nothing but the distillation terms
    from transformers import Trainer, TrainingArguments

    cls = distillation_trainer(Trainer, teacher, DistillSettings(weight=1.0, hidden_weight=1.0), "classification")
    trainer = cls(model=student, args=TrainingArguments(output_dir="unused", use_cpu=True, report_to="none"))
    student.train()
    loss = trainer.compute_loss(student, {**inputs, "labels": torch.tensor([0, 1, 1])})
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    other = make_tiny_bert("BertForSequenceClassification", seed=1, num_labels=2, vocab_size=bert_tok.vocab_size).train()
    assert float(trainer.compute_loss(other, {**inputs, "labels": torch.tensor([0, 1, 1])}).detach()) > 1e-4


def test_lm_distillation_is_the_mean_next_token_kl_over_scored_positions():
    from conftest import make_tiny_gpt2

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 17, generator=g), torch.randn(2, 6, 17, generator=g)
    labels = torch.randint(0, 17, (2, 6), generator=g)
    labels[1, 4:] = -100  # padding: positions 3 and 4 of row 1 predict nothing; position 5 never does
    loss = prediction_loss(student, teacher, "lm", 2.0, labels)

    rows = [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    manual = [torch.nn.functional.kl_div(torch.log_softmax(student[b, i] / 2, -1), torch.log_softmax(teacher[b, i] / 2, -1),
                                         log_target=True, reduction="sum") for b, i in rows]
    assert float(loss) == pytest.approx(4 * float(torch.stack(manual).mean()), rel=1e-5)
    changed = student.clone()
    changed[1, 3:] += 5 * torch.randn(3, 17, generator=g)  # only positions without a target
    changed[0, 5] += 5 * torch.randn(17, generator=g)
    assert float(prediction_loss(changed, teacher, "lm", 2.0, labels)) == pytest.approx(float(loss), rel=1e-6)

    # through the trainer: a tiny GPT-2 (no dropout) distilled from its copy has no loss left at weight 1;
    # evaluation keeps the plain LM loss
    from transformers import Trainer, TrainingArguments

    lm = make_tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cls = distillation_trainer(Trainer, copy.deepcopy(lm), DistillSettings(weight=1.0, hidden_weight=1.0), "lm")
    trainer = cls(model=lm, args=TrainingArguments(output_dir="unused", use_cpu=True, report_to="none"))
    ids = torch.randint(0, lm.config.vocab_size, (2, 9), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    assert float(trainer.compute_loss(lm.train(), batch).detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(trainer.compute_loss(lm.eval(), batch).detach()) > 1.0


@pytest.mark.slow
def test_pruned_tiny_gpt2_fine_tunes_with_its_dense_teacher(tmp_path, shared_data):
    from conftest import make_tiny_gpt2, tiny_lm_on_ptb

    tok, data, dense = tiny_lm_on_ptb(tmp_path, shared_data)
    kw = dict(data=data, batch_size=8, learning_rate=3e-3, max_length=32, seed=0, progress=False)
    teacher = finetune(dense, "ptb", out_dir=tmp_path / "teacher", epochs=2, **kw)

    model = teacher.model
    plan = plan_for(model, seed=2)
    prune_model(model, plan)
    save_pruned(model, tmp_path / "pruned", plan=plan, tokenizer=tok)
    student = finetune(tmp_path / "pruned", "ptb", out_dir=tmp_path / "student", epochs=1, eval_before=True,
                       teacher=tmp_path / "teacher", **kw)

    assert student.settings["teacher"] == str(tmp_path / "teacher")
    assert student.best_metrics["perplexity"] < student.initial_metrics["perplexity"]
    other = tmp_path / "other-vocab"
    make_tiny_gpt2(vocab_size=len(tok) + 1).save_pretrained(other)
    with pytest.raises(InputError, match="vocab_size"):
        finetune(tmp_path / "pruned", "ptb", out_dir=tmp_path / "bad", epochs=1, teacher=other, **kw)
    assert not (tmp_path / "bad").exists()


def test_distillation_settings_are_checked():
    with pytest.raises(InputError, match="weight"):
        DistillSettings(weight=1.5)
    with pytest.raises(InputError, match="temperature"):
        DistillSettings(temperature=0)


@pytest.mark.slow
def test_pruned_tiny_model_learns_a_toy_task_with_a_teacher(tmp_path, bert_tok):
    data = toy_sst2(tmp_path / "toy")
    dense = tmp_path / "dense"
    make_tiny_bert("BertModel", vocab_size=bert_tok.vocab_size).save_pretrained(dense)
    bert_tok.save_pretrained(dense)
    kw = dict(task="sst2", data=data, progress=False, learning_rate=1e-3, batch_size=16, epochs=6)
    teacher = finetune(dense, out_dir=tmp_path / "teacher", **kw)
    assert teacher.best_metric >= 0.9

    model = make_tiny_bert("BertModel", vocab_size=bert_tok.vocab_size)
    plan = plan_for(model, seed=1)
    prune_model(model, plan)
    save_pruned(model, tmp_path / "pruned", plan=plan, tokenizer=bert_tok)
    student = finetune(tmp_path / "pruned", out_dir=tmp_path / "student", teacher=tmp_path / "teacher",
                       distill=DistillSettings(weight=0.5, hidden_weight=0.1), **kw)

    assert student.best_metric >= 0.9
    assert student.settings["teacher"] == str(tmp_path / "teacher")
    assert student.settings["distill"] == {"weight": 0.5, "temperature": 2.0, "hidden_weight": 0.1}
    dev = load_task_dataset("sst2", bert_tok, "dev", data=data)
    assert evaluate_model(load_pruned(tmp_path / "student"), dev)["accuracy"] == pytest.approx(student.best_metric)
    with pytest.raises(InputError, match="no fine-tuned classifier head"):
        finetune(tmp_path / "pruned", out_dir=tmp_path / "bad", teacher=dense, **kw)


# --------------------------------------------------------------------------------------------- threads


def test_threads_reach_torch(tmp_path, bert_tok, capsys):
    from cli_support import run_cli

    data = toy_sst2(tmp_path / "toy", rows=32)
    source = tmp_path / "tiny"
    make_tiny_bert("BertModel", vocab_size=bert_tok.vocab_size).save_pretrained(source)
    bert_tok.save_pretrained(source)
    before = torch.get_num_threads()
    try:
        result = run_cli(["finetune", source, "--task", "sst2", "--data", data, "--epochs", "1", "--threads", "2",
                          "--out", tmp_path / "ft", "--quiet"], capsys)
        assert result.code == 0, result.text
        assert torch.get_num_threads() == 2
        assert json.loads((tmp_path / "ft" / "finetune.json").read_text())["settings"]["threads"] == 2
    finally:
        torch.set_num_threads(before)
    bad = run_cli(["finetune", source, "--task", "sst2", "--data", data, "--threads", "0", "--out", tmp_path / "ft0"],
                  capsys)
    assert bad.code == 2 and bad.error_lines() == ["error: threads must be a positive integer, got 0"]
    assert not (tmp_path / "ft0").exists()


def test_bf16_mixed_precision_learns_and_saves_fp32_weights(tmp_path, bert_tok, capsys):
    from cli_support import run_cli

    data = toy_sst2(tmp_path / "toy")
    source = tmp_path / "tiny"
    make_tiny_bert("BertModel", vocab_size=bert_tok.vocab_size).save_pretrained(source)
    bert_tok.save_pretrained(source)
    model = make_tiny_bert("BertForSequenceClassification", vocab_size=bert_tok.vocab_size, num_labels=2)
    seen = []  # the dtype the first query projection computes in while the model trains
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, args, output: seen.append(output.dtype) if module.training else None)
    result = finetune(model, "sst2", data=data, out_dir=tmp_path / "ft", progress=False, learning_rate=1e-3,
                      batch_size=16, epochs=4, precision="bf16", tokenizer=bert_tok)
    assert set(seen) == {torch.bfloat16}
    assert result.best_metric >= 0.9 and result.settings["precision"] == "bf16"
    reloaded = load_pruned(tmp_path / "ft")
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    dev = load_task_dataset("sst2", bert_tok, "dev", data=data)
    assert evaluate_model(reloaded, dev)["accuracy"] >= 0.9

    teacher_dtypes = []  # a teacher computes in the student's precision too
    reloaded.bert.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, args, output: teacher_dtypes.append(output.dtype))
    finetune(source, "sst2", data=data, out_dir=tmp_path / "kd", progress=False, epochs=1, precision="bf16",
             teacher=reloaded, distill=DistillSettings(hidden_weight=1.0))
    assert teacher_dtypes and set(teacher_dtypes) == {torch.bfloat16}

    for value, message in (("fp8", "precision must be one of fp32, bf16, fp16, got 'fp8'"),
                           ("fp16", "precision fp16 needs a CUDA GPU; on a CPU use bf16 (fast where the CPU has "
                                    "AMX) or fp32")):
        if value == "fp16" and torch.cuda.is_available():
            continue
        bad = run_cli(["finetune", source, "--task", "sst2", "--data", data, "--precision", value,
                       "--out", tmp_path / "bad"], capsys)
        assert bad.code == 2 and bad.error_lines() == [f"error: {message}"]
        assert not (tmp_path / "bad").exists()


def test_the_public_finetune_stays_a_function_after_its_module_is_imported():
    import ppkit
    import ppkit.training  # noqa: F401 - importing a submodule sets an attribute of the package

    assert ppkit.finetune is finetune and callable(ppkit.finetune)
