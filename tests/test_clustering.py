"""Module clustering and centroid selection on plain tensors (paper Sec. 3.3-3.4, reference code)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import ClusterWarning, fcluster, linkage
from scipy.spatial.distance import pdist

from ppkit.clustering import (
    chebyshev_pdist,
    clusters_at,
    count_at,
    distance_from_similarity,
    exact_threshold,
    greedy_mapping,
    head_similarity,
    linkage_tree,
    scan_threshold,
    select_centroids,
    select_random_members,
    select_worst,
    unit_cosine,
)
from ppkit.errors import InputError


def partition(labels) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), set()).add(i)
    return {frozenset(g) for g in groups.values()}


# --------------------------------------------------------------------------- similarity
def test_unit_cosine_is_uncentred_abs_cosine_and_gram_agrees():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen)
    x[:, 1] = -3.0 * x[:, 0]  # anti-parallel: |cos| = 1
    x[:, 2] = x[:, 0] + 5.0  # a shifted copy: centred correlation 1, uncentred cosine not
    cos = unit_cosine(samples=x)
    assert cos.dtype == torch.float32 and cos.shape == (6, 6)
    assert cos[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    a, b = x[:, 0].double(), x[:, 2].double()
    expected = abs(float(a @ b / (a.norm() * b.norm())))
    assert cos[0, 2].item() == pytest.approx(expected, abs=1e-6)
    assert expected < 0.5
    gram = x.double().T @ x.double()
    assert unit_cosine(gram=gram).dtype == torch.float64
    assert torch.allclose(unit_cosine(gram=gram), cos.double(), atol=1e-6)


def test_dead_unit_has_zero_similarity():
    x = torch.randn(20, 3)
    x[:, 2] = 0.0
    cos = unit_cosine(samples=x)
    assert cos[2, 0].item() == 0.0 and cos[2, 2].item() == 0.0


def test_greedy_mapping_is_greedy_not_optimal():
    # greedy takes 0.9 first, which blocks the optimal assignment 0.8 + 0.85 + 0.1
    block = torch.tensor([[0.9, 0.8, 0.0], [0.85, 0.0, 0.0], [0.0, 0.0, 0.1]], dtype=torch.float64)
    picked = greedy_mapping(block[None])
    assert picked[0].tolist() == pytest.approx([0.9, 0.1, 0.0])


def test_greedy_mapping_ties_take_first_flat_index():
    # two maxima: (0,1) comes first in row-major order, so (1,0) stays available: 0.5 + 0.5
    block = torch.tensor([[0.2, 0.5], [0.5, 0.3]], dtype=torch.float64)
    assert greedy_mapping(block[None])[0].tolist() == pytest.approx([0.5, 0.5])
    # first flat max is (0,0) here: the rest is 0.3
    block = torch.tensor([[0.5, 0.2], [0.5, 0.3]], dtype=torch.float64)
    assert greedy_mapping(block[None])[0].tolist() == pytest.approx([0.5, 0.3])


def naive_head_similarity(cos: np.ndarray, heads: int, dh: int) -> np.ndarray:
    """The reference code's loops: per ordered pair, flattened argmax, zero row and column, mean over dh."""
    out = np.eye(heads)
    for i, j in itertools.product(range(heads), repeat=2):
        if i == j:
            continue
        m = cos[i * dh:(i + 1) * dh, j * dh:(j + 1) * dh].copy()
        vals = []
        for _ in range(dh):
            r, c = np.unravel_index(np.argmax(m), m.shape)
            vals.append(m[r, c])
            m[r, :] = 0.0
            m[:, c] = 0.0
        out[i, j] = np.mean(vals)
    return out


def test_head_similarity_matches_reference_loops():
    gen = torch.Generator().manual_seed(1)
    heads, dh = 5, 6
    x = torch.randn(40, heads * dh, generator=gen)
    cos = unit_cosine(samples=x)
    fast = head_similarity(cos, heads, dh).numpy()
    slow = naive_head_similarity(cos.numpy(), heads, dh)
    assert np.allclose(fast, slow, atol=1e-6)
    assert np.allclose(fast, fast.T)


