"""The architecture-adapter interface: the only place that knows a model family's module names.

Everything else in ppkit asks an adapter: how many layers, heads, neurons; which module's *input*
carries the merged per-head context (the input of the attention output projection) and which one
carries the FFN activations (the input of the FFN down projection); how to slice a layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a (possibly pruned) transformer stack.

    ``num_heads`` / ``ffn_dim`` are the dense per-layer sizes a plan indexes into;
    ``heads_per_layer`` / ``neurons_per_layer`` are what the model has now. A "head" is the unit of
    attention pruning: one head, or for grouped-query attention one key/value head with the query heads
    that share it. ``head_dim`` is its width in the merged context (the output projection's input);
    ``kv_dim`` its width in the key and value projections (``head_dim`` unless grouped);
    ``ffn_projections`` counts the FFN matrices a neuron owns a row or column of (3 for a gated FFN).
    ``unit_params`` is (parameters per head, per neuron, per layer that pruning never removes), when
    the adapter counts them from the modules (biases differ by family).
    """

    family: str
    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    ffn_dim: int
    heads_per_layer: tuple[int, ...]
    neurons_per_layer: tuple[int, ...]
    max_positions: int
    is_causal: bool
    kv_dim: int | None = None
    ffn_projections: int = 2
    unit_params: tuple[int, int, int] | None = None

    @property
    def is_dense(self) -> bool:
        return all(h == self.num_heads for h in self.heads_per_layer) and all(
            n == self.ffn_dim for n in self.neurons_per_layer
        )


class ArchitectureAdapter(ABC):
    """Answers structural questions about one model instance of a supported family."""

    #: short family name recorded in plans and saved configs ("bert", "gpt2")
    family: str = ""
    #: human-readable list of supported classes, for error messages
    supported_classes: tuple[str, ...] = ()
    #: whether the output projections have the biases ``--compensate`` refits
    can_compensate: bool = True

    def compensation_refusal(self) -> str:
        """Why ``--compensate`` is not offered (families with ``can_compensate = False`` say why)."""
        return f"{self.family} models cannot be compensated"

    def __init__(self, model: nn.Module) -> None:
        from ..errors import UnsupportedModelError

        self.model = model
        if getattr(model.config, "add_cross_attention", False):
            raise UnsupportedModelError(f"{self.family} models with cross-attention layers are not supported by ppkit")
        self.base = model.base_model
        self.layers = self._layer_stack(self.base)
        self.head_dim = self._unit_width(model.config)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when ``model`` is an instance of one of ``supported_classes``."""
        import transformers

        return isinstance(model, tuple(getattr(transformers, name) for name in cls.supported_classes))

    def shape(self) -> ModelShape:
        """Current sizes of the model's transformer stack."""
        config = self.model.config
        sizes = [self._layer_sizes(layer) for layer in self.layers]
        return ModelShape(
            family=self.family,
            num_layers=len(self.layers),
            num_heads=self._num_units(config),
            head_dim=self.head_dim,
            hidden_size=config.hidden_size,
            ffn_dim=self._dense_ffn_dim(config),
            heads_per_layer=tuple(h for h, _ in sizes),
            neurons_per_layer=tuple(n for _, n in sizes),
            max_positions=config.max_position_embeddings,
            is_causal=self._is_causal(config),
            **self._unit_costs(config),
        )

    def _num_units(self, config) -> int:
        """Prunable attention units per dense layer (heads; key/value groups for grouped-query attention)."""
        return config.num_attention_heads

    def _unit_width(self, config) -> int:
        """Channels of one unit in the merged attention context."""
        return config.hidden_size // config.num_attention_heads

    def _unit_costs(self, config) -> dict:
        """Extra :class:`ModelShape` fields of families whose units cost other than BERT's (none here)."""
        return {}

    @abstractmethod
    def _layer_stack(self, base: nn.Module) -> nn.ModuleList:
        """The list of transformer layers of the base model."""

    @abstractmethod
    def _layer_sizes(self, layer: nn.Module) -> tuple[int, int]:
        """(heads, neurons) one layer has now."""

    @abstractmethod
    def _dense_ffn_dim(self, config) -> int:
        """FFN width of the dense model, from its config."""

    @abstractmethod
    def _is_causal(self, config) -> bool:
        """Whether attention is causal (decoder)."""

    @abstractmethod
    def head_context_module(self, layer: int) -> nn.Module:
        """Module whose forward *input* is the merged per-head context [batch, seq, heads*head_dim]
        (the input of the attention output projection; head h is columns h*head_dim:(h+1)*head_dim)."""

    @abstractmethod
    def ffn_activation_module(self, layer: int) -> nn.Module:
        """Module whose forward *input* is the FFN activation after the nonlinearity [batch, seq, neurons]
        (the input of the FFN down projection)."""

    @abstractmethod
    def attention_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention output projection as (W [heads*head_dim, hidden], b [hidden]) so that out = x @ W + b.
        Returned tensors are views of the parameters when possible (GPT-2 Conv1D) or transposes (BERT Linear)."""

    @abstractmethod
    def ffn_output_weight(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The FFN down projection as (W [neurons, hidden], b [hidden]) so that out = a @ W + b."""

    @abstractmethod
    def set_attention_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Overwrite the attention output projection with W [heads*head_dim, hidden] and b [hidden]."""

    @abstractmethod
    def set_ffn_output(self, layer: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Overwrite the FFN down projection with W [neurons, hidden] and b [hidden]."""

    @abstractmethod
    def prune_layer(self, layer: int, heads: Sequence[int], neurons: Sequence[int]) -> None:
        """Physically keep only ``heads`` and ``neurons`` (indices into the layer's *current* heads/neurons).
        Zero heads or zero neurons must work: the sublayer then adds only its output bias."""

    def dummy_inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
        """Small random inputs for parity checks and export tracing."""
        gen = torch.Generator().manual_seed(seed)
        vocab = int(getattr(self.model.config, "vocab_size", 100))
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        if batch > 1 and seq > 2:
            mask[-1, -(seq // 3):] = 0  # one padded row, so padding paths are exercised
        return {"input_ids": ids, "attention_mask": mask}
