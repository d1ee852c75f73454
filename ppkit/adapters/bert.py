"""Adapter for the BERT family (BertModel and the task heads built on it).

The encoder is reached through ``model.base_model`` (``bert`` attribute of the task models). Head h
of layer l owns rows h*dh:(h+1)*dh of ``attention.self.{query,key,value}`` and the same input columns
of ``attention.output.dense``; neuron j owns row j of ``intermediate.dense`` and input column j of
``output.dense``. The output biases are never pruned.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import PlanError
from ..modeling_pruned import bert_layer_sizes, resize_bert_layer
from .base import ArchitectureAdapter

SUPPORTED_BERT_CLASSES = (
    "BertModel",
    "BertForSequenceClassification",
    "BertForQuestionAnswering",
    "BertForMaskedLM",
    "BertForTokenClassification",
)


def check_keep(indices: Sequence[int], size: int, what: str) -> list[int]:
    """Validate kept indices (sorted, unique, in range(size)) and return them as a list."""
    out = [int(i) for i in indices]
    for prev, cur in zip([-1] + out, out):
        if cur <= prev:
            raise PlanError(f"{what}: indices must be sorted and unique (got {cur} after {prev})")
    if out and (out[0] < 0 or out[-1] >= size):
        raise PlanError(f"{what}: indices must be in 0..{size - 1}, got {out[0]}..{out[-1]}")
    return out


def head_columns(heads: Sequence[int], head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices of the channels of ``heads`` in a merged [heads*head_dim] tensor."""
    idx = [h * head_dim + c for h in heads for c in range(head_dim)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def replace_parameter(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Copy ``value`` into an existing parameter of the same shape (keeps requires_grad)."""
    param = getattr(module, name)
    if tuple(param.shape) != tuple(value.shape):
        raise PlanError(f"expected a tensor of shape {tuple(param.shape)} for {name}, got {tuple(value.shape)}")
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


class BertAdapter(ArchitectureAdapter):
    """Structure of BERT encoders: ``encoder.layer[l].attention`` (MHA) and ``intermediate``/``output`` (FFN)."""

    family = "bert"
    supported_classes = SUPPORTED_BERT_CLASSES

    def _layer_stack(self, base: nn.Module) -> nn.ModuleList:
        return base.encoder.layer

    def _layer_sizes(self, layer: nn.Module) -> tuple[int, int]:
        return bert_layer_sizes(layer, self.head_dim)

    def _dense_ffn_dim(self, config) -> int:
        return config.intermediate_size

    def _is_causal(self, config) -> bool:
        return bool(config.is_decoder)

    def head_context_module(self, layer: int) -> nn.Module:
        return self.layers[layer].attention.output.dense

    def ffn_activation_module(self, layer: int) -> nn.Module:
        return self.layers[layer].output.dense

    def attention_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.layers[layer].attention.output.dense
        return dense.weight.t(), dense.bias

    def ffn_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self.layers[layer].output.dense
        return dense.weight.t(), dense.bias

    def set_attention_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        dense = self.layers[layer].attention.output.dense
        replace_parameter(dense, "weight", weight.t())
        replace_parameter(dense, "bias", bias)

    def set_ffn_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        dense = self.layers[layer].output.dense
        replace_parameter(dense, "weight", weight.t())
        replace_parameter(dense, "bias", bias)

    def prune_layer(self, layer: int, heads: Sequence[int], neurons: Sequence[int]) -> None:
        module = self.layers[layer]
        cur_heads, cur_neurons = bert_layer_sizes(module, self.head_dim)
        heads = check_keep(heads, cur_heads, f"layer {layer} heads")
        neurons = check_keep(neurons, cur_neurons, f"layer {layer} neurons")
        kept: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if len(heads) != cur_heads:
                cols = head_columns(heads, self.head_dim, module.attention.output.dense.weight.device)
                for name in ("query", "key", "value") if heads else ():
                    proj = getattr(module.attention.self, name)
                    kept[f"attention.self.{name}.weight"] = proj.weight[cols]
                    kept[f"attention.self.{name}.bias"] = proj.bias[cols]
                kept["attention.output.dense.weight"] = module.attention.output.dense.weight[:, cols]
                kept["attention.output.dense.bias"] = module.attention.output.dense.bias
            if len(neurons) != cur_neurons:
                idx = torch.tensor(neurons, dtype=torch.long, device=module.intermediate.dense.weight.device)
                kept["intermediate.dense.weight"] = module.intermediate.dense.weight[idx]
                kept["intermediate.dense.bias"] = module.intermediate.dense.bias[idx]
                kept["output.dense.weight"] = module.output.dense.weight[:, idx]
                kept["output.dense.bias"] = module.output.dense.bias
            fill_resized(module, kept, lambda: resize_bert_layer(module, self.model.config, len(heads), len(neurons)))


def fill_resized(module: nn.Module, kept: dict[str, torch.Tensor], resize) -> None:
    """Run ``resize()`` (which rebuilds sublayers of ``module``), then copy the ``kept`` tensors
    (keyed by parameter path inside ``module``) into the new parameters. A frozen layer stays frozen."""
    kept = {name: t.detach().clone() for name, t in kept.items()}
    frozen = not any(p.requires_grad for p in module.parameters())
    resize()
    for name, value in kept.items():
        owner, _, attr = name.rpartition(".")
        replace_parameter(module.get_submodule(owner), attr, value)
    if frozen:
        for p in module.parameters():
            p.requires_grad_(False)
