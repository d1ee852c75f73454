"""Module structure of P-pruned models (self-contained: imports only torch and transformers).

This file is the single place that builds pruned module structure. ppkit's surgery calls
:func:`resize_bert_layer` (BERT, RoBERTa, XLM-R, ELECTRA: the same layer layout under other class
names) or :func:`resize_gpt2_block` before copying the kept weights in, and every
saved pruned directory gets a copy of this file as ``modeling_ppkit.py``, referenced from
``config.json`` ``auto_map``, so ``AutoModel*.from_pretrained(dir, trust_remote_code=True)`` rebuilds
the same structure where ppkit is not installed. It must therefore never import ppkit, and must
have no relative imports (transformers' dynamic-module loader would try to copy them).

A pruned layer keeps the transformers module classes; only the projection sizes change
(``num_heads * head_dim`` attention width, ``neurons`` FFN width) and the per-layer sizes are read
from ``config.ppkit_heads_per_layer`` / ``config.ppkit_neurons_per_layer``. ``config`` itself keeps
the dense sizes. Two cases need their own classes: an attention block with zero heads (the
transformers attention reshapes with ``-1`` heads, which is ambiguous for an empty tensor) and a
GPT-2 ``Conv1D`` with zero inputs (its ``view(-1, 0)`` fails the same way). Either sublayer then adds
exactly its output bias, which is what the masked dense model computes.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
import transformers
from torch import nn
from transformers import BertForSequenceClassification
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.distilbert import modeling_distilbert
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.pytorch_utils import Conv1D

__all__ = [
    "EmptySelfAttention",
    "EmptyBertSelfAttention",
    "EmptyGPT2Attention",
    "ZeroInputConv1D",
    "resize_bert_layer",
    "resize_gpt2_block",
    "shrink_to_shape",
    "mean_pool",
    "POOLINGS",
    "FAMILY_CLASSES",
    "BERT_SHAPED",
    "LLAMA_SHAPED",
    "PPKIT_CLASSES",
    "AUTO_MAP",
]


#: model_type -> {ppkit head name: transformers class}; a family is declared here, once
FAMILY_CLASSES: dict[str, dict[str, str]] = {
    "bert": {
        "base": "BertModel",
        "sequence-classification": "BertForSequenceClassification",
        "question-answering": "BertForQuestionAnswering",
        "masked-lm": "BertForMaskedLM",
        "token-classification": "BertForTokenClassification",
    },
    "roberta": {
        "base": "RobertaModel",
        "sequence-classification": "RobertaForSequenceClassification",
        "question-answering": "RobertaForQuestionAnswering",
        "masked-lm": "RobertaForMaskedLM",
        "token-classification": "RobertaForTokenClassification",
    },
    "xlm-roberta": {
        "base": "XLMRobertaModel",
        "sequence-classification": "XLMRobertaForSequenceClassification",
        "question-answering": "XLMRobertaForQuestionAnswering",
        "masked-lm": "XLMRobertaForMaskedLM",
        "token-classification": "XLMRobertaForTokenClassification",
    },
    "electra": {  # the discriminator and its task heads
        "base": "ElectraModel",
        "sequence-classification": "ElectraForSequenceClassification",
        "question-answering": "ElectraForQuestionAnswering",
        "token-classification": "ElectraForTokenClassification",
    },
    "distilbert": {
        "base": "DistilBertModel",
        "sequence-classification": "DistilBertForSequenceClassification",
        "question-answering": "DistilBertForQuestionAnswering",
        "masked-lm": "DistilBertForMaskedLM",
        "token-classification": "DistilBertForTokenClassification",
    },
    **{
        family: {
            "base": f"{prefix}Model",
            "causal-lm": f"{prefix}ForCausalLM",
            "sequence-classification": f"{prefix}ForSequenceClassification",
            "question-answering": f"{prefix}ForQuestionAnswering",
            "token-classification": f"{prefix}ForTokenClassification",
        }
        for family, prefix in (("llama", "Llama"), ("qwen2", "Qwen2"), ("mistral", "Mistral"))
    },
    "gpt2": {
        "base": "GPT2Model",
        "causal-lm": "GPT2LMHeadModel",
        "sequence-classification": "GPT2ForSequenceClassification",
        "question-answering": "GPT2ForQuestionAnswering",
    },
}

#: families whose layers have BERT's layout: ``attention.self.{query,key,value}``, ``attention.output.dense``,
#: ``intermediate.dense``, ``output.dense`` (RoBERTa's position offset lives in its embeddings, untouched)
BERT_SHAPED = ("bert", "roberta", "xlm-roberta", "electra")

#: decoder families with Llama's layer layout: ``self_attn.{q,k,v,o}_proj`` with grouped-query attention
#: (``num_key_value_heads`` key/value heads, each shared by a group of query heads) and a gated FFN
#: ``mlp.{gate,up,down}_proj``; RMSNorm and rotary embeddings are untouched by pruning
LLAMA_SHAPED = ("llama", "qwen2", "mistral")

#: ppkit head name -> transformers auto class (for ``auto_map``)
AUTO_CLASSES: dict[str, str] = {
    "base": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
}


# --------------------------------------------------------------------------- building blocks
class ZeroInputConv1D(Conv1D):
    """A transformers ``Conv1D`` that also works with zero input or output features.

    ``Conv1D.forward`` flattens with ``view(-1, nx)``, which is ambiguous for an empty tensor (and an
    ONNX Reshape reads a 0 in a shape as "copy this dimension"); a batched matmul needs no reshape, so
    it traces with dynamic shapes and returns just the bias when there are no input features.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


