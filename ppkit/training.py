"""Fine-tuning (the paper's stage 2) with the transformers ``Trainer``, and a plain evaluation loop.

:func:`finetune` loads the model with the task's head (a fresh classifier / QA / LM head on a
pre-trained or pruned body; a pruned directory keeps its pruned structure), trains it with the
paper's setting (evaluate and save every epoch, keep the best epoch by the task metric — loss for LM —
``load_best_model_at_end``, ``save_total_limit=1``), records each epoch's metrics and wall time, and
writes the best model through :func:`ppkit.saving.save_pruned` plus ``finetune.json``, so the result
loads with :func:`ppkit.models.load_pruned` and with plain transformers (``trust_remote_code``).

It runs unchanged under ``torchrun --nproc_per_node N`` (CUDA/NCCL or CPU/gloo): ``batch_size`` is the
global batch (split over processes), every process trains, only rank 0 writes the output.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ppkit.data import TaskDataset, load_task_dataset, pad_token_id, postprocess_qa
from ppkit.errors import InputError
from ppkit.metrics import compute_task_metrics, model_max_positions
from ppkit.models import no_transformers_bars
from ppkit.tasks import TaskSpec, get_task

if TYPE_CHECKING:
    from ppkit.distill import DistillSettings

logger = logging.getLogger(__name__)

#: model head per task kind, as ppkit.models.load_model names them
HEADS = {"classification": "sequence-classification", "regression": "sequence-classification",
         "qa": "question-answering", "lm": "causal-lm"}
_HEAD_SUFFIXES = {"sequence-classification": ("ForSequenceClassification",),
                  "question-answering": ("ForQuestionAnswering",),
                  "causal-lm": ("LMHeadModel", "ForCausalLM")}


@dataclass
class EpochRecord:
    """One epoch: dev metrics (``loss``, the task metrics; ``perplexity`` for LM), training wall time
    of the epoch and wall time of its evaluation, in seconds."""

    epoch: int
    metrics: dict[str, float]
    train_seconds: float
    eval_seconds: float


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`. ``metric`` is the selection metric (``loss`` for LM);
    ``best_metric`` its best dev value, reached at ``best_epoch``; ``best_metrics`` all dev metrics of
    that epoch; ``initial_metrics`` the dev metrics before training when asked for. ``model`` is the
    best model (in memory, not serialised)."""

    task: str
    metric: str
    best_metric: float
    best_epoch: int
    best_metrics: dict[str, float]
    epochs: list[EpochRecord]
    total_seconds: float
    settings: dict[str, Any]
    out_dir: Path | None = None
    initial_metrics: dict[str, float] | None = None
    model: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (what ``finetune.json`` holds); the model is left out."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("model", "epochs")}
        d["epochs"] = [asdict(e) for e in self.epochs]
        d["out_dir"] = str(self.out_dir) if self.out_dir is not None else None
        return d


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(model: nn.Module, dataset: TaskDataset, *, batch_size: int = 64, progress: bool = False) -> Any:
    """Raw predictions for ``dataset``: logits [N, C] (classification), scores [N] (regression),
    (start_logits, end_logits) lists per feature (QA), or the token-weighted mean loss (LM)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    collate = dataset.collator()
    kind = dataset.task.kind
    outs: list[Any] = []
    nll, ntok = 0.0, 0
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        job = bar.add_task(f"evaluating {dataset.task.name}", total=len(dataset))
    try:
        for i in range(0, len(dataset), batch_size):
            batch = collate(dataset.features[i:i + batch_size])
            batch = {k: v.to(device) for k, v in batch.items()}
            if kind == "lm":
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
                n = int(batch["labels"][:, 1:].numel())
                nll += float(out.loss) * n
                ntok += n
            elif kind == "qa":
                out = model(**{k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")})
                for s, e in zip(out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()):
                    outs.append((s, e))
            else:
                out = model(**{k: v for k, v in batch.items() if k != "labels"})
                outs.append(out.logits.float().cpu().numpy())
            if bar is not None:
                bar.advance(job, min(batch_size, len(dataset) - i))
    finally:
        if bar is not None:
            bar.stop()
        model.train(was_training)
    if kind == "lm":
        return nll / max(ntok, 1)
    if kind == "qa":
        return outs
    logits = np.concatenate(outs, axis=0)
    return logits[:, 0] if kind == "regression" else logits


def evaluate_model(model: nn.Module, dataset: TaskDataset, *, batch_size: int = 64, progress: bool = False) -> dict[str, float]:
    """The task metrics of ``model`` on a dataset from :func:`ppkit.data.load_task_dataset` (no Trainer,
    one process): GLUE metrics, SQuAD EM/F1 after run_qa-style post-processing, or LM loss/perplexity
    over the dataset's blocks."""
    preds = predict(model, dataset, batch_size=batch_size, progress=progress)
    if dataset.task.kind == "qa":
        width = max(len(s) for s, _ in preds)
        starts = np.full((len(preds), width), -1e4, dtype=np.float32)
        ends = np.full((len(preds), width), -1e4, dtype=np.float32)
        for i, (s, e) in enumerate(preds):
            starts[i, :len(s)], ends[i, :len(e)] = s, e
        preds = postprocess_qa(dataset, starts, ends)
    return compute_task_metrics(dataset.task, preds, dataset.references)


