"""Task data: read a split (hub or local file), tokenize it, and cut it into calibration batches.

Two sources: the Hugging Face hub through ``datasets.load_dataset`` (the normal path for users with a
network), or ``data=PATH`` — a GLUE-style directory (``train.tsv`` / ``dev.tsv``, ``dev_matched.tsv``
for MNLI; ``train.txt`` / ``valid.txt`` / ``test.txt`` for LM corpora; ``train-v1.1.json`` /
``dev-v1.1.json`` for SQuAD; a parent GLUE directory holding ``SST-2/`` etc. works too) or a single
``.tsv`` / ``.csv`` / ``.json`` / ``.jsonl`` / ``.txt`` file, which then serves as whatever split is
asked for. Local files are parsed here (not by ``datasets``) so that every problem becomes a
:class:`~ppkit.errors.DataError` naming the file, the line and the fix. GLUE TSVs are read with quote
handling off (``csv.QUOTE_NONE``: sentences contain unbalanced ``"``) and a BOM is stripped (MRPC).

Every split is first turned into canonical rows: ``text_a`` / ``text_b`` / ``label`` (GLUE),
``id`` / ``question`` / ``context`` / ``answers`` (SQuAD), or lines of text (LM).

Calibration (:func:`calibration_batches`) follows the reference implementation: the train split,
labels dropped, a seeded random sample of ``samples`` rows (all rows, in order, with a warning when
the split is smaller), batches of 32 padded per batch. LM text is tokenized in chunks of 1000 lines and
cut into blocks of ``max_length`` tokens (512 by default, remainder of each chunk dropped). SQuAD rows
become question+context features (``only_second`` truncation, stride 128), so samples are features.

**Local WikiText-2 without ``train.txt``** (the shared copy has only valid/test): asking for the train
split raises a DataError that says to pass ``--data DIR/valid.txt`` explicitly. ppkit does not fall
back to the validation text silently, because that text is also the evaluation text.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ppkit.errors import DataError, InputError
from ppkit.tasks import ColumnSchema, TaskSpec, get_task

logger = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
LM_CHUNK_LINES = 1000  # reference data.py: texts are joined into blocks per 1000-line map chunk
QA_STRIDE = 128
_FILE_TYPES = (".tsv", ".csv", ".json", ".jsonl", ".txt", ".tokens", ".raw")

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # SQuAD contexts / long TSV fields


# --------------------------------------------------------------------------------------------- raw data


@dataclass
class RawSplit:
    """One split in canonical form. ``rows`` for GLUE/QA tasks, ``lines`` (each ending in a newline)
    for LM tasks; ``source`` says where it came from; ``has_labels`` is False for label-free files
    (a plain list of sentences is enough for calibration)."""

    task: TaskSpec
    split: str
    source: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    has_labels: bool = True

    def __len__(self) -> int:
        return len(self.lines) if self.task.kind == "lm" else len(self.rows)

    @property
    def text(self) -> str:
        """LM tasks: the whole text of the split."""
        return "".join(self.lines)


def _split_name(split: str) -> str:
    s = split.lower()
    s = {"validation": "dev", "valid": "dev", "eval": "dev", "val": "dev"}.get(s, s)
    if s not in SPLITS:
        raise InputError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    return s


def load_split(task: str | TaskSpec, split: str = "train", *, data: str | Path | None = None,
               require_labels: bool = True) -> RawSplit:
    """Read one split of ``task`` into canonical rows, from ``data`` (directory or file) or, when
    ``data`` is None, from the Hugging Face hub. ``split`` is train, dev (the task's validation split,
    ``validation_matched`` for MNLI) or test (LM tasks). With ``require_labels=False`` a file without a
    label column is accepted (calibration drops labels anyway). Raises DataError for anything missing
    or malformed, with the file and line."""
    spec = get_task(task)
    split = _split_name(split)
    if data is None:
        return _load_hub(spec, split, require_labels)
    path = _resolve_local(spec, split, Path(data).expanduser())
    return _read_local(spec, split, path, require_labels)


def _hub_split(spec: TaskSpec, split: str) -> str:
    if split == "train":
        return "train"
    if split == "dev":
        return spec.dev_split
    if spec.test_split is None:
        raise InputError(
            f"task {spec.name} has no labelled test split on the hub (GLUE test labels are hidden); "
            "use the dev split"
        )
    return spec.test_split


def _load_hub(spec: TaskSpec, split: str, require_labels: bool) -> RawSplit:
    hub_split = _hub_split(spec, split)
    try:
        import datasets
        import datasets.config

        from ppkit.models import _hub_offline, _hub_reachable

        # Without network the hub client retries for ~25 s; one short probe decides, and offline mode
        # still serves a dataset already in the local cache.
        offline = _hub_offline() or not _hub_reachable()
        saved = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = saved or offline
        try:
            ds = datasets.load_dataset(spec.hub_name, spec.hub_config, split=hub_split)
        finally:
            datasets.config.HF_HUB_OFFLINE = saved
    except Exception as exc:  # the hub raises many types (ConnectionError, OSError, HfHubHTTPError...)
        raise DataError(
            f"could not load {spec.hub_id} (split {hub_split}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {str(exc)[:300]}. If you are offline, pass --data PATH with a local copy "
            f"(a directory with {'/'.join(_candidates(spec, split)[:2])} or a single .tsv/.csv/.json/.jsonl/.txt file)"
        ) from exc
    source = f"hub:{spec.hub_id}[{hub_split}]"
    columns = list(ds.column_names)
    if spec.kind == "lm":
        col = _lm_column(spec, columns, source)
        return RawSplit(spec, split, source, lines=_as_lines(ds[col]))
    if spec.kind == "qa":
        return RawSplit(spec, split, source, rows=_qa_rows(spec, ds.to_list(), source, require_labels),
                        has_labels=require_labels or "answers" in columns)
    rows, has_labels = _glue_rows(spec, columns, ds.to_list(), source, require_labels, first_line=None)
    return RawSplit(spec, split, source, rows=rows, has_labels=has_labels)


def _candidates(spec: TaskSpec, split: str) -> list[str]:
    names = list(spec.local_files.get(split, ()))
    stems = [split] + {"dev": ["validation", "valid", "val"], "train": [], "test": []}[split]
    for stem in stems:
        for ext in (".tsv", ".csv", ".jsonl", ".json", ".txt"):
            if stem + ext not in names:
                names.append(stem + ext)
    return names


def _resolve_local(spec: TaskSpec, split: str, path: Path) -> Path:
    if not path.exists():
        raise DataError(f"data path {path} does not exist: pass an existing directory or file with --data")
    if path.is_file():
        return path
    if spec.glue_dir and (path / spec.glue_dir).is_dir():
        path = path / spec.glue_dir
    tried = _candidates(spec, split)
    for name in tried:
        if (path / name).is_file():
            return path / name
    present = sorted(p.name for p in path.iterdir())[:20]
    hint = ""
    if split == "train":
        dev = next((path / n for n in _candidates(spec, "dev") if (path / n).is_file()), None)
        if dev is not None:
            why = " (local WikiText-2 copies often ship without train)" if spec.kind == "lm" else ""
            hint = (f". Only a dev/validation file ({dev.name}) is there{why}: to calibrate on it anyway, pass "
                    f"that file explicitly, --data {dev} (note that it is also the evaluation text)")
    raise DataError(
        f"no {split} file for task {spec.name} in {path}: looked for {', '.join(tried[:6])}; "
        f"the directory has {', '.join(present) or 'nothing'}{hint}"
    )


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT`"
        ) from exc


def _read_local(spec: TaskSpec, split: str, path: Path, require_labels: bool) -> RawSplit:
    suffix = path.suffix.lower()
    if suffix not in _FILE_TYPES:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of .tsv .csv .json .jsonl .txt")
    text = _read_text(path)
    source = str(path)
    if suffix in (".txt", ".tokens", ".raw"):
        lines = text.splitlines(keepends=True)
        if spec.kind == "lm":
            return RawSplit(spec, split, source, lines=_as_lines(lines))
        if spec.kind == "classification" or spec.kind == "regression":
            if spec.is_pair:
                raise DataError(f"{path}: a .txt file has one text per line, but {spec.name} needs sentence "
                                "pairs; use a .tsv/.csv/.jsonl file with the task's columns")
            if require_labels:
                raise DataError(f"{path}: a .txt file has no labels; training and evaluation need a "
                                ".tsv/.csv/.jsonl file with a label column (a .txt file is fine for calibration)")
            rows = [{"text_a": ln.rstrip("\r\n")} for ln in lines if ln.strip()]
            if not rows:
                raise DataError(f"{path} has no text lines")
            return RawSplit(spec, split, source, rows=rows, has_labels=False)
        raise DataError(f"{path}: SQuAD data must be JSON (the official nested format or JSON lines)")
    if suffix in (".tsv", ".csv"):
        columns, records, first_line = _parse_delimited(spec, path, text, "\t" if suffix == ".tsv" else ",",
                                                        require_labels)
    else:
        columns, records = _parse_json(path, text, suffix)
        first_line = None
    if spec.kind == "lm":
        col = _lm_column(spec, columns, source)
        return RawSplit(spec, split, source, lines=_as_lines(str(r.get(col) or "") for r in records))
    if spec.kind == "qa":
        has = any("answers" in r for r in records)
        return RawSplit(spec, split, source, rows=_qa_rows(spec, records, source, require_labels), has_labels=has)
    rows, has_labels = _glue_rows(spec, columns, records, source, require_labels, first_line)
    return RawSplit(spec, split, source, rows=rows, has_labels=has_labels)


def _expected(spec: TaskSpec, require_labels: bool) -> str:
    alts = []
    for s in spec.schemas:
        cols = s.required if require_labels else tuple(c for c in (s.text_a, s.text_b) if c)
        alts.append("(" + ", ".join(repr(c) for c in cols) + (" without a header" if s.names else "") + ")")
    return " or ".join(dict.fromkeys(alts))


def _pick_schema(spec: TaskSpec, columns: Sequence[str], require_labels: bool) -> ColumnSchema | None:
    cols = set(columns)
    for s in spec.schemas:
        if s.names is not None:
            continue
        if set(s.required) <= cols:
            return s
    if not require_labels:
        for s in spec.schemas:
            if s.names is None and {c for c in (s.text_a, s.text_b) if c} <= cols:
                return s
    return None


def _parse_delimited(spec: TaskSpec, path: Path, text: str, delimiter: str, require_labels: bool):
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting)
    rows = [(i + 1, r) for i, r in enumerate(reader) if r and any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path} is empty")
    first = [c.strip() for c in rows[0][1]]
    header = first
    body = rows[1:]
    if _pick_schema(spec, first, require_labels) is None:
        headerless = next((s for s in spec.schemas if s.names and len(s.names) == len(first)), None)
        if headerless is not None:
            header, body = list(headerless.names), rows
        elif spec.kind == "lm" and len(first) == 1:
            header, body = ["text"], rows
        elif spec.kind not in ("lm", "qa"):
            kind = "tab" if delimiter == "\t" else "comma"
            raise DataError(
                f"{path}: wrong or missing columns for task {spec.name}: expected {_expected(spec, require_labels)}; "
                f"found {kind}-separated columns {first[:12]}"
            )
    if not body:
        raise DataError(f"{path} has a header but no data rows")
    records = []
    for lineno, r in body:
        if len(r) != len(header):
            raise DataError(
                f"{path}:{lineno}: malformed row with {len(r)} fields, expected {len(header)} "
                f"({', '.join(header[:8])}); GLUE TSVs must be read without quote handling and have one "
                "row per line"
            )
        records.append(dict(zip(header, r)))
    return header, records, body[0][0]


def _parse_json(path: Path, text: str, suffix: str) -> tuple[list[str], list[dict]]:
    obj: Any = None
    if suffix == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # a .json file written as JSON lines (datasets' to_json) is fine
                raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if obj is None:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: line is not valid JSON ({exc.msg}, column {exc.colno}): "
                                f"{line[:80]!r}") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{i}: each JSON line must be an object with the task's fields")
            records.append(rec)
    else:
        records = _json_records(path, obj)
    if not records:
        raise DataError(f"{path} has no records")
    columns = list(dict.fromkeys(k for r in records[:100] for k in r))
    return columns, records


def _json_records(path: Path, obj: Any) -> list[dict]:
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        data = obj["data"]
        if data and isinstance(data[0], dict) and "paragraphs" in data[0]:
            return _flatten_squad(path, data)
        obj = data
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        n = {len(v) for v in obj.values()}
        if len(n) != 1:
            raise DataError(f"{path}: the column lists have different lengths {sorted(n)}")
        keys = list(obj)
        return [dict(zip(keys, vals)) for vals in zip(*obj.values())]
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        return obj
    raise DataError(f"{path}: expected a list of records, a dict of columns, JSON lines, or the SQuAD "
                    "{'data': [articles]} format")


def _flatten_squad(path: Path, articles: list) -> list[dict]:
    records = []
    try:
        for art in articles:
            for para in art["paragraphs"]:
                for qa in para["qas"]:
                    answers = qa.get("answers", [])
                    records.append({
                        "id": str(qa["id"]), "title": art.get("title", ""), "context": para["context"],
                        "question": qa["question"],
                        "answers": {"text": [a["text"] for a in answers],
                                    "answer_start": [int(a["answer_start"]) for a in answers]},
                    })
    except (KeyError, TypeError) as exc:
        raise DataError(f"{path}: malformed SQuAD JSON (missing {exc}); expected data -> paragraphs -> "
                        "context / qas -> id, question, answers") from exc
    return records


def _lm_column(spec: TaskSpec, columns: Sequence[str], source: str) -> str:
    for s in spec.schemas:
        if s.text_a in columns:
            return s.text_a
    raise DataError(f"{source}: wrong or missing columns for task {spec.name}: expected a text column "
                    f"{' or '.join(repr(s.text_a) for s in spec.schemas)}; found {list(columns)[:12]}")


def _as_lines(texts: Iterable[str]) -> list[str]:
    # hub wikitext rows end in "\n", ptb rows do not: rebuild the file text either way
    return [t if t.endswith("\n") else t + "\n" for t in texts]


def _glue_rows(spec: TaskSpec, columns: Sequence[str], records: list[dict], source: str, require_labels: bool,
               first_line: int | None) -> tuple[list[dict], bool]:
    schema = _pick_schema(spec, columns, require_labels)
    if schema is None:
        schema = next((s for s in spec.schemas if s.names and list(s.names) == list(columns)), None)
    if schema is None:
        raise DataError(f"{source}: wrong or missing columns for task {spec.name}: expected "
                        f"{_expected(spec, require_labels)}; found {list(columns)[:12]}")
    use_label = schema.label is not None and schema.label in columns
    rows = []
    for i, rec in enumerate(records):
        where = f"{source}:{first_line + i}" if first_line is not None else f"{source} (row {i})"
        a = rec.get(schema.text_a)
        if a is None:
            raise DataError(f"{where}: missing {schema.text_a!r}")
        row: dict[str, Any] = {"text_a": str(a)}
        if schema.text_b:
            b = rec.get(schema.text_b)
            if b is None:
                raise DataError(f"{where}: missing {schema.text_b!r}")
            row["text_b"] = str(b)
        if use_label:
            row["label"] = _convert_label(spec, schema, rec.get(schema.label), where, require_labels)
        rows.append(row)
    if not rows:
        raise DataError(f"{source} has no data rows")
    return rows, use_label


def _convert_label(spec: TaskSpec, schema: ColumnSchema, value: Any, where: str, strict: bool) -> Any:
    try:
        if spec.kind == "regression":
            return float(value)
        if isinstance(value, str):
            v = value.strip()
            if schema.label_map and v in schema.label_map:
                return schema.label_map[v]
            label = int(v)  # numeric strings also for mapped tasks (a file already converted to ids)
        else:
            label = int(value)
    except (TypeError, ValueError):
        allowed = (", ".join(schema.label_map) if schema.label_map else
                   "a number" if spec.kind == "regression" else f"0..{spec.num_labels - 1}")
        raise DataError(f"{where}: bad label {value!r} in column {schema.label!r}: expected {allowed}") from None
    if strict and not 0 <= label < spec.num_labels:
        raise DataError(f"{where}: label {label} out of range 0..{spec.num_labels - 1} for task {spec.name} "
                        "(hidden test labels are -1: use the dev split)")
    return label


def _qa_rows(spec: TaskSpec, records: list[dict], source: str, require_labels: bool) -> list[dict]:
    if not records:
        raise DataError(f"{source} has no records")
    needed = ("question", "context") + (("answers",) if require_labels else ())
    missing = [c for c in needed if c not in records[0]]
    if missing:
        raise DataError(f"{source}: wrong or missing columns for task {spec.name}: expected "
                        f"{', '.join(repr(c) for c in needed)} (and 'id'); found {list(records[0])[:12]}")
    rows = []
    for i, rec in enumerate(records):
        ans = rec.get("answers") or {"text": [], "answer_start": []}
        if isinstance(ans, list):  # [{"text":..., "answer_start":...}, ...]
            ans = {"text": [a["text"] for a in ans], "answer_start": [int(a["answer_start"]) for a in ans]}
        if not isinstance(ans, dict) or "text" not in ans or "answer_start" not in ans:
            raise DataError(f"{source} (record {i}): 'answers' must be {{'text': [...], 'answer_start': [...]}}")
        if require_labels and not ans["text"] and spec.name != "squad_v2":
            raise DataError(f"{source} (record {i}): question without answers; SQuAD v1.1 needs at least one "
                            "(use task squad_v2 for unanswerable questions)")
        rows.append({"id": str(rec.get("id", i)), "question": str(rec["question"]), "context": str(rec["context"]),
                     "answers": {"text": list(ans["text"]), "answer_start": [int(s) for s in ans["answer_start"]]}})
    return rows


# ------------------------------------------------------------------------------------------ tokenizing


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS (GPT-2 has no pad token), else 0.
    Padding positions are masked out, so the choice never changes results."""
    for tid in (tokenizer.pad_token_id, getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    return 0


def check_max_length(max_length: int, tokenizer=None, max_positions: int | None = None) -> int:
    """Validate a sequence length: positive and not beyond the model's position embeddings
    (``max_positions``, else the tokenizer's ``model_max_length`` when it is a real limit)."""
    if not isinstance(max_length, int) or max_length <= 0:
        raise InputError(f"max length must be a positive integer, got {max_length!r}")
    limit = max_positions
    if limit is None and tokenizer is not None:
        tml = getattr(tokenizer, "model_max_length", None)
        if isinstance(tml, int) and 0 < tml < 1_000_000:
            limit = tml
    if limit is not None and max_length > limit:
        raise InputError(f"max length {max_length} is longer than the model's {limit} positions; "
                         f"use --max-length {limit} or less")
    return max_length


def task_max_length(spec: TaskSpec, max_length: int | None, tokenizer=None, max_positions: int | None = None,
                    warns: list[str] | None = None) -> int:
    """The sequence length to use: ``max_length`` when given (validated by :func:`check_max_length`),
    else the task's default, shortened with a warning to the model's positions when the model is
    shorter (a user who asked for nothing should not get an error about a length they never chose)."""
    if max_length is not None:
        return check_max_length(max_length, tokenizer, max_positions)
    default = spec.max_length
    if max_positions is not None and 0 < max_positions < default:
        msg = (f"task {spec.name}'s default max length {default} is longer than the model's {max_positions} "
               f"positions: using {max_positions}")
        logger.warning(msg)
        if warns is not None:
            warns.append(msg)
        default = max_positions
    return check_max_length(default, tokenizer, max_positions)


def _encode_rows(spec: TaskSpec, tokenizer, rows: Sequence[dict], max_length: int,
                 with_labels: bool) -> list[dict]:
    feats: list[dict] = []
    step = 1000
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        a = [r["text_a"] for r in chunk]
        b = [r["text_b"] for r in chunk] if spec.is_pair else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        for j, row in enumerate(chunk):
            f = {k: list(enc[k][j]) for k in keys}
            if "attention_mask" not in f:
                f["attention_mask"] = [1] * len(f["input_ids"])
            if with_labels:
                f["labels"] = row["label"]
            feats.append(f)
    return feats


def _qa_encode(tokenizer, rows: Sequence[dict], max_length: int, stride: int, *, train: bool):
    """Question+context features as Hugging Face's run_qa builds them. Returns (features,
    feature->example index, offsets with None outside the context)."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("question answering needs a fast tokenizer (offset mappings); load one with use_fast=True")
    stride = min(stride, max(1, max_length // 3))
    cls_id = tokenizer.cls_token_id
    feats, fmap, offsets_all = [], [], []
    step = 256
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        try:
            enc = tokenizer([r["question"].lstrip() for r in chunk], [r["context"] for r in chunk],
                            truncation="only_second", max_length=max_length, stride=stride,
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        except Exception as exc:  # tokenizers raises when a question leaves no room for the context
            raise DataError(f"could not build question/context features with max length {max_length}: {exc}; "
                            "use a larger --max-length (384 is the default)") from exc
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        for i in range(len(enc["input_ids"])):
            ex = start + enc["overflow_to_sample_mapping"][i]
            seq_ids = enc.sequence_ids(i)
            offsets = enc["offset_mapping"][i]
            f = {k: list(enc[k][i]) for k in keys}
            if train:
                ids = f["input_ids"]
                cls_index = ids.index(cls_id) if cls_id in ids else 0
                answers = rows[ex]["answers"]
                s_pos = e_pos = cls_index
                if answers["answer_start"]:
                    start_char = answers["answer_start"][0]
                    end_char = start_char + len(answers["text"][0])
                    ts = 0
                    while seq_ids[ts] != 1:
                        ts += 1
                    te = len(ids) - 1
                    while seq_ids[te] != 1:
                        te -= 1
                    if offsets[ts][0] <= start_char and offsets[te][1] >= end_char:
                        while ts < len(offsets) and offsets[ts][0] <= start_char:
                            ts += 1
                        s_pos = ts - 1
                        while offsets[te][1] >= end_char:
                            te -= 1
                        e_pos = te + 1
                f["start_positions"] = s_pos
                f["end_positions"] = e_pos
            feats.append(f)
            fmap.append(ex)
            offsets_all.append([tuple(o) if seq_ids[k] == 1 else None for k, o in enumerate(offsets)])
    return feats, fmap, offsets_all


def _lm_blocks(tokenizer, lines: Sequence[str], block: int, chunk_order: Iterable[int] | None = None,
               stop_after: int | None = None) -> list[list[int]]:
    """Token blocks of length ``block``: lines are joined per 1000-line chunk, tokenized, and cut; the
    remainder of each chunk is dropped (as the reference). ``chunk_order`` / ``stop_after`` let
    calibration tokenize chunks in a random order and stop once it has enough blocks."""
    n_chunks = math.ceil(len(lines) / LM_CHUNK_LINES)
    order = range(n_chunks) if chunk_order is None else chunk_order
    blocks: list[list[int]] = []
    for c in order:
        text = "".join(lines[c * LM_CHUNK_LINES:(c + 1) * LM_CHUNK_LINES])
        if not text.strip():
            continue
        ids = tokenizer(text, verbose=False)["input_ids"]
        blocks.extend(ids[i:i + block] for i in range(0, len(ids) - block + 1, block))
        if stop_after is not None and len(blocks) >= stop_after:
            break
    return blocks


class PadCollator:
    """Pads a list of features per batch (dynamic padding) into tensors. ``input_ids`` get the pad id,
    ``attention_mask`` / ``token_type_ids`` zeros; GPT-2-style left padding is honoured; labels are
    stacked (float for regression). Keys it does not know are ignored."""

    def __init__(self, tokenizer=None, *, pad_id: int | None = None, padding_side: str | None = None,
                 float_labels: bool = False) -> None:
        self.pad_id = pad_id if pad_id is not None else (pad_token_id(tokenizer) if tokenizer is not None else 0)
        self.left = (padding_side or getattr(tokenizer, "padding_side", "right")) == "left"
        self.float_labels = float_labels

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", self.pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in features[0]:
                continue
            rows = []
            for f in features:
                pad = [fill] * (width - len(f[key]))
                rows.append(pad + list(f[key]) if self.left else list(f[key]) + pad)
            out[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            if isinstance(labels[0], list):  # LM blocks: all the same length
                out["labels"] = torch.tensor(labels, dtype=torch.long)
            else:
                out["labels"] = torch.tensor(labels, dtype=torch.float32 if self.float_labels else torch.long)
        for key in ("start_positions", "end_positions"):
            if key in features[0]:
                out[key] = torch.tensor([f[key] for f in features], dtype=torch.long)
        return out


# ----------------------------------------------------------------------------------------- calibration


@dataclass
class CalibrationData:
    """Calibration batches (labels dropped) and what they are: ``num_samples`` rows actually used
    (features for SQuAD, token blocks for LM), ``requested_samples``, ``mean_length`` (mean non-padding
    tokens per sample), ``source``, ``max_length`` and any ``warnings`` (also logged)."""

    batches: list[dict[str, torch.Tensor]]
    num_samples: int
    mean_length: float
    source: str
    requested_samples: int
    max_length: int
    task: str
    warnings: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Non-padding tokens in all batches."""
        return int(sum(int(b["attention_mask"].sum()) for b in self.batches))


def _sample(n: int, samples: int, seed: int, what: str, source: str, warns: list[str]) -> list[int]:
    if n >= samples:
        return [int(i) for i in np.random.default_rng(seed).choice(n, size=samples, replace=False)]
    msg = f"{source} has only {n} {what}, fewer than the {samples} requested: using all {n}, in order"
    logger.warning(msg)
    warns.append(msg)
    return list(range(n))


def calibration_batches(task: str | TaskSpec, tokenizer, *, data: str | Path | None = None, samples: int = 3000,
                        max_length: int | None = None, seed: int = 0, batch_size: int = 32,
                        max_positions: int | None = None) -> CalibrationData:
    """Label-free calibration batches from the task's train split (paper: 3K random training samples).

    A seeded random sample of ``samples`` rows without replacement (in random order), or all rows in
    order plus a warning when the split is smaller. ``max_length`` defaults to the task's (128; SST-2
    64; SQuAD 384; LM blocks 512) and must not exceed ``max_positions`` (the model's position
    embeddings; the tokenizer's ``model_max_length`` when not given). Batches of ``batch_size`` are
    padded per batch and hold ``input_ids``, ``attention_mask`` and, when the tokenizer makes them,
    ``token_type_ids``. SQuAD samples are question+context features; LM samples are token blocks of
    ``max_length`` (text joined per 1000 lines; for large corpora the chunks are visited in a seeded
    random order and tokenizing stops once enough blocks exist)."""
    spec = get_task(task)
    if not isinstance(samples, int) or samples <= 0:
        raise InputError(f"the number of calibration samples must be a positive integer, got {samples!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch size must be a positive integer, got {batch_size!r}")
    warns: list[str] = []
    max_length = task_max_length(spec, max_length, tokenizer, max_positions, warns)
    raw = load_split(spec, "train", data=data, require_labels=False)
    if spec.kind == "lm":
        rng = np.random.default_rng(seed)
        n_chunks = math.ceil(len(raw.lines) / LM_CHUNK_LINES)
        order = [int(c) for c in rng.permutation(n_chunks)]
        blocks = _lm_blocks(tokenizer, raw.lines, max_length, order, stop_after=samples)
        if len(blocks) >= samples:
            idx = rng.choice(len(blocks), size=samples, replace=False)
            feats = [{"input_ids": blocks[int(i)], "attention_mask": [1] * max_length} for i in idx]
        else:
            blocks = _lm_blocks(tokenizer, raw.lines, max_length)  # corpus order, as the reference
            if not blocks:
                raise DataError(f"{raw.source} has fewer than {max_length} tokens: no calibration block fits; "
                                "use a smaller --max-length or more text")
            _sample(len(blocks), samples, seed, f"blocks of {max_length} tokens", raw.source, warns)
            feats = [{"input_ids": b, "attention_mask": [1] * max_length} for b in blocks]
    elif spec.kind == "qa":
        order = [int(i) for i in np.random.default_rng(seed).permutation(len(raw.rows))]
        feats = []
        for start in range(0, len(order), 512):  # tokenize questions in random order until enough features
            rows = [raw.rows[i] for i in order[start:start + 512]]
            feats.extend(_qa_encode(tokenizer, rows, max_length, QA_STRIDE, train=False)[0])
            if len(feats) >= samples:
                break
        if len(feats) >= samples:
            feats = feats[:samples]
        else:
            feats = _qa_encode(tokenizer, raw.rows, max_length, QA_STRIDE, train=False)[0]
            _sample(len(feats), samples, seed, "question/context features", raw.source, warns)
    else:
        idx = _sample(len(raw.rows), samples, seed, "rows", raw.source, warns)
        feats = _encode_rows(spec, tokenizer, [raw.rows[i] for i in idx], max_length, with_labels=False)
    collate = PadCollator(tokenizer)
    batches = [collate(feats[i:i + batch_size]) for i in range(0, len(feats), batch_size)]
    lengths = [sum(f["attention_mask"]) for f in feats]
    return CalibrationData(
        batches=batches, num_samples=len(feats), mean_length=float(np.mean(lengths)) if lengths else 0.0,
        source=raw.source, requested_samples=samples, max_length=max_length, task=spec.name, warnings=warns,
    )


# -------------------------------------------------------------------------------- train / eval datasets


class TaskDataset(torch.utils.data.Dataset):
    """A tokenized split for fine-tuning and evaluation: ``features`` (model inputs plus ``labels``, or
    ``start_positions`` / ``end_positions`` for QA) and what is needed to score predictions:
    ``references`` (gold labels; gold answer texts per question for QA), and for QA ``examples``,
    ``feature_example`` (feature -> example index) and ``offsets`` (character spans, None outside
    the context). Use :class:`PadCollator` (``collator()``) to batch it."""

    def __init__(self, task: TaskSpec, split: str, source: str, features: list[dict], *, references: list,
                 num_examples: int, examples: list[dict] | None = None, feature_example: list[int] | None = None,
                 offsets: list | None = None, max_length: int = 0, pad_id: int = 0) -> None:
        self.task, self.split, self.source = task, split, source
        self.features, self.references, self.num_examples = features, references, num_examples
        self.examples, self.feature_example, self.offsets = examples, feature_example, offsets
        self.max_length, self.pad_id = max_length, pad_id

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return self.features[i]

    def collator(self, tokenizer=None) -> PadCollator:
        """The padding collator for this dataset (float labels for regression)."""
        return PadCollator(tokenizer, pad_id=None if tokenizer is not None else self.pad_id,
                           float_labels=self.task.kind == "regression")

    @property
    def mean_length(self) -> float:
        """Mean non-padding tokens per feature."""
        return float(np.mean([sum(f["attention_mask"]) for f in self.features])) if self.features else 0.0


def _limit_indices(n: int, limit: int | None, seed: int | None) -> list[int]:
    if limit is None or limit >= n:
        return list(range(n))
    if limit <= 0:
        raise InputError(f"limit must be a positive integer, got {limit}")
    if seed is None:
        return list(range(limit))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=limit, replace=False))