def _cache_placeholder(hidden_states: torch.Tensor) -> torch.Tensor:
    # A layer without heads has nothing to cache, but the cache must still advance by the same
    # number of positions as the other layers. An empty [B, 0, T, dh] tensor is not enough:
    # DynamicLayer.get_seq_length() returns 0 when keys.numel() == 0 (and a static cache looks for
    # non-zero entries), so store a one-channel tensor of ones instead.
    batch, seq = hidden_states.shape[0], hidden_states.shape[1]
    return hidden_states.new_ones(batch, 1, seq, 1)


def _either(cache, past_key_values):
    # transformers 5.24 renamed the attention modules' ``past_key_values`` argument to ``cache``;
    # accept both so the pruned modules work on either side of the rename.
    return cache if cache is not None else past_key_values


def _update_cache(past_key_values, layer_idx: int | None, hidden_states: torch.Tensor) -> int:
    """Advance the cache of an attention layer without heads; return the key length after the update."""
    seq = hidden_states.shape[1]  # no int(): keeps the sequence length dynamic when traced for export
    if past_key_values is None:
        return seq
    cache = past_key_values.self_attention_cache if isinstance(past_key_values, EncoderDecoderCache) else past_key_values
    placeholder = _cache_placeholder(hidden_states)
    keys, _ = cache.update(placeholder, placeholder, layer_idx)
    return int(keys.shape[-2])


