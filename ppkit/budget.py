"""How many FLOPs each module type must give up: the lambda split of a kept-FLOPs budget.

The budget ``r`` is the fraction of the dense model's FLOPs to *keep* (FLOPs of MHA + FFN, at the
calibration mean sequence length, as :mod:`ppkit.flops` counts them). The pruned FLOPs
``P = (1 - r) * I`` are split so that pruned FFN FLOPs = lambda x pruned MHA FLOPs (paper Eq. 4,
``I^F - C^F = lambda (I^A - C^A)``; Algorithm 1's ``C^F = lambda C^A`` is a typo the reference code
does not follow either). Every layer keeps at least ``min_heads`` heads and ``min_neurons`` neurons
(1 each for clustering, where each layer keeps at least one cluster). When the FFN cannot give its
lambda share (e.g. lambda=5 and r <= 0.2 for BERT-base: the reference code loops forever there) the
rest is moved to MHA, and vice versa; a note records it. When both together cannot reach ``r``,
:class:`~ppkit.errors.BudgetError` names the smallest reachable ratio.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .adapters.base import ModelShape
from .errors import BudgetError, InputError
from .flops import unit_flops

#: relative slack when turning FLOPs into unit counts, so float noise never drops a whole unit
_COUNT_EPS = 1e-9


@dataclass
class BudgetSplit:
    """Per-unit FLOPs and the pruned / kept FLOPs targets of each module type."""

    budget: float
    lambda_: float
    seq_len: float
    head_flops: float
    neuron_flops: float
    dense_mha: float
    dense_ffn: float
    #: FLOPs to prune in MHA / FFN (prune_mha + prune_ffn == (1 - budget) * dense_total)
    prune_mha: float
    prune_ffn: float
    min_heads: int = 1
    min_neurons: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def dense_total(self) -> float:
        return self.dense_mha + self.dense_ffn

    @property
    def prune_total(self) -> float:
        return self.prune_mha + self.prune_ffn

    @property
    def kept_total(self) -> float:
        """The most FLOPs a plan may keep."""
        return self.dense_total - self.prune_total

    def max_heads_kept(self) -> int:
        """Largest total head count that still prunes ``prune_mha``."""
        return count_within(self.dense_mha - self.prune_mha, self.head_flops)

    def max_neurons_kept(self, prune_ffn: float | None = None) -> int:
        """Largest total neuron count that still prunes ``prune_ffn`` (default: this split's)."""
        p = self.prune_ffn if prune_ffn is None else prune_ffn
        return count_within(self.dense_ffn - p, self.neuron_flops)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_within(flops: float, unit_flops: float) -> int:
    """How many units of ``unit_flops`` fit in ``flops`` (never more than fit, up to float noise)."""
    if unit_flops <= 0:
        raise InputError("unit FLOPs must be positive (sequence length or hidden size is zero?)")
    return max(0, int(math.floor(flops / unit_flops * (1.0 + _COUNT_EPS) + _COUNT_EPS)))


def split_budget(
    shape: ModelShape,
    seq_len: float,
    budget: float,
    lambda_: float = 5.0,
    *,
    min_heads: int = 1,
    min_neurons: int = 1,
    ffn_only: bool = False,
) -> BudgetSplit:
    """Split the FLOPs to prune between MHA and FFN for a dense ``shape`` and kept fraction ``budget``.

    With ``ffn_only`` every pruned FLOP comes from the FFN (KCM); otherwise pruned FFN = ``lambda_`` x
    pruned MHA, with the share one side cannot give moved to the other (and a note). Raises
    :class:`BudgetError` with the smallest reachable kept ratio when the budget cannot be met.
    """
    if not (0.0 < budget <= 1.0) or math.isnan(budget):
        raise InputError(f"FLOPs budget must be in (0, 1] (the fraction of FLOPs to keep), got {budget}")
    if lambda_ < 0 or math.isnan(lambda_) or math.isinf(lambda_):
        raise InputError(f"lambda must be a finite number >= 0, got {lambda_}")
    if seq_len <= 0:
        raise InputError(f"FLOPs sequence length must be positive, got {seq_len}")
    fh, fn = unit_flops(shape, seq_len)
    L, H, N = shape.num_layers, shape.num_heads, shape.ffn_dim
    dense_mha, dense_ffn = L * H * fh, L * N * fn
    total = dense_mha + dense_ffn
    prune = (1.0 - budget) * total
    max_mha = 0.0 if ffn_only else L * max(H - min_heads, 0) * fh
    max_ffn = L * max(N - min_neurons, 0) * fn
    notes: list[str] = []
    if prune > (max_mha + max_ffn) * (1.0 + _COUNT_EPS):
        reachable = (total - max_mha - max_ffn) / total
        what = (
            "KCM prunes FFN neurons only" if ffn_only else f"every layer keeps at least {min_heads} head(s) and {min_neurons} neuron(s)"
        )
        raise BudgetError(
            f"a FLOPs budget of {budget:.4g} cannot be reached: {what}, so the smallest reachable ratio is "
            f"{reachable:.4f}; pass a larger --flops"
        )
    if ffn_only:
        p_mha, p_ffn = 0.0, prune
    else:
        p_mha = prune / (lambda_ + 1.0)
        p_ffn = prune - p_mha
        if p_ffn > max_ffn:
            moved = p_ffn - max_ffn
            p_ffn, p_mha = max_ffn, p_mha + moved
            notes.append(
                f"FFN cannot give its lambda={lambda_:g} share (each layer keeps >= {min_neurons} neuron(s)): "
                f"{moved:.4g} FLOPs ({moved / total:.2%} of dense) moved to MHA"
            )
        if p_mha > max_mha:
            moved = p_mha - max_mha
            p_mha, p_ffn = max_mha, p_ffn + moved
            notes.append(
                f"MHA cannot give its share (each layer keeps >= {min_heads} head(s)): "
                f"{moved:.4g} FLOPs ({moved / total:.2%} of dense) moved to FFN"
            )
    return BudgetSplit(
        budget=float(budget), lambda_=float(lambda_), seq_len=float(seq_len), head_flops=fh, neuron_flops=fn,
        dense_mha=dense_mha, dense_ffn=dense_ffn, prune_mha=min(p_mha, max_mha), prune_ffn=min(p_ffn, max_ffn),
        min_heads=min_heads, min_neurons=min_neurons, notes=notes,
    )


def achieved_split(split: BudgetSplit, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int]) -> dict[str, float]:
    """What a plan with these counts achieves against ``split`` (recorded in ``plan.meta``)."""
    kept_mha = sum(heads_per_layer) * split.head_flops
    kept_ffn = sum(neurons_per_layer) * split.neuron_flops
    pruned_mha = split.dense_mha - kept_mha
    pruned_ffn = split.dense_ffn - kept_ffn
    return {
        "flops_ratio": (kept_mha + kept_ffn) / split.dense_total,
        "mha_ratio": kept_mha / split.dense_mha if split.dense_mha else 1.0,
        "ffn_ratio": kept_ffn / split.dense_ffn if split.dense_ffn else 1.0,
        "pruned_mha_flops": pruned_mha,
        "pruned_ffn_flops": pruned_ffn,
        "target_pruned_mha_flops": split.prune_mha,
        "target_pruned_ffn_flops": split.prune_ffn,
        # None when no MHA FLOPs were pruned (the ratio is undefined; JSON has no infinity)
        "lambda_achieved": (pruned_ffn / pruned_mha) if pruned_mha > 0 else None,
    }
