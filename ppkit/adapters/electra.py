"""Adapter for the ELECTRA discriminator: BERT's layer layout under other class names.

A small ELECTRA projects its embeddings (``embedding_size``) up to ``hidden_size`` before the first
layer; the layers themselves are BERT's, so BERT's adapter applies unchanged.
"""

from __future__ import annotations

from ..modeling_pruned import FAMILY_CLASSES
from .bert import BertAdapter


class ElectraAdapter(BertAdapter):
    """ELECTRA encoders (``electra.encoder.layer``)."""

    family = "electra"
    supported_classes = tuple(FAMILY_CLASSES["electra"].values())
