"""Pruned and fine-tuned directories load in the clients people already use as the original did:
sentence-transformers (its modules, Normalize, max_seq_length), a slow tokenizer, transformers pipelines
with named labels."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED

import ppkit
from ppkit.modeling_pruned import mean_pool

MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
SST2 = SHARED / "glue" / "SST-2"
TEXTS = ["A man is playing a guitar.", "The stock market fell sharply today.", "a gripping, funny film"]


@pytest.fixture(scope="module")
def pruned_minilm(tmp_path_factory):
    out = tmp_path_factory.mktemp("clients") / "minilm-60"
    ppkit.prune(MINILM, task="sst2", data=SST2, flops=0.6, samples=64, out=out, plot=False, progress=False)
    return out


def _ppkit_embeddings(path, texts):
    model = ppkit.load_pruned(path, head="base")
    tok = ppkit.load_tokenizer(path)
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)


@pytest.mark.slow
def test_sentence_transformers_loads_pruned_and_finetuned_directories(pruned_minilm, tmp_path):
    from sentence_transformers import SentenceTransformer

    finetuned = tmp_path / "minilm-60-ft"
    ppkit.finetune(pruned_minilm, "sst2", data=SST2, out_dir=finetuned, train_limit=32, eval_limit=16, epochs=1,
                   progress=False)
    original = SentenceTransformer(str(MINILM), device="cpu")
    for path in (pruned_minilm, finetuned):
        st = SentenceTransformer(str(path), device="cpu", trust_remote_code=True)
        assert [type(m).__name__ for m in st] == [type(m).__name__ for m in original] == ["Transformer", "Pooling", "Normalize"]
        assert st.max_seq_length == original.max_seq_length == 256
        got = st.encode(TEXTS, convert_to_tensor=True)
        assert (got - _ppkit_embeddings(path, TEXTS)).abs().max() <= 1e-5
        assert got.norm(dim=-1) == pytest.approx(torch.ones(len(TEXTS)), abs=1e-5)  # dot product = cosine


def test_slow_tokenizer_loads_from_a_pruned_directory(pruned_minilm):
    from transformers import AutoTokenizer, BertTokenizer

    assert (pruned_minilm / "vocab.txt").read_bytes() == (MINILM / "vocab.txt").read_bytes()
    fast = AutoTokenizer.from_pretrained(pruned_minilm)
    for slow in (AutoTokenizer.from_pretrained(pruned_minilm, use_fast=False), BertTokenizer.from_pretrained(pruned_minilm)):
        assert slow(TEXTS[0])["input_ids"] == fast(TEXTS[0])["input_ids"]


@pytest.mark.slow
def test_pipeline_gives_named_labels_without_error_noise(pruned_minilm, tmp_path, capfd):
    from transformers.pipelines import pipeline  # sentence-transformers' import can shadow transformers.pipeline

    finetuned = tmp_path / "ft"
    ppkit.finetune(pruned_minilm, "sst2", data=SST2, out_dir=finetuned, train_limit=32, eval_limit=16, epochs=1,
                   progress=False)
    capfd.readouterr()
    classify = pipeline("text-classification", model=str(finetuned), trust_remote_code=True, device="cpu")
    labels = {r["label"] for r in classify(TEXTS)}
    assert labels <= {"negative", "positive"} and labels
    # pipelines check the class name; the remote-code class carries the transformers name for that
    assert "is not supported for text-classification" not in capfd.readouterr().err
    assert type(classify.model).__name__ == "BertForSequenceClassification"
    assert type(classify.model).__module__.endswith("modeling_ppkit")
