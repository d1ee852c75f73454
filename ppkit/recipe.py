"""Fine-tuning defaults that learn, for a dense and a pruned model alike.

The paper fine-tunes BERT-base on GLUE for 3 epochs at batch 32 and learning rate 2e-5. Taken to a
small model (all-MiniLM-L6-v2, hidden 384) and the small GLUE sets, that recipe did not learn
(``benchmarks/README.md``, "Fine-tuning that learns"): 2e-5 is too slow for a small model within a
few hundred steps, and a fresh regression head that starts far from the label mean collapses to a
near-constant output. ppkit's defaults for sentence classification / regression therefore:

* scale the learning rate with the model's width, a step lower for classification than for
  regression on small models (``LEARNING_RATES``, ``CLASSIFICATION_LEARNING_RATES``);
* run at least ``MIN_STEPS`` optimizer steps (more epochs on small train sets, at most ``MAX_EPOCHS``),
  with batch 16 below ``LARGE_TRAIN_SET`` examples;
* warm up linearly over 10% of the steps, weight decay 0.01;
* start the head well (:func:`ppkit.training.init_head`: bias at the label mean for regression, at
  the log class prior for classification) and pool as the checkpoint was trained
  (:func:`ppkit.sbert.checkpoint_pooling`).

QA and language modelling keep the paper's settings (``TaskSpec``). Every value is overridable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ppkit.tasks import TaskSpec

#: (largest hidden size, learning rate): small models need a larger step (regression; STS-B)
LEARNING_RATES = ((384, 1e-4), (512, 5e-5), (10**9, 2e-5))
#: classification tasks: on all-MiniLM-L6-v2 (hidden 384) with the full MRPC / RTE train sets, 5e-5
#: learned better than 1e-4 (dense MRPC 80.6 vs 78.9, RTE best epoch 64.6 vs 58.5; benchmarks/README.md)
CLASSIFICATION_LEARNING_RATES = ((512, 5e-5), (10**9, 2e-5))
MIN_STEPS = 1000
MAX_EPOCHS = 10
LARGE_TRAIN_SET = 10_000
WARMUP_RATIO = 0.1
WEIGHT_DECAY = 0.01


@dataclass(frozen=True)
class Recipe:
    """Resolved fine-tuning settings (what ``finetune.json`` records under ``settings``)."""

    epochs: int
    batch_size: int
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    name: str

    def to_dict(self) -> dict:
        return asdict(self)


def learning_rate_for(hidden_size: int, kind: str = "regression") -> float:
    """The default learning rate for a model of this width and a task of this kind
    (``CLASSIFICATION_LEARNING_RATES`` for classification, ``LEARNING_RATES`` otherwise)."""
    table = CLASSIFICATION_LEARNING_RATES if kind == "classification" else LEARNING_RATES
    return next(lr for width, lr in table if hidden_size <= width)


def default_recipe(spec: TaskSpec, hidden_size: int, train_examples: int, *, epochs: int | None = None,
                   batch_size: int | None = None, learning_rate: float | None = None,
                   warmup_ratio: float | None = None, weight_decay: float | None = None,
                   min_steps: int | None = None) -> Recipe:
    """Fill in what the caller left as None: ppkit's recipe for GLUE-style tasks, the paper's
    (``spec``) for QA and LM. ``min_steps`` (default ``MIN_STEPS``; 0 turns it off) raises the number
    of epochs of a small train set, never above ``MAX_EPOCHS``, and only when ``epochs`` is None."""
    sentence_task = spec.kind in ("classification", "regression")
    if not sentence_task:
        return Recipe(epochs=spec.epochs if epochs is None else epochs,
                      batch_size=spec.batch_size if batch_size is None else batch_size,
                      learning_rate=spec.learning_rate if learning_rate is None else learning_rate,
                      warmup_ratio=0.0 if warmup_ratio is None else warmup_ratio,
                      weight_decay=0.0 if weight_decay is None else weight_decay, name="paper")
    if batch_size is None:
        batch_size = 16 if train_examples < LARGE_TRAIN_SET else 32
    if epochs is None:
        steps_per_epoch = max(1, math.ceil(train_examples / batch_size))
        wanted = MIN_STEPS if min_steps is None else min_steps
        epochs = min(MAX_EPOCHS, max(spec.epochs, math.ceil(wanted / steps_per_epoch)))
    return Recipe(epochs=epochs, batch_size=batch_size,
                  learning_rate=learning_rate_for(hidden_size, spec.kind) if learning_rate is None else learning_rate,
                  warmup_ratio=WARMUP_RATIO if warmup_ratio is None else warmup_ratio,
                  weight_decay=WEIGHT_DECAY if weight_decay is None else weight_decay, name="ppkit-v2")
