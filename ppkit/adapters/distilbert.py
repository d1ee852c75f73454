"""Adapter for DistilBERT: BERT's adapter with DistilBERT's module names.

``transformer.layer[l]`` holds ``attention.{q,k,v,out}_lin`` (the output projection lives inside the
attention module) and ``ffn.lin1`` / ``ffn.lin2``; the dense FFN width is ``config.hidden_dim``.
"""

from __future__ import annotations

from ..modeling_pruned import FAMILY_CLASSES, resize_distilbert_block
from .bert import BertAdapter


class DistilBertAdapter(BertAdapter):
    """DistilBERT encoders (``distilbert.transformer.layer``)."""

    family = "distilbert"
    supported_classes = tuple(FAMILY_CLASSES["distilbert"].values())
    layers_path = "transformer.layer"
    qkv_paths = ("attention.q_lin", "attention.k_lin", "attention.v_lin")
    attention_output_path = "attention.out_lin"
    ffn_input_path = "ffn.lin1"
    ffn_output_path = "ffn.lin2"
    ffn_dim_key = "hidden_dim"
    resize = staticmethod(resize_distilbert_block)
