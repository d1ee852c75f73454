"""Adapters for RoBERTa and XLM-RoBERTa: BERT's layer layout under other class names.

Their position ids start after the padding index; that lives in the embeddings, which pruning does
not touch, so everything BERT's adapter does applies unchanged.
"""

from __future__ import annotations

from ..modeling_pruned import FAMILY_CLASSES
from .bert import BertAdapter


class RobertaAdapter(BertAdapter):
    """RoBERTa encoders (``roberta.encoder.layer``)."""

    family = "roberta"
    supported_classes = tuple(FAMILY_CLASSES["roberta"].values())


class XLMRobertaAdapter(BertAdapter):
    """XLM-RoBERTa encoders (``roberta.encoder.layer``)."""

    family = "xlm-roberta"
    supported_classes = tuple(FAMILY_CLASSES["xlm-roberta"].values())
