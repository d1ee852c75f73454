"""FLOPs accounting of the transformer layers, as in the paper (FLOPs = 2 x multiply-accumulates).

Per sequence of length s, hidden size d, head size dh, one attention head costs

    f_h = 2 * (3*s*d*dh        Q, K, V projections (its dh output columns of each)
               + s*s*dh        scores Q K^T
               + s*s*dh        weighted sum of V
               + s*dh*d)       its dh input rows of the output projection
        = 2 * (4*s*d*dh + 2*s^2*dh)

and one FFN neuron costs f_n = 2 * (2*s*d) (one row of the up projection, one column of the down
projection). Counted are exactly the matrix products of the transformer layers: the four attention
projections, the two attention matmuls and the two FFN projections. Not counted (as in the paper):
embeddings, LayerNorm, biases, softmax/scaling/masking, activations, residual additions, the pooler
and any task head / LM head. With eager attention, ``torch.utils.flop_counter.FlopCounterMode``
counts the same ops (its mm/addmm/bmm formulas ignore bias additions) for the layer modules, so the
counts agree exactly for one sequence of length s (``tests/test_flops.py``). Causal masking does not
reduce the count: eager attention computes the full s x s score matrix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from torch import nn

from .adapters.base import ModelShape
from .errors import InputError, PlanError
from .plan import PruningPlan


def _check_seq_len(seq_len: float) -> float:
    s = float(seq_len)
    if not s > 0:
        raise InputError(f"sequence length must be positive, got {seq_len}")
    return s


def head_flops(hidden_size: int, head_dim: int, seq_len: float, kv_dim: int | None = None) -> float:
    """FLOPs of one attention head for one sequence: 2 * (3*s*d*dh + s^2*dh + s^2*dh + s*dh*d).

    For a grouped-query unit (``head_dim`` = query channels of the group, ``kv_dim`` = its one key /
    value head) the K and V projections cost ``s*d*kv_dim`` each instead."""
    s = _check_seq_len(seq_len)
    d, dh = float(hidden_size), float(head_dim)
    kv = dh if kv_dim is None else float(kv_dim)
    return 2.0 * (s * d * dh + 2 * s * d * kv + s * s * dh + s * s * dh + s * dh * d)


def neuron_flops(hidden_size: int, seq_len: float, projections: int = 2) -> float:
    """FLOPs of one FFN neuron for one sequence: 2 * (2*s*d); a gated FFN (3 projections) 2 * (3*s*d)."""
    s = _check_seq_len(seq_len)
    return 2.0 * (projections * s * float(hidden_size))


def unit_flops(shape: ModelShape, seq_len: float) -> tuple[float, float]:
    """FLOPs of one attention unit and one FFN neuron of a model of ``shape``."""
    return (head_flops(shape.hidden_size, shape.head_dim, seq_len, shape.kv_dim),
            neuron_flops(shape.hidden_size, seq_len, shape.ffn_projections))


@dataclass
class FlopsReport:
    """FLOPs of the MHA and FFN sublayers (pruned and dense) for one sequence of ``seq_len`` tokens.

    ``ratio`` = total / dense_total is the kept fraction (the paper's FLOPs constraint); ``per_layer``
    lists (mha, ffn) FLOPs of each layer.
    """

    mha: float
    ffn: float
    total: float
    dense_mha: float
    dense_ffn: float
    dense_total: float
    ratio: float
    mha_ratio: float
    ffn_ratio: float
    seq_len: float
    per_layer: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_layer"] = [list(x) for x in self.per_layer]
        return data


def count_flops(
    shape: ModelShape, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int], seq_len: float
) -> FlopsReport:
    """FLOPs of a model of ``shape`` keeping ``heads_per_layer[l]`` heads and ``neurons_per_layer[l]`` neurons,
    compared with the dense model (``shape.num_heads`` / ``shape.ffn_dim`` per layer)."""
    if len(heads_per_layer) != shape.num_layers or len(neurons_per_layer) != shape.num_layers:
        raise PlanError(
            f"expected {shape.num_layers} layers of head/neuron counts, got {len(heads_per_layer)}/{len(neurons_per_layer)}"
        )
    fh, fn = unit_flops(shape, seq_len)
    per_layer = [(h * fh, n * fn) for h, n in zip(heads_per_layer, neurons_per_layer)]
    mha = sum(a for a, _ in per_layer)
    ffn = sum(f for _, f in per_layer)
    dense_mha = shape.num_layers * shape.num_heads * fh
    dense_ffn = shape.num_layers * shape.ffn_dim * fn
    total, dense_total = mha + ffn, dense_mha + dense_ffn
    return FlopsReport(
        mha=mha,
        ffn=ffn,
        total=total,
        dense_mha=dense_mha,
        dense_ffn=dense_ffn,
        dense_total=dense_total,
        ratio=total / dense_total if dense_total else 1.0,
        mha_ratio=mha / dense_mha if dense_mha else 1.0,
        ffn_ratio=ffn / dense_ffn if dense_ffn else 1.0,
        seq_len=float(seq_len),
        per_layer=per_layer,
    )


def plan_flops(plan: PruningPlan, shape: ModelShape, seq_len: float) -> FlopsReport:
    """FLOPs of the model ``plan`` would produce from the dense model of ``shape``."""
    plan.validate(shape.num_layers, shape.num_heads, shape.ffn_dim)
    return count_flops(shape, plan.heads_per_layer, plan.neurons_per_layer, seq_len)


def model_flops(model: nn.Module, seq_len: float) -> FlopsReport:
    """FLOPs of a (possibly pruned) model as it is now, compared with its dense shape."""
    from .adapters import get_adapter

    shape = get_adapter(model).shape()
    return count_flops(shape, shape.heads_per_layer, shape.neurons_per_layer, seq_len)


def count_params(shape: ModelShape, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int]) -> int:
    """Parameters of the prunable projections (attention Q/K/V/output and FFN weights and biases, output
    biases included) for the given per-layer counts. The difference between two calls is exactly the
    change of ``sum(p.numel() for p in model.parameters())`` caused by pruning."""
    if shape.unit_params is not None:
        per_head, per_neuron, fixed = shape.unit_params
    else:
        d, dh = shape.hidden_size, shape.head_dim
        per_head = 3 * (d * dh + dh) + dh * d  # q/k/v rows + biases, output-projection rows
        per_neuron = d + 1 + d  # up-projection row + bias, down-projection column
        fixed = 2 * d  # the two output biases, never pruned
    return sum(h * per_head + n * per_neuron + fixed for h, n in zip(heads_per_layer, neurons_per_layer))
