"""Task registry: what each supported task is, where its data lives, and how it is scored.

A :class:`TaskSpec` is plain data. It names the Hugging Face hub dataset as people load it with
``datasets.load_dataset`` and the column names of the original local files (GLUE TSVs, SQuAD JSON,
plain-text LM corpora), so :mod:`ppkit.data` can read either one into the same canonical columns:
``text_a`` (and ``text_b`` for pair tasks) plus ``label`` for GLUE, the SQuAD fields for QA, and
``text`` for language modelling. Fine-tuning defaults are the paper's (BERT paper GLUE setting;
SQuAD batch 12; GPT-2 LM per corpus).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ppkit.errors import InputError


@dataclass(frozen=True)
class ColumnSchema:
    """One way a table of the task can be laid out: which columns hold text_a, text_b and the label.

    ``names`` is set for headerless files (CoLA): the columns are named positionally. ``label_map``
    turns string labels (GLUE ``entailment`` / ``not_entailment``) into the hub's integer ids.
    """

    text_a: str
    text_b: str | None = None
    label: str | None = None
    names: tuple[str, ...] | None = None
    label_map: Mapping[str, int] | None = None

    @property
    def required(self) -> tuple[str, ...]:
        cols = [self.text_a] + ([self.text_b] if self.text_b else []) + ([self.label] if self.label else [])
        return tuple(cols)


@dataclass(frozen=True)
class TaskSpec:
    """Everything ppkit knows about one task.

    ``kind`` is classification, regression, qa or lm. ``hub_name`` / ``hub_config`` are the
    ``datasets.load_dataset`` arguments; ``dev_split`` the hub split used for evaluation (the GLUE
    test labels are hidden, so "dev" is the validation split as in the paper). ``schemas`` lists the
    accepted column layouts, hub names first, then the local GLUE TSV names. ``local_files`` maps
    train/dev/test to file names tried in a local directory, and ``glue_dir`` is the GLUE folder
    name (``SST-2``) so a whole GLUE directory can be passed. ``metrics`` are the keys
    :func:`ppkit.metrics.compute_task_metrics` returns; ``main_metric`` picks the best epoch
    (``loss`` for LM, lower is better).
    """

    name: str
    kind: str
    hub_name: str
    hub_config: str | None
    num_labels: int
    dev_split: str
    metrics: tuple[str, ...]
    main_metric: str
    max_length: int
    schemas: tuple[ColumnSchema, ...] = ()
    local_files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    glue_dir: str | None = None
    test_split: str | None = None
    # fine-tuning defaults (paper, section 4)
    epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 2e-5
    description: str = ""
    #: class names by label id (GLUE's), written as the fine-tuned model's id2label
    label_names: tuple[str, ...] = ()

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (the tokenizer gets two texts)."""
        return any(s.text_b for s in self.schemas)

    @property
    def greater_is_better(self) -> bool:
        """False only for LM tasks, whose best epoch has the lowest loss."""
        return self.kind != "lm"

    @property
    def hub_id(self) -> str:
        """``name/config`` as shown to users."""
        return f"{self.hub_name}/{self.hub_config}" if self.hub_config else self.hub_name


_NLI = {"entailment": 0, "not_entailment": 1}
_MNLI = {"entailment": 0, "neutral": 1, "contradiction": 2}
_GLUE_FILES = {"train": ("train.tsv",), "dev": ("dev.tsv",), "test": ("test.tsv",)}


def _glue(name: str, glue_dir: str, schemas: tuple[ColumnSchema, ...], *, num_labels: int = 2,
          metrics: tuple[str, ...] = ("accuracy",), main: str = "accuracy", kind: str = "classification",
          dev_split: str = "validation", max_length: int = 128, local_files=None, description: str = "",
          label_names: tuple[str, ...] = ()) -> TaskSpec:
    return TaskSpec(
        name=name, kind=kind, hub_name="glue", hub_config=name, num_labels=num_labels, dev_split=dev_split,
        metrics=metrics, main_metric=main, max_length=max_length, schemas=schemas,
        local_files=local_files or _GLUE_FILES, glue_dir=glue_dir, description=description, label_names=label_names,
    )