# ------------------------------------------------------------------------------------------ fine-tuning


def _load(model_or_dir: Any, spec: TaskSpec, tokenizer: Any, allow_pickle: bool,
          pooling: str | None) -> tuple[nn.Module, Any, Any, bool]:
    """(model with the task head, tokenizer, plan or None, whether the head is freshly initialised)."""
    head = HEADS[spec.kind]
    num_labels = spec.num_labels if head == "sequence-classification" else None
    plan = None
    if isinstance(model_or_dir, nn.Module):
        model = model_or_dir
        name = type(model).__name__
        if not name.endswith(_HEAD_SUFFIXES[head]):
            raise InputError(f"task {spec.name} needs a model with a {head} head, got {name}; pass a model "
                             "directory instead and ppkit adds a fresh head")
        if tokenizer is None:
            raise InputError("pass tokenizer=... when giving finetune() a loaded model")
        if pooling is not None:
            raise InputError("pooling applies when finetune() loads the model; set config.ppkit_pooling yourself")
        fresh = False
    else:
        from ppkit.models import load_model, load_tokenizer
        from ppkit.sbert import checkpoint_pooling

        path = Path(str(model_or_dir)).expanduser()
        if pooling is None and head == "sequence-classification" and _family_of(path) == "bert":
            pooling = checkpoint_pooling(path)
        fresh = not _has_head(path, head)
        model = load_model(str(model_or_dir), head=head, num_labels=num_labels, allow_pickle=allow_pickle,
                           pooling=pooling)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(str(model_or_dir))
        if (path / "plan.json").is_file():
            from ppkit.plan import PruningPlan

            plan = PruningPlan.from_json(path / "plan.json")
    if head == "sequence-classification" and getattr(model.config, "num_labels", spec.num_labels) != spec.num_labels:
        raise InputError(f"the model's classifier has {model.config.num_labels} labels but task {spec.name} has "
                         f"{spec.num_labels}")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_token_id(tokenizer)  # GPT-2 classification needs it to find the last token
    if head == "sequence-classification" and len(spec.label_names) == spec.num_labels:
        # pipelines and the saved config then say "positive", not "LABEL_1"
        model.config.id2label = dict(enumerate(spec.label_names))
        model.config.label2id = {name: i for i, name in enumerate(spec.label_names)}
    return model, tokenizer, plan, fresh


def _source_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a hub name: transformers reads its config


def _family_of(path: Path) -> str | None:
    config = _source_config(path)
    return config.get("ppkit_family") or config.get("model_type")


def _has_head(path: Path, head: str) -> bool:
    """Whether the checkpoint at ``path`` was saved with ``head`` (then it is trained, not fresh)."""
    from ppkit.models import saved_head

    return saved_head(path) == head


