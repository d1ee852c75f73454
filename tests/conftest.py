"""Shared pytest fixtures: tiny random BERT / GPT-2 models, the shared data directory, seeding.

Every fixture builds a fresh object per test (function scope) so a test may prune or modify it in
place. Tiny models are built with a fixed seed, in eval mode (dropout off) and with eager attention
so masked / pruned / reloaded outputs can be compared exactly.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PPKIT_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()

TINY_VOCAB = 120


def tiny_bert_config(**overrides):
    """Config of the tiny BERT used across the tests (3 layers, hidden 32, 4 heads of 8, FFN 64)."""
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_gpt2_config(**overrides):
    """Config of the tiny GPT-2 used across the tests (3 layers, n_embd 32, 4 heads of 8, FFN 128)."""
    from transformers import GPT2Config

    kwargs = dict(
        vocab_size=TINY_VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=TINY_VOCAB - 1,
        eos_token_id=TINY_VOCAB - 1,
        pad_token_id=TINY_VOCAB - 1,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


#: config class of each BERT-shaped family beside BERT (the tiny shape is BERT's)
ENCODER_CONFIGS = {"roberta": "RobertaConfig", "xlm-roberta": "XLMRobertaConfig", "electra": "ElectraConfig",
                   "distilbert": "DistilBertConfig"}

#: tiny Llama-style decoders: Llama with 2 query heads per key/value head, Qwen2 with q/k/v biases and an
#: explicit head_dim (12, not hidden / heads), Mistral with plain multi-head attention (one query head per group)
DECODER_CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, head_dim=12)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=4, sliding_window=None)),
}


def tiny_decoder_config(family: str, **overrides):
    """Tiny config of a Llama-style family (``DECODER_CONFIGS``): 3 layers, hidden 32, 4 query heads, FFN 64."""
    import transformers

    name, extra = DECODER_CONFIGS[family]
    kwargs = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64, attention_dropout=0.0,
                  bos_token_id=TINY_VOCAB - 1, eos_token_id=TINY_VOCAB - 1, pad_token_id=TINY_VOCAB - 1,
                  tie_word_embeddings=False, attn_implementation="eager", **extra)
    kwargs.update(overrides)
    return getattr(transformers, name)(**kwargs)


def tiny_encoder_config(family: str, **overrides):
    """Tiny config of a BERT-shaped family (``ENCODER_CONFIGS``), BERT's tiny shape. RoBERTa / XLM-R get
    ``type_vocab_size=1`` and padding index 1 as their checkpoints have; ELECTRA a smaller embedding
    (16) projected up to the hidden size, as ELECTRA-small has; DistilBERT its own names for the sizes."""
    import transformers

    base = tiny_bert_config().to_dict()
    kwargs = {k: base[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "max_position_embeddings", "hidden_dropout_prob",
                                   "attention_probs_dropout_prob")}
    kwargs["attn_implementation"] = "eager"
    if family in ("roberta", "xlm-roberta"):
        kwargs.update(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if family == "electra":
        kwargs.update(embedding_size=16, type_vocab_size=2)
    if family == "distilbert":  # DistilBERT's own names for the same sizes
        kwargs = dict(vocab_size=kwargs["vocab_size"], dim=kwargs["hidden_size"], n_layers=kwargs["num_hidden_layers"],
                      n_heads=kwargs["num_attention_heads"], hidden_dim=kwargs["intermediate_size"],
                      max_position_embeddings=kwargs["max_position_embeddings"], dropout=0.0, attention_dropout=0.0,
                      seq_classif_dropout=0.0, qa_dropout=0.0, attn_implementation="eager")
    kwargs.update(overrides)
    return getattr(transformers, ENCODER_CONFIGS[family])(**kwargs)


def make_tiny(family: str, cls_name: str, seed: int = 0, **overrides):
    """A fresh tiny model of any supported ``family`` and transformers class ``cls_name``, eval mode."""
    import transformers

    if family == "bert":
        return make_tiny_bert(cls_name, seed=seed, **overrides)
    if family == "gpt2":
        return make_tiny_gpt2(cls_name, seed=seed, **overrides)
    torch.manual_seed(seed)
    config = tiny_decoder_config(family, **overrides) if family in DECODER_CONFIGS else tiny_encoder_config(family, **overrides)
    return getattr(transformers, cls_name)(config).eval()


def make_tiny_bert(cls_name: str = "BertModel", seed: int = 0, **overrides):
    """A fresh tiny BERT of class ``cls_name`` (e.g. "BertForSequenceClassification"), eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_bert_config(**overrides))
    return model.eval()


