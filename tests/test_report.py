"""The terminal summary of `ppkit prune` shows what a user wants to see: the compensation outcome and the
plan's notes (before, both were only in report.json)."""

from __future__ import annotations

from conftest import SHARED, make_tiny_bert
from rich.console import Console

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