@torch.no_grad()
def init_head(model: nn.Module, train_ds: TaskDataset) -> dict[str, Any] | None:
    """Start a fresh sequence-classification head where the labels are: its bias at the train labels'
    mean (regression) or at the log class prior (classification), its weights unchanged (small). A
    head that starts far from the label mean needs many steps to get there, and in a pruned model
    those steps can instead collapse the body to a constant output. Returns what was set, or None
    when the model's head has no bias (GPT-2's ``score``) or the task is not GLUE-style."""
    kind = train_ds.task.kind
    head = getattr(model, "classifier", None)
    if kind not in ("classification", "regression") or not isinstance(head, nn.Linear) or head.bias is None:
        return None
    labels = np.asarray([f["labels"] for f in train_ds.features], dtype=np.float64)
    if kind == "regression":
        head.bias.fill_(float(labels.mean()))
        return {"bias": "label mean", "value": float(labels.mean())}
    counts = np.bincount(labels.astype(np.int64), minlength=head.out_features).astype(np.float64)
    prior = (counts + 1.0) / (counts.sum() + head.out_features)  # add-one: no class at log(0)
    head.bias.copy_(torch.as_tensor(np.log(prior), dtype=head.bias.dtype))
    return {"bias": "log class prior", "value": [float(v) for v in np.log(prior)]}


#: config fields that hold a dropout probability, across the families ppkit loads
_DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attn_pdrop",
                   "resid_pdrop", "embd_pdrop", "summary_first_dropout", "attention_dropout", "dropout",
                   "seq_classif_dropout", "qa_dropout")


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout of ``model`` (embeddings, attention, hidden, classifier) to ``p``, and its config
    to match so the saved model records it. Fields left unset in the config (None) stay unset."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style: a float, not a module
            module.attention_dropout = p
    for name in _DROPOUT_FIELDS:
        if isinstance(getattr(model.config, name, None), (int, float)):
            setattr(model.config, name, p)


