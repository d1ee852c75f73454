"""The paper's "Worst" ablation (Fig. 5): keep redundancy on purpose.

Heads and neurons are clustered and cut exactly as in Dual-CP (same options: ``linkage``,
``threshold``, ``step``, ``rebalance``), so every layer keeps the same *number* of heads and
neurons as Dual-CP would. Instead of one centroid per cluster, the kept units are the members of
the layer's *largest* clusters: clusters are taken by size (descending; ties: the cluster with the
lowest member index first) until the count is filled, the last one contributing its members with
the largest mean |activation|. All other clusters are pruned. Deterministic (no seed needed).
"""

from __future__ import annotations

from ppkit.clustering import cluster_under_budget, select_worst
from ppkit.hookspecs import hookimpl
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.plugins.dual_cp import OPTIONS, clustering_options
from ppkit.strategy import PruningContext, Strategy


def prune(ctx: PruningContext) -> PruningPlan:
    """Worst-case plan: Dual-CP's per-layer counts, filled from the largest (most redundant) clusters."""
    res = cluster_under_budget(ctx.stats, ctx.shape, ctx.seq_len, ctx.flops_budget, ctx.lambda_, **clustering_options(ctx))
    layers = []
    for l in range(ctx.shape.num_layers):
        h_labels, n_labels = res.heads.labels[l], res.neurons.labels[l]
        heads = select_worst(h_labels, int(h_labels.max()) + 1, res.heads.scores[l])
        neurons = select_worst(n_labels, int(n_labels.max()) + 1, res.neurons.scores[l])
        layers.append(LayerPlan(tuple(int(i) for i in heads), tuple(int(i) for i in neurons)))
    meta = {"strategy": "worst", **res.meta}
    return PruningPlan(layers, ctx.shape.num_heads, ctx.shape.ffn_dim, meta)


STRATEGY = Strategy(
    name="worst",
    description="Ablation: Dual-CP's clusters and counts, but keep members of the largest redundant clusters",
    prune=prune,
    needs=frozenset({"activations"}),
    options={k: v for k, v in OPTIONS.items() if k != "selection"},
)


@hookimpl
def ppkit_strategies() -> list[Strategy]:
    return [STRATEGY]