_LM_SCHEMA_TEXT = (ColumnSchema("text"),)

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        _glue("cola", "CoLA", (
            ColumnSchema("sentence", label="label"),
            ColumnSchema("sentence", label="label", names=("source", "label", "orig_label", "sentence")),
        ), metrics=("matthews_correlation",), main="matthews_correlation",
            description="CoLA acceptability (Matthews correlation)", label_names=("unacceptable", "acceptable")),
        _glue("sst2", "SST-2", (ColumnSchema("sentence", label="label"),), max_length=64,
              description="SST-2 sentiment (accuracy)", label_names=("negative", "positive")),
        _glue("mrpc", "MRPC", (
            ColumnSchema("sentence1", "sentence2", "label"),
            ColumnSchema("#1 String", "#2 String", "Quality"),
        ), metrics=("accuracy", "f1"), description="MRPC paraphrase (accuracy, F1)",
            label_names=("not_equivalent", "equivalent")),
        _glue("qqp", "QQP", (
            ColumnSchema("question1", "question2", "label"),
            ColumnSchema("question1", "question2", "is_duplicate"),
        ), metrics=("accuracy", "f1"), description="QQP duplicate questions (accuracy, F1)",
            label_names=("not_duplicate", "duplicate")),
        _glue("stsb", "STS-B", (
            ColumnSchema("sentence1", "sentence2", "label"),
            ColumnSchema("sentence1", "sentence2", "score"),
        ), num_labels=1, kind="regression", metrics=("pearson", "spearman"), main="spearman",
            description="STS-B similarity (Pearson, Spearman)"),
        _glue("mnli", "MNLI", (
            ColumnSchema("premise", "hypothesis", "label"),
            ColumnSchema("sentence1", "sentence2", "gold_label", label_map=_MNLI),
            ColumnSchema("sentence1", "sentence2", "label", label_map=_MNLI),
        ), num_labels=3, dev_split="validation_matched",
            local_files={"train": ("train.tsv",), "dev": ("dev_matched.tsv", "dev.tsv"),
                         "test": ("test_matched.tsv",)},
            description="MNLI entailment, matched dev (accuracy)", label_names=("entailment", "neutral", "contradiction")),
        _glue("qnli", "QNLI", (
            ColumnSchema("question", "sentence", "label", label_map=_NLI),
        ), description="QNLI question entailment (accuracy)", label_names=("entailment", "not_entailment")),
        _glue("rte", "RTE", (
            ColumnSchema("sentence1", "sentence2", "label", label_map=_NLI),
        ), description="RTE entailment (accuracy)", label_names=("entailment", "not_entailment")),
        TaskSpec(
            name="squad", kind="qa", hub_name="squad", hub_config=None, num_labels=2, dev_split="validation",
            metrics=("exact_match", "f1"), main_metric="f1", max_length=384,
            local_files={"train": ("train-v1.1.json", "train.json", "train.jsonl"),
                         "dev": ("dev-v1.1.json", "dev.json", "dev.jsonl", "validation.jsonl")},
            batch_size=12, description="SQuAD v1.1 extractive QA (EM, F1)",
        ),
        TaskSpec(
            name="squad_v2", kind="qa", hub_name="squad_v2", hub_config=None, num_labels=2,
            dev_split="validation", metrics=("exact_match", "f1"), main_metric="f1", max_length=384,
            local_files={"train": ("train-v2.0.json", "train.json", "train.jsonl"),
                         "dev": ("dev-v2.0.json", "dev.json", "dev.jsonl", "validation.jsonl")},
            batch_size=12, description="SQuAD v2.0 extractive QA with unanswerable questions (EM, F1)",
        ),
        TaskSpec(
            name="wikitext-2", kind="lm", hub_name="wikitext", hub_config="wikitext-2-raw-v1", num_labels=0,
            dev_split="validation", test_split="test", metrics=("perplexity",), main_metric="loss",
            max_length=512, schemas=_LM_SCHEMA_TEXT,
            local_files={"train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
                         "dev": ("valid.txt", "wiki.valid.raw", "wiki.valid.tokens"),
                         "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens")},
            epochs=10, batch_size=32, learning_rate=1e-4, description="WikiText-2 language modelling (perplexity)",
        ),
        TaskSpec(
            name="wikitext-103", kind="lm", hub_name="wikitext", hub_config="wikitext-103-raw-v1", num_labels=0,
            dev_split="validation", test_split="test", metrics=("perplexity",), main_metric="loss",
            max_length=512, schemas=_LM_SCHEMA_TEXT,
            local_files={"train": ("train.txt", "wiki.train.raw", "wiki.train.tokens"),
                         "dev": ("valid.txt", "wiki.valid.raw", "wiki.valid.tokens"),
                         "test": ("test.txt", "wiki.test.raw", "wiki.test.tokens")},
            epochs=8, batch_size=32, learning_rate=5e-4, description="WikiText-103 language modelling (perplexity)",
        ),
        TaskSpec(
            name="ptb", kind="lm", hub_name="ptb_text_only", hub_config=None, num_labels=0,
            dev_split="validation", test_split="test", metrics=("perplexity",), main_metric="loss",
            max_length=512, schemas=(ColumnSchema("sentence"), ColumnSchema("text")),
            local_files={"train": ("train.txt", "ptb.train.txt"), "dev": ("valid.txt", "ptb.valid.txt"),
                         "test": ("test.txt", "ptb.test.txt")},
            epochs=20, batch_size=32, learning_rate=1e-4, description="Penn Treebank language modelling (perplexity)",
        ),
    ]
}

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "squad1.1": "squad", "squad_v1": "squad", "squad2": "squad_v2",
            "squad-v2": "squad_v2", "wikitext2": "wikitext-2", "wikitext103": "wikitext-103",
            "penn_treebank": "ptb", "wikitext-2-v1": "wikitext-2", "wikitext-103-v1": "wikitext-103"}


def task_names() -> list[str]:
    """Names of all registered tasks, in registry order."""
    return list(TASKS)


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The :class:`TaskSpec` called ``name`` (case-insensitive; a few common aliases such as ``sst-2``
    are accepted). Raises :class:`InputError` listing the valid names."""
    if isinstance(name, TaskSpec):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise InputError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]