class EmptySelfAttention(nn.Module):
    """Self-attention with zero heads for BERT-shaped layers: returns an empty context [batch, seq, 0].

    Used through :func:`empty_self_attention`, which mixes it into the family's own self-attention
    class (``BertSelfAttention``, ``RobertaSelfAttention``...) without its projections, so that
    transformers' output recording and weight initialisation treat it like the module it replaces.
    The following ``attention.output.dense`` is ``Linear(0, hidden)``, i.e. it adds only its bias.
    """

    def __init__(self, config, is_causal: bool = False, layer_idx: int | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.num_attention_heads = 0
        self.attention_head_size = int(config.hidden_size / config.num_attention_heads)
        self.all_head_size = 0
        self.scaling = self.attention_head_size**-0.5
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_decoder = config.is_decoder
        self.is_causal = is_causal
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        key_len = _update_cache(_either(cache, past_key_values), self.layer_idx, hidden_states)
        batch, seq = hidden_states.shape[0], hidden_states.shape[1]
        context = hidden_states.new_zeros(batch, seq, 0)
        weights = hidden_states.new_zeros(batch, 0, seq, key_len)
        return context, weights


_EMPTY_ATTENTION_CLASSES: dict[type, type] = {}


def _empty_variant(mixin: type, attention_cls: type) -> type:
    """``Empty<Name>``: ``mixin`` (a zero-head forward) over a family's own attention class, made once."""
    if issubclass(attention_cls, mixin):
        return attention_cls
    cls = _EMPTY_ATTENTION_CLASSES.get(attention_cls)
    if cls is None:
        name = "Empty" + attention_cls.__name__
        cls = type(name, (mixin, attention_cls), {"__module__": __name__, "__qualname__": name})
        _EMPTY_ATTENTION_CLASSES[attention_cls] = cls
    return cls


def empty_self_attention(attention_cls: type) -> type:
    """The zero-head variant of a BERT-shaped self-attention class."""
    return _empty_variant(EmptySelfAttention, attention_cls)


EmptyBertSelfAttention = empty_self_attention(BertSelfAttention)


class EmptyGroupedAttention(nn.Module):
    """Llama-style attention with zero key/value groups: ``o_proj`` of an empty context (its bias, if any).

    Mixed into the family's attention class by :func:`empty_grouped_attention`, like
    :class:`EmptySelfAttention`. The KV cache is still advanced (see ``_cache_placeholder``), so
    ``generate`` keeps the right positions and masks in every layer.
    """

    def __init__(self, config, layer_idx: int, like: nn.Module) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = like.head_dim
        self.num_key_value_groups = like.num_key_value_groups
        self.scaling = like.scaling
        self.attention_dropout = like.attention_dropout
        self.is_causal = True
        weight = like.o_proj.weight
        self.o_proj = _linear(0, config.hidden_size, weight, bias=like.o_proj.bias is not None)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        key_len = _update_cache(_either(cache, past_key_values), self.layer_idx, hidden_states)
        batch, seq = hidden_states.shape[0], hidden_states.shape[1]
        output = self.o_proj(hidden_states.new_zeros(batch, seq, 0))
        return output, hidden_states.new_zeros(batch, 0, seq, key_len)


def empty_grouped_attention(attention_cls: type) -> type:
    """The zero-group variant of a Llama-style attention class."""
    return _empty_variant(EmptyGroupedAttention, attention_cls)


# transformers 5 calls it DistilBertSelfAttention; 4.57's is MultiHeadSelfAttention, called with query/key/value
_DistilBertAttention = getattr(modeling_distilbert, "DistilBertSelfAttention", None) or modeling_distilbert.MultiHeadSelfAttention


class EmptyDistilBertSelfAttention(_DistilBertAttention):
    """DistilBERT attention with zero heads: ``out_lin`` (inside this module in DistilBERT) of an empty
    context, i.e. its bias. Returns (output, weights), which either transformers version's block unpacks."""

    def __init__(self, config) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.n_heads = 0
        self.dim = config.dim
        self.attention_head_size = config.dim // config.n_heads
        self.scaling = self.attention_head_size**-0.5
        self.out_lin = _linear(0, config.dim, torch.empty(0))
        self.dropout = nn.Dropout(p=config.attention_dropout)
        self.is_causal = False

    def forward(self, hidden_states: torch.Tensor | None = None, attention_mask=None, query=None, **kwargs):
        x = hidden_states if hidden_states is not None else query
        batch, seq = x.shape[0], x.shape[1]
        output = self.out_lin(x.new_zeros(batch, seq, 0))
        return output, x.new_zeros(batch, 0, seq, seq)


class EmptyGPT2Attention(GPT2Attention):
    """GPT-2 attention with zero heads: the output is ``c_proj`` of an empty context, i.e. its bias.

    The KV cache is still advanced (see ``_cache_placeholder``) so ``generate`` with a cache keeps
    the right positions and masks in every layer.
    """

    def __init__(self, config, layer_idx: int | None = None) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = 0
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.split_size = 0
        self.scale_attn_weights = config.scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = config.scale_attn_by_inverse_layer_idx
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn
        self.is_cross_attention = False
        self.layer_idx = layer_idx
        self.scaling = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        self.c_proj = ZeroInputConv1D(self.embed_dim, 0)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.is_causal = True

    def forward(
        self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None, cache=None, **kwargs
    ):
        if encoder_hidden_states is not None:
            raise ValueError("pruned GPT-2 models do not support cross-attention")
        key_len = _update_cache(_either(cache, past_key_values), self.layer_idx, hidden_states)
        batch, seq = hidden_states.shape[0], hidden_states.shape[1]
        output = self.resid_dropout(self.c_proj(hidden_states.new_zeros(batch, seq, 0)))
        weights = hidden_states.new_zeros(batch, 0, seq, key_len)
        return output, weights


def _linear(n_in: int, n_out: int, like: torch.Tensor, bias: bool = True) -> nn.Linear:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        return nn.Linear(n_in, n_out, bias=bias, device=like.device, dtype=like.dtype)


def _conv1d(n_out: int, n_in: int, like: torch.Tensor) -> Conv1D:
    cls = ZeroInputConv1D if n_in == 0 or n_out == 0 else Conv1D
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        with torch.device(like.device):
            module = cls(n_out, n_in)
    return module.to(dtype=like.dtype)


# --------------------------------------------------------------------------- resizing one layer
def bert_layer_sizes(layer: nn.Module, head_dim: int) -> tuple[int, int]:
    """(heads, neurons) a BERT-shaped layer (``BertLayer``, ``RobertaLayer``...) has now."""
    return layer.attention.output.dense.in_features // head_dim, layer.intermediate.dense.out_features


def distilbert_block_sizes(block: nn.Module, head_dim: int) -> tuple[int, int]:
    """(heads, neurons) a DistilBERT ``TransformerBlock`` has now."""
    return block.attention.out_lin.in_features // head_dim, block.ffn.lin1.out_features


def gpt2_block_sizes(block: nn.Module, head_dim: int) -> tuple[int, int]:
    """(heads, neurons) a ``GPT2Block`` has now."""
    return block.attn.c_proj.weight.shape[0] // head_dim, block.mlp.c_fc.weight.shape[1]


def resize_bert_layer(layer: nn.Module, config, num_heads: int, num_neurons: int) -> None:
    """Rebuild the projections of one BERT-shaped layer for ``num_heads`` heads and ``num_neurons`` neurons.

    Only sublayers whose size changes are rebuilt; new weights are freshly initialised (the caller
    copies the kept weights in, or ``from_pretrained`` loads them). Dtype and device follow the
    existing weights, so this also works on the meta device used while loading.
    """
    hidden = config.hidden_size
    head_dim = hidden // config.num_attention_heads
    cur_heads, cur_neurons = bert_layer_sizes(layer, head_dim)
    attention = layer.attention
    like = attention.output.dense.weight
    if num_heads != cur_heads:
        old = attention.self
        is_causal, layer_idx = getattr(old, "is_causal", False), getattr(old, "layer_idx", None)
        if num_heads == 0:
            attention.self = empty_self_attention(type(old))(config, is_causal=is_causal, layer_idx=layer_idx)
        else:
            if isinstance(old, EmptySelfAttention):
                raise ValueError("cannot grow an attention block that has no heads")
            width = num_heads * head_dim
            old.query, old.key, old.value = (_linear(hidden, width, like) for _ in range(3))
            old.num_attention_heads = num_heads
            old.all_head_size = width
        attention.output.dense = _linear(num_heads * head_dim, hidden, like)
    if num_neurons != cur_neurons:
        layer.intermediate.dense = _linear(hidden, num_neurons, like)
        layer.output.dense = _linear(num_neurons, hidden, like)


def resize_distilbert_block(block: nn.Module, config, num_heads: int, num_neurons: int) -> None:
    """Rebuild the projections of one DistilBERT ``TransformerBlock`` (``attention.{q,k,v,out}_lin``,
    ``ffn.lin1/lin2``) for ``num_heads`` heads and ``num_neurons`` neurons; as :func:`resize_bert_layer`."""
    hidden = config.dim
    head_dim = hidden // config.n_heads
    cur_heads, cur_neurons = distilbert_block_sizes(block, head_dim)
    like = block.attention.out_lin.weight
    if num_heads != cur_heads:
        if num_heads == 0:
            block.attention = EmptyDistilBertSelfAttention(config).to(device=like.device, dtype=like.dtype)
        else:
            attention = block.attention
            if isinstance(attention, EmptyDistilBertSelfAttention):
                raise ValueError("cannot grow an attention block that has no heads")
            width = num_heads * head_dim
            attention.q_lin, attention.k_lin, attention.v_lin = (_linear(hidden, width, like) for _ in range(3))
            attention.out_lin = _linear(width, hidden, like)
            attention.n_heads, attention.dim = num_heads, width  # transformers 4.x splits heads with dim // n_heads
    if num_neurons != cur_neurons:
        block.ffn.lin1 = _linear(hidden, num_neurons, like)
        block.ffn.lin2 = _linear(num_neurons, hidden, like)


def grouped_head_dim(config) -> int:
    """Width of one query / key / value head of a Llama-style config (``head_dim`` may be set explicitly)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama_layer_sizes(layer: nn.Module, config) -> tuple[int, int]:
    """(key/value groups, neurons) a Llama-style decoder layer has now."""
    group_width = grouped_head_dim(config) * (config.num_attention_heads // config.num_key_value_heads)
    return layer.self_attn.o_proj.in_features // group_width, layer.mlp.gate_proj.out_features


def resize_llama_layer(layer: nn.Module, config, num_groups: int, num_neurons: int) -> None:
    """Rebuild one Llama-style decoder layer for ``num_groups`` key/value groups and ``num_neurons`` neurons.

    A group is one key/value head with the ``num_attention_heads // num_key_value_heads`` query heads
    that share it, so ``q_proj``/``o_proj`` keep ``groups * per_group * head_dim`` channels and
    ``k_proj``/``v_proj`` ``groups * head_dim``; the attention's ``num_key_value_groups`` (query heads
    per key/value head) is unchanged, and its forward reshapes with ``-1`` heads. The gated FFN's
    gate and up projections lose the same rows. Biases follow the existing projections (Qwen2 has
    them on q/k/v only).
    """
    hidden = config.hidden_size
    head_dim = grouped_head_dim(config)
    per_group = config.num_attention_heads // config.num_key_value_heads
    cur_groups, cur_neurons = llama_layer_sizes(layer, config)
    attention = layer.self_attn
    like = attention.o_proj.weight
    if num_groups != cur_groups:
        if num_groups == 0:
            empty = empty_grouped_attention(type(attention))
            layer.self_attn = empty(config, attention.layer_idx, attention)
        else:
            if isinstance(attention, EmptyGroupedAttention):
                raise ValueError("cannot grow an attention block that has no heads")
            q_width, kv_width = num_groups * per_group * head_dim, num_groups * head_dim
            attention.q_proj = _linear(hidden, q_width, like, bias=attention.q_proj.bias is not None)
            attention.k_proj = _linear(hidden, kv_width, like, bias=attention.k_proj.bias is not None)
            attention.v_proj = _linear(hidden, kv_width, like, bias=attention.v_proj.bias is not None)
            attention.o_proj = _linear(q_width, hidden, like, bias=attention.o_proj.bias is not None)
    if num_neurons != cur_neurons:
        mlp = layer.mlp
        mlp.gate_proj = _linear(hidden, num_neurons, like, bias=mlp.gate_proj.bias is not None)
        mlp.up_proj = _linear(hidden, num_neurons, like, bias=mlp.up_proj.bias is not None)
        mlp.down_proj = _linear(num_neurons, hidden, like, bias=mlp.down_proj.bias is not None)


def resize_gpt2_block(block: nn.Module, config, num_heads: int, num_neurons: int) -> None:
    """Rebuild the projections of one ``GPT2Block`` for ``num_heads`` heads and ``num_neurons`` neurons.

    With k heads the fused ``c_attn`` is ``Conv1D(3*k*head_dim, hidden)`` (q, k, v blocks of width
    k*head_dim), ``split_size`` is ``k*head_dim`` and ``num_heads`` is k; ``embed_dim`` stays the
    residual width (it is only the output size of ``c_proj``). ``head_dim`` and the attention scaling
    are unchanged.
    """
    hidden = config.hidden_size
    head_dim = hidden // config.num_attention_heads
    cur_heads, cur_neurons = gpt2_block_sizes(block, head_dim)
    like = block.attn.c_proj.weight
    if num_heads != cur_heads:
        if num_heads == 0:
            block.attn = EmptyGPT2Attention(config, layer_idx=block.attn.layer_idx)
        else:
            attn = block.attn
            if isinstance(attn, EmptyGPT2Attention):
                raise ValueError("cannot grow an attention block that has no heads")
            width = num_heads * head_dim
            attn.c_attn = _conv1d(3 * width, hidden, like)
            attn.c_proj = _conv1d(hidden, width, like)
            attn.num_heads = num_heads
            attn.split_size = width
    if num_neurons != cur_neurons:
        block.mlp.c_fc = _conv1d(num_neurons, hidden, like)
        block.mlp.c_proj = _conv1d(hidden, num_neurons, like)


def _stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    base = getattr(model, "base_model", model)
    family = getattr(model.config, "ppkit_family", None) or model.config.model_type
    if family in BERT_SHAPED:
        return family, base.encoder.layer
    if family == "distilbert":
        return family, base.transformer.layer
    if family in LLAMA_SHAPED:
        return family, base.layers
    if family == "gpt2":
        return family, base.h
    raise TypeError(f"{type(model).__name__} is not a model family ppkit prunes ({family!r})")


def shrink_to_shape(model: nn.Module, heads_per_layer: Sequence[int], neurons_per_layer: Sequence[int]) -> nn.Module:
    """Rebuild every layer of a model to the given per-layer head and neuron counts.

    New weights are randomly initialised; this gives the module structure a checkpoint of a pruned
    model is loaded into. Returns ``model``.
    """
    family, layers = _stack(model)
    if len(heads_per_layer) != len(layers) or len(neurons_per_layer) != len(layers):
        raise ValueError(
            f"model has {len(layers)} layers but ppkit_heads_per_layer/ppkit_neurons_per_layer have "
            f"{len(heads_per_layer)}/{len(neurons_per_layer)} entries"
        )
    resize = {"gpt2": resize_gpt2_block, "distilbert": resize_distilbert_block,
              **{f: resize_llama_layer for f in LLAMA_SHAPED}}.get(family, resize_bert_layer)
    for layer, heads, neurons in zip(layers, heads_per_layer, neurons_per_layer):
        resize(layer, model.config, int(heads), int(neurons))
    return model


def _apply_config_shape(model: nn.Module) -> None:
    heads = getattr(model.config, "ppkit_heads_per_layer", None)
    neurons = getattr(model.config, "ppkit_neurons_per_layer", None)
    if heads is not None and neurons is not None:
        shrink_to_shape(model, heads, neurons)


# --------------------------------------------------------------------------- model classes
#: what ``config.ppkit_pooling`` may say: BERT's [CLS] pooler, or the masked mean of the token states
POOLINGS = ("cls", "mean")


class PrunedShape:
    """Mixin of every pruned model class: after the usual ``__init__``, rebuild the layers to the sizes in
    ``config.ppkit_heads_per_layer`` / ``ppkit_neurons_per_layer`` (``from_pretrained`` then loads into them)."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        _apply_config_shape(self)


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the token states over non-padding positions (sentence-transformers' mean pooling)."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def sequence_classification_loss(config, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss ``BertForSequenceClassification`` computes (problem type from the labels, as there)."""
    num_labels = logits.shape[-1]
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(logits.view(-1), labels.to(logits.dtype).view(-1))
        return nn.functional.mse_loss(logits, labels.to(logits.dtype))
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class PpkitBertForSequenceClassification(PrunedShape, BertForSequenceClassification):
    """Pruned ``BertForSequenceClassification`` (sizes from the config).

    ``config.ppkit_pooling = "mean"`` classifies the mean of the last hidden states over the attention
    mask (how sentence-transformers checkpoints were trained) instead of BERT's [CLS] pooler; the
    default ``"cls"`` is the transformers head unchanged.
    """

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        if getattr(self.config, "ppkit_pooling", "cls") != "mean":
            return super().forward(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                   position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels, **kwargs)
        kwargs.pop("return_dict", None)
        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        logits = self.classifier(self.dropout(mean_pool(outputs.last_hidden_state, attention_mask)))
        loss = None if labels is None else sequence_classification_loss(self.config, logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        attentions=outputs.attentions)


def _pruned_class(name: str) -> type:
    """``Ppkit<name>``: the transformers class ``name`` with :class:`PrunedShape` mixed in."""
    pruned = "Ppkit" + name
    doc = f"Pruned ``{name}`` (per-layer sizes from the config)."
    return type(pruned, (PrunedShape, getattr(transformers, name)), {"__module__": __name__, "__qualname__": pruned,
                                                                      "__doc__": doc})


#: transformers class name -> pruned class (BERT's classifier is written out above for its pooling option)
PPKIT_CLASSES: dict[str, type] = {
    name: PpkitBertForSequenceClassification if name == "BertForSequenceClassification" else _pruned_class(name)
    for heads in FAMILY_CLASSES.values()
    for name in heads.values()
}
globals().update({cls.__name__: cls for cls in PPKIT_CLASSES.values()})  # ``modeling_ppkit.PpkitRobertaModel``...


def _pipeline_alias(cls: type) -> type:
    """A subclass of a ``Ppkit*`` head class carrying the transformers class's *name*, for loading with
    ``trust_remote_code``: pipelines compare the model's class name with the names their task supports
    and log an error for any other, and transformers never adds a remote-code class on a built-in config
    (``BertConfig``) to those names. The structure is the ``Ppkit*`` class's; the module says where it
    comes from (``modeling_ppkit``)."""
    name = cls.__name__.removeprefix("Ppkit")
    return type(name, (cls,), {"__module__": __name__, "__qualname__": name, "__doc__": cls.__doc__})


#: classes that ``auto_map`` points at under the transformers names (see ``_pipeline_alias``)
PIPELINE_ALIASES: dict[str, type] = {
    name: _pipeline_alias(PPKIT_CLASSES[name])
    for heads in FAMILY_CLASSES.values()
    for head, name in heads.items()
    if head != "base"
}
globals().update(PIPELINE_ALIASES)  # module attributes, as auto_map's "modeling_ppkit.<name>" needs

#: config.json ``auto_map`` per family (module name is the copied file, ``modeling_ppkit.py``)
AUTO_MAP: dict[str, dict[str, str]] = {
    family: {
        AUTO_CLASSES[head]: f"modeling_ppkit.{'Ppkit' + name if head == 'base' else name}"
        for head, name in heads.items()
    }
    for family, heads in FAMILY_CLASSES.items()
}
