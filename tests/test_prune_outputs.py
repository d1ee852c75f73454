"""What `ppkit prune` hands back: a terminal summary with the compensation outcome and the plan's notes
(before, both were only in report.json), and, for a fine-tuned source, its task head."""

from __future__ import annotations

from conftest import SHARED, make_tiny_bert
from rich.console import Console

import ppkit
from ppkit.pipeline import prune
from ppkit.report import summary_table


def test_summary_shows_compensation_and_notes():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "models" / "all-MiniLM-L6-v2")
    model = make_tiny_bert("BertModel", vocab_size=tok.vocab_size)
    result = prune(model, tokenizer=tok, task="sst2", data=SHARED / "glue" / "SST-2", flops=0.7, strategy="kcm",
                   samples=48, compensate="lstsq", plot=False, progress=False)
    console = Console(record=True, width=200)
    console.print(summary_table(result.report))
    text = console.export_text()

    comp = result.report["compensation"]
    assert f"lstsq: {comp['accepted']}/{len(comp['layers'])} sublayers" in text
    assert f"held-out error {comp['mean_error_before']:.4g} -> {comp['mean_error_after']:.4g}" in text
    assert "note: KCM prunes FFN neurons only: all heads kept, lambda ignored" in text


def test_a_fine_tuned_classifier_keeps_its_head_and_predictions(tmp_path):
    """Retraining-free use: pruning a fine-tuned task model keeps (and saves) its classifier; pruning
    nothing changes no prediction."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "models" / "all-MiniLM-L6-v2")
    source = tmp_path / "classifier"
    tuned = make_tiny_bert("BertForSequenceClassification", vocab_size=tok.vocab_size, num_labels=2)
    tuned.save_pretrained(source)
    tok.save_pretrained(source)
    kw = dict(task="sst2", data=SHARED / "glue" / "SST-2", samples=32, plot=False, progress=False)

    same = prune(source, flops=1.0, out=tmp_path / "all", **kw)
    smaller = prune(source, flops=0.6, out=tmp_path / "pruned", **kw)

    assert same.report["head"] == "sequence-classification" and same.report["source_fine_tuned"]
    batch = tok(["a gripping film", "dull and long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = tuned(**batch).logits
        assert torch.allclose(same.model(**batch).logits, expected, atol=1e-5)
        reloaded = ppkit.load_pruned(tmp_path / "all")
        assert type(reloaded).__name__ == "PpkitBertForSequenceClassification"
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
    assert smaller.report["flops_ratio"] <= 0.6 + 1e-9
    assert type(ppkit.load_pruned(tmp_path / "pruned")).__name__ == "PpkitBertForSequenceClassification"
    # no training follows: the default reconstructs the kept weights, and an explicit "none" says how to keep quality
    assert smaller.report["compensation"]["method"] == "lstsq-seq"
    assert not any("--compensate" in w for w in smaller.report["warnings"])
    uncompensated = prune(source, flops=0.6, compensate="none", **kw)
    assert any("--compensate auto or lstsq-seq" in w for w in uncompensated.report["warnings"])
