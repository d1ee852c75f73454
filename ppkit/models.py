"""Loading pre-trained, fine-tuned or ppkit-pruned models of the supported families and their tokenizers (writing a
pruned model is :mod:`ppkit.saving`'s job).

Local directories are preferred; a hub name is used from the local cache or, when the hub is
reachable, downloaded. Without network a hub name fails fast with :class:`ModelLoadError` (the
hub client would otherwise retry for ~25 s). Pickled ``.bin`` weights are refused unless
``allow_pickle=True``, because unpickling can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from torch import nn

from . import modeling_pruned
from .adapters import FAMILIES, get_adapter
from .errors import InputError, ModelLoadError, PlanError, UnsupportedModelError
from .plan import PruningPlan

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
WEIGHTS_FILE = "model.safetensors"


#: load_model/load_pruned head names -> transformers class name per family
HEAD_CLASSES: dict[str, dict[str, str]] = modeling_pruned.FAMILY_CLASSES


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports while ppkit loads or saves.

    ppkit reports progress itself, and a freshly initialised task head on a pre-trained body is
    expected here, so the multi-line "LOAD REPORT" table is noise for a ppkit user.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_transformers_bars():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


@contextlib.contextmanager
def no_transformers_bars() -> Iterator[None]:
    """Hide transformers' own progress bars (e.g. "Writing model shards" at every Trainer checkpoint),
    which would interleave with ppkit's progress; its warnings still show."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def class_for_head(family: str, head: str) -> str:
    """transformers class name for ``head`` in ``family``; :class:`~ppkit.errors.InputError` if unavailable."""
    heads = HEAD_CLASSES.get(family)
    if heads is None:
        raise InputError(f"unknown model family {family!r}; known: {', '.join(HEAD_CLASSES)}")
    if head not in heads:
        raise InputError(f"head {head!r} is not available for {family} models; available: {', '.join(heads)}")
    return heads[head]


def is_pruned_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory saved by :func:`save_pruned`."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "ppkit_heads_per_layer" in json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_pruned(path: str | Path, head: str | None = None, num_labels: int | None = None, **kwargs: Any) -> nn.Module:
    """Load a directory written by :func:`save_pruned` (eval mode).

    ``head`` (same names as :func:`ppkit.models.load_model`) loads the pruned body under another task
    head, e.g. a pruned pre-trained ``BertModel`` as ``"sequence-classification"`` for fine-tuning
    (the new head is randomly initialised); by default the saved class is used. ``kwargs`` go to
    ``from_pretrained``. Raises :class:`ModelLoadError` if the directory is missing or unreadable and
    :class:`PlanError` if it is not a ppkit-pruned model.
    """
    path = Path(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise ModelLoadError(f"pruned model directory not found: {path}")
    if not config_path.is_file():
        raise ModelLoadError(f"{path} is not a model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {config_path}: {exc}") from exc
    if "ppkit_heads_per_layer" not in config or "ppkit_neurons_per_layer" not in config:
        raise PlanError(f"{path} is not a ppkit-pruned model (config.json has no ppkit_heads_per_layer); use load_model")
    if not (path / WEIGHTS_FILE).is_file():
        raise ModelLoadError(f"{path} has no {WEIGHTS_FILE}")
    family = config.get("ppkit_family") or config.get("model_type")
    if head is None:
        archs = config.get("architectures") or []
        cls_name = archs[0].removeprefix("Ppkit") if archs else class_for_head(family, "base")
    else:
        cls_name = class_for_head(family, head)
    cls = modeling_pruned.PPKIT_CLASSES.get(cls_name)
    if cls is None:
        raise ModelLoadError(f"{path}: saved class {cls_name!r} is not one ppkit can load")
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        with quiet_transformers():
            model = cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except WEIGHT_ERRORS as exc:
        raise ModelLoadError(f"cannot load the pruned model in {path}: {one_line(exc)}{damaged_hint(exc)}") from exc
    shape = get_adapter(model).shape()
    if list(shape.heads_per_layer) != list(config["ppkit_heads_per_layer"]) or list(shape.neurons_per_layer) != list(
        config["ppkit_neurons_per_layer"]
    ):
        raise ModelLoadError(f"{path}: the loaded model does not have the sizes recorded in config.json")
    if (path / PLAN_FILE).is_file():
        check_saved_plan(path / PLAN_FILE, shape)
    return model.eval()


def _weight_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, RuntimeError, KeyError, EOFError]
    try:  # a truncated or garbled safetensors file raises safetensors' own error type
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors comes with transformers
        pass
    return tuple(errors)


