"""Adapter for Llama-style decoders (Llama, Qwen2, Mistral): grouped-query attention and a gated FFN.

``model.layers[l].self_attn`` has ``q_proj`` (H query heads), ``k_proj`` / ``v_proj`` (KV key/value
heads, KV divides H) and ``o_proj``; query heads ``j*g .. (j+1)*g - 1`` (``g = H / KV``) share key/value
head j. The unit of attention pruning is such a **group**: key/value head j with its g query heads, so a
plan's "heads" are the KV groups, and a group's channels in the merged context (the input of
``o_proj``) are ``j*g*dh .. (j+1)*g*dh`` — contiguous, so masks, statistics and Dual-CP's head
similarity (which then compares whole groups) work unchanged. Neuron i owns row i of ``gate_proj``
and ``up_proj`` and column i of ``down_proj``.

Llama and Mistral have no biases on these projections (Qwen2 has them on q/k/v), so output-side
reconstruction (``--compensate``), which refits the output bias, is not offered for these families.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..modeling_pruned import FAMILY_CLASSES, grouped_head_dim, llama_layer_sizes, resize_llama_layer
from .base import ArchitectureAdapter
from .bert import check_keep, fill_resized, head_columns, replace_parameter


class LlamaAdapter(ArchitectureAdapter):
    """Structure of Llama decoders: ``layers[l].self_attn`` (GQA) and ``layers[l].mlp`` (gated FFN)."""

    family = "llama"
    supported_classes = tuple(FAMILY_CLASSES["llama"].values())
    can_compensate = False

    def _layer_stack(self, base: nn.Module) -> nn.ModuleList:
        return base.layers

    def _num_units(self, config) -> int:
        return config.num_key_value_heads

    def _unit_width(self, config) -> int:
        return grouped_head_dim(config) * (config.num_attention_heads // config.num_key_value_heads)

    def _biases(self, config) -> tuple[bool, bool, bool]:
        """Whether the q/k/v, the o and the FFN projections have biases (declared per family: a layer
        without heads has no q/k/v modules to look at)."""
        return bool(config.attention_bias), bool(config.attention_bias), bool(getattr(config, "mlp_bias", False))

    def _unit_costs(self, config) -> dict:
        d, width, kv = config.hidden_size, self.head_dim, grouped_head_dim(config)
        qkv_bias, o_bias, mlp_bias = self._biases(config)
        per_group = d * width + 2 * d * kv + width * d + qkv_bias * (width + 2 * kv)
        per_neuron = 3 * d + 2 * mlp_bias
        fixed = d * (o_bias + mlp_bias)
        return {"kv_dim": kv, "ffn_projections": 3, "unit_params": (per_group, per_neuron, fixed)}

    def _layer_sizes(self, layer: nn.Module) -> tuple[int, int]:
        return llama_layer_sizes(layer, self.model.config)

    def _dense_ffn_dim(self, config) -> int:
        return config.intermediate_size

    def _is_causal(self, config) -> bool:
        return True

    def head_context_module(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn.o_proj

    def ffn_activation_module(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp.down_proj

    def compensation_refusal(self) -> str:
        """Why ``--compensate`` is not offered for this family (one line)."""
        return (f"{self.family} projections have no output bias, which reconstruction refits; "
                "prune this family without --compensate")

    def _no_bias(self) -> InputError:
        return InputError(self.compensation_refusal())

    def attention_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.layers[layer].self_attn.o_proj
        if proj.bias is None:
            raise self._no_bias()
        return proj.weight.t(), proj.bias

    def ffn_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.layers[layer].mlp.down_proj
        bias = proj.bias if proj.bias is not None else torch.zeros_like(proj.weight[:, 0])
        return proj.weight.t(), bias  # KCM reads the weights only; compensation is refused in set_ffn_output

    def set_attention_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        proj = self.layers[layer].self_attn.o_proj
        if proj.bias is None:
            raise self._no_bias()
        replace_parameter(proj, "weight", weight.t())
        replace_parameter(proj, "bias", bias)

    def set_ffn_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        proj = self.layers[layer].mlp.down_proj
        if proj.bias is None:
            raise self._no_bias()
        replace_parameter(proj, "weight", weight.t())
        replace_parameter(proj, "bias", bias)

    def prune_layer(self, layer: int, heads: Sequence[int], neurons: Sequence[int]) -> None:
        module = self.layers[layer]
        config = self.model.config
        cur_groups, cur_neurons = llama_layer_sizes(module, config)
        groups = check_keep(heads, cur_groups, f"layer {layer} key/value groups")
        neurons = check_keep(neurons, cur_neurons, f"layer {layer} neurons")
        kept: dict[str, torch.Tensor] = {}

        def keep(path: str, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
            proj = module.get_submodule(path)
            kept[f"{path}.weight"] = proj.weight[rows] if rows is not None else proj.weight[:, cols]
            if proj.bias is not None:
                kept[f"{path}.bias"] = proj.bias[rows] if rows is not None else proj.bias

        with torch.no_grad():
            if len(groups) != cur_groups:
                device = module.self_attn.o_proj.weight.device
                query = head_columns(groups, self.head_dim, device)
                kv = head_columns(groups, grouped_head_dim(config), device)
                if groups:
                    keep("self_attn.q_proj", rows=query)
                    keep("self_attn.k_proj", rows=kv)
                    keep("self_attn.v_proj", rows=kv)
                keep("self_attn.o_proj", cols=query)
            if len(neurons) != cur_neurons:
                idx = torch.tensor(neurons, dtype=torch.long, device=module.mlp.down_proj.weight.device)
                keep("mlp.gate_proj", rows=idx)
                keep("mlp.up_proj", rows=idx)
                keep("mlp.down_proj", cols=idx)
            fill_resized(module, kept, lambda: resize_llama_layer(module, config, len(groups), len(neurons)))


class Qwen2Adapter(LlamaAdapter):
    """Qwen2 decoders: Llama's layout, with biases on the q/k/v projections."""

    family = "qwen2"
    supported_classes = tuple(FAMILY_CLASSES["qwen2"].values())

    def _biases(self, config) -> tuple[bool, bool, bool]:
        return True, False, False


class MistralAdapter(LlamaAdapter):
    """Mistral decoders: Llama's layout (sliding-window attention is the attention function's business)."""

    family = "mistral"
    supported_classes = tuple(FAMILY_CLASSES["mistral"].values())

    def _biases(self, config) -> tuple[bool, bool, bool]:
        return False, False, False
