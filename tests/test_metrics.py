"""GLUE metrics against scikit-learn / scipy, SQuAD EM/F1 on hand-made cases, strided perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppkit.errors import InputError
from ppkit.metrics import (
    accuracy,
    compute_task_metrics,
    f1_binary,
    matthews_corrcoef,
    normalize_answer,
    pearson,
    perplexity,
    spearman,
    squad_f1,
    squad_scores,
)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    from sklearn import metrics as skm

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=200)
    p = np.where(rng.random(200) < 0.7, y, 1 - y)
    assert accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p))
    assert f1_binary(p, y) == pytest.approx(skm.f1_score(y, p))
    assert matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p))
    y3, p3 = rng.integers(0, 3, size=150), rng.integers(0, 3, size=150)
    assert matthews_corrcoef(p3, y3) == pytest.approx(skm.matthews_corrcoef(y3, p3))


def test_degenerate_cases_follow_sklearn():
    # constant predictions: MCC undefined -> 0; no positives anywhere: F1 0
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert f1_binary([0, 0], [0, 0]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    with pytest.raises(InputError):
        accuracy([1, 0], [1])


def test_correlations_match_definitions():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    x = rng.normal(size=100)
    y = 0.5 * x + rng.normal(size=100)
    y[:10] = np.round(y[:10])  # some ties for the rank version
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert spearman(x, y) == pytest.approx(np.corrcoef(rankdata(x), rankdata(y))[0, 1])
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, np.exp(x)) < 0.99


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Big, Cat!") == "big cat"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert squad_f1("the big cat", "a big dog") == pytest.approx(0.5)
    assert squad_f1("big big cat", "big cat") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    scores = squad_scores(["Denver Broncos", "the cat sat", "nothing"],
                          [["Denver Broncos", "Broncos"], ["a dog", "cat sat down"], ["something"]])
    # EM: 1 + 0 + 0; F1: 1 + max(0, 2*(2/2)*(2/3)/(1+2/3)) + 0
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8) / 3)


def test_squad_v2_empty_answers():
    # unanswerable: gold [] -> [""]; predicting "" is right, anything else is wrong
    v2 = squad_scores(["", "x", "Paris"], [[], [], ["Paris"]], v2=True)
    assert v2 == {"exact_match": pytest.approx(200 / 3), "f1": pytest.approx(200 / 3)}
    assert squad_f1("", "", v2=True) == 1.0 and squad_f1("", "", v2=False) == 0.0


def test_compute_task_metrics_per_kind():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    refs = [0, 1, 1, 1]
    m = compute_task_metrics("mrpc", logits, refs)
    assert m == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    assert set(compute_task_metrics("cola", [0, 1, 1, 1], refs)) == {"matthews_correlation"}
    s = compute_task_metrics("stsb", np.array([[1.0], [2.0], [3.5], [3.0]]), [1.0, 2.5, 3.0, 4.0])
    assert set(s) == {"pearson", "spearman"} and s["spearman"] == pytest.approx(0.8)
    assert compute_task_metrics("squad", ["a b"], [["a b"]]) == {"exact_match": 100.0, "f1": 100.0}
    lm = compute_task_metrics("ptb", 2.0, None)
    assert lm["perplexity"] == pytest.approx(math.exp(2.0))


def _token_nll(model, ids):
    """Per-position next-token NLL of one window, computed by hand with log_softmax."""
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return -torch.log_softmax(logits.double(), -1).gather(1, ids[0, 1:, None])[:, 0]


def test_perplexity_single_and_disjoint_windows_equal_exact_token_average():
    from conftest import make_tiny_gpt2

    model = make_tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 120, (1, 50), generator=g)
    # one window covering everything: exp(mean NLL of the 49 predicted tokens)
    full = _token_nll(model, ids)
    assert perplexity(model, ids, max_length=64, stride=64) == pytest.approx(math.exp(full.mean().item()), rel=1e-5)
    # disjoint windows of 16: each window restarts its context
    nll = torch.cat([_token_nll(model, ids[:, s:s + 16]) for s in range(0, 50, 16)])
    assert perplexity(model, ids, max_length=16, stride=16) == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)


def test_overlapping_windows_score_each_token_once_with_context():
    from conftest import make_tiny_gpt2

    model = make_tiny_gpt2()
    ids = torch.randint(0, 120, (1, 40), generator=torch.Generator().manual_seed(1))
    max_len, stride = 16, 8
    # by hand, the documented recipe: window [b, b+16), targets are its last trg_len tokens, the
    # window's mean over those targets is weighted by (num targets - 1)
    total, count, prev_end = 0.0, 0, 0
    for b in range(0, 40, stride):
        end = min(b + max_len, 40)
        trg_len = end - prev_end
        nll = _token_nll(model, ids[:, b:end])  # position i predicts token i+1 of the window
        win = end - b
        target_pos = [i for i in range(1, win) if i >= win - trg_len]
        mean = nll[[i - 1 for i in target_pos]].mean().item()
        total += mean * (trg_len - 1)
        count += trg_len - 1
        prev_end = end
        if end == 40:
            break
    assert perplexity(model, ids, max_length=max_len, stride=stride) == pytest.approx(math.exp(total / count), rel=1e-5)
    # the overlap gives tokens context, so the value is not the disjoint-window one
    assert perplexity(model, ids, max_length=16, stride=8) != pytest.approx(perplexity(model, ids, max_length=16, stride=16))


def test_perplexity_argument_checks():
    from conftest import make_tiny_gpt2

    model = make_tiny_gpt2()
    ids = torch.randint(0, 120, (1, 20))
    with pytest.raises(InputError, match="stride"):
        perplexity(model, ids, max_length=8, stride=9)
    with pytest.raises(InputError, match="64 positions"):
        perplexity(model, ids, max_length=128, stride=8)
    assert model.training is False
