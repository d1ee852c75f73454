"""Dual-CP (Wang et al., LREC-COLING 2024): module clustering + centroid selection, label-free.

Per layer, heads and FFN neurons are clustered by the similarity of their activations on the task
data (:mod:`ppkit.clustering`): neurons by uncentred |cos| of their activation vectors, heads by
greedy dimension mapping of their d_h context dimensions; D = 1 - C; agglomerative clustering
with one dendrogram per layer and module type. Each module type is cut at *one global distance
threshold* shared by all layers (so layers get unequal sparsity), chosen to meet that type's FLOPs
target (pruned FFN = lambda x pruned MHA, paper Eq. 4). In every cluster one member is kept.

Options (``ctx.options``):

``linkage``    ``"average"`` (paper, default) | ``"complete"`` | ``"reference"`` (the authors' code:
               ``pdist(D, 'chebyshev')`` then complete linkage).
``threshold``  ``"exact"`` (default): the smallest merge height over all layers' dendrograms that
               meets the target; never over budget and, for the same target, never prunes more
               than the scan (with a step finer than the gaps between merge heights both agree).
               ``"scan"``: the paper's delta scan t = step, 2*step, ... (first t meeting the target).
``step``       scan step (default 0.001 as in the paper; the authors' code uses 0.0005 and builds
               masks one step *after* the first passing t, which is not reproduced).
``selection``  ``"centroid"`` (default; alias ``"activation"``): keep the member with the largest
               mean |activation| over the calibration tokens (ties: lowest index). ``"random"``: a
               seeded random member per cluster (the paper's +MC ablation).
``rebalance``  true (default): heads are cut first; the FFN target is then the total still to
               prune, so the slack of the coarse head granularity goes to the FFN and the total
               lands close to the budget. false: each type meets its own lambda share.

Deviations from paper / code, on purpose:

* Head similarity is divided by d_h (as the code), not by H (paper Eq. 8).
* Head centroids score the cluster *members* by mean |activation|. The reference code
  (cluster.py:103-104) scores heads 0..k-1 of the layer instead of the members and keeps
  ``members[argmax]``; that bug is not reproduced, so masks can differ from the code's for
  multi-member head clusters.
* The budget never loops forever: when the FFN cannot give its lambda share (e.g. lambda=5 and a
  budget <= 0.2 on BERT-base) the rest moves to MHA and ``plan.meta["notes"]`` says so; an
  unreachable budget is a :class:`~ppkit.errors.BudgetError`.
* Token sampling is seeded (the code has no seed).

``plan.meta`` records thresholds, clusters per layer, the achieved MHA/FFN split and notes.
"""

from __future__ import annotations

import numpy as np

from ppkit.clustering import (LINKAGES, THRESHOLDS, cluster_assignment, cluster_under_budget, select_centroids,
                              select_random_members)
from ppkit.hookspecs import hookimpl
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.strategy import PruningContext, Strategy, as_bool, positive_float

SELECTIONS = ("centroid", "activation", "random")

OPTIONS = {
    "linkage": f"clustering linkage: {', '.join(LINKAGES)} (default average)",
    "threshold": f"global threshold search: {', '.join(THRESHOLDS)} (default exact)",
    "step": "delta-scan step for threshold=scan (default 0.001)",
    "selection": "member kept per cluster: centroid (largest mean |a|, default) or random (+MC ablation)",
    "rebalance": "give the head-granularity slack to the FFN target (default true)",
}


def clustering_options(ctx: PruningContext) -> dict:
    """The clustering options shared by dual-cp and worst, validated."""
    return {
        "linkage": ctx.option("linkage", "average", choices=LINKAGES),
        "threshold": ctx.option("threshold", "exact", choices=THRESHOLDS),
        "step": ctx.option("step", 0.001, cast=positive_float),
        "rebalance": ctx.option("rebalance", True, cast=as_bool),
    }


def prune(ctx: PruningContext) -> PruningPlan:
    """Dual-CP plan for ``ctx`` (see the module docstring for options)."""
    opts = clustering_options(ctx)
    selection = ctx.option("selection", "centroid", choices=SELECTIONS)
    selection = "centroid" if selection == "activation" else selection
    res = cluster_under_budget(ctx.stats, ctx.shape, ctx.seq_len, ctx.flops_budget, ctx.lambda_, **opts)
    rng = np.random.default_rng(ctx.seed)
    layers = []
    for l in range(ctx.shape.num_layers):
        if selection == "centroid":
            heads = select_centroids(res.heads.labels[l], res.heads.scores[l])
            neurons = select_centroids(res.neurons.labels[l], res.neurons.scores[l])
        else:
            heads = select_random_members(res.heads.labels[l], rng)
            neurons = select_random_members(res.neurons.labels[l], rng)
        layers.append(LayerPlan(tuple(int(i) for i in heads), tuple(int(i) for i in neurons)))
        ctx.artifacts.setdefault("assignments", {}).update({
            (l, "attention"): cluster_assignment(res.heads.labels[l], heads),
            (l, "ffn"): cluster_assignment(res.neurons.labels[l], neurons),
        })
    meta = {"strategy": "dual-cp", "selection": selection, "seed": ctx.seed, **res.meta}
    return PruningPlan(layers, ctx.shape.num_heads, ctx.shape.ffn_dim, meta)


STRATEGY = Strategy(
    name="dual-cp",
    description="Dual-CP (paper): cluster heads and neurons by activation similarity, keep one centroid per cluster",
    prune=prune,
    needs=frozenset({"activations"}),
    options=OPTIONS,
)


@hookimpl
def ppkit_strategies() -> list[Strategy]:
    return [STRATEGY]
