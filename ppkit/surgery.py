"""Physical pruning: make a dense model smaller according to a :class:`~ppkit.plan.PruningPlan`."""

from __future__ import annotations

from torch import nn

from .adapters import get_adapter
from .errors import PlanError
from .plan import PruningPlan


def prune_model(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Keep only the plan's heads and neurons in every layer of a dense ``model`` (in place; returns it).

    The plan is validated against the model's dense shape first (:class:`PlanError` on mismatch or if
    the model is already pruned, since plan indices refer to the dense model). Output biases are kept,
    so a layer left with zero heads or neurons adds only that bias, like the masked model. The new
    per-layer sizes are recorded as ``config.ppkit_heads_per_layer`` / ``config.ppkit_neurons_per_layer``
    (and ``config.ppkit_family``), which is what :func:`ppkit.saving.save_pruned` writes.
    """
    adapter = get_adapter(model)
    shape = adapter.shape()
    plan.validate(shape.num_layers, shape.num_heads, shape.ffn_dim)
    if not shape.is_dense:
        raise PlanError(
            "this model is already pruned; a plan indexes the heads and neurons of the dense model, "
            "so apply it to the original (dense) model"
        )
    for layer, keep in enumerate(plan.layers):
        adapter.prune_layer(layer, keep.heads, keep.neurons)
    record_shape(model)
    return model


def record_shape(model: nn.Module) -> None:
    """Write the model's current per-layer head/neuron counts and family into its config."""
    adapter = get_adapter(model)
    shape = adapter.shape()
    model.config.ppkit_heads_per_layer = list(shape.heads_per_layer)
    model.config.ppkit_neurons_per_layer = list(shape.neurons_per_layer)
    model.config.ppkit_family = adapter.family
