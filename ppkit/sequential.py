"""Sequential reconstruction (``--compensate lstsq-seq``): re-solve each sublayer's kept output rows on
the *pruned* model's own inputs, layer by layer, so errors do not accumulate.

One-shot ``lstsq`` (:mod:`ppkit.compensate`) fits every sublayer on the dense model's inputs, as if
the layers before it were unpruned. Here, as in K-prune's weight tuning (Park et al., 2024) and
Kwon et al.'s layer-wise mask tuning (2022), sublayers are visited in forward order; for each one
the masked model, with every earlier correction in place, is run up to that sublayer over the
calibration tokens, and the kept rows Theta_K of its output projection are fit so that
[x_pruned,K, 1] Theta_K reproduces the *dense* model's output y there:

    min_t  sum_w |[x_K, 1] t - y|^2 + mu |t - Theta_K|^2   (ridge toward the original rows)

with the same per-token weights (1 / |y - b|^2), ridge grid and held-out acceptance rule as the
one-shot fit. A sublayer that keeps everything is refit too once anything before it is pruned (its
inputs moved); with nothing pruned up to a sublayer, it is left alone.

``--compensate mask-tuning`` is Kwon et al.'s mask tuning in the same sequential loop: instead of new
rows, one scale per kept unit (its rows times s_u, the bias untouched), the least-squares solution of
the same weighted objective with a ridge toward s = 1. It is the restricted version of the row refit
(units x 1 unknowns instead of units x unit_size x hidden), kept as the fisher strategy's own step.

Cost: one dense pass over the selected sequences for the targets, then one truncated pass per
sublayer (the forward stops at the sublayer's projection), about (L + 1) full passes over a few
thousand tokens (``max_tokens``, whole calibration batches).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .compensate import HOLDOUT, MOMENT_TOKENS, RIDGE_GRID, SublayerResult, best_candidate, output_theta, \
    projection, quadratic_error, ridge_solutions, set_kept_rows, summarize
from .errors import InputError
from .masking import apply_masks
from .plan import PruningPlan
from .statistics import _model_device, _valid_mask

KINDS = ("attention", "ffn")
SOLVERS = {"rows": "lstsq-seq", "scales": "mask-tuning"}


def scale_solutions(g: torch.Tensor, cross: torch.Tensor, base_rows: torch.Tensor, unit_size: int,
                    ridges) -> Any:
    """Kept rows ``diag(s) P`` (bias row unchanged) for the per-unit scales s minimising
    sum w |x_K diag(s) P + b - y|^2 + mu |s - 1|^2, for each relative ridge: Kwon et al.'s mask tuning.

    With unit u's rows P_u and G, C the weighted moments of [x_K, 1] (as for the row refit), the normal
    equations are A s = r with A[u, v] = sum over u's and v's rows of G[i, j] <P_i, P_j> and
    r[u] = sum over u's rows of <C_i - G[i, bias] b, P_i>.
    """
    rows, bias = base_rows[:-1], base_rows[-1]
    k = rows.shape[0]
    units = k // unit_size
    if units == 0:
        return
    pair = g[:k, :k] * (rows @ rows.T)
    a = pair.reshape(units, unit_size, units, unit_size).sum(dim=(1, 3))
    r = ((cross[:k] - g[:k, k:k + 1] * bias) * rows).sum(1).reshape(units, unit_size).sum(1)
    scale = max(float(a.diagonal().mean()), 1e-12)
    eye = torch.eye(units, dtype=a.dtype)
    for ridge in ridges:
        mu = ridge * scale
        factor, info = torch.linalg.cholesky_ex(a + mu * eye)
        if int(info) != 0:
            continue
        s = torch.cholesky_solve((r + mu).unsqueeze(1), factor).squeeze(1)
        yield ridge, torch.cat([rows * s.repeat_interleave(unit_size).unsqueeze(1), bias.unsqueeze(0)])


class _Reached(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def _select(batches: Iterable[dict[str, torch.Tensor]], max_tokens: int | None, holdout: float, seed: int):
    """Whole batches (calibration order is already a seeded random sample) until ``max_tokens`` real
    tokens, each with its real-token mask and a seeded per-sequence held-out flag."""
    gen = torch.Generator().manual_seed(seed)
    selected, tokens = [], 0
    for batch in batches:
        mask = _valid_mask(batch)
        held = torch.rand(mask.shape[0], generator=gen) < holdout
        selected.append((batch, mask, held.unsqueeze(1).expand_as(mask)[mask]))
        tokens += int(mask.sum())
        if max_tokens is not None and tokens >= max_tokens:
            break
    if not selected:
        raise InputError("sequential reconstruction needs calibration batches")
    return selected


def _module(adapter, layer: int, kind: str) -> nn.Module:
    return adapter.head_context_module(layer) if kind == "attention" else adapter.ffn_activation_module(layer)


def _run(model: nn.Module, selected, device, module: nn.Module, on_batch) -> None:
    """Forward every selected batch until ``module``, handing its input's real-token rows to ``on_batch``."""
    current: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple) -> None:
        x = args[0]
        on_batch(current["i"], x[current["mask"].to(x.device)].float())
        raise _Reached

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            for i, (batch, mask, _) in enumerate(selected):
                current.update(i=i, mask=mask)
                try:
                    model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
                except _Reached:
                    pass
    finally:
        handle.remove()


