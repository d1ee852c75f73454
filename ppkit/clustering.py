"""Module clustering (paper Sec. 3.3, Algorithm 2) and centroid selection (Sec. 3.4), reusable by plugins.

Pieces, each usable on plain tensors:

* :func:`unit_cosine` — |cos| between activation columns, *uncentred* (as the paper and the
  reference code), from sampled rows (one normalised matrix product) or from a Gram matrix.
* :func:`head_similarity` — head-to-head similarity by greedy dimension mapping, vectorised over
  all head pairs at once: per pair, repeatedly take the global maximum of the d_h x d_h |cos|
  block (first flat index on ties), record it, remove its row and column; the d_h picked values
  are averaged (divided by d_h, like the reference code; the paper's Eq. 8 writes 1/H, which does
  not give a similarity in [0, 1] unless H = d_h). The diagonal is 1.
* :func:`linkage_tree` — agglomerative clustering of D = 1 - C with ``"average"`` (paper),
  ``"complete"`` or ``"reference"`` (the authors' code: ``pdist(D, 'chebyshev')`` of the square D
  taken as observations, then complete linkage; :func:`chebyshev_pdist` computes it on several threads).
* :func:`exact_threshold` / :func:`scan_threshold` — one global distance threshold per module type
  over all layers' dendrograms that keeps at most a given number of clusters.
* :func:`select_centroids`, :func:`select_random_members`, :func:`select_worst` — which members
  of each layer's clusters are kept.
* :func:`cluster_under_budget` — all of the above for a model's statistics under a FLOPs budget
  (used by the dual-cp and worst strategies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .budget import BudgetSplit, achieved_split, split_budget
from .errors import BudgetError, InputError

LINKAGES = ("average", "complete", "reference")
THRESHOLDS = ("exact", "scan")
#: the reference code's cosine eps: a unit whose activations are all zero has similarity 0 to everything
COSINE_EPS = 1e-8


# --------------------------------------------------------------------------- similarity
def unit_cosine(samples: torch.Tensor | None = None, gram: torch.Tensor | None = None, eps: float = COSINE_EPS) -> torch.Tensor:
    """|cos| between the columns of ``samples`` [T, C] (or from their Gram matrix [C, C]) as a [C, C] matrix.

    Uncentred, like the paper and the reference code: cos(x, y) = x.y / (max(|x|, eps) max(|y|, eps)).
    From samples this is one float32 product of the column-normalised matrix (float32, like the
    reference code); from a (float64) Gram matrix it is computed and returned in float64.
    """
    if samples is not None:
        x = samples.float()
        xn = x / x.norm(dim=0).clamp_min(eps)
        return (xn.T @ xn).abs_().clamp_(max=1.0)
    if gram is not None:
        g = gram.double()
        inv = 1.0 / torch.diagonal(g).clamp_min(0).sqrt().clamp_min(eps)
        return (g * inv[:, None] * inv[None, :]).abs_().clamp_(max=1.0)
    raise InputError("unit_cosine needs samples or a Gram matrix")


def greedy_mapping(blocks: torch.Tensor) -> torch.Tensor:
    """Greedy dimension mapping for a batch of |cos| blocks [P, m, n]: the min(m, n) picked values [P, k].

    Each step takes every block's global maximum (first flat index on ties, like ``argmax`` of the
    flattened block in the reference code), records it and removes its row and column.
    """
    if blocks.dim() != 3:
        raise InputError(f"blocks must be [pairs, m, n], got shape {tuple(blocks.shape)}")
    p, m, n = blocks.shape
    k = min(m, n)
    work = blocks.clone()
    picked = torch.empty(p, k, dtype=blocks.dtype)
    if p == 0:
        return picked
    rows = torch.arange(p)
    flat = work.view(p, m * n)
    for step in range(k):
        idx = flat.argmax(dim=1)
        picked[:, step] = flat[rows, idx]
        r, c = idx // n, idx % n
        work[rows, r, :] = -math.inf
        work[rows, :, c] = -math.inf
    return picked


def head_similarity(cos: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Head similarity C^A [H, H] from the |cos| matrix [H*dh, H*dh] of the merged context columns.

    C^A[i, j] = mean of the d_h greedily mapped dimension similarities of heads i and j (i != j),
    computed once per unordered pair and mirrored; the diagonal is 1.
    """
    hd = num_heads * head_dim
    if cos.shape != (hd, hd):
        raise InputError(f"cosine matrix has shape {tuple(cos.shape)}, expected ({hd}, {hd})")
    blocks4 = cos.reshape(num_heads, head_dim, num_heads, head_dim).permute(0, 2, 1, 3)  # [i, j, m, n]
    iu = torch.triu_indices(num_heads, num_heads, offset=1)
    blocks = blocks4[iu[0], iu[1]]  # [pairs, dh, dh]
    sim = greedy_mapping(blocks).mean(dim=1)  # divided by d_h (reference code), not by H (paper Eq. 8)
    out = torch.eye(num_heads, dtype=cos.dtype)
    out[iu[0], iu[1]] = sim
    out[iu[1], iu[0]] = sim
    return out


