"""The built-in strategies pick what the paper says, within the FLOPs budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppkit.adapters import get_adapter
from ppkit.adapters.base import ModelShape
from ppkit.budget import split_budget
from ppkit.errors import BudgetError, InputError
from ppkit.flops import head_flops, neuron_flops, plan_flops
from ppkit.registry import PruningContext, run_strategy
from ppkit.statistics import ActivationStats, collect_statistics

L, H, DH, N, T, S = 2, 4, 4, 16, 400, 20.0
SHAPE = ModelShape("bert", L, H, DH, H * DH, N, (H,) * L, (N,) * L, 64, False)
FH, FN = head_flops(H * DH, DH, S), neuron_flops(H * DH, S)
DENSE = L * (H * FH + N * FN)


def constructed_stats(seed: int = 0) -> ActivationStats:
    """Per layer: neurons {0,3,7} are copies (x1, x-2, x0.5) and {5,9} copies (x1, x3); head 2 is head 0
    with shuffled dimensions, two of them negated, x2. Everything else is independent noise."""
    gen = torch.Generator().manual_seed(seed)
    heads, neurons = [], []
    for _ in range(L):
        a = torch.randn(T, N, generator=gen)
        a[:, 3] = -2.0 * a[:, 0]
        a[:, 7] = 0.5 * a[:, 0]
        a[:, 9] = 3.0 * a[:, 5]
        h = torch.randn(T, H * DH, generator=gen)
        perm = torch.tensor([2, 0, 3, 1])
        h[:, 2 * DH:3 * DH] = 2.0 * h[:, 0:DH][:, perm] * torch.tensor([1.0, -1.0, 1.0, -1.0])
        heads.append(h)
        neurons.append(a)
    return ActivationStats.from_samples(heads, neurons, H, DH, mean_seq_len=S)


def budget_for(pruned_heads: int, pruned_neurons: int) -> tuple[float, float]:
    """(kept FLOPs fraction, lambda) that ask for exactly these pruned counts."""
    p_mha, p_ffn = pruned_heads * FH, pruned_neurons * FN
    return 1.0 - (p_mha + p_ffn) / DENSE, p_ffn / p_mha


def ctx_for(stats, budget, lambda_, seed=0, **options) -> PruningContext:
    return PruningContext(None, None, SHAPE, stats, budget, S, lambda_, seed, options)


@pytest.mark.parametrize("linkage", ["average", "complete", "reference"])
def test_dual_cp_keeps_one_per_duplicate_group_the_most_active(linkage):
    budget, lam = budget_for(pruned_heads=2, pruned_neurons=6)  # one head and three neurons per layer
    plan = run_strategy("dual-cp", ctx_for(constructed_stats(), budget, lam, linkage=linkage))
    for layer in plan.layers:
        assert layer.heads == (1, 2, 3)  # head 2 (x2) beats its copy head 0
        assert set(layer.neurons) == set(range(N)) - {0, 7, 5}  # keeps 3 (x-2) and 9 (x3)
    assert plan.meta["clusters_per_layer"] == {"heads": [3, 3], "neurons": [13, 13]}
    assert plan.meta["linkage"] == linkage
    assert plan_flops(plan, SHAPE, S).ratio <= budget + 1e-12


def test_dual_cp_leaves_each_pruned_unit_s_centroid_for_merge():
    """``ctx.artifacts["assignments"]`` maps every pruned unit to the kept member of its cluster
    (what ``--compensate merge`` folds it into)."""
    budget, lam = budget_for(pruned_heads=2, pruned_neurons=6)
    ctx = ctx_for(constructed_stats(), budget, lam)
    run_strategy("dual-cp", ctx)
    for l in range(L):
        assert ctx.artifacts["assignments"][(l, "attention")] == {0: 2}
        assert ctx.artifacts["assignments"][(l, "ffn")] == {0: 3, 7: 3, 5: 9}


def test_dual_cp_random_selection_is_one_random_member_per_cluster():
    budget, lam = budget_for(2, 6)
    stats = constructed_stats()
    plans = [run_strategy("dual-cp", ctx_for(stats, budget, lam, seed=s, selection="random")) for s in range(8)]
    for plan in plans:
        for layer in plan.layers:
            assert len({0, 2} & set(layer.heads)) == 1 and {1, 3} <= set(layer.heads)
            assert len({0, 3, 7} & set(layer.neurons)) == 1 and len({5, 9} & set(layer.neurons)) == 1
    assert len({tuple(p.layers[0].neurons) for p in plans}) > 1
    again = run_strategy("dual-cp", ctx_for(stats, budget, lam, seed=3, selection="random"))
    assert again.layers == plans[3].layers


def test_worst_keeps_the_redundant_units():
    budget, lam = budget_for(2, 6)
    stats = constructed_stats()
    best = run_strategy("dual-cp", ctx_for(stats, budget, lam))
    worst = run_strategy("worst", ctx_for(stats, budget, lam))
    assert worst.heads_per_layer == best.heads_per_layer and worst.neurons_per_layer == best.neurons_per_layer
    for layer in worst.layers:
        assert {0, 2} <= set(layer.heads)
        assert {0, 3, 7, 5, 9} <= set(layer.neurons)
        # the three pruned neurons are independent ones (the last singletons)
        assert set(range(N)) - set(layer.neurons) == {13, 14, 15}


def test_exact_threshold_agrees_with_delta_scan(tiny_bert):
    stats = collect_statistics(tiny_bert, tiny_batches(), tokens=40, progress=False)
    adapter = get_adapter(tiny_bert)
    shape = adapter.shape()
    for budget in (0.8, 0.6, 0.4):
        ctx = lambda **o: PruningContext(tiny_bert, adapter, shape, stats, budget, stats.mean_seq_len, 5.0, 0, o)
        exact = run_strategy("dual-cp", ctx(threshold="exact"))
        coarse = run_strategy("dual-cp", ctx(threshold="scan", step=0.05, rebalance=False))
        exact_nr = run_strategy("dual-cp", ctx(threshold="exact", rebalance=False))
        assert sum(exact_nr.heads_per_layer) >= sum(coarse.heads_per_layer)
        assert sum(exact_nr.neurons_per_layer) >= sum(coarse.neurons_per_layer)
        fine = run_strategy("dual-cp", ctx(threshold="scan", step=1e-7))
        assert fine.layers == exact.layers
        assert exact.meta["thresholds"]["heads"] <= fine.meta["thresholds"]["heads"] < exact.meta["thresholds"]["heads"] + 1e-7 + 1e-12
        for plan in (exact, coarse, fine):
            assert plan_flops(plan, shape, stats.mean_seq_len).ratio <= budget + 1e-12


def test_rebalance_lands_close_to_budget(tiny_bert):
    stats = collect_statistics(tiny_bert, tiny_batches(), tokens=40, progress=False)
    adapter = get_adapter(tiny_bert)
    shape = adapter.shape()
    fn = neuron_flops(shape.hidden_size, stats.mean_seq_len)
    dense = plan_flops(run_strategy("dual-cp", PruningContext(tiny_bert, adapter, shape, stats, 1.0, stats.mean_seq_len)), shape, stats.mean_seq_len).dense_total
    for budget in (0.9, 0.7, 0.5):
        plan = run_strategy("dual-cp", PruningContext(tiny_bert, adapter, shape, stats, budget, stats.mean_seq_len))
        kept = plan_flops(plan, shape, stats.mean_seq_len).total
        assert budget * dense - kept < fn * 1.0001  # within one neuron of the budget
        assert kept <= budget * dense * (1 + 1e-12)
        assert plan.meta["split"]["flops_ratio"] == pytest.approx(kept / dense)


def test_lambda_infeasible_budget_moves_ffn_share_to_mha():
    bert_base = ModelShape("bert", 12, 12, 64, 768, 3072, (12,) * 12, (3072,) * 12, 512, False)
    split = split_budget(bert_base, 128.0, 0.15, 5.0)
    assert split.prune_ffn == pytest.approx(12 * 3071 * split.neuron_flops)
    assert split.prune_total == pytest.approx(0.85 * split.dense_total)
    assert "moved to MHA" in split.notes[0]
    # constructed model: the FFN is ~24% of the FLOPs, so lambda=5 at 30% cannot be met by the FFN alone
    stats = constructed_stats()
    plan = run_strategy("dual-cp", ctx_for(stats, 0.3, 5.0))
    assert plan_flops(plan, SHAPE, S).ratio <= 0.3
    assert any("moved to MHA" in n for n in plan.meta["notes"])
    assert min(plan.heads_per_layer) >= 1 and min(plan.neurons_per_layer) >= 1
    reachable = L * (FH + FN) / DENSE  # one head and one neuron per layer
    with pytest.raises(BudgetError, match=f"smallest reachable ratio is {reachable:.4f}"):
        run_strategy("dual-cp", ctx_for(stats, 0.01, 5.0))


def test_tiny_bert_at_15_percent_finishes_within_budget(tiny_bert):
    stats = collect_statistics(tiny_bert, tiny_batches(), tokens=40, progress=False)
    adapter = get_adapter(tiny_bert)
    shape = adapter.shape()
    for name in ("dual-cp", "worst", "random"):
        plan = run_strategy(name, PruningContext(tiny_bert, adapter, shape, stats, 0.15, stats.mean_seq_len, 5.0))
        assert plan_flops(plan, shape, stats.mean_seq_len).ratio <= 0.15


def test_random_is_seeded_and_within_budget(tiny_gpt2):
    adapter = get_adapter(tiny_gpt2)
    shape = adapter.shape()
    ctx = lambda seed: PruningContext(tiny_gpt2, adapter, shape, None, 0.5, 10.0, 5.0, seed)
    a, b, c = run_strategy("random", ctx(0)), run_strategy("random", ctx(0)), run_strategy("random", ctx(1))
    assert a.layers == b.layers and a.layers != c.layers
    for plan in (a, c):
        assert plan_flops(plan, shape, 10.0).ratio <= 0.5
        assert min(plan.heads_per_layer) >= 1 and min(plan.neurons_per_layer) >= 1
    # both module types are pruned, with the lambda split
    assert sum(a.heads_per_layer) < shape.num_layers * shape.num_heads
    assert sum(a.neurons_per_layer) < shape.num_layers * shape.ffn_dim


def test_kcm_prunes_ffn_only(tiny_bert):
    stats = collect_statistics(tiny_bert, tiny_batches(), tokens=40, progress=False)
    adapter = get_adapter(tiny_bert)
    shape = adapter.shape()
    plan = run_strategy("kcm", PruningContext(tiny_bert, adapter, shape, stats, 0.8, stats.mean_seq_len, 5.0))
    assert plan.heads_per_layer == [shape.num_heads] * shape.num_layers
    counts = plan.neurons_per_layer
    assert max(counts) - min(counts) <= 1 and sum(counts) < shape.num_layers * shape.ffn_dim
    report = plan_flops(plan, shape, stats.mean_seq_len)
    assert report.mha_ratio == 1.0 and report.ratio <= 0.8
    # FFN cannot reach 0.3 alone on this tiny model (heads are most of its FLOPs)
    with pytest.raises(BudgetError, match="FFN neurons only"):
        run_strategy("kcm", PruningContext(tiny_bert, adapter, shape, stats, 0.3, stats.mean_seq_len, 5.0))


def test_kcm_r2_prefers_points_others_cannot_represent():
    from ppkit.plugins.kcm import r2_scores, r2d2_scores

    gen = torch.Generator().manual_seed(0)
    cloud = 0.05 * torch.randn(30, 8, generator=gen)  # a tight cloud of similar neurons ...
    outlier = torch.full((1, 8), 2.0)  # ... and one far away
    r2, iters = r2_scores(torch.cat([cloud, outlier]))
    assert iters >= 1 and int(np.argmax(r2)) == 30
    score = r2d2_scores(np.array([0.1, 0.9, 0.5]), np.array([3.0, 1.0, 2.0]), "rank")
    assert score.tolist() == [2.0, 2.0, 2.0]  # rank sums: (0+2), (2+0), (1+1)


def test_kcm_r2_is_remembered_per_weights():
    """A budget sweep reuses R2 for the same weights; other weights are computed afresh."""
    from ppkit.plugins import kcm

    points = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    first, iters = kcm.r2_scores(points)
    calls = []
    real = kcm._r2_scores
    kcm._r2_scores = lambda *a: calls.append(a) or real(*a)
    try:
        again, iters_again = kcm.r2_scores(points.clone())
        first[0] = -1.0  # callers get copies: the cached scores stay intact
        other, _ = kcm.r2_scores(points * 2.0)
        assert kcm.r2_scores(points)[0][0] != -1.0
    finally:
        kcm._r2_scores = real
    assert len(calls) == 1  # only the new weights were computed
    assert iters_again == iters and np.array_equal(again, kcm._r2_scores(points, None, 1e-4, 200)[0])


def test_bad_option_names_the_strategy():
    budget, lam = budget_for(2, 6)
    with pytest.raises(InputError, match="dual-cp.*linkage='ward'"):
        run_strategy("dual-cp", ctx_for(constructed_stats(), budget, lam, linkage="ward"))
    with pytest.raises(InputError, match="needs activation statistics"):
        run_strategy("dual-cp", ctx_for(None, budget, lam))


def tiny_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 120, (8, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[5, 4:] = 0
    return [{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}]
