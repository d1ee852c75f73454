"""Writing pruned models (loading them is :mod:`ppkit.models`' job), and atomic output directories.

A saved pruned model is an ordinary transformers directory (``config.json`` with ``model_type``
bert/gpt2, ``model.safetensors``) plus ``ppkit_heads_per_layer`` / ``ppkit_neurons_per_layer`` /
``ppkit_family`` in the config, ``plan.json``, tokenizer files, and ``modeling_ppkit.py`` (a copy of
:mod:`ppkit.modeling_pruned`) referenced by ``auto_map``, so that
``AutoModel*.from_pretrained(dir, trust_remote_code=True)`` works without ppkit installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from . import modeling_pruned
from .adapters import get_adapter
from .errors import OutputError, PlanError
from .models import PLAN_FILE, WEIGHTS_FILE, quiet_transformers
from .plan import PruningPlan
from .sbert import carry_files

MODELING_FILE = "modeling_ppkit.py"


def hf_class_name(model: nn.Module) -> str:
    """The transformers class a model is (or derives from, for the ``Ppkit*`` classes)."""
    for cls in type(model).__mro__:
        if cls.__name__ in modeling_pruned.PPKIT_CLASSES:
            return cls.__name__
    raise PlanError(f"{type(model).__name__} cannot be saved as a pruned model")


def save_pruned(
    model: nn.Module,
    out_dir: str | Path,
    plan: PruningPlan | None = None,
    tokenizer: Any = None,
    extra_files: dict[str, str] | None = None,
    source: str | Path | None = None,
) -> Path:
    """Write a (pruned) model to ``out_dir`` so that :func:`load_pruned` and remote-code loading rebuild it.

    Writes ``config.json`` (with ``ppkit_*`` fields and ``auto_map``), ``model.safetensors`` (never
    pickle), ``modeling_ppkit.py``, ``plan.json`` when ``plan`` is given (it must match the model's
    current sizes), the tokenizer files when ``tokenizer`` is given, ``extra_files`` (file name ->
    text), and from a local ``source`` directory its sentence-transformers metadata and tokenizer files
    (:func:`ppkit.sbert.carry_files`). ``out_dir`` is created if needed and written in place; wrap the call in
    :func:`atomic_output_dir` for an all-or-nothing write. Returns ``out_dir``.
    """
    out = Path(out_dir)
    adapter = get_adapter(model)
    shape = adapter.shape()
    cls_name = hf_class_name(model)
    if plan is not None:
        plan.validate(shape.num_layers, shape.num_heads, shape.ffn_dim)
        if tuple(plan.heads_per_layer) != shape.heads_per_layer or tuple(plan.neurons_per_layer) != shape.neurons_per_layer:
            raise PlanError(
                "the plan does not match the model: the plan keeps "
                f"{plan.heads_per_layer} heads / {plan.neurons_per_layer} neurons per layer, the model has "
                f"{list(shape.heads_per_layer)} / {list(shape.neurons_per_layer)} (prune the model with this plan first)"
            )
    for name in extra_files or {}:
        if Path(name).name != name or name in {"config.json", WEIGHTS_FILE, MODELING_FILE, PLAN_FILE}:
            raise OutputError(f"extra file name {name!r} must be a plain file name that ppkit does not write itself")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            model.save_pretrained(out)
        config_path = out / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["architectures"] = [cls_name]
        config["ppkit_family"] = adapter.family
        config["ppkit_heads_per_layer"] = list(shape.heads_per_layer)
        config["ppkit_neurons_per_layer"] = list(shape.neurons_per_layer)
        config["auto_map"] = dict(modeling_pruned.AUTO_MAP[adapter.family])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        shutil.copyfile(modeling_pruned.__file__, out / MODELING_FILE)
        if plan is not None:
            plan.to_json(out / PLAN_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        for name, text in (extra_files or {}).items():
            (out / name).write_text(text, encoding="utf-8")
        carry_files(source, out)
        _default_file_modes(out)
    except OSError as exc:
        raise OutputError(f"cannot write the pruned model to {out}: {exc}") from exc
    if not (out / WEIGHTS_FILE).is_file():
        raise OutputError(f"transformers did not write {WEIGHTS_FILE} in {out}")
    return out


def _default_file_modes(folder: Path) -> None:
    """Give every file the mode a plain ``open()`` would (0666 less the umask): safetensors writes its
    file through a private temporary file (0600), unlike the other files of the directory."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def check_output_dir(path: str | Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse, before any work starts, an output directory that exists (without ``overwrite``), is a
    file, or cannot be created or written (a parent is a file, no write permission).

    :func:`atomic_output_dir` checks the same when it is entered, but only at the end of a run; this
    preflight lets a command fail in a second instead of after minutes of work.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} exists; choose another {flag} or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a directory")
    check_parent_writable(path, flag)


def check_output_file(path: str | Path | None, flag: str) -> None:
    """:class:`OutputError` unless ``path`` (when given) names a file, not a directory, whose folder
    exists or can be created and is writable."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; give a file name")
    check_parent_writable(path, flag)


def check_parent_writable(path: str | Path, flag: str = "--out") -> None:
    """:class:`OutputError` unless ``path``'s nearest existing ancestor is a writable directory."""
    path = Path(path)
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {path}: {parent} is a file, not a directory; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {parent} (permission denied): choose a writable {flag}")


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` in one rename.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and an existing
    ``path`` is left untouched. Raises :class:`OutputError` if ``path`` exists and ``overwrite`` is
    false, if it is a file, or if the parent directory cannot be written.
    """
    target = Path(path).absolute()
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise OutputError(f"output {target} exists; choose another path or pass overwrite (--overwrite)")
        if not target.is_dir():
            raise OutputError(f"output {target} exists and is not a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
    except OSError as exc:
        raise OutputError(f"cannot create the output directory next to {target}: {exc}") from exc
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    try:
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, backup / target.name)
        os.replace(tmp, target)
    except OSError as exc:
        if backup is not None and not target.exists():
            os.replace(backup / target.name, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot move the finished output to {target}: {exc}") from exc
    finally:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
