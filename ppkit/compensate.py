"""Retraining-free reconstruction: fold what pruned heads and neurons did into the kept weights.

Both sublayers end in a linear map of the units a plan prunes: y = [x, 1] @ Theta, where x holds the
FFN activations (or the merged head contexts) of one token and Theta = [W; b] is the down (or
output) projection. Pruning drops rows of Theta. This module re-solves the *kept* rows so that y is
reproduced as well as possible over calibration tokens, using only second moments G = sum_t w_t
[x_t, 1]^T [x_t, 1] over a seeded sample of calibration tokens (accumulated during the statistics
forward pass, see :class:`MomentCollector`):

- ``lstsq``: ridge least squares, damped toward the original kept rows (not toward zero), so that
  pruning nothing changes nothing: theta = (G_KK + mu D)^-1 (G_K: Theta + mu D theta0).
- ``merge``: each pruned unit is regressed on one kept unit (its cluster's kept member when the
  strategy reports clusters, otherwise the kept unit that explains it best) plus a constant, and its
  output rows are folded into that unit's rows and the bias.

Safety. A few tokens ([CLS], GPT-2's first token) carry a large share of the second moment, so a
fit over raw tokens serves them and hurts the rest. Tokens are therefore weighted by the inverse
squared norm of their sublayer output (w_t = 1 / (|y_t - b|^2 + eps)), which makes the objective the
per-token *relative* error. Each layer's correction (and the ridge strength) is judged on held-out
calibration samples by that same error, and accepted only where it improves on no correction.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import InputError
from .plan import PruningPlan

METHODS = ("lstsq", "merge")
#: relative ridge strengths tried, as fractions of the mean diagonal of G_KK, strongest first; the
#: search stops once the held-out error rises (it is U-shaped in the ridge), so usually 3-4 are solved
RIDGE_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 0.0)
#: share of calibration samples held out to judge each correction
HOLDOUT = 0.25
#: calibration tokens (fit + held out) whose moments are accumulated; None = all
MOMENT_TOKENS = 2048
#: sampled rows buffered per sublayer before their Gram matrix is formed
FLUSH_ROWS = 2048


@dataclass
class Moments:
    """Weighted second moments of [x, 1] for one sublayer: a fit part and a held-out part."""

    fit: torch.Tensor
    held: torch.Tensor
    tokens_fit: int = 0
    tokens_held: int = 0


@dataclass
class LayerMoments:
    attention: Moments
    ffn: Moments


@dataclass
class SublayerResult:
    """Held-out relative error of one sublayer without and with the correction."""

    layer: int
    sublayer: str
    error_before: float
    error_after: float
    accepted: bool
    ridge: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "sublayer": self.sublayer, "error_before": self.error_before,
            "error_after": self.error_after, "accepted": self.accepted, "ridge": self.ridge,
        }


class MomentCollector:
    """Accumulates the weighted second moments of every sublayer from the activations it is shown.

    It is an :class:`~ppkit.statistics.ActivationObserver`: given to
    :func:`~ppkit.statistics.collect_statistics` it rides on the statistics forward pass, so
    compensation needs no pass of its own. Only ``max_tokens`` non-padding positions (uniform,
    seeded) enter the moments: a Gram matrix costs about twice an FFN forward per token, and a few
    thousand tokens determine a ridge fit of the kept rows well. Each calibration *sample* goes
    (seeded) either to the fit or to the held-out part, so held-out errors are measured on samples
    the fit never saw. ``seconds`` is the time spent here.
    """

    def __init__(self, model: nn.Module, *, max_tokens: int | None = MOMENT_TOKENS, seed: int = 0,
                 holdout: float = HOLDOUT) -> None:
        from .adapters import get_adapter

        self.adapter = get_adapter(model)
        self.num_layers = self.adapter.shape().num_layers
        self.max_tokens = max_tokens
        self.seed = seed
        self.holdout = holdout
        self.seconds = 0.0
        self._parts: list[dict[str, torch.Tensor]] = []
        self._batch: dict[str, torch.Tensor] = {}
        self._layers: list[dict[str, Moments]] = [dict() for _ in range(self.num_layers)]
        self._pending: dict[tuple[int, str, str], list[torch.Tensor]] = {}
        self._pending_rows: dict[tuple[int, str, str], int] = {}

    def start(self, masks: list[torch.Tensor]) -> None:
        from .statistics import _positions_per_batch

        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed)
        total = int(sum(int(m.sum()) for m in masks))
        n = total if self.max_tokens is None else min(int(self.max_tokens), total)
        index = torch.randperm(total, generator=gen)[:n].sort().values
        self._parts = []
        for mask, (rows, pos) in zip(masks, _positions_per_batch(masks, index)):
            held = (torch.rand(mask.shape[0], generator=gen) < self.holdout)[rows]
            flat = rows * mask.shape[1] + pos
            self._parts.append({"fit": flat[~held], "held": flat[held]})
        self.seconds += time.perf_counter() - t0

    def begin_batch(self, index: int) -> None:
        self._batch = self._parts[index]

    def observe(self, layer: int, kind: str, x: torch.Tensor) -> None:
        t0 = time.perf_counter()
        sublayer = "attention" if kind == "head" else "ffn"
        x2 = x.detach().reshape(-1, x.shape[-1])
        for part, idx in self._batch.items():
            if idx.numel():
                key = (layer, sublayer, part)
                self._pending.setdefault(key, []).append(x2.index_select(0, idx.to(x2.device)).float())
                self._pending_rows[key] = self._pending_rows.get(key, 0) + idx.numel()
                if self._pending_rows[key] >= FLUSH_ROWS:
                    self._flush(key)
        self.seconds += time.perf_counter() - t0

    def _flush(self, key: tuple[int, str, str]) -> None:
        """Add the pending rows' weighted Gram matrix to the float64 total: one large product instead
        of one per batch (per-batch products and float64 adds of an N x N matrix cost more than the math)."""
        layer, sublayer, part = key
        self._pending_rows.pop(key, None)
        rows = torch.cat(self._pending.pop(key))
        # plain tensors even when called inside the statistics pass's inference mode, so the totals
        # can be updated there and used normally afterwards
        with torch.inference_mode(False):
            # weight each token by 1 / |its sublayer output|^2, so the fit minimises relative error
            norm2 = (rows @ projection(self.adapter, layer, sublayer)[0].detach().float()).pow(2).sum(-1)
            eps = 1e-2 * float(norm2.mean()) + 1e-12
            ext = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1) * (norm2 + eps).rsqrt().unsqueeze(1)
            gram = (ext.T @ ext).double()
            mom = self._layers[layer].get(sublayer)
            if mom is None:
                mom = self._layers[layer][sublayer] = Moments(torch.zeros_like(gram), torch.zeros_like(gram))
            if part == "fit":
                mom.fit += gram
                mom.tokens_fit += rows.shape[0]
            else:
                mom.held += gram
                mom.tokens_held += rows.shape[0]

    def moments(self) -> list[LayerMoments]:
        """The accumulated moments (on CPU), one entry per layer."""
        t0 = time.perf_counter()
        for key in list(self._pending):
            self._flush(key)
        self.seconds += time.perf_counter() - t0
        out = []
        for layer, parts in enumerate(self._layers):
            if set(parts) != {"attention", "ffn"}:
                raise InputError(f"no compensation moments for layer {layer}: the collector saw no tokens of it")
            for mom in parts.values():
                mom.fit, mom.held = mom.fit.cpu(), mom.held.cpu()
            out.append(LayerMoments(attention=parts["attention"], ffn=parts["ffn"]))
        return out


def collect_moments(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    seed: int = 0,
    max_tokens: int | None = MOMENT_TOKENS,
    holdout: float = HOLDOUT,
) -> list[LayerMoments]:
    """The moments of ``batches`` alone: the statistics forward pass (which excludes padding) with a
    :class:`MomentCollector` riding on it. Prefer giving the collector to
    :func:`~ppkit.statistics.collect_statistics` yourself when statistics are collected anyway."""
    from .statistics import collect_statistics

    collector = MomentCollector(model, max_tokens=max_tokens, seed=seed, holdout=holdout)
    # tokens=1: the statistics themselves are not wanted, only the pass and its hooks
    collect_statistics(model, batches, tokens=1, seed=seed, progress=False, observers=[collector])
    return collector.moments()


def _held_out_error(gram: torch.Tensor, theta: torch.Tensor, keep: torch.Tensor):
    """A function of new kept rows t giving the weighted relative output error on held-out tokens:
    sum_t w_t |[x_t,K] t - [x_t,1] Theta|^2 / sum_t w_t |[x_t,1] Theta|^2."""
    g_theta = gram @ theta
    return quadratic_error(gram[keep][:, keep], g_theta[keep], float((g_theta * theta).sum()))


def quadratic_error(g_kk: torch.Tensor, cross: torch.Tensor, total: float):
    """A function of rows t giving sum_t w_t |x_t t - y_t|^2 / sum_t w_t |y_t|^2 from the moments
    G = sum w x^T x (``g_kk``), C = sum w x^T y (``cross``) and sum w |y|^2 (``total``), expanded so each
    call costs one |K|^2 product instead of a pass over the tokens."""

    def error(rows: torch.Tensor) -> float:
        if total <= 0:
            return 0.0
        value = float(((g_kk @ rows) * rows).sum()) - 2.0 * float((rows * cross).sum()) + total
        return max(value, 0.0) / total

    return error


def solve_lstsq(gram: torch.Tensor, theta: torch.Tensor, keep: torch.Tensor, ridges: Sequence[float]) -> Iterator[tuple[float, torch.Tensor]]:
    """Kept rows (incl. the bias row, last) minimising |[x_K,1] t - [x,1] Theta|^2 + mu |t - Theta_K|^2.

    mu is given relative to the mean diagonal of G_KK. Yields (ridge, rows) pairs lazily, one
    Cholesky solve each, leaving out ridges for which the damped G_KK is not positive definite.
    """
    return ridge_solutions(gram[keep][:, keep], gram[keep] @ theta, theta[keep], ridges)


def ridge_solutions(g_kk: torch.Tensor, cross: torch.Tensor, theta0: torch.Tensor,
                    ridges: Sequence[float]) -> Iterator[tuple[float, torch.Tensor]]:
    """Rows t minimising t^T G t - 2 <t, C> + mu |t - theta0|^2 for each relative ridge (see :func:`solve_lstsq`)."""
    scale = max(float(g_kk.diagonal().mean()), 1e-12) if g_kk.numel() else 1.0
    eye = torch.eye(g_kk.shape[0], dtype=g_kk.dtype)
    for ridge in ridges:
        mu = ridge * scale
        factor, info = torch.linalg.cholesky_ex(g_kk + mu * eye)
        if int(info) != 0:
            continue  # singular without (enough) damping
        yield ridge, torch.cholesky_solve(cross + mu * theta0, factor)


def best_candidate(candidates: Iterable[tuple[float | None, torch.Tensor]], error, base_rows: torch.Tensor):
    """The candidate rows with the lowest held-out ``error``, if lower than ``base_rows``' (else those):
    returns (rows, error, ridge). Stops at the first rise, the held-out error being U-shaped in the ridge."""
    best_rows, best_err, best_ridge = base_rows, error(base_rows), None
    previous = math.inf
    for ridge, cand in candidates:
        err = error(cand)
        if math.isfinite(err) and err < best_err:
            best_rows, best_err, best_ridge = cand, err, ridge
        if err > previous:
            break  # weaker damping only overfits more from here on
        previous = err
    return best_rows, best_err, best_ridge


def solve_merge(
    gram: torch.Tensor, theta: torch.Tensor, keep_units: Sequence[int], unit_size: int,
    assignment: dict[int, int] | None = None,
) -> torch.Tensor:
    """Fold each pruned unit into one kept unit: x_j ~ x_k M + beta; rows_k += M rows_j, b += beta rows_j.

    Units are groups of ``unit_size`` consecutive rows (a head's dimensions, or 1 for a neuron). The
    kept unit is ``assignment[j]`` when given (e.g. the kept member of j's cluster), otherwise the kept
    unit that explains x_j best. Returns the new kept rows (kept units' rows in order, then the bias row).
    """
    n = gram.shape[0] - 1
    kept = list(keep_units)
    pruned = sorted(set(range(n // unit_size)) - set(kept))
    new = theta.clone()
    if kept and pruned:
        if unit_size == 1:
            _merge_neurons(gram, theta, new, kept, pruned, assignment)
        else:
            _merge_heads(gram, theta, new, kept, pruned, unit_size, assignment)
    keep_rows = [u * unit_size + i for u in kept for i in range(unit_size)] + [n]
    return new[keep_rows]


def _merge_neurons(gram, theta, new, kept, pruned, assignment) -> None:
    """Vectorised merge for single neurons, from the (weighted) covariance implied by the Gram matrix."""
    n = gram.shape[0] - 1
    total, sums = gram[n, n], gram[:n, n]
    cov = gram[:n, :n] - torch.outer(sums, sums) / total
    k_idx, j_idx = torch.tensor(kept), torch.tensor(pruned)
    c_jk = cov[j_idx][:, k_idx]  # [pruned, kept]
    var_k = cov.diagonal()[k_idx].clamp_min(1e-12)
    best = (c_jk.pow(2) / var_k).argmax(dim=1)
    if assignment:
        pos = {k: i for i, k in enumerate(kept)}
        forced = [pos.get(assignment.get(j, -1), -1) for j in pruned]
        best = torch.tensor([f if f >= 0 else int(b) for f, b in zip(forced, best.tolist())])
    target = k_idx[best]
    alpha = c_jk[torch.arange(len(pruned)), best] / var_k[best]
    beta = (sums[j_idx] - alpha * sums[target]) / total
    new.index_add_(0, target, alpha.unsqueeze(1) * theta[j_idx])
    new[n] += beta @ theta[j_idx]


def _merge_heads(gram, theta, new, kept, pruned, unit_size, assignment) -> None:
    """Merge pruned heads: regress a head's context on a kept head's context (plus a constant)."""
    n = gram.shape[0] - 1

    def rows(u: int) -> list[int]:
        return list(range(u * unit_size, (u + 1) * unit_size))

    for j in pruned:
        rj = rows(j)
        candidates = [assignment[j]] if assignment and assignment.get(j) in kept else kept
        best = None
        for k in candidates:
            idx = rows(k) + [n]
            a = gram[idx][:, idx]
            b = gram[idx][:, rj]
            coef = torch.linalg.solve(a + 1e-9 * float(a.diagonal().mean()) * torch.eye(len(idx), dtype=a.dtype), b)
            explained = float((coef * b).sum())  # larger = better fit of x_j from [x_k, 1]
            if best is None or explained > best[0]:
                best = (explained, k, coef)
        _, k, coef = best
        new[rows(k) + [n]] += coef @ theta[rj]


def compensate_model(
    model: nn.Module,
    plan: PruningPlan,
    moments: list[LayerMoments] | None = None,
    *,
    method: str = "lstsq",
    batches: Iterable[dict[str, torch.Tensor]] | None = None,
    seed: int = 0,
    assignments: dict[tuple[int, str], dict[int, int]] | None = None,
) -> dict[str, Any]:
    """Correct the kept output-projection rows of a *dense* model in place, before surgery.

    Give ``moments`` (from :func:`collect_moments`) or ``batches`` to collect them. Returns the
    report recorded under ``compensation`` in report.json: per layer and sublayer, the held-out
    relative error before and after, and whether the correction was accepted.
    """
    from .adapters import get_adapter

    if method not in METHODS:
        raise InputError(f"compensation must be one of none, {', '.join(METHODS)}; got {method!r}")
    adapter = get_adapter(model)
    shape = adapter.shape()
    plan.validate(shape.num_layers, shape.num_heads, shape.ffn_dim)
    if moments is None:
        if batches is None:
            raise InputError("compensate_model needs moments or calibration batches")
        moments = collect_moments(model, batches, seed=seed)
    results: list[SublayerResult] = []
    for layer, layer_plan in enumerate(plan.layers):
        for kind, units, unit_size in (("attention", layer_plan.heads, shape.head_dim), ("ffn", layer_plan.neurons, 1)):
            mom = getattr(moments[layer], kind)
            theta = output_theta(adapter, layer, kind)
            n = theta.shape[0] - 1
            keep_rows = torch.tensor([u * unit_size + i for u in units for i in range(unit_size)] + [n], dtype=torch.long)
            base_rows = theta[keep_rows]
            held_error = _held_out_error(mom.held, theta, keep_rows)
            err_before = held_error(base_rows)
            best_rows, best_err, best_ridge = base_rows, err_before, None
            if len(keep_rows) < n + 1:  # something is pruned
                if method == "lstsq":
                    candidates = solve_lstsq(mom.fit, theta, keep_rows, RIDGE_GRID)
                else:
                    assignment = (assignments or {}).get((layer, kind))
                    candidates = [(None, solve_merge(mom.fit, theta, list(units), unit_size, assignment))]
                best_rows, best_err, best_ridge = best_candidate(candidates, held_error, base_rows)
            accepted = best_rows is not base_rows
            if accepted:
                set_kept_rows(adapter, layer, kind, theta, keep_rows, best_rows)
            results.append(SublayerResult(layer, kind, err_before, best_err, accepted, best_ridge))
    return summarize(results, method)


def projection(adapter, layer: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of a sublayer's output projection, ``kind`` "attention" or "ffn" (out = x @ W + b)."""
    return adapter.attention_output_weight(layer) if kind == "attention" else adapter.ffn_output_weight(layer)


def output_theta(adapter, layer: int, kind: str) -> torch.Tensor:
    """Theta = [W; b] of a sublayer's output projection ("attention" or "ffn"), float64 on the CPU,
    where the fits are solved whatever the model's device."""
    weight, bias = projection(adapter, layer, kind)
    return torch.cat([weight.detach().to("cpu", torch.float64), bias.detach().to("cpu", torch.float64).unsqueeze(0)], 0)


def set_kept_rows(adapter, layer: int, kind: str, theta: torch.Tensor, keep_rows: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows`` over the kept rows (``keep_rows``, the bias row last) of a sublayer's output projection."""
    setter = adapter.set_attention_output if kind == "attention" else adapter.set_ffn_output
    weight, bias = projection(adapter, layer, kind)
    new_theta = theta.clone()
    new_theta[keep_rows] = rows
    n = theta.shape[0] - 1
    setter(layer, new_theta[:n].to(weight.device, weight.dtype), new_theta[n].to(bias.device, bias.dtype))


def summarize(results: Sequence[SublayerResult], method: str) -> dict[str, Any]:
    """The ``compensation`` entry of report.json for per-sublayer results."""
    return {
        "method": method,
        "holdout": HOLDOUT,
        "token_weighting": "1 / (|y_t - b|^2 + 0.01 mean)",
        "layers": [r.as_dict() for r in results],
        "mean_error_before": sum(r.error_before for r in results) / max(len(results), 1),
        "mean_error_after": sum(r.error_after for r in results) / max(len(results), 1),
        "accepted": sum(r.accepted for r in results),
    }
