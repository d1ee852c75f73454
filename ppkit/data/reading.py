"""Reading a split: from the Hugging Face hub (``datasets.load_dataset``) or from local files (a GLUE-style
directory or one file), into canonical rows (:class:`RawSplit`).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ppkit.errors import DataError, InputError
from ppkit.tasks import TaskSpec, get_task

from .parsing import (
    as_lines,
    glue_rows,
    lm_column,
    parse_delimited,
    parse_json,
    qa_rows,
)


csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # SQuAD contexts / long TSV fields


SPLITS = ("train", "dev", "test")


_FILE_TYPES = (".tsv", ".csv", ".json", ".jsonl", ".txt", ".tokens", ".raw")


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


def split_name(split: str) -> str:
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
    split = split_name(split)
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
        col = lm_column(spec, columns, source)
        return RawSplit(spec, split, source, lines=as_lines(ds[col]))
    if spec.kind == "qa":
        return RawSplit(spec, split, source, rows=qa_rows(spec, ds.to_list(), source, require_labels),
                        has_labels=require_labels or "answers" in columns)
    rows, has_labels = glue_rows(spec, columns, ds.to_list(), source, require_labels, first_line=None)
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
            return RawSplit(spec, split, source, lines=as_lines(lines))
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
        columns, records, first_line = parse_delimited(spec, path, text, "\t" if suffix == ".tsv" else ",",
                                                        require_labels)
    else:
        columns, records = parse_json(path, text, suffix)
        first_line = None
    if spec.kind == "lm":
        col = lm_column(spec, columns, source)
        return RawSplit(spec, split, source, lines=as_lines(str(r.get(col) or "") for r in records))
    if spec.kind == "qa":
        has = any("answers" in r for r in records)
        return RawSplit(spec, split, source, rows=qa_rows(spec, records, source, require_labels), has_labels=has)
    rows, has_labels = glue_rows(spec, columns, records, source, require_labels, first_line)
    return RawSplit(spec, split, source, rows=rows, has_labels=has_labels)
