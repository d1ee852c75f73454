"""Loading pre-trained (or ppkit-pruned) BERT / GPT-2 models and their tokenizers.

Local directories are preferred; a hub name is used from the local cache or, when the hub is
reachable, downloaded. Without network a hub name fails fast with :class:`ModelLoadError` (the
hub client would otherwise retry for ~25 s). Pickled ``.bin`` weights are refused unless
``allow_pickle=True``, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from torch import nn

from .adapters import FAMILIES, get_adapter, supported_classes
from .errors import InputError, ModelLoadError, UnsupportedModelError
from .saving import (
    HEAD_CLASSES,
    WEIGHT_ERRORS,
    class_for_head,
    damaged_hint,
    is_pruned_dir,
    load_pruned,
    one_line,
    quiet_transformers,
)

log = logging.getLogger(__name__)

HEADS = ("base", "sequence-classification", "question-answering", "causal-lm", "masked-lm", "token-classification")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_PROBE_TIMEOUT_S = 3.0


def _offline_msg(name: str) -> str:
    return (
        f"model {name!r} is not a local directory and could not be downloaded (offline?): "
        "pass a local path to a model directory"
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def _local_dir(name_or_path: str | Path) -> Path | None:
    """The local directory meant by ``name_or_path``, None for a hub name; ModelLoadError for a missing path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file, not a model directory")
        return path
    if isinstance(name_or_path, Path) or _looks_like_path(text):
        raise ModelLoadError(f"model path not found: {text}")
    return None


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def _hub_reachable() -> bool:
    # huggingface_hub retries failed connections with back-off (~25 s); one short TCP connect tells
    # us up front whether trying makes sense. It runs in a daemon thread because name resolution is
    # not bounded by the socket timeout. Behind a proxy a direct connect says nothing, so trust it.
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="ppkit-hub-probe", daemon=True)
    thread.start()
    thread.join(_HUB_PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])


def _from_hub(name: str, load: Callable[[bool], Any]) -> Any:
    """Call ``load(local_files_only)``: from the cache first, then from the hub if it is reachable."""
    try:
        return load(True)
    except (OSError, ValueError) as exc:
        log.debug("%s not usable from the local cache: %s", name, exc)
    if _hub_offline() or not _hub_reachable():
        raise ModelLoadError(_offline_msg(name))
    try:
        return load(False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {name!r} from the hub: {exc}") from exc


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_path}: {exc}") from exc


def _family(model_type: str | None, where: str) -> str:
    if not model_type:
        raise ModelLoadError(f"{where}: config.json has no \"model_type\", so it is not a transformers model configuration")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{where} is a {model_type!r} model, which ppkit does not support; supported model types: "
            f"{', '.join(FAMILIES)} (classes: {', '.join(supported_classes())})"
        )
    return str(model_type)


def _check_weights(path: Path, allow_pickle: bool) -> None:
    files = [p.name for p in path.iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files):
        return
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if not pickled:
        raise ModelLoadError(f"{path} has no model weights (expected model.safetensors)")
    if not allow_pickle:
        raise ModelLoadError(
            f"{path} has only pickled weights ({', '.join(sorted(pickled))}); loading pickle can run arbitrary "
            "code, so ppkit refuses it. Convert the weights to safetensors, or pass allow_pickle=True "
            "(--allow-pickle) if you trust the source"
        )