def load_task_dataset(task: str | TaskSpec, tokenizer, split: str = "dev", *, data: str | Path | None = None,
                      max_length: int | None = None, limit: int | None = None, limit_seed: int | None = None,
                      max_positions: int | None = None) -> TaskDataset:
    """Tokenize one split with labels kept, for fine-tuning (``split="train"``) and evaluation
    (``"dev"``; ``"test"`` for LM). ``limit`` keeps the first N examples (or a seeded random subset
    when ``limit_seed`` is given) for quick runs; for QA it counts questions, for LM blocks of
    ``max_length`` tokens (the text is joined per 1000 lines and cut, as for calibration)."""
    spec = get_task(task)
    split = _split_name(split)
    max_length = task_max_length(spec, max_length, tokenizer, max_positions)
    raw = load_split(spec, split, data=data, require_labels=True)
    pad = pad_token_id(tokenizer)
    if spec.kind == "lm":
        blocks = _lm_blocks(tokenizer, raw.lines, max_length)
        if not blocks:
            raise DataError(f"{raw.source} has fewer than {max_length} tokens; use a smaller --max-length")
        blocks = [blocks[i] for i in _limit_indices(len(blocks), limit, limit_seed)]
        feats = [{"input_ids": b, "attention_mask": [1] * len(b), "labels": list(b)} for b in blocks]
        return TaskDataset(spec, split, raw.source, feats, references=[], num_examples=len(feats),
                           max_length=max_length, pad_id=pad)
    if not raw.has_labels:
        raise DataError(f"{raw.source} has no label column; fine-tuning and evaluation need labels")
    rows = [raw.rows[i] for i in _limit_indices(len(raw.rows), limit, limit_seed)]
    if spec.kind == "qa":
        feats, fmap, offsets = _qa_encode(tokenizer, rows, max_length, QA_STRIDE, train=True)
        refs = [r["answers"]["text"] for r in rows]
        return TaskDataset(spec, split, raw.source, feats, references=refs, num_examples=len(rows), examples=rows,
                           feature_example=fmap, offsets=offsets, max_length=max_length, pad_id=pad)
    feats = _encode_rows(spec, tokenizer, rows, max_length, with_labels=True)
    return TaskDataset(spec, split, raw.source, feats, references=[r["label"] for r in rows],
                       num_examples=len(rows), max_length=max_length, pad_id=pad)


