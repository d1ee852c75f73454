"""Task registry, local/hub data loading, calibration batches and tokenized task datasets."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch

from ppkit.data import (
    PadCollator,
    calibration_batches,
    lm_token_ids,
    load_split,
    load_task_dataset,
    postprocess_qa,
)
from ppkit.errors import DataError, InputError
from ppkit.metrics import compute_task_metrics
from ppkit.tasks import TASKS, get_task


@pytest.fixture(scope="module")
def gpt2_tok():
    from conftest import SHARED
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt2")


def write(path, text: str, encoding: str = "utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


# ------------------------------------------------------------------------------------------- registry


def test_registry_has_every_task_with_consistent_fields():
    assert set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "squad", "squad_v2",
                          "wikitext-2", "wikitext-103", "ptb"}
    assert get_task("mnli").dev_split == "validation_matched"
    assert get_task("SST-2").max_length == 64 and get_task("squad").max_length == 384
    assert get_task("mrpc").max_length == 128 and get_task("ptb").max_length == 512
    assert get_task("stsb").kind == "regression" and get_task("stsb").num_labels == 1
    assert get_task("mnli").num_labels == 3
    assert get_task("mrpc").metrics == ("accuracy", "f1")
    assert get_task("cola").metrics == ("matthews_correlation",)
    assert get_task("stsb").main_metric == "spearman"
    assert get_task("wikitext-2").hub_config == "wikitext-2-raw-v1"
    assert get_task("wikitext-103").hub_config == "wikitext-103-raw-v1"
    assert get_task("ptb").hub_name == "ptb_text_only"
    assert get_task("squad").batch_size == 12
    assert not get_task("ptb").greater_is_better and get_task("qnli").greater_is_better
    for spec in TASKS.values():
        assert spec.main_metric in spec.metrics + ("loss",)
        assert spec.kind in ("classification", "regression", "qa", "lm")


def test_unknown_task_lists_valid_names():
    with pytest.raises(InputError) as err:
        get_task("sst3")
    assert "sst2" in str(err.value) and "wikitext-103" in str(err.value)


# ------------------------------------------------------------------------------------ real GLUE files


@pytest.mark.parametrize(
    "task, folder, rows, counts",
    [
        ("sst2", "SST-2", 872, {0: 428, 1: 444}),
        ("mrpc", "MRPC", 408, {1: 279, 0: 129}),       # BOM + '#1 String' columns
        ("rte", "RTE", 277, {0: 146, 1: 131}),         # entailment -> 0 as GLUE on the hub
        ("cola", "CoLA", 1043, {1: 721, 0: 322}),      # no header (data README says 720: it dropped row 1)
        ("qnli", "QNLI", 5463, {0: 2702, 1: 2761}),    # stray quotes: needs QUOTE_NONE
    ],
)
def test_real_glue_dev_files_parse_with_glue_label_ids(shared_data, task, folder, rows, counts):
    split = load_split(task, "dev", data=shared_data / "glue" / folder)
    assert len(split) == rows
    assert Counter(r["label"] for r in split.rows) == counts
    assert all(isinstance(r["text_a"], str) and r["text_a"] for r in split.rows)
    assert ("text_b" in split.rows[0]) == get_task(task).is_pair


def test_mrpc_columns_and_bom(shared_data):
    split = load_split("mrpc", "train", data=shared_data / "glue")  # parent GLUE directory works too
    assert len(split) == 3668
    first = split.rows[0]
    assert first["text_a"].startswith("Amrozi accused his brother")
    assert first["label"] == 1


def test_stsb_scores_are_floats(shared_data):
    split = load_split("stsb", "dev", data=shared_data / "glue" / "STS-B")
    assert len(split) == 1500
    assert split.rows[0]["label"] == pytest.approx(5.0)
    assert all(0.0 <= r["label"] <= 5.0 for r in split.rows)


def test_dev_lengths_match_the_papers_averages(shared_data, bert_tok):
    # reference data.py:22-39 measured these with BERT's uncased WordPiece (same vocabulary as MiniLM)
    for task, folder, mean in [("sst2", "SST-2", 25.16), ("mrpc", "MRPC", 53.24), ("stsb", "STS-B", 31.47)]:
        ds = load_task_dataset(task, bert_tok, "dev", data=shared_data / "glue" / folder)
        assert ds.mean_length == pytest.approx(mean, abs=0.005)


# ----------------------------------------------------------------------------------- local file errors


def test_missing_path_and_missing_split(tmp_path, shared_data):
    with pytest.raises(DataError, match="does not exist"):
        load_split("sst2", "train", data=tmp_path / "nope")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(DataError, match="no dev file .*dev.tsv"):
        load_split("sst2", "dev", data=tmp_path)


def test_local_wikitext2_without_train_is_an_error_that_names_valid(shared_data, gpt2_tok):
    with pytest.raises(DataError) as err:
        calibration_batches("wikitext-2", gpt2_tok, data=shared_data / "lm" / "wikitext-2")
    msg = str(err.value)
    assert "no train file" in msg and "valid.txt" in msg and "--data" in msg


def test_empty_file(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_split("sst2", "train", data=write(tmp_path / "train.tsv", "\n \n"))
    with pytest.raises(DataError, match="no data rows"):
        load_split("sst2", "train", data=write(tmp_path / "h.tsv", "sentence\tlabel\n"))


def test_wrong_columns_name_expected_and_found(tmp_path):
    f = write(tmp_path / "train.tsv", "text\ty\nhello\t1\n")
    with pytest.raises(DataError) as err:
        load_split("mrpc", "train", data=f)
    msg = str(err.value)
    assert "'sentence1'" in msg and "'#1 String'" in msg and "['text', 'y']" in msg
    # labels are required for train/dev, not for calibration
    f2 = write(tmp_path / "nolabel.tsv", "sentence\nhello\nworld\n")
    with pytest.raises(DataError, match="'label'"):
        load_split("sst2", "train", data=f2)
    assert [r["text_a"] for r in load_split("sst2", "train", data=f2, require_labels=False).rows] == ["hello", "world"]


def test_malformed_tsv_row_names_the_line(tmp_path):
    f = write(tmp_path / "train.tsv", "sentence\tlabel\ngood one\t1\nbroken\t0\textra\n")
    with pytest.raises(DataError, match=r"train.tsv:3: malformed row with 3 fields, expected 2"):
        load_split("sst2", "train", data=f)


def test_unbalanced_quotes_are_text_not_quoting(tmp_path):
    f = write(tmp_path / "train.tsv", 'sentence\tlabel\n" a quote starts here\t1\nand ends " here\t0\n')
    rows = load_split("sst2", "train", data=f).rows
    assert rows == [{"text_a": '" a quote starts here', "label": 1}, {"text_a": 'and ends " here', "label": 0}]


def test_not_utf8(tmp_path):
    f = write(tmp_path / "train.tsv", "sentence\tlabel\ncaf\u00e9\t1\n", encoding="latin-1")
    with pytest.raises(DataError, match=r"not UTF-8 .*line 2"):
        load_split("sst2", "train", data=f)


def test_bad_json_lines(tmp_path):
    f = write(tmp_path / "train.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", "label": \n')
    with pytest.raises(DataError, match=r"train.jsonl:2: line is not valid JSON"):
        load_split("sst2", "train", data=f)
    with pytest.raises(DataError, match="invalid JSON at line 1"):
        load_split("sst2", "train", data=write(tmp_path / "x.json", '[{"sentence": "a",'))


def test_bad_labels(tmp_path):
    with pytest.raises(DataError, match=r"train.tsv:3: bad label 'maybe'.*entailment, not_entailment"):
        load_split("rte", "train", data=write(tmp_path / "train.tsv",
                                              "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n"))
    with pytest.raises(DataError, match="out of range"):
        load_split("sst2", "train", data=write(tmp_path / "t2.tsv", "sentence\tlabel\na\t-1\n"))


def test_pair_task_rejects_txt(tmp_path):
    with pytest.raises(DataError, match="sentence pairs"):
        load_split("mrpc", "train", data=write(tmp_path / "t.txt", "a\nb\n"), require_labels=False)


def test_csv_json_jsonl_and_hub_column_names(tmp_path):
    csv_f = write(tmp_path / "a.csv", 'sentence1,sentence2,label\n"x, y",b,1\nc,d,0\n')
    rows = load_split("mrpc", "train", data=csv_f).rows
    assert rows[0] == {"text_a": "x, y", "text_b": "b", "label": 1}
    jl = write(tmp_path / "b.jsonl", '{"premise": "p", "hypothesis": "h", "label": 2}\n\n')
    assert load_split("mnli", "train", data=jl).rows == [{"text_a": "p", "text_b": "h", "label": 2}]
    js = write(tmp_path / "c.json", json.dumps({"sentence1": ["s"], "sentence2": ["t"], "score": [3.5]}))
    assert load_split("stsb", "dev", data=js).rows == [{"text_a": "s", "text_b": "t", "label": 3.5}]
    mnli_dev = tmp_path / "mnli"
    mnli_dev.mkdir()
    write(mnli_dev / "dev_matched.tsv", "index\tsentence1\tsentence2\tlabel1\tgold_label\n0\tp\th\tneutral\tcontradiction\n")
    assert load_split("mnli", "dev", data=mnli_dev).rows[0]["label"] == 2


def test_hub_path_maps_columns_and_offline_failure_says_data(monkeypatch):
    import datasets

    import ppkit.models

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"premise": ["p1"], "hypothesis": ["h1"], "label": [1], "idx": [0]})

    monkeypatch.setattr(ppkit.models, "_hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    split = load_split("mnli", "dev")
    assert calls == [("glue", "mnli", "validation_matched")]
    assert split.rows == [{"text_a": "p1", "text_b": "h1", "label": 1}]
    assert split.source == "hub:glue/mnli[validation_matched]"

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'glue' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"glue/sst2 .*pass --data PATH"):
        load_split("sst2", "train")


# --------------------------------------------------------------------------------------- calibration


def _unique_sentences_file(tmp_path, n):
    lines = ["sentence\tlabel"] + [f"sentence number {i} " + "word " * (i % 7) + f"\t{i % 2}" for i in range(n)]
    return write(tmp_path / "train.tsv", "\n".join(lines) + "\n")


def test_calibration_is_a_seeded_sample_without_replacement(tmp_path, bert_tok):
    f = _unique_sentences_file(tmp_path, 100)
    a = calibration_batches("sst2", bert_tok, data=f, samples=40, seed=3, batch_size=16)
    b = calibration_batches("sst2", bert_tok, data=f, samples=40, seed=3, batch_size=16)
    c = calibration_batches("sst2", bert_tok, data=f, samples=40, seed=4, batch_size=16)
    assert a.num_samples == 40 and a.requested_samples == 40 and not a.warnings
    assert [x.shape[0] for x in (bb["input_ids"] for bb in a.batches)] == [16, 16, 8]
    for x, y in zip(a.batches, b.batches):
        assert torch.equal(x["input_ids"], y["input_ids"])

    def texts(cal):
        out = []
        for bb in cal.batches:
            for ids, mask in zip(bb["input_ids"], bb["attention_mask"]):
                out.append(bert_tok.decode(ids[mask.bool()], skip_special_tokens=True))
        return out

    ta = texts(a)
    assert len(set(ta)) == 40  # without replacement
    assert ta != texts(c)
    assert ta != sorted(ta, key=lambda s: int(s.split()[2]))  # random order, not file order
    for bb in a.batches:
        assert set(bb) == {"input_ids", "attention_mask", "token_type_ids"}  # labels dropped
        # dynamic padding: the batch is as wide as its longest row
        assert bb["input_ids"].shape[1] == int(bb["attention_mask"].sum(1).max())
    assert a.mean_length == pytest.approx(float(torch.cat([bb["attention_mask"].sum(1) for bb in a.batches]).float().mean()))


def test_calibration_uses_all_rows_in_order_when_too_few(tmp_path, bert_tok, caplog):
    f = _unique_sentences_file(tmp_path, 10)
    with caplog.at_level(logging.WARNING, logger="ppkit.data"):
        cal = calibration_batches("sst2", bert_tok, data=f, samples=3000)
    assert cal.num_samples == 10 and cal.requested_samples == 3000
    assert "only 10 rows" in cal.warnings[0] and "using all 10" in caplog.text
    first = bert_tok.decode(cal.batches[0]["input_ids"][0], skip_special_tokens=True)
    assert first.startswith("sentence number 0")


def test_calibration_arguments_are_checked(tmp_path, bert_tok):
    f = _unique_sentences_file(tmp_path, 10)
    for bad in (0, -5):
        with pytest.raises(InputError, match="samples"):
            calibration_batches("sst2", bert_tok, data=f, samples=bad)
    with pytest.raises(InputError, match="longer than the model's 64 positions"):
        calibration_batches("sst2", bert_tok, data=f, max_length=128, max_positions=64)
    with pytest.raises(InputError, match="512 positions"):  # tokenizer.model_max_length when no model limit
        calibration_batches("sst2", bert_tok, data=f, max_length=1024)


def test_calibration_truncates_to_max_length_and_pairs_get_segments(shared_data, bert_tok):
    cal = calibration_batches("rte", bert_tok, data=shared_data / "glue" / "RTE", samples=64, max_length=48)
    ids = torch.cat([b["input_ids"] for b in cal.batches])
    assert ids.shape[1] <= 48 and cal.max_length == 48
    assert all(int(b["token_type_ids"].max()) == 1 for b in cal.batches)  # second segment present


def test_label_free_txt_is_enough_for_calibration(tmp_path, bert_tok):
    f = write(tmp_path / "in_domain.txt", "a great film\n\nawful acting\nfine\n")
    cal = calibration_batches("sst2", bert_tok, data=f, samples=2, seed=0)
    assert cal.num_samples == 2
    with pytest.raises(DataError, match="no labels"):
        load_task_dataset("sst2", bert_tok, "train", data=f)


def test_lm_blocks_are_contiguous_token_runs(tmp_path, gpt2_tok, shared_data):
    lines = (shared_data / "lm" / "ptb" / "valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:300]
    d = tmp_path / "ptb"
    d.mkdir()
    write(d / "train.txt", "".join(lines))
    full = gpt2_tok("".join(lines), verbose=False)["input_ids"]
    n_blocks = len(full) // 64
    cal = calibration_batches("ptb", gpt2_tok, data=d, samples=10, max_length=64, seed=1, batch_size=4)
    assert cal.num_samples == 10 and cal.mean_length == 64.0
    starts = set()
    for b in cal.batches:
        assert b["input_ids"].shape[1] == 64 and bool(b["attention_mask"].all())
        assert "token_type_ids" not in b
        for row in b["input_ids"].tolist():
            s = next(i for i in range(0, len(full), 64) if full[i:i + 64] == row)
            starts.add(s)
    assert len(starts) == 10
    # asking for more blocks than exist: all of them, in corpus order, with a warning
    cal = calibration_batches("ptb", gpt2_tok, data=d, samples=10_000, max_length=64)
    assert cal.num_samples == n_blocks and "fewer than the 10000 requested" in cal.warnings[0]
    assert cal.batches[0]["input_ids"][0].tolist() == full[:64]


def test_squad_calibration_features_and_train_positions(shared_data, bert_tok):
    squad = shared_data / "squad" / "dev-v1.1.json"
    cal = calibration_batches("squad", bert_tok, data=squad, samples=20, max_length=128, batch_size=8)
    assert cal.num_samples == 20
    b = cal.batches[0]
    assert b["input_ids"].shape[1] <= 128 and int(b["token_type_ids"].max()) == 1

    ds = load_task_dataset("squad", bert_tok, "train", data=squad, max_length=384, limit=30)
    assert ds.num_examples == 30 and len(ds) >= 30
    hits, spans = 0, {}
    for f, ex, offs in zip(ds.features, ds.feature_example, ds.offsets):
        s, e = f["start_positions"], f["end_positions"]
        if s == 0:
            continue
        span = ds.examples[ex]["context"][offs[s][0]:offs[e][1]]
        gold = ds.examples[ex]["answers"]["text"][0]
        assert gold in span  # a sub-word answer ("gold" in "golden") widens to whole tokens
        hits += span == gold
        spans.setdefault(ex, span)
    assert hits >= 25 and len(spans) == 30

    # logits peaked at the gold positions give the gold answers back (EM 100)
    import numpy as np

    width = max(len(f["input_ids"]) for f in ds.features)
    starts = np.zeros((len(ds), width), dtype=np.float32)
    ends = np.zeros((len(ds), width), dtype=np.float32)
    for i, f in enumerate(ds.features):
        starts[i, f["start_positions"]] = 10.0
        ends[i, f["end_positions"]] = 10.0
    answers = postprocess_qa(ds, starts, ends)
    assert answers == [spans[i] for i in range(30)]
    assert compute_task_metrics("squad", answers, ds.references)["f1"] > 95.0


def test_task_dataset_limits_and_labels(shared_data, bert_tok):
    stsb = load_task_dataset("stsb", bert_tok, "dev", data=shared_data / "glue" / "STS-B", limit=8)
    assert stsb.references == [5.0, 4.75, 5.0, 2.4, 2.75, 2.615, 5.0, 2.333]
    batch = stsb.collator(bert_tok)(stsb.features)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist()[1] == pytest.approx(4.75)
    first = load_task_dataset("sst2", bert_tok, "dev", data=shared_data / "glue" / "SST-2", limit=20)
    sub1 = load_task_dataset("sst2", bert_tok, "dev", data=shared_data / "glue" / "SST-2", limit=20, limit_seed=1)
    sub2 = load_task_dataset("sst2", bert_tok, "dev", data=shared_data / "glue" / "SST-2", limit=20, limit_seed=1)
    assert first.num_examples == 20 and len(first.features) == 20
    assert [f["input_ids"] for f in sub1.features] == [f["input_ids"] for f in sub2.features]
    assert [f["input_ids"] for f in sub1.features] != [f["input_ids"] for f in first.features]
    assert PadCollator(bert_tok)(first.features[:3])["labels"].dtype == torch.long


def test_lm_token_ids_and_gpt2_padding(shared_data, gpt2_tok):
    ids = lm_token_ids("wikitext-2", gpt2_tok, "test", data=shared_data / "lm" / "wikitext-2")
    assert ids.shape[0] == 1 and ids.shape[1] > 250_000
    batch = PadCollator(gpt2_tok)([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]},
                                   {"input_ids": [4], "attention_mask": [1]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 50256, 50256]]  # GPT-2 has no pad token: EOS
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
