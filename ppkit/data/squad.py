"""SQuAD post-processing: start / end logits of the features back to answer texts per question (run_qa style).
"""

from __future__ import annotations

import math

import numpy as np

from ppkit.errors import InputError

from .encoding import TaskDataset


def postprocess_qa(dataset: TaskDataset, start_logits: np.ndarray, end_logits: np.ndarray, *, n_best: int = 20,
                   max_answer_length: int = 30, null_threshold: float = 0.0) -> list[str]:
    """Answer text per question from per-feature start/end logits, as Hugging Face's run_qa does: the
    best valid span (inside the context, end >= start, at most ``max_answer_length`` tokens) over all
    features of a question; for SQuAD v2 the empty answer wins when the null score (CLS start + end)
    beats the best span by more than ``null_threshold``."""
    if dataset.examples is None or dataset.feature_example is None or dataset.offsets is None:
        raise InputError("postprocess_qa needs a QA dataset from load_task_dataset")
    v2 = dataset.task.name == "squad_v2"
    best: list[tuple[float, str]] = [(-math.inf, "")] * len(dataset.examples)
    null: list[float] = [math.inf] * len(dataset.examples)
    for fi, ex in enumerate(dataset.feature_example):
        s_log, e_log, offs = start_logits[fi], end_logits[fi], dataset.offsets[fi]
        n = len(offs)
        s_log, e_log = s_log[:n], e_log[:n]
        null[ex] = min(null[ex], float(s_log[0] + e_log[0]))
        s_idx = np.argsort(s_log)[-1:-n_best - 1:-1]
        e_idx = np.argsort(e_log)[-1:-n_best - 1:-1]
        context = dataset.examples[ex]["context"]
        for s in s_idx:
            for e in e_idx:
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_log[s] + e_log[e])
                if score > best[ex][0]:
                    best[ex] = (score, context[offs[s][0]:offs[e][1]])
    out = []
    for ex, (score, text) in enumerate(best):
        if v2 and (score == -math.inf or null[ex] > score + null_threshold):
            out.append("")
        else:
            out.append(text)
    return out