def _dense_targets(model: nn.Module, adapter, selected, device, num_layers: int) -> dict[tuple[int, str], list[torch.Tensor]]:
    """Per sublayer and batch, the dense model's output y = x W + b at the real tokens (float32, CPU)."""
    targets: dict[tuple[int, str], list[torch.Tensor]] = {}
    current: dict[str, Any] = {}
    handles = []

    def make_hook(layer: int, kind: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0][current["mask"].to(args[0].device)].float()
            weight, bias = projection(adapter, layer, kind)
            targets.setdefault((layer, kind), []).append((x @ weight.float() + bias.float()).cpu())

        return hook

    for layer in range(num_layers):
        for kind in KINDS:
            handles.append(_module(adapter, layer, kind).register_forward_pre_hook(make_hook(layer, kind)))
    try:
        with torch.inference_mode():
            for batch, mask, _ in selected:
                current["mask"] = mask
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    return targets


def reconstruct_sequential(
    model: nn.Module,
    plan: PruningPlan,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    seed: int = 0,
    max_tokens: int | None = MOMENT_TOKENS,
    holdout: float = HOLDOUT,
    solver: str = "rows",
) -> dict[str, Any]:
    """Correct the kept output rows of a *dense* ``model`` in place, sublayer by sublayer, before surgery.

    ``max_tokens`` real calibration tokens (whole batches; None = all) are used, a ``holdout`` share of
    the sequences judging each correction. ``solver`` "rows" refits the kept rows (``lstsq-seq``),
    "scales" one scale per kept unit (``mask-tuning``). Returns the ``compensation`` report (as
    :func:`ppkit.compensate.compensate_model`'s, with ``sequential: true``).
    """
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    from .adapters import get_adapter

    adapter = get_adapter(model)
    shape = adapter.shape()
    plan.validate(shape.num_layers, shape.num_heads, shape.ffn_dim)
    device = _model_device(model)
    selected = _select(batches, max_tokens, holdout, seed)
    targets = _dense_targets(model, adapter, selected, device, shape.num_layers)

    results: list[SublayerResult] = []
    passes = 1
    upstream_pruned = False
    with apply_masks(model, plan):
        for layer, layer_plan in enumerate(plan.layers):
            for kind, units, unit_size in (("attention", layer_plan.heads, shape.head_dim), ("ffn", layer_plan.neurons, 1)):
                theta = output_theta(adapter, layer, kind)
                n = theta.shape[0] - 1
                keep_cols = torch.tensor([u * unit_size + i for u in units for i in range(unit_size)], dtype=torch.long)
                upstream_pruned = upstream_pruned or len(keep_cols) < n
                if not upstream_pruned:
                    continue  # its inputs and outputs are the dense model's: nothing to correct
                moments = _moments(model, selected, device, _module(adapter, layer, kind), keep_cols,
                                   targets[(layer, kind)], theta[n])
                passes += 1
                keep_rows = torch.cat([keep_cols, torch.tensor([n])])
                base_rows = theta[keep_rows]
                held_error = quadratic_error(*moments["held"])
                err_before = held_error(base_rows)
                g_fit, cross_fit, _ = moments["fit"]
                if solver == "rows":
                    candidates = ridge_solutions(g_fit, cross_fit, base_rows, RIDGE_GRID)
                else:
                    candidates = scale_solutions(g_fit, cross_fit, base_rows, unit_size, RIDGE_GRID)
                best_rows, best_err, best_ridge = best_candidate(candidates, held_error, base_rows)
                accepted = best_rows is not base_rows
                if accepted:
                    set_kept_rows(adapter, layer, kind, theta, keep_rows, best_rows)
                results.append(SublayerResult(layer, kind, err_before, best_err, accepted, best_ridge))
    report = summarize(results, SOLVERS[solver])
    real = torch.cat([held for _, _, held in selected])
    report.update(sequential=True, tokens_fit=int((~real).sum()), tokens_held=int(real.sum()),
                  forward_passes=passes)
    return report


def _moments(model, selected, device, module, keep_cols, targets, bias):
    """Weighted (G = sum w [x_K,1]^T [x_K,1], C = sum w [x_K,1]^T y, sum w |y|^2) on the fit and the
    held-out sequences, x from the masked model's pass up to ``module``, y the dense targets."""
    acc = {part: [0.0, 0.0, 0.0] for part in ("fit", "held")}
    eps = 1e-2 * float(torch.cat(targets).double().sub(bias).pow(2).sum(-1).mean()) + 1e-12

    def on_batch(i: int, x: torch.Tensor) -> None:
        y = targets[i].double()
        w = 1.0 / ((y - bias).pow(2).sum(-1) + eps)
        ext = torch.cat([x.cpu().double()[:, keep_cols], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        weighted = ext * w.unsqueeze(1)
        held = selected[i][2]
        for part, rows in (("fit", ~held), ("held", held)):
            if rows.any():
                a = acc[part]
                a[0] = a[0] + weighted[rows].T @ ext[rows]
                a[1] = a[1] + weighted[rows].T @ y[rows]
                a[2] += float((w[rows] * y[rows].pow(2).sum(-1)).sum())

    _run(model, selected, device, module, on_batch)
    k = len(keep_cols) + 1
    for part, a in acc.items():
        if isinstance(a[0], float):  # no sequence of this part
            a[0], a[1] = torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, targets[0].shape[1], dtype=torch.float64)
    return {part: tuple(a) for part, a in acc.items()}
