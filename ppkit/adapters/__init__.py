"""Architecture adapters: the only code that knows a model family's module names.

:func:`get_adapter` picks the adapter for a model instance; :data:`ADAPTERS` lists them in the
order they are tried; :data:`FAMILIES` maps the ``config.model_type`` of each family to its adapter.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import ArchitectureAdapter, ModelShape
from .bert import BertAdapter
from .distilbert import DistilBertAdapter
from .electra import ElectraAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter, MistralAdapter, Qwen2Adapter
from .roberta import RobertaAdapter, XLMRobertaAdapter

ADAPTERS: tuple[type[ArchitectureAdapter], ...] = (BertAdapter, RobertaAdapter, XLMRobertaAdapter, ElectraAdapter,
                                                   DistilBertAdapter, GPT2Adapter, LlamaAdapter, Qwen2Adapter, MistralAdapter)
FAMILIES: dict[str, type[ArchitectureAdapter]] = {a.family: a for a in ADAPTERS}

__all__ = ["ADAPTERS", "FAMILIES", "ArchitectureAdapter", "ModelShape", "get_adapter", "supported_classes"]


def supported_classes() -> list[str]:
    """Names of all transformers model classes ppkit can prune."""
    return [name for adapter in ADAPTERS for name in adapter.supported_classes]


def get_adapter(model: nn.Module) -> ArchitectureAdapter:
    """The adapter for ``model``; :class:`UnsupportedModelError` naming the supported classes otherwise."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported by ppkit; supported model classes: {', '.join(supported_classes())}"
    )
