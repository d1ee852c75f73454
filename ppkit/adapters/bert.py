"""Adapter for the BERT family (BertModel and the task heads built on it), and the base of every
family with BERT's layer layout (RoBERTa, XLM-R, ELECTRA declare only their names).

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
from ..modeling_pruned import FAMILY_CLASSES, resize_bert_layer
from .base import ArchitectureAdapter


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
    """Structure of BERT encoders: ``encoder.layer[l].attention`` (MHA) and ``intermediate``/``output`` (FFN).

    Every name below is a declaration: a family whose layers have separate query / key / value /
    output ``nn.Linear`` projections and a two-``Linear`` FFN is this class with other names
    (see :mod:`ppkit.adapters.distilbert`).
    """

    family = "bert"
    supported_classes = tuple(FAMILY_CLASSES["bert"].values())
    #: the layer list, from the base model
    layers_path = "encoder.layer"
    #: query, key and value projections, from a layer
    qkv_paths = ("attention.self.query", "attention.self.key", "attention.self.value")
    #: attention output projection (its input is the merged per-head context), from a layer
    attention_output_path = "attention.output.dense"
    #: FFN up and down projections, from a layer
    ffn_input_path = "intermediate.dense"
    ffn_output_path = "output.dense"
    #: config attribute with the dense FFN width
    ffn_dim_key = "intermediate_size"
    #: rebuilds a layer's projections for new sizes (``modeling_pruned``)
    resize = staticmethod(resize_bert_layer)

    def _layer_stack(self, base: nn.Module) -> nn.ModuleList:
        return base.get_submodule(self.layers_path)

    def _layer_sizes(self, layer: nn.Module) -> tuple[int, int]:
        heads = layer.get_submodule(self.attention_output_path).in_features // self.head_dim
        return heads, layer.get_submodule(self.ffn_input_path).out_features

    def _dense_ffn_dim(self, config) -> int:
        return getattr(config, self.ffn_dim_key)

    def _is_causal(self, config) -> bool:
        return bool(getattr(config, "is_decoder", False))

    def _module(self, layer: int, path: str) -> nn.Module:
        return self.layers[layer].get_submodule(path)

    def head_context_module(self, layer: int) -> nn.Module:
        return self._module(layer, self.attention_output_path)

    def ffn_activation_module(self, layer: int) -> nn.Module:
        return self._module(layer, self.ffn_output_path)

    def attention_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self._module(layer, self.attention_output_path)
        return dense.weight.t(), dense.bias

    def ffn_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        dense = self._module(layer, self.ffn_output_path)
        return dense.weight.t(), dense.bias

    def set_attention_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        dense = self._module(layer, self.attention_output_path)
        replace_parameter(dense, "weight", weight.t())
        replace_parameter(dense, "bias", bias)

    def set_ffn_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        dense = self._module(layer, self.ffn_output_path)
        replace_parameter(dense, "weight", weight.t())
        replace_parameter(dense, "bias", bias)

    def prune_layer(self, layer: int, heads: Sequence[int], neurons: Sequence[int]) -> None:
        module = self.layers[layer]
        cur_heads, cur_neurons = self._layer_sizes(module)
        heads = check_keep(heads, cur_heads, f"layer {layer} heads")
        neurons = check_keep(neurons, cur_neurons, f"layer {layer} neurons")
        kept: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if len(heads) != cur_heads:
                out = module.get_submodule(self.attention_output_path)
                cols = head_columns(heads, self.head_dim, out.weight.device)
                for path in self.qkv_paths if heads else ():
                    proj = module.get_submodule(path)
                    kept[f"{path}.weight"] = proj.weight[cols]
                    kept[f"{path}.bias"] = proj.bias[cols]
                kept[f"{self.attention_output_path}.weight"] = out.weight[:, cols]
                kept[f"{self.attention_output_path}.bias"] = out.bias
            if len(neurons) != cur_neurons:
                up, down = module.get_submodule(self.ffn_input_path), module.get_submodule(self.ffn_output_path)
                idx = torch.tensor(neurons, dtype=torch.long, device=up.weight.device)
                kept[f"{self.ffn_input_path}.weight"] = up.weight[idx]
                kept[f"{self.ffn_input_path}.bias"] = up.bias[idx]
                kept[f"{self.ffn_output_path}.weight"] = down.weight[:, idx]
                kept[f"{self.ffn_output_path}.bias"] = down.bias
            fill_resized(module, kept, lambda: self.resize(module, self.model.config, len(heads), len(neurons)))


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