def test_permuted_sign_flipped_head_copy_is_found_by_mapping():
    gen = torch.Generator().manual_seed(2)
    heads, dh, t = 3, 8, 300
    x = torch.randn(t, heads * dh, generator=gen)
    perm = torch.randperm(dh, generator=gen)
    signs = torch.where(torch.rand(dh, generator=gen) < 0.5, -1.0, 1.0)
    x[:, 2 * dh:3 * dh] = 1.7 * x[:, 0:dh][:, perm] * signs  # head 2 = shuffled, partly negated, scaled head 0
    cos = unit_cosine(samples=x)
    sim = head_similarity(cos, heads, dh)
    assert sim[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert sim[0, 1].item() < 0.3 and sim[1, 2].item() < 0.3
    # comparing dimension m with dimension m (no mapping) would miss the copy
    unmapped = torch.diagonal(cos[0:dh, 2 * dh:3 * dh]).mean().item()
    assert unmapped < 0.5


# --------------------------------------------------------------------------- linkage
# a, b, c, d: hand-worked so that average, complete and the authors' chebyshev+complete differ
D4 = np.array(
    [
        [0.0, 0.1, 0.2, 0.9],
        [0.1, 0.0, 0.6, 0.9],
        [0.2, 0.6, 0.0, 0.45],
        [0.9, 0.9, 0.45, 0.0],
    ]
)


def test_linkages_give_hand_worked_trees():
    # average: ab@0.1, (ab)c@(0.2+0.6)/2=0.4, (abc)d@(0.9+0.9+0.45)/3=0.75
    # complete: ab@0.1, cd@0.45 (< max(0.2,0.6)=0.6), (ab)(cd)@0.9
    # reference: chebyshev rows: ab 0.4, ac 0.5, bc 0.6, cd 0.7, ad 0.9, bd 0.9 -> ab@0.4, (ab)c@0.6, d@0.9
    expected_heights = {"average": [0.1, 0.4, 0.75], "complete": [0.1, 0.45, 0.9], "reference": [0.4, 0.6, 0.9]}
    expected_at_05 = {
        "average": {frozenset({0, 1, 2}), frozenset({3})},
        "complete": {frozenset({0, 1}), frozenset({2, 3})},
        "reference": {frozenset({0, 1}), frozenset({2}), frozenset({3})},
    }
    for method in ("average", "complete", "reference"):
        z = linkage_tree(D4, method)
        assert z[:, 2].tolist() == pytest.approx(expected_heights[method]), method
        assert partition(clusters_at(z, 0.5)) == expected_at_05[method], method


def test_reference_linkage_equals_authors_scipy_call():
    gen = np.random.default_rng(3)
    x = gen.random((12, 5))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    d = d / d.max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClusterWarning)
        authors = linkage(d.astype(np.float32), method="complete", metric="chebyshev")
    ours = linkage_tree(d, "reference")
    assert np.allclose(ours[:, 2], authors[:, 2], atol=1e-6)
    assert partition(clusters_at(ours, 0.3)) == partition(fcluster(authors, 0.3, criterion="distance"))


def test_unknown_linkage_is_an_input_error():
    with pytest.raises(InputError, match="average, complete, reference"):
        linkage_tree(D4, "ward")


# --------------------------------------------------------------------------- thresholds
def random_trees(seed: int, layers: int = 3, n: int = 15) -> list[np.ndarray]:
    gen = np.random.default_rng(seed)
    trees = []
    for _ in range(layers):
        x = gen.random((n, 4))
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        trees.append(linkage_tree(d / d.max(), "average"))
    return trees


def test_count_at_matches_fcluster():
    trees = random_trees(4)
    for t in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0):
        assert count_at(trees, t) == [int(clusters_at(z, t).max()) + 1 for z in trees]


def test_exact_threshold_is_smallest_cut_meeting_target():
    trees = random_trees(5)
    heights = np.sort(np.concatenate([z[:, 2] for z in trees]))
    for max_kept in (44, 40, 25, 10, 3):
        t = exact_threshold(trees, max_kept)
        assert sum(count_at(trees, t)) <= max_kept
        smaller = heights[heights < t]
        if smaller.size:
            assert sum(count_at(trees, smaller[-1])) > max_kept
    assert exact_threshold(trees, 45) is None  # 3 x 15 units: nothing to prune


