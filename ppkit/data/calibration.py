"""Calibration batches for the statistics pass (the reference implementation's sampling: the train
split, labels dropped, a seeded random sample, batches padded per batch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ppkit.errors import DataError, InputError
from ppkit.tasks import TaskSpec, get_task

from .encoding import (
    LM_CHUNK_LINES,
    QA_STRIDE,
    PadCollator,
    encode_rows,
    lm_blocks,
    qa_encode,
    task_max_length,
)
from .reading import load_split

logger = logging.getLogger("ppkit.data")  # one name for the package's warnings, as users see them


@dataclass
class CalibrationData:
    """Calibration batches (labels dropped) and what they are: ``num_samples`` rows actually used
    (features for SQuAD, token blocks for LM), ``requested_samples``, ``mean_length`` (mean non-padding
    tokens per sample), ``source``, ``max_length`` and any ``warnings`` (also logged)."""

    batches: list[dict[str, torch.Tensor]]
    num_samples: int
    mean_length: float
    source: str
    requested_samples: int
    max_length: int
    task: str
    warnings: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in all batches."""
        return int(sum(int(b["attention_mask"].sum()) for b in self.batches))


def _sample(n: int, samples: int, seed: int, what: str, source: str, warns: list[str]) -> list[int]:
    if n >= samples:
        return [int(i) for i in np.random.default_rng(seed).choice(n, size=samples, replace=False)]
    msg = f"{source} has only {n} {what}, fewer than the {samples} requested: using all {n}, in order"
    logger.warning(msg)
    warns.append(msg)
    return list(range(n))


def calibration_batches(task: str | TaskSpec, tokenizer, *, data: str | Path | None = None, samples: int = 3000,
                        max_length: int | None = None, seed: int = 0, batch_size: int = 32,
                        max_positions: int | None = None) -> CalibrationData:
    """Label-free calibration batches from the task's train split (paper: 3K random training samples).

    A seeded random sample of ``samples`` rows without replacement (in random order), or all rows in
    order plus a warning when the split is smaller. ``max_length`` defaults to the task's (128; SST-2
    64; SQuAD 384; LM blocks 512) and must not exceed ``max_positions`` (the model's position
    embeddings; the tokenizer's ``model_max_length`` when not given). Batches of ``batch_size`` are
    padded per batch and hold ``input_ids``, ``attention_mask`` and, when the tokenizer makes them,
    ``token_type_ids``. SQuAD samples are question+context features; LM samples are token blocks of
    ``max_length`` (text joined per 1000 lines; for large corpora the chunks are visited in a seeded
    random order and tokenizing stops once enough blocks exist)."""
    spec = get_task(task)
    if not isinstance(samples, int) or samples <= 0:
        raise InputError(f"the number of calibration samples must be a positive integer, got {samples!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    warns: list[str] = []
    max_length = task_max_length(spec, max_length, tokenizer, max_positions, warns)
    raw = load_split(spec, "train", data=data, require_labels=False)
    if spec.kind == "lm":
        rng = np.random.default_rng(seed)
        n_chunks = math.ceil(len(raw.lines) / LM_CHUNK_LINES)
        order = [int(c) for c in rng.permutation(n_chunks)]
        blocks = lm_blocks(tokenizer, raw.lines, max_length, order, stop_after=samples)
        if len(blocks) >= samples:
            idx = rng.choice(len(blocks), size=samples, replace=False)
            feats = [{"input_ids": blocks[int(i)], "attention_mask": [1] * max_length} for i in idx]
        else:
            blocks = lm_blocks(tokenizer, raw.lines, max_length)  # corpus order, as the reference
            if not blocks:
                raise DataError(f"{raw.source} has fewer than {max_length} tokens: no calibration block fits; "
                                "use a smaller --max-length or more text")
            _sample(len(blocks), samples, seed, f"blocks of {max_length} tokens", raw.source, warns)
            feats = [{"input_ids": b, "attention_mask": [1] * max_length} for b in blocks]
    elif spec.kind == "qa":
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(raw.rows))]
        feats = []
        for start in range(0, len(order), 512):  # tokenize questions in random order until enough features
            rows = [raw.rows[i] for i in order[start:start + 512]]
            feats.extend(qa_encode(tokenizer, rows, max_length, QA_STRIDE, train=False)[0])
            if len(feats) >= samples:
                break
        if len(feats) >= samples:
            feats = feats[:samples]
        else:
            feats = qa_encode(tokenizer, raw.rows, max_length, QA_STRIDE, train=False)[0]
            _sample(len(feats), samples, seed, "question/context features", raw.source, warns)
    else:
        idx = _sample(len(raw.rows), samples, seed, "rows", raw.source, warns)
        feats = encode_rows(spec, tokenizer, [raw.rows[i] for i in idx], max_length, with_labels=False)
    collate = PadCollator(tokenizer)
    batches = [collate(feats[i:i + batch_size]) for i in range(0, len(feats), batch_size)]
    lengths = [sum(f["attention_mask"]) for f in feats]
    return CalibrationData(
        batches=batches, num_samples=len(feats), mean_length=float(np.mean(lengths)) if lengths else 0.0,
        source=raw.source, requested_samples=samples, max_length=max_length, task=spec.name, warnings=warns,
    )
