"""The paper's masks m^A (heads) and m^F (neurons) applied to a dense model with forward pre-hooks.

Multiplying the merged per-head context (the input of the attention output projection) by a 0/1
mask repeated over each head's ``head_dim`` channels, and the FFN activations (the input of the FFN
down projection) by a 0/1 neuron mask, is exactly what physical pruning computes: a dropped head or
neuron contributes nothing, and the output biases stay. Used to check surgery and to evaluate a plan
without changing the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .errors import PlanError
from .plan import PruningPlan


class MaskHandle:
    """The hooks installed by :func:`apply_masks`; ``remove()`` (or leaving the ``with`` block) restores
    the model. ``head_masks`` / ``neuron_masks`` are the per-layer 0/1 tensors in use."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self.head_masks: list[torch.Tensor] = []
        self.neuron_masks: list[torch.Tensor] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> "MaskHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _multiply_input(mask: torch.Tensor):
    def hook(module: nn.Module, args: tuple[Any, ...]):
        x = args[0]
        return (x * mask.to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

    return hook


def apply_masks(model: nn.Module, plan: PruningPlan) -> MaskHandle:
    """Mask the heads and neurons ``plan`` drops on a *dense* ``model`` (in place, until removed).

    Returns a :class:`MaskHandle`; use it as a context manager (``with apply_masks(m, plan): ...``) or
    call ``remove()``. Raises :class:`PlanError` if the plan does not fit the model or the model is
    already pruned (plans index the dense heads and neurons).
    """
    adapter = get_adapter(model)
    shape = adapter.shape()
    plan.validate(shape.num_layers, shape.num_heads, shape.ffn_dim)
    if not shape.is_dense:
        raise PlanError("masks apply to a dense model, but this model is already pruned")
    handle = MaskHandle()
    device = next(model.parameters()).device
    for layer, (head_row, neuron_row) in enumerate(zip(plan.head_mask(), plan.neuron_mask())):
        head_mask = torch.tensor(head_row, device=device).repeat_interleave(shape.head_dim)
        neuron_mask = torch.tensor(neuron_row, device=device)
        handle.head_masks.append(head_mask)
        handle.neuron_masks.append(neuron_mask)
        handle._handles.append(adapter.head_context_module(layer).register_forward_pre_hook(_multiply_input(head_mask)))
        handle._handles.append(adapter.ffn_activation_module(layer).register_forward_pre_hook(_multiply_input(neuron_mask)))
    return handle