def lm_token_ids(task: str | TaskSpec, tokenizer, split: str = "test", *, data: str | Path | None = None) -> torch.Tensor:
    """The whole text of an LM split as one [1, n] tensor of token ids, for strided perplexity
    (:func:`ppkit.metrics.perplexity`)."""
    spec = get_task(task)
    if spec.kind != "lm":
        raise InputError(f"task {spec.name} is not a language-modelling task")
    raw = load_split(spec, split, data=data)
    ids = tokenizer(raw.text, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise DataError(f"{raw.source} has fewer than 2 tokens")
    return torch.tensor([ids], dtype=torch.long)


def postprocess_qa(dataset: TaskDataset, start_logits: np.ndarray, end_logits: np.ndarray, *, n_best: int = 20,
                   max_answer_length: int = 30, null_threshold: float = 0.0) -> list[str]:
    """Answer text per question from per-feature start/end logits, as Hugging Face's run_qa does: the
    best valid span (inside the context, end >= start, at most ``max_answer_length`` tokens) over all
    features of a question; for SQuAD v2 the empty answer wins when the null score (CLS start + end)
    beats the best span by more than ``null_threshold``."""
    if dataset.examples is None or dataset.feature_example is None or dataset.offsets is None:
        raise InputError("postprocess_qa needs a QA dataset from load_task_dataset")
    v2 = dataset.task.name == "squad_v2"
    best: list[tuple[float, str]] = [(-math.inf, "")] * len(dataset.examples)
    null: list[float] = [math.inf] * len(dataset.examples)
    for fi, ex in enumerate(dataset.feature_example):
        s_log, e_log, offs = start_logits[fi], end_logits[fi], dataset.offsets[fi]
        n = len(offs)
        s_log, e_log = s_log[:n], e_log[:n]
        null[ex] = min(null[ex], float(s_log[0] + e_log[0]))
        s_idx = np.argsort(s_log)[-1:-n_best - 1:-1]
        e_idx = np.argsort(e_log)[-1:-n_best - 1:-1]
        context = dataset.examples[ex]["context"]
        for s in s_idx:
            for e in e_idx:
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer_length:
                    continue
                score = float(s_log[s] + e_log[e])
                if score > best[ex][0]:
                    best[ex] = (score, context[offs[s][0]:offs[e][1]])
    out = []
    for ex, (score, text) in enumerate(best):
        if v2 and (score == -math.inf or null[ex] > score + null_threshold):
            out.append("")
        else:
            out.append(text)
    return out
