"""KCM baseline (Nova, Dai & Schuurmans, ICML 2023, "Gradient-free structured pruning with unlabeled
data", arXiv 2303.04185): FFN neurons only, every head kept, no labels.

KCM ("Kernelized Convex Masking") ranks each layer's FFN neurons with R2D2, which combines

* **R2, representative ranking** (weights only): each neuron is the point ``w_i`` (its row of the
  FFN down projection, [hidden]) and the layer's neurons are approximated by their kernelized
  convex hull. With a Gaussian kernel ``K_ij = exp(-|w_i - w_j|^2 / (2 sigma^2))`` the non-negative
  coefficients ``C`` of ``min_C ||Phi - Phi C||^2, C >= 0`` are found by the multiplicative update
  ``C <- C * sqrt(K / (K C))`` from ``C = 1/N`` until the relative change
  ``|sum(C_new - C)| / sum|C|`` falls below ``tol``. ``R2_i = C_ii``: how much a neuron is needed
  to represent itself (points on the hull, which others cannot represent, score high).
* **D2, data-driven ranking** (unlabeled data): the l2 norm of the neuron's activations over the
  calibration tokens, as sqrt(mean a^2) over the statistics' similarity tokens (the T sampled
  tokens, or every non-padding token with ``--tokens all``; rank-equivalent to the l2 norm).

and keeps the top neurons of every layer, with the same count in every layer.

The authors released no code (the P-pruning authors re-implemented KCM too, unreleased). What is
implemented here, and where it may deviate:

* ``combine="rank"`` (default): R2D2 score = rank(R2) + rank(D2) within the layer (0 = lowest),
  following the paper's description that R2D2 *combines the ranks* of R2 and D2; ties broken by
  D2, then lowest index. ``combine="product"``: min-max-normalised R2 times min-max-normalised
  D2 (as an independent public re-implementation does). The paper's exact combination rule may
  differ from both.
* ``sigma`` defaults to the median pairwise distance of the layer's weight rows (the paper treats
  the kernel width as a hyper-parameter; its value is not known here). ``sigma`` can be given.
* The update stops at ``tol`` (default 1e-4) or ``max_iter`` (default 200) iterations. The update
  converges slowly towards C = I (the trivial self-representation), so the ranking is that of the
  stopping point: on MiniLM layer 0 (N=1536) tol=1e-4 stops after ~190 iterations (~17 s on 2 CPU
  cores; N x N products, so run on a GPU for BERT-base), and the Spearman correlation of R2 after
  2 vs. 300 iterations is 0.89.
* Budget: every pruned FLOP comes from the FFN (heads all kept, so ``lambda`` is ignored); the
  kept neuron count ``floor(target / neuron FLOPs)`` is spread evenly over layers, the remainder
  going to the first layers. Any layer keeps >= 1 neuron; a budget below that is a BudgetError.
* KCM prunes a *fine-tuned* model in the original paper; here, as in the P-pruning ablation
  (Fig. 5), it prunes the pre-trained model before fine-tuning. No mask rescaling is applied.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ppkit.budget import achieved_split, split_budget
from ppkit.errors import InputError
from ppkit.hookspecs import hookimpl
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.strategy import PruningContext, Strategy, positive_float

COMBINES = ("rank", "product")

OPTIONS = {
    "combine": "how R2 and D2 are combined: rank (sum of ranks, default) or product (of min-max scores)",
    "sigma": "Gaussian kernel width for R2 (default: median pairwise distance of the weight rows)",
    "tol": "R2 convergence tolerance (default 1e-4)",
    "max_iter": "R2 iteration limit (default 200)",
}


#: R2 depends on the weights alone and costs ~1 TFLOP per MiniLM layer, while a sweep prunes the same
#: pre-trained model at many budgets: results are remembered per process, keyed by the weights' bytes
_R2_CACHE: dict[tuple, tuple[np.ndarray, int]] = {}
_R2_CACHE_SIZE = 256


def r2_scores(weights: torch.Tensor, sigma: float | None = None, tol: float = 1e-4, max_iter: int = 200) -> tuple[np.ndarray, int]:
    """Representative-ranking scores diag(C) [N] of the points ``weights`` [N, d], and the iterations used."""
    x = weights.detach().float()
    key = (hashlib.sha1(x.cpu().contiguous().numpy().tobytes()).hexdigest(), tuple(x.shape), sigma, tol, max_iter)
    if key not in _R2_CACHE:
        if len(_R2_CACHE) >= _R2_CACHE_SIZE:
            _R2_CACHE.pop(next(iter(_R2_CACHE)))
        _R2_CACHE[key] = _r2_scores(x, sigma, tol, max_iter)
    scores, iterations = _R2_CACHE[key]
    return scores.copy(), iterations


def _r2_scores(x: torch.Tensor, sigma: float | None, tol: float, max_iter: int) -> tuple[np.ndarray, int]:
    # on the model's device: the N x N products are the cost
    n = x.shape[0]
    if n == 1:
        return np.ones(1), 0
    d2 = torch.cdist(x, x).pow_(2)
    if sigma is None:
        off = d2[~torch.eye(n, dtype=torch.bool)]
        sigma = float(off.median().clamp_min(1e-12).sqrt())
    k = torch.exp(-d2 / (2.0 * sigma * sigma))
    c = torch.full((n, n), 1.0 / n, device=x.device)
    tiny = torch.finfo(torch.float32).tiny
    it = 0
    for it in range(1, max_iter + 1):
        new = c * torch.sqrt(k / (k @ c).clamp_min(tiny))
        diff = float((new - c).sum().abs() / c.abs().sum())
        c = new
        if diff < tol:
            break
    return torch.diagonal(c).double().cpu().numpy(), it


def _ranks(x: np.ndarray) -> np.ndarray:
    """0-based ranks (ties share the average rank)."""
    from scipy.stats import rankdata

    return rankdata(x, method="average") - 1.0


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.ones_like(x)


def r2d2_scores(r2: np.ndarray, d2: np.ndarray, combine: str = "rank") -> np.ndarray:
    """Combined R2D2 score per neuron (higher = keep)."""
    if combine == "rank":
        return _ranks(r2) + _ranks(d2)
    if combine == "product":
        return _minmax(r2) * _minmax(d2)
    raise InputError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")


def top_k(score: np.ndarray, tiebreak: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the ``k`` best by ``score``, then ``tiebreak``, then lowest index."""
    n = score.shape[0]
    order = np.lexsort((np.arange(n), -tiebreak, -score))
    return np.sort(order[:k])


