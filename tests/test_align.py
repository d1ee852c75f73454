"""--multiple-of: every layer's kept FFN width is a multiple of N and the plan stays within the budget."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED, make_tiny_bert

import ppkit
from ppkit.adapters import get_adapter
from ppkit.align import align_plan
from ppkit.errors import InputError
from ppkit.flops import plan_flops
from ppkit.plan import LayerPlan, PruningPlan


@pytest.mark.parametrize("strategy", ["dual-cp", "random", "kcm"])
def test_prune_with_multiple_of_8_is_aligned_and_within_budget(strategy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "models" / "all-MiniLM-L6-v2")
    kw = dict(tokenizer=tok, task="sst2", data=SHARED / "glue" / "SST-2", flops=0.6, samples=48, strategy=strategy,
              plot=False, progress=False)
    plain = ppkit.prune(make_tiny_bert("BertModel", vocab_size=tok.vocab_size), **kw)
    aligned = ppkit.prune(make_tiny_bert("BertModel", vocab_size=tok.vocab_size), multiple_of=8, **kw)

    widths = aligned.plan.neurons_per_layer
    assert all(w % 8 == 0 for w in widths), widths
    assert aligned.report["flops_ratio"] <= 0.6 + 1e-9 and aligned.report["multiple_of"] == 8
    assert aligned.plan.heads_per_layer == plain.plan.heads_per_layer
    # the freed budget is spent again: within one step of 8 neurons per layer of the unaligned plan's FLOPs
    shape = get_adapter(make_tiny_bert("BertModel", vocab_size=tok.vocab_size)).shape()
    step = plan_flops(PruningPlan([LayerPlan((), tuple(range(8)))] + [LayerPlan((), ())] * 2, 4, 64), shape,
                      aligned.report["flops_seq_len"]).ratio
    assert aligned.report["flops_ratio"] >= plain.report["flops_ratio"] - step
    assert get_adapter(aligned.model).shape().neurons_per_layer == tuple(widths)


def test_align_keeps_the_most_important_neurons():
    shape = get_adapter(make_tiny_bert("BertModel")).shape()
    plan = PruningPlan([LayerPlan((0, 1, 2, 3), tuple(range(12))) for _ in range(3)], 4, 64)
    scores = [np.arange(64, dtype=float)[::-1] for _ in range(3)]  # lower index = more important
    budget = plan_flops(plan, shape, 16.0).ratio
    out = align_plan(plan, 8, shape, 16.0, budget, scores)
    # 12 + 12 + 12 kept: every layer drops to 8 (its most important 8), and the 12 neurons freed buy one
    # layer back up to 16 (two would need 40 > 36)
    assert [layer.neurons for layer in out.layers] == [tuple(range(16)), tuple(range(8)), tuple(range(8))]
    assert plan_flops(out, shape, 16.0).ratio <= budget
    assert align_plan(plan, 1, shape, 16.0, budget) is plan
    with pytest.raises(InputError, match="does not divide"):
        align_plan(plan, 7, shape, 16.0, budget)