def test_exact_never_prunes_more_than_scan_and_fine_scan_agrees():
    trees = random_trees(6)
    for max_kept in (41, 33, 20, 7):
        t_exact = exact_threshold(trees, max_kept)
        t_scan = scan_threshold(trees, max_kept, step=0.01)
        assert t_scan >= t_exact
        assert sum(count_at(trees, t_exact)) >= sum(count_at(trees, t_scan))
        assert sum(count_at(trees, t_scan)) <= max_kept
        fine = scan_threshold(trees, max_kept, step=1e-7)
        assert [partition(clusters_at(z, fine)) for z in trees] == [partition(clusters_at(z, t_exact)) for z in trees]


def test_scan_is_first_grid_point_meeting_target():
    trees = random_trees(7)
    step, max_kept = 0.001, 30
    t = scan_threshold(trees, max_kept, step)
    k = round(t / step)
    assert sum(count_at(trees, k * step)) <= max_kept
    assert k == 1 or sum(count_at(trees, (k - 1) * step)) > max_kept


# --------------------------------------------------------------------------- selection
def test_centroid_is_largest_score_with_lowest_index_on_ties():
    labels = np.array([0, 1, 0, 1, 2, 0])
    scores = np.array([0.5, 0.2, 0.9, 0.2, 0.1, 0.9])
    assert select_centroids(labels, scores).tolist() == [1, 2, 4]


def test_random_members_one_per_cluster_and_seeded():
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    picks = [tuple(select_random_members(labels, np.random.default_rng(s))) for s in range(20)]
    for p in picks:
        assert sorted(labels[list(p)].tolist()) == [0, 1, 2, 3]
    assert picks[0] == tuple(select_random_members(labels, np.random.default_rng(0)))
    assert len(set(picks)) > 1


def test_worst_keeps_members_of_largest_clusters():
    labels = np.array([0, 1, 1, 2, 2, 2, 3])  # sizes: {0}:1, {1,2}:2, {3,4,5}:3, {6}:1
    scores = np.array([1.0, 1.0, 0.5, 0.1, 0.2, 0.3, 1.0])
    assert select_worst(labels, 4, scores).tolist() == [1, 3, 4, 5]  # all of the triple, best of the pair
    assert select_worst(labels, 6, scores).tolist() == [0, 1, 2, 3, 4, 5]  # singleton tie: lowest index first


def test_reference_linkage_reads_the_diagonal_of_d_like_the_authors_code():
    """A near-tie: rows (0, 1) and (2, 3) are both 0.2 apart in Chebyshev distance with a zero diagonal.
    The float32 noise the authors' D has on its diagonal (1 - |cos(x, x)| ~ 1e-6) decides which pair merges
    first; reference mode must use D as given, as their ``linkage(D, 'complete', 'chebyshev')`` does."""
    d = np.array([[0.0, 0.2, 0.5, 0.6],
                  [0.2, 0.0, 0.6, 0.5],
                  [0.5, 0.6, 0.0, 0.2],
                  [0.6, 0.5, 0.2, 0.0]], dtype=np.float32)
    zeroed_first = set(linkage_tree(d, "reference")[0, :2].astype(int))
    noisy = d.copy()
    noisy[2, 2] = noisy[3, 3] = np.float32(1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClusterWarning)
        authors = linkage(noisy, method="complete", metric="chebyshev")
    ours = linkage_tree(noisy, "reference")
    assert np.array_equal(ours[:, :2], authors[:, :2]) and np.allclose(ours[:, 2], authors[:, 2], rtol=0, atol=1e-12)
    assert set(ours[0, :2].astype(int)) == {2, 3} and zeroed_first == {0, 1}  # the diagonal decided the tie
    # distance_from_similarity keeps that diagonal only when asked (reference mode), zeroes it otherwise
    sim = 1.0 - noisy
    assert distance_from_similarity(sim, zero_diagonal=False)[2, 2] == pytest.approx(1e-6, abs=1e-7)
    assert distance_from_similarity(sim)[2, 2] == 0.0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_chebyshev_distance_equals_scipys_pdist_bit_for_bit(threads):
    """Reference linkage's distances on several threads are scipy's values exactly (ties stay ties), for a
    row count that is not a multiple of the block and a float32 D with diagonal noise like the authors'."""
    rng = np.random.default_rng(0)
    d = rng.random((203, 203)).astype(np.float32)
    np.fill_diagonal(d, np.float32(1e-6))
    d[7] = d[11]  # an exact tie between two rows
    ours = chebyshev_pdist(d, threads=threads, block=16)
    expected = pdist(d.astype(np.float64), metric="chebyshev")
    assert ours.dtype == np.float64 and np.array_equal(ours, expected)