def distance_from_similarity(sim: torch.Tensor | np.ndarray, zero_diagonal: bool = True) -> np.ndarray:
    """D = 1 - C (same float dtype as C); C in [0, 1], so D is in [0, 1].

    ``"average"`` and ``"complete"`` linkage read the upper triangle only (``squareform(...,
    checks=False)``), so float noise between C[i, j] and C[j, i] does not matter, and the diagonal is
    set to 0. ``"reference"`` linkage reads whole rows of D, the diagonal included, as the authors'
    code does; there ``zero_diagonal=False`` keeps the diagonal as computed (1 - |cos(x, x)|, about
    ±1e-7 in float32), which can decide a near-tie between two merges (see :func:`linkage_tree`). A
    float32 D is what the reference code clusters too (scipy converts it to float64).
    """
    s = sim.detach().cpu().numpy() if isinstance(sim, torch.Tensor) else np.asarray(sim)
    d = np.subtract(1.0, s, dtype=s.dtype if s.dtype in (np.float32, np.float64) else np.float64)
    if zero_diagonal:
        np.fill_diagonal(d, 0.0)
    return d


def layer_distances(layer: Any, kind: str, num_heads: int | None = None, head_dim: int | None = None,
                    zero_diagonal: bool = True) -> np.ndarray:
    """Distance matrix of one :class:`~ppkit.statistics.LayerStats` for ``kind`` "heads" or "neurons"
    (``zero_diagonal``: see :func:`distance_from_similarity`)."""
    if kind == "neurons":
        cos = unit_cosine(layer.neuron_samples, None if layer.neuron_samples is not None else layer.neuron_gram)
        return distance_from_similarity(cos, zero_diagonal)
    if kind == "heads":
        if num_heads is None or head_dim is None:
            raise InputError("head distances need num_heads and head_dim")
        cos = unit_cosine(layer.head_samples, None if layer.head_samples is not None else layer.head_gram)
        return distance_from_similarity(head_similarity(cos, num_heads, head_dim), zero_diagonal)
    raise InputError(f"kind must be 'heads' or 'neurons', got {kind!r}")