def _check_settings(**values: Any) -> None:
    """One clear error for a bad fine-tuning setting, before any work (None means: the default)."""
    checks = {
        "epochs": (_positive_int, "a positive integer"),
        "batch_size": (_positive_int, "a positive integer"),
        "threads": (_positive_int, "a positive integer"),
        "min_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "zero or a positive integer"),
        "learning_rate": (lambda v: v > 0, "positive"),
        "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "weight_decay": (lambda v: v >= 0, "zero or positive"),
        "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    }
    for name, value in values.items():
        ok, what = checks[name]
        if value is not None and not ok(value):
            raise InputError(f"{name.replace('_', ' ')} must be {what}, got {value!r}")


PRECISIONS = ("fp32", "bf16", "fp16")


def _check_precision(precision: str) -> None:
    """fp16 autocast needs a CUDA GPU; bf16 a GPU that has it, or the CPU."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and not torch.cuda.is_available():
        raise InputError("precision fp16 needs a CUDA GPU; on a CPU use bf16 (fast where the CPU has AMX) or fp32")
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU has no bf16: use precision fp16 or fp32")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_output(out_dir: Path, overwrite: bool) -> None:
    from ppkit.saving import check_output_dir

    check_output_dir(out_dir, overwrite)  # also a parent that is a file / not writable, before any work


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _callbacks():
    from transformers import ProgressCallback, TrainerCallback

    class EpochTimer(TrainerCallback):
        """Training wall time per epoch and the dev metrics of each epoch-end evaluation."""

        def __init__(self, report: bool = False) -> None:
            self.report = report  # one line per epoch on stderr
            self.training = False
            self.t0 = 0.0
            self.train_times: list[float] = []
            self.records: list[EpochRecord] = []

        def on_train_begin(self, args, state, control, **kw):
            self.training = True

        def on_train_end(self, args, state, control, **kw):
            self.training = False

        def on_epoch_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kw):
            self.train_times.append(time.perf_counter() - self.t0)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            if not self.training or metrics is None:
                return
            clean = _clean_metrics(metrics)
            record = EpochRecord(
                epoch=int(round(state.epoch or len(self.records) + 1)), metrics=clean,
                train_seconds=self.train_times[-1] if self.train_times else float("nan"),
                eval_seconds=float(metrics.get("eval_runtime", float("nan"))),
            )
            self.records.append(record)
            if self.report and state.is_world_process_zero:
                train_loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
                dev = ", ".join(f"{k} {v:.4f}" for k, v in clean.items())
                loss = f"train loss {train_loss:.4f} · " if train_loss is not None else ""
                print(f"epoch {record.epoch}/{int(args.num_train_epochs)} · step {state.global_step}/{state.max_steps} "
                      f"· {loss}dev {dev} · {record.train_seconds:.0f} s", file=sys.stderr, flush=True)

    class QuietProgress(ProgressCallback):
        """tqdm bars on stderr, without the dict dumps ProgressCallback writes to stdout."""

        def on_log(self, args, state, control, logs=None, **kw):
            if logs:
                logger.info("%s", {k: v for k, v in logs.items() if k != "total_flos"})

    return EpochTimer, QuietProgress


def _clean_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k.startswith("eval_") and k[5:] not in ("runtime", "samples_per_second", "steps_per_second", "epoch",
                                                                 "model_preparation_time"):
            out[k[5:]] = float(v)
    return out


def finetune(
    model_or_dir: str | Path | nn.Module,
    task: str | TaskSpec,
    *,
    out_dir: str | Path,
    data: str | Path | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    max_length: int | None = None,
    seed: int = 0,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    progress: bool = True,
    tokenizer: Any = None,
    overwrite: bool = False,
    weight_decay: float | None = None,
    warmup_ratio: float | None = None,
    eval_before: bool = False,
    allow_pickle: bool = False,
    checkpoint_dir: str | Path | None = None,
    pooling: str | None = None,
    init_head_bias: bool = True,
    min_steps: int | None = None,
    threads: int | None = None,
    teacher: str | Path | nn.Module | None = None,
    distill: DistillSettings | None = None,
    precision: str = "fp32",
    dropout: float | None = None,
) -> FinetuneResult:
    """Fine-tune a pre-trained or pruned model on ``task`` and write the best epoch's model to ``out_dir``.

    ``model_or_dir`` is a model directory or hub name (loaded with the task head — a fresh one on a
    base checkpoint; a ppkit-pruned directory keeps its pruned sizes and its ``plan.json``) or a loaded
    model that already has the head (then pass ``tokenizer``). Settings left as None come from
    :func:`ppkit.recipe.default_recipe`: for GLUE-style tasks a learning rate by model width, at least
    ``min_steps`` steps, warm-up 10%, weight decay 0.01; for SQuAD and LM the paper's (SQuAD batch 12,
    length 384; GPT-2 LM per corpus). A fresh head starts at the train labels' mean (regression) or
    log class prior (classification) unless ``init_head_bias=False``; ``pooling`` ("cls" / "mean",
    BERT classifiers) defaults to what the checkpoint was trained with. ``threads`` sets torch's
    intra-op threads. ``teacher`` (a fine-tuned dense model directory or model; for LM tasks the dense
    language model) turns on distillation with ``distill`` (:class:`ppkit.distill.DistillSettings`). ``batch_size`` is global (divided by
    the number of torchrun processes). ``precision`` "bf16" / "fp16" trains with mixed-precision autocast
    (fp32 master weights, saved in fp32); fp16 needs a CUDA GPU, bf16 runs on CPUs too (fast on AMX).
    ``dropout`` sets every dropout probability of the model (None: the checkpoint's, 0.1 for BERT).
    ``train_limit`` / ``eval_limit`` keep a seeded random subset of the train split / the first N dev
    examples for quick runs. The dev split is evaluated after every epoch and the best epoch by the
    task metric (loss for LM) is kept. Rank 0 writes ``out_dir`` atomically (model, tokenizer,
    ``plan.json`` if any, ``finetune.json``); trainer checkpoints go to ``checkpoint_dir`` (default: a
    hidden directory beside ``out_dir``) and are removed at the end."""
    from transformers import (
        PrinterCallback,
        ProgressCallback,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from ppkit.distill import DistillSettings, distillation_trainer, load_teacher
    from ppkit.recipe import default_recipe
    from ppkit.saving import atomic_output_dir, save_pruned

    spec = get_task(task)
    _check_settings(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, warmup_ratio=warmup_ratio,
                    weight_decay=weight_decay, min_steps=min_steps, threads=threads, dropout=dropout)
    _check_precision(precision)
    out = Path(out_dir).absolute()
    _check_output(out, overwrite)
    ckpt = Path(checkpoint_dir).absolute() if checkpoint_dir else out.parent / f".{out.name}.ppkit-checkpoints"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if threads is not None:
        torch.set_num_threads(threads)

    start = time.perf_counter()
    set_seed(seed)  # the fresh task head is initialised from this seed
    model, tokenizer, plan, fresh_head = _load(model_or_dir, spec, tokenizer, allow_pickle, pooling)
    if dropout is not None:
        set_dropout(model, dropout)
    max_pos = model_max_positions(model)
    teacher_model = load_teacher(teacher, model, spec, allow_pickle) if teacher is not None else None

    metric_key = "loss" if spec.kind == "lm" else spec.main_metric
    # placeholders until the train set's size is known (the recipe depends on it)
    args = _training_args(TrainingArguments, ckpt, 1, 1, 1e-5, 0.0, 0.0, seed, metric_key, spec, progress, precision)
    if args.process_index == 0 and ckpt.exists():
        shutil.rmtree(ckpt, ignore_errors=True)
    _barrier()

    with args.main_process_first(desc="tokenizing the task data"):
        train_ds = load_task_dataset(spec, tokenizer, "train", data=data, max_length=max_length, limit=train_limit,
                                     limit_seed=seed if train_limit is not None else None, max_positions=max_pos)
        eval_ds = load_task_dataset(spec, tokenizer, "dev", data=data, max_length=max_length, limit=eval_limit,
                                    max_positions=max_pos)

    recipe = default_recipe(spec, model.config.hidden_size, len(train_ds), epochs=epochs, batch_size=batch_size,
                            learning_rate=learning_rate, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                            min_steps=min_steps)
    per_device = max(1, recipe.batch_size // world)
    if per_device * world != recipe.batch_size:
        logger.warning("batch size %d is not divisible by %d processes: using %d per process (global %d)",
                       recipe.batch_size, world, per_device, per_device * world)
    args = _training_args(TrainingArguments, ckpt, recipe.epochs, per_device, recipe.learning_rate,
                          recipe.weight_decay, recipe.warmup_ratio, seed, metric_key, spec, progress, precision)
    head_init = init_head(model, train_ds) if fresh_head and init_head_bias else None

    EpochTimer, QuietProgress = _callbacks()
    timer = EpochTimer(report=progress)
    trainer_cls = Trainer
    if teacher_model is not None:
        trainer_cls = distillation_trainer(Trainer, teacher_model, distill or DistillSettings(), spec.kind)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=train_ds.collator(tokenizer), compute_metrics=_metrics_fn(spec, eval_ds),
                          callbacks=[timer])
    # transformers 5 passes num_items_in_batch counted over *unshifted* labels when it cannot tell the
    # loss shifts them (GPT-2 configs have loss_type=None), which scales causal-LM losses by (n-1)/n;
    # the model's own mean over its valid (shifted) targets is the right per-token loss.
    trainer.model_accepts_loss_kwargs = False
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress)

    initial = None
    try:
        with no_transformers_bars():
            if eval_before:
                initial = _clean_metrics(trainer.evaluate())
                _add_perplexity(spec, initial)
            trainer.train()
    except BaseException:
        if args.process_index == 0 and checkpoint_dir is None:
            shutil.rmtree(ckpt, ignore_errors=True)
        raise
    for rec in timer.records:
        _add_perplexity(spec, rec.metrics)

    best_model = trainer.model
    best_model.eval()
    from ppkit.adapters import get_adapter

    shape = get_adapter(best_model).shape()
    if not timer.records:
        raise InputError("training finished without an evaluation; check epochs and the data size")
    pick = max if spec.greater_is_better else min
    best = pick(timer.records, key=lambda r: r.metrics.get(metric_key, -math.inf if spec.greater_is_better else math.inf))
    total = time.perf_counter() - start
    settings = {
        "model": str(model_or_dir) if not isinstance(model_or_dir, nn.Module) else type(model_or_dir).__name__,
        "task": spec.name, "data": train_ds.source, "eval_data": eval_ds.source, "epochs": recipe.epochs,
        "batch_size": per_device * world, "per_device_batch_size": per_device, "world_size": world,
        "learning_rate": recipe.learning_rate, "weight_decay": recipe.weight_decay,
        "warmup_ratio": recipe.warmup_ratio, "recipe": recipe.name, "head_init": head_init,
        "pooling": getattr(model.config, "ppkit_pooling", None), "threads": torch.get_num_threads(),
        "precision": precision, "dropout": dropout,
        "teacher": None if teacher is None else (str(teacher) if not isinstance(teacher, nn.Module)
                                                 else type(teacher).__name__),
        "distill": None if teacher is None else (distill or DistillSettings()).to_dict(),
        "max_length": train_ds.max_length, "seed": seed, "train_examples": train_ds.num_examples,
        "train_features": len(train_ds), "eval_examples": eval_ds.num_examples, "device": str(args.device),
        "pruned": not shape.is_dense, "heads_per_layer": list(shape.heads_per_layer),
        "neurons_per_layer": list(shape.neurons_per_layer),
    }
    result = FinetuneResult(
        task=spec.name, metric=metric_key, best_metric=best.metrics.get(metric_key, float("nan")),
        best_epoch=best.epoch, best_metrics=dict(best.metrics), epochs=list(timer.records), total_seconds=total,
        settings=settings, out_dir=out, initial_metrics=initial, model=best_model,
    )

    _barrier()
    if args.process_index == 0:
        text = json.dumps(result.to_dict(), indent=2, sort_keys=True, default=float) + "\n"
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            save_pruned(best_model, tmp, plan=plan, tokenizer=tokenizer, extra_files={"finetune.json": text},
                        source=None if isinstance(model_or_dir, nn.Module) else model_or_dir)
        if checkpoint_dir is None:
            shutil.rmtree(ckpt, ignore_errors=True)
    _barrier()
    return result


def _training_args(TrainingArguments, ckpt: Path, epochs: int, per_device: int, learning_rate: float,
                   weight_decay: float, warmup_ratio: float, seed: int, metric_key: str, spec: TaskSpec,
                   progress: bool, precision: str = "fp32"):
    kwargs: dict[str, Any] = dict(
        output_dir=str(ckpt), num_train_epochs=epochs, per_device_train_batch_size=per_device,
        per_device_eval_batch_size=max(per_device, 32), learning_rate=learning_rate, weight_decay=weight_decay,
        warmup_steps=float(warmup_ratio), seed=seed, data_seed=seed, eval_strategy="epoch", save_strategy="epoch",
        logging_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model=metric_key, greater_is_better=spec.greater_is_better, save_only_model=True,
        report_to="none", disable_tqdm=not progress, remove_unused_columns=False, dataloader_num_workers=0,
        label_names=["start_positions", "end_positions"] if spec.kind == "qa" else ["labels"],
        bf16=precision == "bf16", fp16=precision == "fp16",
    )
    accepted = inspect.signature(TrainingArguments).parameters
    if "warmup_ratio" in accepted and "train_sampling_strategy" not in accepted:  # transformers 4.x
        kwargs["warmup_steps"] = 0
        kwargs["warmup_ratio"] = float(warmup_ratio)  # 4.x wants an int number of steps there
    if spec.kind in ("classification", "regression"):
        # batches of similar lengths: far less padding on sentence(-pair) tasks, the same examples per epoch
        if "train_sampling_strategy" in accepted:
            kwargs["train_sampling_strategy"] = "group_by_length"
        else:
            kwargs["group_by_length"] = True
    if not torch.cuda.is_available():
        kwargs["use_cpu"] = True
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            kwargs["ddp_backend"] = "gloo"
    return TrainingArguments(**kwargs)


def _add_perplexity(spec: TaskSpec, metrics: dict[str, float]) -> None:
    if spec.kind == "lm" and "loss" in metrics:
        metrics["perplexity"] = math.exp(metrics["loss"]) if metrics["loss"] < 700 else math.inf


def _metrics_fn(spec: TaskSpec, eval_ds: TaskDataset):
    if spec.kind == "lm":
        return None  # eval loss only: gathering [N, 512, vocab] logits would not fit in memory

    def compute(pred) -> dict[str, float]:
        if spec.kind == "qa":
            starts, ends = pred.predictions[:2]
            answers = postprocess_qa(eval_ds, np.asarray(starts), np.asarray(ends))
            return compute_task_metrics(spec, answers, eval_ds.references)
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return compute_task_metrics(spec, logits, pred.label_ids)

    return compute
