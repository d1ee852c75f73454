"""Files a checkpoint carries beside its weights that ppkit keeps: sentence-transformers metadata and
tokenizer files, and the pooling a checkpoint was trained with.

A sentence-transformers checkpoint (all-MiniLM-L6-v2) describes its embedding pipeline in
``modules.json`` with one folder per module (``1_Pooling/``, ``2_Normalize/``) and its maximum sequence
length in ``sentence_bert_config.json``. A pruned or fine-tuned copy keeps these files so that
``SentenceTransformer(dir)`` rebuilds the same pipeline, and the pooling they name is the default
pooling of a classifier fine-tuned from it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

#: top-level files copied from the source when the output does not have them yet
CARRIED_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "README.md",
                 "vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json", "generation_config.json")
#: sentence-transformers module folders: "1_Pooling", "2_Normalize", ...
_MODULE_DIR = re.compile(r"^\d+_[A-Za-z]\w*$")


def carry_files(source: str | Path | None, out_dir: str | Path) -> list[str]:
    """Copy the carried files and module folders of a local ``source`` directory into ``out_dir``
    (never over a file already there); returns the names copied. A hub name or None copies nothing."""
    if source is None:
        return []
    src, out = Path(str(source)).expanduser(), Path(out_dir)
    if not src.is_dir():
        return []
    copied = []
    for name in CARRIED_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and _MODULE_DIR.match(p.name)):
        if not (out / folder.name).exists():
            shutil.copytree(folder, out / folder.name)
            copied.append(folder.name + "/")
    return copied


def checkpoint_pooling(path: str | Path | None) -> str | None:
    """The pooling a local checkpoint asks for: ``config.json``'s ``ppkit_pooling`` (a ppkit-fine-tuned
    model), else sentence-transformers' ``1_Pooling/config.json`` (``"mean"`` or ``"cls"``); None when
    neither says (a plain BERT: keep its [CLS] pooler) or ``path`` is not a local directory."""
    if path is None:
        return None
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        return None
    config = _read_json(folder / "config.json")
    if config.get("ppkit_pooling"):
        return str(config["ppkit_pooling"])
    pooling = _pooling_config(folder)
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    if pooling.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _pooling_config(folder: Path) -> dict:
    for module in _read_json(folder / "modules.json", default=[]):
        if str(module.get("type", "")).endswith("Pooling"):
            return _read_json(folder / str(module.get("path", "")) / "config.json")
    return {}


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {} if default is None else default
