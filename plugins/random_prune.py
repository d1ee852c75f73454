"""The paper's "Random" baseline: prune heads and neurons uniformly at random under the same budget.

The FLOPs split is the same as Dual-CP's (pruned FFN = lambda x pruned MHA, the excess moved when
one side cannot give its share, every layer keeps >= 1 head and >= 1 neuron). Heads are drawn first
and, with ``rebalance`` (default true), the FFN target is then the total still to prune. Within a
module type, the kept units are one uniformly drawn unit per layer (so no layer is emptied) plus a
uniform random subset of all remaining units of the model; which layers lose more is therefore
random too. Seeded by ``ctx.seed`` (numpy ``default_rng``): the same seed gives the same plan.
"""

from __future__ import annotations

import numpy as np

from ppkit.budget import achieved_split, split_budget
from ppkit.hookspecs import hookimpl
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.strategy import PruningContext, Strategy, as_bool


def random_keep(num_layers: int, units: int, total_kept: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Sorted kept indices per layer: ``total_kept`` units of ``num_layers`` x ``units``, >= 1 per layer."""
    total_kept = int(min(max(total_kept, num_layers), num_layers * units))
    reserved = rng.integers(0, units, size=num_layers) + np.arange(num_layers) * units
    rest = np.setdiff1d(np.arange(num_layers * units), reserved, assume_unique=True)
    extra = rng.permutation(rest)[: total_kept - num_layers]
    kept = np.sort(np.concatenate([reserved, extra]))
    layer = kept // units
    return [kept[layer == l] - l * units for l in range(num_layers)]


def prune(ctx: PruningContext) -> PruningPlan:
    """A seeded random plan within ``ctx.flops_budget``."""
    rebalance = ctx.option("rebalance", True, cast=as_bool)
    shape = ctx.shape
    split = split_budget(shape, ctx.seq_len, ctx.flops_budget, ctx.lambda_, min_heads=1, min_neurons=1)
    rng = np.random.default_rng(ctx.seed)
    L = shape.num_layers
    heads = random_keep(L, shape.num_heads, split.max_heads_kept(), rng)
    pruned_mha = split.dense_mha - sum(len(h) for h in heads) * split.head_flops
    prune_ffn = split.prune_ffn
    if rebalance:
        prune_ffn = min(max(split.prune_total - pruned_mha, 0.0), L * (shape.ffn_dim - 1) * split.neuron_flops)
    neurons = random_keep(L, shape.ffn_dim, split.max_neurons_kept(prune_ffn), rng)
    layers = [LayerPlan(tuple(int(i) for i in h), tuple(int(i) for i in n)) for h, n in zip(heads, neurons)]
    meta = {
        "strategy": "random", "seed": ctx.seed, "lambda": ctx.lambda_, "flops_seq_len": ctx.seq_len,
        "budget": ctx.flops_budget, "rebalance": rebalance,
        "split": achieved_split(split, [len(h) for h in heads], [len(n) for n in neurons]),
        "notes": list(split.notes),
    }
    return PruningPlan(layers, shape.num_heads, shape.ffn_dim, meta)


STRATEGY = Strategy(
    name="random",
    description="Baseline: prune heads and neurons uniformly at random under the same lambda split (seeded)",
    prune=prune,
    needs=frozenset(),
    options={"rebalance": "give the head-granularity slack to the FFN target (default true)"},
)


@hookimpl
def ppkit_strategies() -> list[Strategy]:
    return [STRATEGY]
