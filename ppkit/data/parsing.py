"""Parsing local files and hub tables into canonical rows: GLUE ``text_a`` / ``text_b`` / ``label``, SQuAD
question / context / answers, LM lines. Every problem is a :class:`~ppkit.errors.DataError` naming the file,
the line and the fix (hence no ``datasets`` csv loader here: it reports neither).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from ppkit.errors import DataError
from ppkit.tasks import ColumnSchema, TaskSpec


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


def parse_delimited(spec: TaskSpec, path: Path, text: str, delimiter: str, require_labels: bool):
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


def parse_json(path: Path, text: str, suffix: str) -> tuple[list[str], list[dict]]:
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


def lm_column(spec: TaskSpec, columns: Sequence[str], source: str) -> str:
    for s in spec.schemas:
        if s.text_a in columns:
            return s.text_a
    raise DataError(f"{source}: wrong or missing columns for task {spec.name}: expected a text column "
                    f"{' or '.join(repr(s.text_a) for s in spec.schemas)}; found {list(columns)[:12]}")


def as_lines(texts: Iterable[str]) -> list[str]:
    # hub wikitext rows end in "\n", ptb rows do not: rebuild the file text either way
    return [t if t.endswith("\n") else t + "\n" for t in texts]


def glue_rows(spec: TaskSpec, columns: Sequence[str], records: list[dict], source: str, require_labels: bool,
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


def qa_rows(spec: TaskSpec, records: list[dict], source: str, require_labels: bool) -> list[dict]:
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
