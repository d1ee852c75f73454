"""Aligned FFN widths: every layer keeps a multiple of N neurons, inside the FLOPs budget.

Matrix kernels run best on widths that are multiples of 8 / 64 (GPU tensor cores, CPU vector
lanes); a plan's widths are whatever the strategy chose (e.g. 1871). :func:`align_plan` rounds every
layer down to a multiple of N, dropping its least important kept neurons, then spends the FLOPs this
freed by rounding layers back up, N neurons at a time (most important pruned neurons first), while
the plan stays within the budget. Importance is the mean |activation| from the statistics pass when
there is one; without it (e.g. the random strategy) the plan's own order decides (the last kept
neurons go first, the first pruned ones come back first). Heads are not changed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .adapters.base import ModelShape
from .errors import InputError
from .flops import plan_flops
from .plan import LayerPlan, PruningPlan


def align_plan(plan: PruningPlan, multiple: int, shape: ModelShape, seq_len: float, budget: float,
               scores: Sequence[np.ndarray] | None = None) -> PruningPlan:
    """``plan`` with every layer's kept FFN width a multiple of ``multiple`` and at most ``budget`` of
    the dense FLOPs at ``seq_len``; ``scores`` are per-layer neuron importances (higher = keep)."""
    if multiple < 1:
        raise InputError(f"--multiple-of must be a positive integer, got {multiple}")
    if multiple == 1:
        return plan
    if shape.ffn_dim % multiple:
        raise InputError(f"--multiple-of {multiple} does not divide the FFN width {shape.ffn_dim}")
    kept = [list(layer.neurons) for layer in plan.layers]
    pruned = [sorted(set(range(shape.ffn_dim)) - set(k)) for k in kept]
    for i in range(len(kept)):
        rank = _ranker(scores, i)
        kept[i].sort(key=rank, reverse=True)  # most important first
        pruned[i].sort(key=rank, reverse=True)
        extra = len(kept[i]) % multiple
        if extra:
            dropped = kept[i][len(kept[i]) - extra:]
            kept[i] = kept[i][:len(kept[i]) - extra]
            pruned[i] = sorted(pruned[i] + dropped, key=rank, reverse=True)

    def build() -> PruningPlan:
        layers = [LayerPlan(layer.heads, tuple(sorted(k))) for layer, k in zip(plan.layers, kept)]
        return PruningPlan(layers, plan.num_heads, plan.ffn_dim, {**plan.meta, "multiple_of": multiple})

    # spend what rounding down freed: round layers back up while the budget allows, the layer that
    # lost the most important neuron first
    grew = True
    while grew:
        grew = False
        order = sorted((i for i in range(len(kept)) if len(pruned[i]) >= multiple),
                       key=lambda i: _ranker(scores, i)(pruned[i][0]), reverse=True)
        for i in order:
            kept[i] += pruned[i][:multiple]
            if plan_flops(build(), shape, seq_len).ratio <= budget * (1 + 1e-9):
                pruned[i] = pruned[i][multiple:]
                grew = True
                break
            kept[i] = kept[i][:-multiple]
    return build()


def _ranker(scores: Sequence[np.ndarray] | None, layer: int):
    if scores is None:
        return lambda n: -n  # the plan's order: lower index = more important
    s = np.asarray(scores[layer], dtype=np.float64)
    return lambda n: s[n]
