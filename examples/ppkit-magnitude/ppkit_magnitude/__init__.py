"""ppkit-magnitude: an example third-party ppkit strategy (weight magnitude, no calibration data).

Score of head h in layer l: ||W_O[h*dh:(h+1)*dh, :]||_F (its rows of the attention output
projection). Score of neuron j: ||W_2[j, :]||_2 (its row of the FFN down projection). Pruned FLOPs
are split with ppkit's lambda rule; heads are chosen first (globally, smallest norms pruned, at
least one head kept per layer), then neurons for the rest of the budget the same way.
"""

from __future__ import annotations

import numpy as np

from ppkit.budget import achieved_split, split_budget
from ppkit.errors import InputError
from ppkit.hookspecs import hookimpl
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.strategy import PruningContext, Strategy

__version__ = "0.1.0"


def keep_largest(scores: np.ndarray, total_kept: int) -> list[np.ndarray]:
    """Kept indices per layer: the best unit of every layer, then the globally largest scores."""
    layers, units = scores.shape
    total_kept = int(min(max(total_kept, layers), layers * units))
    flat = scores.reshape(-1)
    best = scores.argmax(axis=1) + np.arange(layers) * units
    rest = np.setdiff1d(np.arange(layers * units), best)
    order = rest[np.lexsort((rest, -flat[rest]))]  # descending score, ties: lowest index
    kept = np.sort(np.concatenate([best, order[: total_kept - layers]]))
    layer_of = kept // units
    return [kept[layer_of == l] - l * units for l in range(layers)]


def prune(ctx: PruningContext) -> PruningPlan:
    """Magnitude plan within ``ctx.flops_budget``."""
    if ctx.adapter is None:
        raise InputError("magnitude needs the model adapter (it reads the output projections)")
    shape = ctx.shape
    h_scores, n_scores = [], []
    for l in range(shape.num_layers):
        w_o, _ = ctx.adapter.attention_output_weight(l)  # [heads*dh, hidden]
        w_2, _ = ctx.adapter.ffn_output_weight(l)  # [neurons, hidden]
        h_scores.append(w_o.detach().float().reshape(shape.num_heads, -1).norm(dim=1).cpu().numpy())
        n_scores.append(w_2.detach().float().norm(dim=1).cpu().numpy())
    split = split_budget(shape, ctx.seq_len, ctx.flops_budget, ctx.lambda_)
    heads = keep_largest(np.stack(h_scores), split.max_heads_kept())
    pruned_mha = split.dense_mha - sum(len(h) for h in heads) * split.head_flops
    max_ffn = shape.num_layers * (shape.ffn_dim - 1) * split.neuron_flops
    neurons = keep_largest(np.stack(n_scores), split.max_neurons_kept(min(max(split.prune_total - pruned_mha, 0.0), max_ffn)))
    layers = [LayerPlan(tuple(int(i) for i in h), tuple(int(i) for i in n)) for h, n in zip(heads, neurons)]
    meta = {"strategy": "magnitude", "split": achieved_split(split, [len(h) for h in heads], [len(n) for n in neurons])}
    return PruningPlan(layers, shape.num_heads, shape.ffn_dim, meta)


STRATEGY = Strategy(
    name="magnitude",
    description="Example plugin: prune the heads and neurons with the smallest output-weight norms",
    prune=prune,
    needs=frozenset(),
)


@hookimpl
def ppkit_strategies() -> list[Strategy]:
    return [STRATEGY]