#: what loading damaged weights raises (turned into ModelLoadError by the loaders)
WEIGHT_ERRORS = _weight_errors()


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (transformers' messages span several)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:400] + "..."


def damaged_hint(exc: BaseException) -> str:
    """A hint for errors that mean the weights file itself is damaged (truncated copy, disk full)."""
    name = type(exc).__name__
    text = str(exc).lower()
    if name == "SafetensorError" or "deserializ" in text or "incomplete" in text or "truncat" in text:
        return " (the weights file is damaged or truncated: copy or re-create the model directory)"
    return ""


def check_saved_plan(plan_path: Path, shape: Any) -> PruningPlan:
    """Read ``plan.json`` beside pruned weights and check it against the loaded model's shape.

    A plan edited by hand into something invalid (out-of-range or unsorted indices, wrong layer
    count, counts that differ from the weights) raises :class:`PlanError` naming the file, instead
    of being trusted by whatever reads the plan later (reports, export, fine-tuning).
    """
    try:
        plan = PruningPlan.from_json(plan_path)
    except PlanError as exc:
        raise PlanError(f"{plan_path} is not a valid pruning plan: {exc}; restore the file or delete it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"cannot read {plan_path}: {exc}") from None
    try:
        plan.validate(shape.num_layers, shape.num_heads, shape.ffn_dim)
    except PlanError as exc:
        raise PlanError(f"{plan_path} does not fit the saved model: {exc}; restore the file or delete it") from None
    if plan.heads_per_layer != list(shape.heads_per_layer) or plan.neurons_per_layer != list(shape.neurons_per_layer):
        raise PlanError(
            f"{plan_path} does not match the saved weights: it keeps {plan.heads_per_layer} heads / "
            f"{plan.neurons_per_layer} neurons per layer, the weights have {list(shape.heads_per_layer)} / "
            f"{list(shape.neurons_per_layer)}; restore the file or delete it"
        )
    return plan



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
            f"{', '.join(FAMILIES)}"
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
    """Load a supported model (any family in :data:`HEAD_CLASSES`; eval mode) from a local directory or a hub name.

    ``head`` picks the task head: "base", "sequence-classification", "question-answering",
    "causal-lm" (decoders), "masked-lm" (encoders but ELECTRA) or "token-classification"; a head missing from the
    checkpoint is newly initialised (``num_labels`` outputs for classification). A directory written by
    :func:`ppkit.saving.save_pruned` is loaded with :func:`ppkit.models.load_pruned`. Raises
    :class:`ModelLoadError` (missing path, not a model directory, offline hub name, pickled weights
    without ``allow_pickle``), :class:`UnsupportedModelError` (other architectures) or
    :class:`InputError` (unknown head). ``pooling`` ("cls" or "mean", BERT sequence classification
    only) loads ppkit's classifier class and sets ``config.ppkit_pooling``. ``kwargs`` go to
    ``from_pretrained``.
    """
    if head not in HEADS:
        raise InputError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    if pooling is not None:
        if pooling not in modeling_pruned.POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}; choose one of: {', '.join(modeling_pruned.POOLINGS)}")
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

    name = class_for_head(family, head)
    if pooling is None:
        return getattr(transformers, name)
    if family != "bert":
        raise InputError(f"--pooling is available for BERT classifiers; {family} keeps its own head")
    return modeling_pruned.PPKIT_CLASSES[name]


def infer_head(model: nn.Module) -> str:
    """The head name of a transformers model from its class ("base", "sequence-classification", ...)."""
    return head_from_class_name(type(model).__name__)


def head_from_class_name(name: str) -> str:
    """The head name for a model class name such as "BertForSequenceClassification" or "GPT2LMHeadModel"."""
    if name.endswith("ForSequenceClassification"):
        return "sequence-classification"
    if name.endswith("ForQuestionAnswering"):
        return "question-answering"
    if name.endswith(("LMHeadModel", "ForCausalLM")):
        return "causal-lm"
    if name.endswith("ForMaskedLM"):
        return "masked-lm"
    if name.endswith("ForTokenClassification"):
        return "token-classification"
    return "base"


def head_from_config(config: dict[str, Any]) -> str:
    """The head recorded in a config.json dictionary (its first ``architectures`` entry)."""
    archs = config.get("architectures") or []
    if not archs:
        return "base"
    return head_from_class_name(str(archs[0]))


def saved_head(folder: str | Path) -> str | None:
    """The head a checkpoint directory was saved with (:func:`head_from_config` of its config.json), or
    None when there is no readable config.json (a hub name)."""
    try:
        config = json.loads((Path(str(folder)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return head_from_config(config)


#: a checkpoint's task head, recognised from its architectures (a fine-tuned model keeps it when pruned)
_TASK_HEADS = ("sequence-classification", "question-answering", "token-classification")


def pruning_head(name_or_path: str | Path) -> str:
    """The head a model is pruned with: a fine-tuned task model keeps its task head (classification,
    QA, token classification); a decoder (GPT-2, Llama-style) keeps its language-modelling head (how
    decoders are used: ``generate``, logits in ONNX); a pre-trained encoder body is pruned without a
    head ("base")."""
    local = _local_dir(name_or_path)
    if local is not None:
        config = _read_config(local)
    else:
        name = str(name_or_path)
        try:
            from transformers import AutoConfig

            hub = _from_hub(name, lambda local_only: AutoConfig.from_pretrained(name, local_files_only=local_only))
        except ModelLoadError:
            return "base"  # load_model reports the offline hub name with its own message
        config = {"model_type": hub.model_type, "architectures": getattr(hub, "architectures", None)}
    head = head_from_config(config)
    if head in _TASK_HEADS:
        return head
    return "causal-lm" if "causal-lm" in HEAD_CLASSES.get(str(config.get("model_type")), {}) else "base"


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


__all__ = ["HEADS", "HEAD_CLASSES", "head_from_config", "infer_head", "load_model", "load_tokenizer", "pruning_head", "saved_head"]