def prune(ctx: PruningContext) -> PruningPlan:
    """KCM plan: all heads kept, the top R2D2 neurons of every layer within the budget."""
    combine = ctx.option("combine", "rank", choices=COMBINES)
    sigma = ctx.options.get("sigma")
    sigma = None if sigma in (None, "median") else ctx.option("sigma", None, cast=positive_float)
    tol = ctx.option("tol", 1e-4, cast=positive_float)
    max_iter = ctx.option("max_iter", 200, cast=int)
    if max_iter < 1:
        raise InputError(f"option max_iter must be >= 1, got {max_iter}")
    if ctx.adapter is None:
        raise InputError("kcm needs the model adapter (it reads the FFN output weights)")
    if ctx.stats is None:
        raise InputError("kcm needs activation statistics (D2)")
    shape = ctx.shape
    split = split_budget(shape, ctx.seq_len, ctx.flops_budget, ctx.lambda_, min_neurons=1, ffn_only=True)
    L, N = shape.num_layers, shape.ffn_dim
    total = split.max_neurons_kept()
    per_layer = [total // L + (1 if l < total % L else 0) for l in range(L)]
    layers, iters = [], []
    for l in range(L):
        weight, _ = ctx.adapter.ffn_output_weight(l)  # [N, hidden]
        if weight.shape[0] != N:
            raise InputError(f"layer {l} FFN output weight has {weight.shape[0]} rows, expected {N}")
        r2, used = r2_scores(weight, sigma, tol, max_iter)
        iters.append(used)
        layer = ctx.stats.layers[l]
        d2 = np.sqrt(layer.neuron_sq_mean.double().numpy())
        keep = top_k(r2d2_scores(r2, d2, combine), d2, per_layer[l]) if per_layer[l] < N else np.arange(N)
        layers.append(LayerPlan(tuple(range(shape.num_heads)), tuple(int(i) for i in keep)))
    meta = {
        "strategy": "kcm", "combine": combine, "sigma": sigma if sigma is not None else "median",
        "tol": tol, "max_iter": max_iter, "r2_iterations": iters, "budget": ctx.flops_budget,
        "flops_seq_len": ctx.seq_len,
        "split": achieved_split(split, [shape.num_heads] * L, per_layer),
        "notes": ["KCM prunes FFN neurons only: all heads kept, lambda ignored"] + list(split.notes),
    }
    return PruningPlan(layers, shape.num_heads, N, meta)


STRATEGY = Strategy(
    name="kcm",
    description="Baseline KCM (Nova et al. 2023): R2D2-ranked FFN neurons only, same count per layer, heads kept",
    prune=prune,
    needs=frozenset({"activations"}),
    options=OPTIONS,
)


@hookimpl
def ppkit_strategies() -> list[Strategy]:
    return [STRATEGY]