def load_model(
    name_or_path: str | Path,
    head: str = "base",
    num_labels: int | None = None,
    allow_pickle: bool = False,
    pooling: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a supported BERT / GPT-2 model (eval mode) from a local directory or a hub name.

    ``head`` picks the task head: "base", "sequence-classification", "question-answering",
    "causal-lm" (GPT-2), "masked-lm" (BERT) or "token-classification"; a head missing from the
    checkpoint is newly initialised (``num_labels`` outputs for classification). A directory written by
    :func:`ppkit.saving.save_pruned` is loaded with :func:`ppkit.saving.load_pruned`. Raises
    :class:`ModelLoadError` (missing path, not a model directory, offline hub name, pickled weights
    without ``allow_pickle``), :class:`UnsupportedModelError` (other architectures) or
    :class:`InputError` (unknown head). ``pooling`` ("cls" or "mean", BERT sequence classification
    only) loads ppkit's classifier class and sets ``config.ppkit_pooling``. ``kwargs`` go to
    ``from_pretrained``.
    """
    if head not in HEADS:
        raise InputError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if pooling is not None:
        from .modeling_pruned import POOLINGS

        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if head != "sequence-classification":
            raise InputError(f"pooling applies to the sequence-classification head, not {head!r}")
    if num_labels is not None:
        if int(num_labels) < 1:
            raise InputError(f"num_labels must be positive, got {num_labels}")
        kwargs["num_labels"] = int(num_labels)
    local = _local_dir(name_or_path)
    if local is not None:
        config = _read_config(local)
        if is_pruned_dir(local):
            model = load_pruned(local, head=head, **kwargs)
            if pooling is not None:
                _model_class(get_adapter(model).family, head, pooling)  # refuses pooling on GPT-2
                model.config.ppkit_pooling = pooling
            return model
        family = _family(config.get("model_type"), str(local))
        cls = _model_class(family, head, pooling)
        _check_weights(local, allow_pickle)
        try:
            with quiet_transformers():
                model = cls.from_pretrained(local, use_safetensors=None if allow_pickle else True, **kwargs)
        except WEIGHT_ERRORS as exc:
            raise ModelLoadError(f"cannot load the model in {local}: {one_line(exc)}{damaged_hint(exc)}") from exc
    else:
        name = str(name_or_path)

        def load(local_only: bool) -> nn.Module:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name, local_files_only=local_only)
            cls = _model_class(_family(config.model_type, name), head, pooling)
            with quiet_transformers():
                return cls.from_pretrained(
                    name, local_files_only=local_only, use_safetensors=None if allow_pickle else True, **kwargs
                )

        model = _from_hub(name, load)
    get_adapter(model)  # e.g. cross-attention configs are refused here
    if pooling is not None:
        model.config.ppkit_pooling = pooling
    return model.eval()


def _model_class(family: str, head: str, pooling: str | None) -> type:
    """The transformers class for ``head``, or ppkit's subclass of it when a pooling is asked for."""
    import transformers

    from .modeling_pruned import PPKIT_CLASSES

    name = class_for_head(family, head)
    if pooling is None:
        return getattr(transformers, name)
    if family != "bert":
        raise InputError(f"--pooling is available for BERT classifiers; {family} keeps its own head")
    return PPKIT_CLASSES[name]


#: a checkpoint's task head, recognised from its architectures (a fine-tuned model keeps it when pruned)
_TASK_HEADS = {"ForSequenceClassification": "sequence-classification", "ForQuestionAnswering": "question-answering",
               "ForTokenClassification": "token-classification"}


def pruning_head(name_or_path: str | Path) -> str:
    """The head a model is pruned with: a fine-tuned task model keeps its task head (classification,
    QA, token classification); GPT-2 keeps its language-modelling head (tied to the input embeddings,
    so it costs no weights, and it is how GPT-2 is used: ``generate``, logits in ONNX); a pre-trained
    BERT body is pruned without a head ("base")."""
    local = _local_dir(name_or_path)
    if local is not None:
        config = _read_config(local)
        model_type, archs = config.get("model_type"), config.get("architectures") or []
    else:
        name = str(name_or_path)
        try:
            from transformers import AutoConfig

            config = _from_hub(name, lambda local_only: AutoConfig.from_pretrained(name, local_files_only=local_only))
        except ModelLoadError:
            return "base"  # load_model reports the offline hub name with its own message
        model_type, archs = config.model_type, getattr(config, "architectures", None) or []
    for arch in archs:
        for suffix, head in _TASK_HEADS.items():
            if str(arch).endswith(suffix):
                return head
    return "causal-lm" if model_type == "gpt2" else "base"


def load_tokenizer(name_or_path: str | Path, **kwargs: Any) -> Any:
    """Load the tokenizer of a model directory (or hub name) with ``AutoTokenizer``.

    A tokenizer without a padding token (GPT-2) gets its end-of-sequence token as padding token, so
    batches can be padded. Raises :class:`ModelLoadError` like :func:`load_model`.
    """
    from transformers import AutoTokenizer

    local = _local_dir(name_or_path)
    if local is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(local, **kwargs)
        except (OSError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"no usable tokenizer in {local} ({exc}); pass the tokenizer directory explicitly") from exc
    else:
        name = str(name_or_path)
        tokenizer = _from_hub(name, lambda local_only: AutoTokenizer.from_pretrained(name, local_files_only=local_only, **kwargs))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


__all__ = ["HEADS", "HEAD_CLASSES", "load_model", "load_tokenizer", "pruning_head"]