# --------------------------------------------------------------------------- trees
def linkage_tree(dist: np.ndarray, method: str = "average") -> np.ndarray:
    """scipy linkage matrix Z [n-1, 4] for a square distance matrix under ``method`` (see :data:`LINKAGES`)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    if method not in LINKAGES:
        raise InputError(f"linkage must be one of {', '.join(LINKAGES)}, got {method!r}")
    d = np.asarray(dist)
    if d.dtype not in (np.float32, np.float64):
        d = d.astype(np.float64)
    n = d.shape[0]
    if n < 2:
        return np.zeros((0, 4), dtype=np.float64)
    if method == "reference":
        # The authors pass the square D to linkage(metric='chebyshev'): scipy treats its rows as
        # observations, so the clustered distance is max_k |D[i,k] - D[j,k]|, then complete linkage.
        # D is used as given, diagonal included: its ~1e-7 float noise enters the Chebyshev distances
        # and decides near-ties (two merge heights 6e-8 apart were seen on MiniLM), so a zeroed or
        # symmetrised D can part from the authors' tree there.
        return linkage(chebyshev_pdist(d), method="complete")
    return linkage(squareform(d, checks=False), method=method)


def chebyshev_pdist(x: np.ndarray, threads: int | None = None, block: int = 64) -> np.ndarray:
    """``scipy.spatial.distance.pdist(x, "chebyshev")`` in float64, identical values, on ``threads`` threads.

    O(n^3) and the cost of ``--linkage reference`` (~1 s per MiniLM FFN layer on one thread). Rows are
    handed out in blocks of ``block`` to a thread pool; scipy's ``cdist`` releases the GIL, and each
    block's distances to the rows after it are copied into the condensed vector, so every value is the
    one ``pdist`` computes (a max of exact float64 differences: no summation order to differ).
    ``threads`` defaults to torch's intra-op thread count (every core unless ``OMP_NUM_THREADS`` is set).
    """
    from scipy.spatial.distance import cdist, pdist

    x = np.ascontiguousarray(x, dtype=np.float64)
    n = x.shape[0]
    threads = torch.get_num_threads() if threads is None else threads
    if threads <= 1 or n <= 2 * block:
        return pdist(x, metric="chebyshev")
    out = np.empty(n * (n - 1) // 2, dtype=np.float64)

    def fill(start: int) -> None:
        stop = min(start + block, n)
        rows = cdist(x[start:stop], x[start:], metric="chebyshev")
        for r, i in enumerate(range(start, stop)):
            offset = i * n - i * (i + 1) // 2  # condensed index of the pair (i, i + 1)
            out[offset:offset + n - i - 1] = rows[r, r + 1:]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(fill, range(0, n, block)))
    return out


def clusters_at(tree: np.ndarray, threshold: float | None) -> np.ndarray:
    """0-based flat cluster labels [n] of a tree cut at ``threshold`` (merges with height <= t applied).

    ``None`` means no cut: every unit is its own cluster.
    """
    from scipy.cluster.hierarchy import fcluster

    n = tree.shape[0] + 1
    if threshold is None or n == 1:
        return np.arange(n)
    return fcluster(tree, t=threshold, criterion="distance").astype(np.int64) - 1


def count_at(trees: Sequence[np.ndarray], threshold: float | None) -> list[int]:
    """Clusters per tree at ``threshold`` without building labels (n minus merges with height <= t)."""
    out = []
    for z in trees:
        n = z.shape[0] + 1
        out.append(n if threshold is None else n - int(np.count_nonzero(z[:, 2] <= threshold)))
    return out


def exact_threshold(trees: Sequence[np.ndarray], max_kept: int) -> float | None:
    """Smallest global threshold (a merge height) at which all trees together keep <= ``max_kept`` clusters.

    ``None`` when no cut is needed. Every tree keeps at least one cluster, so ``max_kept`` must be
    at least the number of trees.
    """
    total = sum(z.shape[0] + 1 for z in trees)
    if total <= max_kept:
        return None
    if max_kept < len(trees):
        raise BudgetError(f"cannot keep only {max_kept} clusters over {len(trees)} layers (each keeps at least one)")
    heights = np.sort(np.concatenate([z[:, 2] for z in trees]))
    return float(heights[total - max_kept - 1])


def scan_threshold(trees: Sequence[np.ndarray], max_kept: int, step: float = 0.001) -> float | None:
    """The paper's delta scan: the first t in step, 2*step, ... with <= ``max_kept`` clusters in total.

    Computed directly from the merge heights (no Python loop over all steps), so it never hangs;
    t_k is ``k * step`` (not a float sum of steps). ``None`` when no cut is needed.
    """
    if not step > 0:
        raise InputError(f"scan step must be positive, got {step}")
    exact = exact_threshold(trees, max_kept)
    if exact is None:
        return None
    k = max(1, int(math.floor(exact / step)) - 1)
    while sum(count_at(trees, k * step)) > max_kept:
        k += 1
    return k * step


# --------------------------------------------------------------------------- selection
def select_centroids(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per cluster, the member with the largest score (ties: lowest index); sorted kept indices."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(n), -s, labels))
    return np.sort(order[_first_of_groups(labels[order])])


def select_random_members(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per cluster, one member drawn uniformly with ``rng`` (the paper's +MC ablation); sorted indices."""
    labels = np.asarray(labels)
    keys = rng.random(labels.shape[0])
    order = np.lexsort((keys, labels))
    return np.sort(order[_first_of_groups(labels[order])])


