"""Task metrics: GLUE (accuracy, F1, Matthews, Pearson/Spearman), SQuAD EM/F1, strided perplexity.

Scales follow the official scripts: GLUE metrics are fractions in [0, 1] (as ``evaluate``'s glue
metric), SQuAD exact match and F1 are percentages (as the official ``evaluate-v1.1.py`` /
``evaluate-v2.0.py``), perplexity is ``exp`` of the mean token negative log-likelihood.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any, Sequence

import numpy as np
import torch

from ppkit.errors import InputError
from ppkit.tasks import TaskSpec, get_task


def _arrays(predictions, references) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape[0] != r.shape[0]:
        raise InputError(f"{p.shape[0]} predictions but {r.shape[0]} references")
    if p.shape[0] == 0:
        raise InputError("no predictions to score")
    return p, r


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Fraction of predictions equal to the reference label."""
    p, r = _arrays(predictions, references)
    return float((p == r).mean())


def f1_binary(predictions: Sequence[int], references: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (GLUE MRPC/QQP: label 1); 0.0 when there are no true or predicted positives."""
    p, r = _arrays(predictions, references)
    tp = int(((p == positive) & (r == positive)).sum())
    fp = int(((p == positive) & (r != positive)).sum())
    fn = int(((p != positive) & (r == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(predictions: Sequence[int], references: Sequence[int]) -> float:
    """Matthews correlation coefficient (multiclass form, equal to sklearn's); 0.0 when undefined."""
    p, r = _arrays(predictions, references)
    labels = np.union1d(p, r)
    idx = {v: i for i, v in enumerate(labels.tolist())}
    cm = np.zeros((len(labels), len(labels)), dtype=np.float64)
    for a, b in zip(r.tolist(), p.tolist()):
        cm[idx[a], idx[b]] += 1
    t, pk = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    cov_ytyp = c * s - t @ pk
    cov_ypyp = s * s - pk @ pk
    cov_ytyt = s * s - t @ t
    denom = math.sqrt(cov_ytyt * cov_ypyp)
    return 0.0 if denom == 0 else float(cov_ytyp / denom)


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation (scipy)."""
    from scipy.stats import pearsonr

    p, r = _arrays(predictions, references)
    return float(pearsonr(p.astype(np.float64), r.astype(np.float64))[0])


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation (scipy)."""
    from scipy.stats import spearmanr

    p, r = _arrays(predictions, references)
    return float(spearmanr(p.astype(np.float64), r.astype(np.float64))[0])


# ------------------------------------------------------------------------------------------------ SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """The official SQuAD normalisation: lowercase, drop punctuation, drop articles, squash whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def squad_exact(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_f1(prediction: str, gold: str, *, v2: bool = False) -> float:
    """Token-overlap F1 of the normalised strings. With ``v2`` an empty side scores 1.0 only when
    both are empty (official v2.0 script); v1.1 scores it 0.0."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if v2 and (not pred or not ref):
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], references: Sequence[Sequence[str]], *, v2: bool = False) -> dict[str, float]:
    """``exact_match`` and ``f1`` in percent, each the max over a question's gold answers, averaged
    over questions. For v2, a question with no gold answer has gold ``[""]``."""
    if len(predictions) != len(references):
        raise InputError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise InputError("no predictions to score")
    em = f1 = 0.0
    for pred, golds in zip(predictions, references):
        golds = ([g for g in golds if normalize_answer(g)] or [""]) if v2 else list(golds)
        if not golds:
            raise InputError("a SQuAD v1.1 question has no gold answer")
        em += max(squad_exact(pred, g) for g in golds)
        f1 += max(squad_f1(pred, g, v2=v2) for g in golds)
    n = len(predictions)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# -------------------------------------------------------------------------------------------- perplexity


def model_max_positions(model) -> int | None:
    """The model's context length from its config (``n_positions`` or ``max_position_embeddings``)."""
    cfg = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, *, max_length: int | None = None, stride: int = 512,
               progress: bool = False) -> float:
    """Strided (sliding-window) perplexity exactly as Hugging Face documents it ("Perplexity of
    fixed-length models"): windows of ``max_length`` tokens (default: the model's context) start every
    ``stride`` tokens; only the last ``trg_len`` tokens of a window (those not scored before) are
    targets, the others get label -100; each window's mean loss is weighted by its number of target
    tokens minus one (the model shifts labels internally), and ppl = exp(total nll / total tokens)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    max_length = max_length or model_max_positions(model) or 1024
    limit = model_max_positions(model)
    if limit is not None and max_length > limit:
        raise InputError(f"perplexity window {max_length} is longer than the model's {limit} positions")
    if not 1 <= stride <= max_length:
        raise InputError(f"stride must be between 1 and the window length {max_length}, got {stride}")
    seq_len = input_ids.size(1)
    if seq_len < 2:
        raise InputError("perplexity needs at least 2 tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    starts = list(range(0, seq_len, stride))
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        job = bar.add_task("perplexity", total=len(starts))
    try:
        for begin in starts:
            end = min(begin + max_length, seq_len)
            trg_len = end - prev_end  # may differ from stride on the last window
            ids = input_ids[:, begin:end].to(device)
            target = ids.clone()
            target[:, :-trg_len] = -100
            loss = model(ids, labels=target).loss
            num_valid = int((target != -100).sum())
            num_loss_tokens = num_valid - target.size(0)  # internal label shift drops one per row
            nll_sum += float(loss) * num_loss_tokens
            n_tokens += num_loss_tokens
            prev_end = end
            if bar is not None:
                bar.advance(job)
            if end == seq_len:
                break
    finally:
        if bar is not None:
            bar.stop()
        model.train(was_training)
    return math.exp(nll_sum / n_tokens)


# ------------------------------------------------------------------------------------------- per task


def compute_task_metrics(task: str | TaskSpec, predictions: Any, references: Any) -> dict[str, float]:
    """The task's metrics as a dict: classification takes logits [N, C] or label ids [N]; regression
    scores [N] (or [N, 1]); QA answer strings with a list of gold answers per question; LM the mean
    token negative log-likelihood (a float; references ignored), giving ``loss`` and ``perplexity``."""
    spec = get_task(task)
    if spec.kind == "lm":
        loss = float(np.mean(np.asarray(predictions, dtype=np.float64)))
        return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}
    if spec.kind == "qa":
        return squad_scores(list(predictions), list(references), v2=spec.name == "squad_v2")
    p = np.asarray(predictions)
    if spec.kind == "regression":
        p = p.reshape(p.shape[0], -1)[:, 0] if p.ndim > 1 else p
    elif p.ndim == 2:
        p = p.argmax(axis=-1)
    fns = {"accuracy": accuracy, "f1": f1_binary, "matthews_correlation": matthews_corrcoef,
           "pearson": pearson, "spearman": spearman}
    return {name: fns[name](p, references) for name in spec.metrics}
