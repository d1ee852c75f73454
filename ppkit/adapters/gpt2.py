"""Adapter for GPT-2 (GPT2Model, GPT2LMHeadModel and the task heads built on GPT2Model).

GPT-2 uses ``Conv1D`` layers whose weight is [in, out] (``y = x @ W + b``). The fused ``c_attn``
weight [hidden, 3*width] holds the q, k and v blocks side by side (``split_size`` = width =
heads*head_dim), so head h owns columns h*dh:(h+1)*dh of *each* block; ``c_proj`` rows of the same
channels. Neuron j owns column j of ``mlp.c_fc`` and row j of ``mlp.c_proj``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..modeling_pruned import FAMILY_CLASSES, gpt2_block_sizes, resize_gpt2_block
from .base import ArchitectureAdapter
from .bert import check_keep, fill_resized, head_columns, replace_parameter


class GPT2Adapter(ArchitectureAdapter):
    """Structure of GPT-2: ``h[l].attn`` (fused ``c_attn``, ``c_proj``) and ``h[l].mlp`` (``c_fc``, ``c_proj``)."""

    family = "gpt2"
    supported_classes = tuple(FAMILY_CLASSES["gpt2"].values())

    def _layer_stack(self, base: nn.Module) -> nn.ModuleList:
        return base.h

    def _layer_sizes(self, layer: nn.Module) -> tuple[int, int]:
        return gpt2_block_sizes(layer, self.head_dim)

    def _dense_ffn_dim(self, config) -> int:
        return config.n_inner if config.n_inner is not None else 4 * config.hidden_size

    def _is_causal(self, config) -> bool:
        return True

    def head_context_module(self, layer: int) -> nn.Module:
        return self.layers[layer].attn.c_proj

    def ffn_activation_module(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp.c_proj

    def attention_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.layers[layer].attn.c_proj
        return proj.weight, proj.bias

    def ffn_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.layers[layer].mlp.c_proj
        return proj.weight, proj.bias

    def set_attention_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        proj = self.layers[layer].attn.c_proj
        replace_parameter(proj, "weight", weight)
        replace_parameter(proj, "bias", bias)

    def set_ffn_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        proj = self.layers[layer].mlp.c_proj
        replace_parameter(proj, "weight", weight)
        replace_parameter(proj, "bias", bias)

    def prune_layer(self, layer: int, heads: Sequence[int], neurons: Sequence[int]) -> None:
        block = self.layers[layer]
        cur_heads, cur_neurons = gpt2_block_sizes(block, self.head_dim)
        heads = check_keep(heads, cur_heads, f"layer {layer} heads")
        neurons = check_keep(neurons, cur_neurons, f"layer {layer} neurons")
        kept: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if len(heads) != cur_heads:
                attn = block.attn
                cols = head_columns(heads, self.head_dim, attn.c_proj.weight.device)
                if heads:
                    width = cur_heads * self.head_dim  # == attn.split_size
                    qkv = torch.cat([cols, cols + width, cols + 2 * width])
                    kept["attn.c_attn.weight"] = attn.c_attn.weight[:, qkv]
                    kept["attn.c_attn.bias"] = attn.c_attn.bias[qkv]
                kept["attn.c_proj.weight"] = attn.c_proj.weight[cols]
                kept["attn.c_proj.bias"] = attn.c_proj.bias
            if len(neurons) != cur_neurons:
                mlp = block.mlp
                idx = torch.tensor(neurons, dtype=torch.long, device=mlp.c_fc.weight.device)
                kept["mlp.c_fc.weight"] = mlp.c_fc.weight[:, idx]
                kept["mlp.c_fc.bias"] = mlp.c_fc.bias[idx]
                kept["mlp.c_proj.weight"] = mlp.c_proj.weight[idx]
                kept["mlp.c_proj.bias"] = mlp.c_proj.bias
            fill_resized(block, kept, lambda: resize_gpt2_block(block, self.model.config, len(heads), len(neurons)))