def select_worst(labels: np.ndarray, keep: int, scores: np.ndarray) -> np.ndarray:
    """The paper's "Worst" condition: keep ``keep`` units taken from the *largest* clusters.

    Clusters are visited by size (descending; ties: the cluster whose lowest member index is
    smaller first) and all their members kept, until ``keep`` units are kept; the last cluster
    visited contributes its highest-scoring members. Redundant units are kept, the rest pruned.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    keep = int(min(max(keep, 0), n))
    sizes = np.bincount(labels)
    first_member = np.full(sizes.shape[0], n)
    np.minimum.at(first_member, labels, np.arange(n))
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    rank_of_cluster = np.empty_like(sizes)
    rank_of_cluster[np.lexsort((first_member, -sizes))] = np.arange(sizes.shape[0])
    order = np.lexsort((np.arange(n), -s, rank_of_cluster[labels]))
    return np.sort(order[:keep])


def cluster_assignment(labels: np.ndarray, kept: Sequence[int]) -> dict[int, int]:
    """{pruned unit: the kept member of its cluster} for clusters that keep exactly one member."""
    kept_of: dict[int, int] = {}
    for k in kept:
        kept_of[int(labels[k])] = -1 if int(labels[k]) in kept_of else int(k)
    kept_set = {int(k) for k in kept}
    return {j: kept_of[int(lab)] for j, lab in enumerate(labels)
            if j not in kept_set and kept_of.get(int(lab), -1) >= 0}


def _first_of_groups(sorted_labels: np.ndarray) -> np.ndarray:
    first = np.ones(sorted_labels.shape[0], dtype=bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return first


# --------------------------------------------------------------------------- model level
@dataclass
class UnitClustering:
    """Dendrograms, cut and labels of one module type ("heads" or "neurons") over all layers."""

    kind: str
    trees: list[np.ndarray]
    scores: list[np.ndarray]
    threshold: float | None = None
    labels: list[np.ndarray] = field(default_factory=list)

    @property
    def clusters_per_layer(self) -> list[int]:
        return [int(l.max()) + 1 if l.size else 0 for l in self.labels]

    def cut(self, threshold: float | None) -> None:
        self.threshold = threshold
        self.labels = [clusters_at(z, threshold) for z in self.trees]


@dataclass
class DualClustering:
    """Result of :func:`cluster_under_budget`: both module types cut, the budget split, and meta data."""

    heads: UnitClustering
    neurons: UnitClustering
    split: BudgetSplit
    meta: dict[str, Any]


def build_unit_clustering(stats: Any, kind: str, linkage: str = "average") -> UnitClustering:
    """Distance matrices and dendrograms of every layer for ``kind`` from :class:`ActivationStats`."""
    trees, scores = [], []
    for layer in stats.layers:
        d = layer_distances(layer, kind, stats.num_heads, stats.head_dim, zero_diagonal=linkage != "reference")
        trees.append(linkage_tree(d, linkage))
        score = layer.head_abs_mean if kind == "heads" else layer.neuron_abs_mean
        scores.append(np.asarray(score.detach().cpu().numpy() if isinstance(score, torch.Tensor) else score, dtype=np.float64))
    return UnitClustering(kind=kind, trees=trees, scores=scores)


def choose_threshold(trees: Sequence[np.ndarray], max_kept: int, mode: str = "exact", step: float = 0.001) -> float | None:
    """Global threshold by ``mode`` "exact" (smallest merge height) or "scan" (paper's delta scan)."""
    if mode == "exact":
        return exact_threshold(trees, max_kept)
    if mode == "scan":
        return scan_threshold(trees, max_kept, step)
    raise InputError(f"threshold must be one of {', '.join(THRESHOLDS)}, got {mode!r}")


def cluster_under_budget(
    stats: Any,
    shape: Any,
    seq_len: float,
    budget: float,
    lambda_: float = 5.0,
    *,
    linkage: str = "average",
    threshold: str = "exact",
    step: float = 0.001,
    rebalance: bool = True,
) -> DualClustering:
    """Cluster heads and neurons of every layer and cut each type at one global threshold meeting its FLOPs target.

    The targets come from :func:`ppkit.budget.split_budget` (pruned FFN = lambda x pruned MHA, moved
    when one side cannot give its share). Heads are cut first; with ``rebalance`` the FFN target is
    then the total still to prune, so the slack left by the coarse head granularity (the head cut
    prunes at least its share) is given back to the FFN and the total lands close to the budget.
    The result never exceeds the budget.
    """
    if stats is None:
        raise InputError("this strategy needs activation statistics (run collect_statistics first)")
    if len(stats.layers) != shape.num_layers:
        raise InputError(f"statistics have {len(stats.layers)} layers but the model has {shape.num_layers}")
    split = split_budget(shape, seq_len, budget, lambda_, min_heads=1, min_neurons=1)
    heads = build_unit_clustering(stats, "heads", linkage)
    neurons = build_unit_clustering(stats, "neurons", linkage)

    heads.cut(choose_threshold(heads.trees, split.max_heads_kept(), threshold, step))
    kept_heads = sum(heads.clusters_per_layer)
    pruned_mha = split.dense_mha - kept_heads * split.head_flops
    if rebalance:
        max_ffn = shape.num_layers * (shape.ffn_dim - 1) * split.neuron_flops
        prune_ffn = min(max(split.prune_total - pruned_mha, 0.0), max_ffn)
    else:
        prune_ffn = split.prune_ffn
    neurons.cut(choose_threshold(neurons.trees, split.max_neurons_kept(prune_ffn), threshold, step))

    meta = {
        "linkage": linkage,
        "threshold_mode": threshold,
        "scan_step": step if threshold == "scan" else None,
        "rebalance": rebalance,
        "thresholds": {"heads": heads.threshold, "neurons": neurons.threshold},
        "clusters_per_layer": {"heads": heads.clusters_per_layer, "neurons": neurons.clusters_per_layer},
        "lambda": lambda_,
        "flops_seq_len": seq_len,
        "budget": budget,
        "split": achieved_split(split, heads.clusters_per_layer, neurons.clusters_per_layer),
        "notes": list(split.notes),
    }
    if rebalance and abs(prune_ffn - split.prune_ffn) > 1e-9 * split.dense_total:
        meta["notes"].append(
            f"head granularity pruned {pruned_mha / split.dense_total:.2%} of dense FLOPs in MHA "
            f"(target {split.prune_mha / split.dense_total:.2%}); FFN target adjusted to "
            f"{prune_ffn / split.dense_total:.2%} so the total lands at the budget"
        )
    return DualClustering(heads=heads, neurons=neurons, split=split, meta=meta)