def make_tiny_gpt2(cls_name: str = "GPT2LMHeadModel", seed: int = 0, **overrides):
    """A fresh tiny GPT-2 of class ``cls_name`` ("GPT2Model" or "GPT2LMHeadModel"), eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_gpt2_config(**overrides))
    return model.eval()


def tiny_lm_on_ptb(folder: Path, shared_data: Path, rows: tuple[int, int] = (150, 50)):
    """A fresh tiny GPT-2 LM saved with the real GPT-2 tokenizer under ``folder/gpt2``, and the first
    ``rows`` lines of PTB train / valid under ``folder/ptb``: (tokenizer, data dir, model dir)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_data / "tokenizers" / "gpt2")
    data = folder / "ptb"
    data.mkdir(parents=True)
    for name, n in zip(("train", "valid"), rows):
        lines = (shared_data / "lm" / "ptb" / f"{name}.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        (data / f"{name}.txt").write_text("".join(lines[:n]), encoding="utf-8")
    model_dir = folder / "gpt2"
    make_tiny_gpt2(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return tok, data, model_dir


@pytest.fixture
def seeded():
    """Seed python, numpy and torch with 0 (tests that need other seeds use explicit generators)."""
    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return 0


@pytest.fixture
def shared_data() -> Path:
    """The shared data directory (../shared/data or $PPKIT_SHARED_DATA); fails clearly if missing."""
    if not SHARED.is_dir():
        pytest.fail(f"shared data directory not found: {SHARED} (set PPKIT_SHARED_DATA)")
    return SHARED


@pytest.fixture
def tiny_bert():
    """Tiny random BertModel (3 layers, hidden 32, 4 heads, FFN 64, vocab 120), eval mode, eager attention."""
    return make_tiny_bert("BertModel")


@pytest.fixture
def tiny_bert_cls():
    """Tiny random BertForSequenceClassification (2 labels), same shape as ``tiny_bert``."""
    return make_tiny_bert("BertForSequenceClassification", num_labels=2)


@pytest.fixture
def tiny_gpt2():
    """Tiny random GPT2LMHeadModel (3 layers, n_embd 32, 4 heads, FFN 128, vocab 120), eval mode, eager."""
    return make_tiny_gpt2("GPT2LMHeadModel")


@pytest.fixture(scope="session")
def bert_tok():
    """The real MiniLM (uncased WordPiece) tokenizer from the shared data."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "models" / "all-MiniLM-L6-v2")


@pytest.fixture
def minilm_path(shared_data) -> Path:
    """Path of the real all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, hidden 384, FFN 1536)."""
    path = shared_data / "models" / "all-MiniLM-L6-v2"
    if not (path / "config.json").is_file():
        pytest.fail(f"MiniLM model not found at {path} (the shared data is required)")
    return path


# --------------------------------------------------------------------------- plan helpers (import from tests)
def random_plan(num_layers: int, num_heads: int, ffn_dim: int, seed: int = 0, kind: str = "uneven"):
    """A random PruningPlan for tests.

    kind: "uneven" (1..all heads/neurons per layer, random subsets), "zeros" (layer 0 keeps no heads,
    layer 1 no neurons, layer 2 neither; other layers uneven), "keep_all".
    """
    from ppkit.plan import LayerPlan, PruningPlan

    if kind == "keep_all":
        return PruningPlan.keep_all(num_layers, num_heads, ffn_dim)
    rng = random.Random(seed)
    layers = []
    for layer in range(num_layers):
        n_heads = rng.randint(1, num_heads)
        n_neurons = rng.randint(1, ffn_dim)
        if kind == "zeros":
            if layer in (0, 2):
                n_heads = 0
            if layer in (1, 2):
                n_neurons = 0
        heads = tuple(sorted(rng.sample(range(num_heads), n_heads)))
        neurons = tuple(sorted(rng.sample(range(ffn_dim), n_neurons)))
        layers.append(LayerPlan(heads, neurons))
    return PruningPlan(layers, num_heads, ffn_dim, {"kind": kind, "seed": seed})


def plan_for(model, seed: int = 0, kind: str = "uneven"):
    """random_plan sized for ``model`` (any model ppkit has an adapter for)."""
    from ppkit.adapters import get_adapter

    shape = get_adapter(model).shape()
    return random_plan(shape.num_layers, shape.num_heads, shape.ffn_dim, seed=seed, kind=kind)
