"""Tokenizing splits for fine-tuning and evaluation: :class:`TaskDataset`, :func:`load_task_dataset`, the
padding collator, LM blocks and SQuAD features.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ppkit.errors import DataError, InputError
from ppkit.tasks import TaskSpec, get_task

from .reading import load_split, split_name

logger = logging.getLogger("ppkit.data")  # one name for the package's warnings, as users see them


LM_CHUNK_LINES = 1000  # reference data.py: texts are joined into blocks per 1000-line map chunk


QA_STRIDE = 128


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS (GPT-2 has no pad token), else 0.
    Padding positions are masked out, so the choice never changes results."""
    for tid in (tokenizer.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def check_max_length(max_length: int, tokenizer=None, max_positions: int | None = None) -> int:
    """Validate a sequence length: positive and not beyond the model's position embeddings
    (``max_positions``, else the tokenizer's ``model_max_length`` when it is a real limit)."""
    if not isinstance(max_length, int) or max_length <= 0:
        raise InputError(f"max length must be a positive integer, got {max_length!r}")
    limit = max_positions
    if limit is None and tokenizer is not None:
        tml = getattr(tokenizer, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 1_000_000:
            limit = tml
    if limit is not None and max_length > limit:
        raise InputError(f"max length {max_length} is longer than the model's {limit} positions; "
                         f"use --max-length {limit} or less")
    return max_length


def task_max_length(spec: TaskSpec, max_length: int | None, tokenizer=None, max_positions: int | None = None,
                    warns: list[str] | None = None) -> int:
    """The sequence length to use: ``max_length`` when given (validated by :func:`check_max_length`),
    else the task's default, shortened with a warning to the model's positions when the model is
    shorter (a user who asked for nothing should not get an error about a length they never chose)."""
    if max_length is not None:
        return check_max_length(max_length, tokenizer, max_positions)
    default = spec.max_length
    if max_positions is not None and 0 < max_positions < default:
        msg = (f"task {spec.name}'s default max length {default} is longer than the model's {max_positions} "
               f"positions: using {max_positions}")
        logger.warning(msg)
        if warns is not None:
            warns.append(msg)
        default = max_positions
    return check_max_length(default, tokenizer, max_positions)


def encode_rows(spec: TaskSpec, tokenizer, rows: Sequence[dict], max_length: int,
                 with_labels: bool) -> list[dict]:
    feats: list[dict] = []
    step = 1000
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        a = [r["text_a"] for r in chunk]
        b = [r["text_b"] for r in chunk] if spec.is_pair else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        for j, row in enumerate(chunk):
            f = {k: list(enc[k][j]) for k in keys}
            if "attention_mask" not in f:
                f["attention_mask"] = [1] * len(f["input_ids"])
            if with_labels:
                f["labels"] = row["label"]
            feats.append(f)
    return feats


def qa_encode(tokenizer, rows: Sequence[dict], max_length: int, stride: int, *, train: bool):
    """Question+context features as Hugging Face's run_qa builds them. Returns (features,
    feature->example index, offsets with None outside the context)."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("question answering needs a fast tokenizer (offset mappings); load one with use_fast=True")
    stride = min(stride, max(1, max_length // 3))
    cls_id = tokenizer.cls_token_id
    feats, fmap, offsets_all = [], [], []
    step = 256
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        try:
            enc = tokenizer([r["question"].lstrip() for r in chunk], [r["context"] for r in chunk],
                            truncation="only_second", max_length=max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        except Exception as exc:  # tokenizers raises when a question leaves no room for the context
            raise DataError(f"could not build question/context features with max length {max_length}: {exc}; "
                            "use a larger --max-length (384 is the default)") from exc
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        for i in range(len(enc["input_ids"])):
            ex = start + enc["overflow_to_sample_mapping"][i]
            seq_ids = enc.sequence_ids(i)
            offsets = enc["offset_mapping"][i]
            f = {k: list(enc[k][i]) for k in keys}
            if train:
                ids = f["input_ids"]
                cls_index = ids.index(cls_id) if cls_id in ids else 0
                answers = rows[ex]["answers"]
                s_pos = e_pos = cls_index
                if answers["answer_start"]:
                    start_char = answers["answer_start"][0]
                    end_char = start_char + len(answers["text"][0])
                    ts = 0
                    while seq_ids[ts] != 1:
                        ts += 1
                    te = len(ids) - 1
                    while seq_ids[te] != 1:
                        te -= 1
                    if offsets[ts][0] <= start_char and offsets[te][1] >= end_char:
                        while ts < len(offsets) and offsets[ts][0] <= start_char:
                            ts += 1
                        s_pos = ts - 1
                        while offsets[te][1] >= end_char:
                            te -= 1
                        e_pos = te + 1
                f["start_positions"] = s_pos
                f["end_positions"] = e_pos
            feats.append(f)
            fmap.append(ex)
            offsets_all.append([tuple(o) if seq_ids[k] == 1 else None for k, o in enumerate(offsets)])
    return feats, fmap, offsets_all


def lm_blocks(tokenizer, lines: Sequence[str], block: int, chunk_order: Iterable[int] | None = None,
               stop_after: int | None = None) -> list[list[int]]:
    """Token blocks of length ``block``: lines are joined per 1000-line chunk, tokenized, and cut; the
    remainder of each chunk is dropped (as the reference). ``chunk_order`` / ``stop_after`` let
    calibration tokenize chunks in a random order and stop once it has enough blocks."""
    n_chunks = math.ceil(len(lines) / LM_CHUNK_LINES)
    order = range(n_chunks) if chunk_order is None else chunk_order
    blocks: list[list[int]] = []
    for c in order:
        text = "".join(lines[c * LM_CHUNK_LINES:(c + 1) * LM_CHUNK_LINES])
        if not text.strip():
            continue
        ids = tokenizer(text, verbose=False)["input_ids"]
        blocks.extend(ids[i:i + block] for i in range(0, len(ids) - block + 1, block))
        if stop_after is not None and len(blocks) >= stop_after:
            break
    return blocks


class PadCollator:
    """Pads a list of features per batch (dynamic padding) into tensors. ``input_ids`` get the pad id,
    ``attention_mask`` / ``token_type_ids`` zeros; GPT-2-style left padding is honoured; labels are
    stacked (float for regression). Keys it does not know are ignored."""

    def __init__(self, tokenizer=None, *, pad_id: int | None = None, padding_side: str | None = None,
                 float_labels: bool = False) -> None:
        self.pad_id = pad_id if pad_id is not None else (pad_token_id(tokenizer) if tokenizer is not None else 0)
        self.left = (padding_side or getattr(tokenizer, "padding_side", "right")) == "left"
        self.float_labels = float_labels

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in features[0]:
                continue
            rows = []
            for f in features:
                pad = [fill] * (width - len(f[key]))
                rows.append(pad + list(f[key]) if self.left else list(f[key]) + pad)
            out[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            if isinstance(labels[0], list):  # LM blocks: all the same length
                out["labels"] = torch.tensor(labels, dtype=torch.long)
            else:
                out["labels"] = torch.tensor(labels, dtype=torch.float32 if self.float_labels else torch.long)
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return out


class TaskDataset(torch.utils.data.Dataset):
    """A tokenized split for fine-tuning and evaluation: ``features`` (model inputs plus ``labels``, or
    ``start_positions`` / ``end_positions`` for QA) and what is needed to score predictions:
    ``references`` (gold labels; gold answer texts per question for QA), and for QA ``examples``,
    ``feature_example`` (feature -> example index) and ``offsets`` (character spans, None outside
    the context). Use :class:`PadCollator` (``collator()``) to batch it."""

    def __init__(self, task: TaskSpec, split: str, source: str, features: list[dict], *, references: list,
                 num_examples: int, examples: list[dict] | None = None, feature_example: list[int] | None = None,
                 offsets: list | None = None, max_length: int = 0, pad_id: int = 0) -> None:
        self.task, self.split, self.source = task, split, source
        self.features, self.references, self.num_examples = features, references, num_examples
        self.examples, self.feature_example, self.offsets = examples, feature_example, offsets
        self.max_length, self.pad_id = max_length, pad_id

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]

    def collator(self, tokenizer=None) -> PadCollator:
        """The padding collator for this dataset (float labels for regression)."""
        return PadCollator(tokenizer, pad_id=None if tokenizer is not None else self.pad_id,
                           float_labels=self.task.kind == "regression")

    @property
    def mean_length(self) -> float:
        """Mean non-padding tokens per feature."""
        return float(np.mean([sum(f["attention_mask"]) for f in self.features])) if self.features else 0.0


def _limit_indices(n: int, limit: int | None, seed: int | None) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise InputError(f"limit must be a positive integer, got {limit}")
    if seed is None:
        return list(range(limit))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=limit, replace=False))


def load_task_dataset(task: str | TaskSpec, tokenizer, split: str = "dev", *, data: str | Path | None = None,
                      max_length: int | None = None, limit: int | None = None, limit_seed: int | None = None,
                      max_positions: int | None = None) -> TaskDataset:
    """Tokenize one split with labels kept, for fine-tuning (``split="train"``) and evaluation
    (``"dev"``; ``"test"`` for LM). ``limit`` keeps the first N examples (or a seeded random subset
    when ``limit_seed`` is given) for quick runs; for QA it counts questions, for LM blocks of
    ``max_length`` tokens (the text is joined per 1000 lines and cut, as for calibration)."""
    spec = get_task(task)
    split = split_name(split)
    max_length = task_max_length(spec, max_length, tokenizer, max_positions)
    raw = load_split(spec, split, data=data, require_labels=True)
    pad = pad_token_id(tokenizer)
    if spec.kind == "lm":
        blocks = lm_blocks(tokenizer, raw.lines, max_length)
        if not blocks:
            raise DataError(f"{raw.source} has fewer than {max_length} tokens; use a smaller --max-length")
        blocks = [blocks[i] for i in _limit_indices(len(blocks), limit, limit_seed)]
        feats = [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]
        return TaskDataset(spec, split, raw.source, feats, references=[], num_examples=len(feats),
                           max_length=max_length, pad_id=pad)
    if not raw.has_labels:
        raise DataError(f"{raw.source} has no label column; fine-tuning and evaluation need labels")
    rows = [raw.rows[i] for i in _limit_indices(len(raw.rows), limit, limit_seed)]
    if spec.kind == "qa":
        feats, fmap, offsets = qa_encode(tokenizer, rows, max_length, QA_STRIDE, train=True)
        refs = [r["answers"]["text"] for r in rows]
        return TaskDataset(spec, split, raw.source, feats, references=refs, num_examples=len(rows), examples=rows,
                           feature_example=fmap, offsets=offsets, max_length=max_length, pad_id=pad)
    feats = encode_rows(spec, tokenizer, rows, max_length, with_labels=True)
    return TaskDataset(spec, split, raw.source, feats, references=[r["label"] for r in rows],
                       num_examples=len(rows), max_length=max_length, pad_id=pad)


def lm_token_ids(task: str | TaskSpec, tokenizer, split: str = "test", *, data: str | Path | None = None) -> torch.Tensor:
    """The whole text of an LM split as one [1, n] tensor of token ids, for strided perplexity
    (:func:`ppkit.metrics.perplexity`)."""
    spec = get_task(task)
    if spec.kind != "lm":
        raise InputError(f"task {spec.name} is not a language-modelling task")
    raw = load_split(spec, split, data=data)
    ids = tokenizer(raw.text, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise DataError(f"{raw.source} has fewer than 2 tokens")
    return torch.tensor([ids], dtype=torch.long)
