"""ONNX export of dense and pruned models, checked against torch with onnxruntime.

Design decisions (measured on torch 2.13 / transformers 5.23 / onnxruntime 1.32):

- The default exporter is the TorchScript one (``torch.onnx.export(..., dynamo=False)``). It exports
  every supported family (including zero-head / zero-neuron layers) with dynamic batch and sequence axes in
  well under a second, needs no extra dependency and prints nothing. ``exporter="dynamo"`` is
  available too (it needs ``onnxscript``, is ~20x slower to export, and is where torch is heading).
- Attention is exported with the *eager* implementation: the traced sdpa path adds NaN guards
  (``IsNaN``/``Where`` per layer) and was not faster under onnxruntime on CPU, so the model's
  attention implementation is switched to eager for the trace and restored afterwards.
- transformers models take keyword arguments, so a small wrapper module with positional
  ``(input_ids, attention_mask[, token_type_ids])`` returning a tuple of tensors is traced.
  GPT-2 is exported without a KV cache (``use_cache=False``).
- Every export is verified: ``onnx.checker`` and onnxruntime against torch on two input sizes that
  differ from the traced one in both batch and sequence length (so the dynamic axes are exercised),
  with one padded row each. The file is written beside the target under a temporary name and
  renamed only after the checks pass, so a failed export leaves the previous file untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ExportError, InputError, ModelLoadError, OutputError
from .machine import available_cores
from .models import head_from_config, infer_head

log = logging.getLogger(__name__)

#: heads understood by :func:`export_onnx` and what the exported graph returns for each
HEAD_OUTPUTS: dict[str, tuple[str, ...]] = {
    "base": ("last_hidden_state",),
    "sequence-classification": ("logits",),
    "question-answering": ("start_logits", "end_logits"),
    "causal-lm": ("logits",),
    "masked-lm": ("logits",),
    "token-classification": ("logits",),
}

#: batch / sequence sizes used to trace the graph (different from both check sizes on purpose)
TRACE_SHAPE = (2, 7)
#: the two (batch, seq) sizes onnxruntime is compared with torch on
CHECK_SHAPES = ((1, 5), (3, 12))


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well onnxruntime matched torch.

    ``max_abs_diff`` is the largest absolute difference over all outputs and both checked input
    sizes (``None`` when ``check=False``); ``seconds`` covers export and checks.
    """

    path: Path
    opset: int
    max_abs_diff: float | None
    inputs: list[str]
    outputs: list[str]
    seconds: float
    head: str = "base"
    family: str = ""
    exporter: str = "torchscript"
    checked_shapes: list[tuple[int, int]] = field(default_factory=list)
    quantization: dict[str, Any] | None = None  # int8 / fp16: its cosine / max diff against the fp32 graph
    optimization: dict[str, Any] | None = None  # fused operators, heads per attention node, max diff to unfused

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["checked_shapes"] = [list(s) for s in self.checked_shapes]
        return data


# ----------------------------------------------------------------------------- model inspection
def is_decoder_model(model: nn.Module) -> bool:
    """True for causal LMs (GPT-2, Llama-style): exported without cache and without token_type_ids."""
    from .modeling_pruned import LLAMA_SHAPED

    config = getattr(model, "config", None)
    return bool(
        getattr(config, "model_type", "") in {"gpt2", *LLAMA_SHAPED} or getattr(config, "is_decoder", False)
    )


def uses_token_type_ids(model: nn.Module) -> bool:
    """Whether the exported graph takes ``token_type_ids`` (BERT-like encoders with segment embeddings)."""
    if is_decoder_model(model):
        return False
    config = getattr(model, "config", None)
    if int(getattr(config, "type_vocab_size", 0) or 0) < 2:
        return False
    return "token_type_ids" in inspect.signature(model.forward).parameters


def max_sequence_length(model: nn.Module) -> int:
    """Largest sequence length the model's position embeddings allow."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return 512


def model_family(model: nn.Module) -> str:
    """Short family name ("bert", "gpt2", ...) from the adapter when one exists, else the config."""
    try:
        from .adapters import get_adapter

        return get_adapter(model).family
    except Exception:  # noqa: BLE001 - any model transformers can run is exportable
        return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def input_names_for(model: nn.Module) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if uses_token_type_ids(model):
        names.append("token_type_ids")
    return names


def sample_inputs(
    model: nn.Module, batch: int, seq: int, *, seed: int = 0, pad_last_row: bool = True
) -> dict[str, torch.Tensor]:
    """Random int64 inputs named like the exported graph's inputs; the last row is right-padded."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (batch, seq), generator=gen, dtype=torch.long)
    mask = torch.ones_like(ids)
    if pad_last_row and batch > 1 and seq > 2:
        mask[-1, seq - seq // 3 :] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    if uses_token_type_ids(model):
        types = torch.zeros_like(ids)
        types[:, seq // 2 :] = 1
        feed["token_type_ids"] = types
    return feed


class _OnnxWrapper(nn.Module):
    """Positional inputs in, a tuple of the head's output tensors out (what the tracer needs)."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_names: Sequence[str], decoder: bool):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.decoder = decoder
        self.extra: dict[str, Any] = {"return_dict": True}
        if decoder and "use_cache" in inspect.signature(model.forward).parameters:
            self.extra["use_cache"] = False

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = dict(zip(self.input_names, args))
        if self.decoder:
            inputs["attention_mask"] = causal_additive_mask(inputs["attention_mask"], self.model.dtype)
        out = self.model(**inputs, **self.extra)
        return tuple(out[name] for name in self.output_names)


def causal_additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype, queries: int | None = None) -> torch.Tensor:
    """The [batch, 1, queries, keys] additive mask a decoder builds from a 2D padding mask over all keys
    (the cached ones first): 0 where a query (the last ``queries`` positions; default all) may attend
    (causal and not padding), the dtype's minimum elsewhere. Built in the exported graph itself:
    transformers passes a 4D mask through unchanged, while its own mask builder in 4.x vmaps, which the
    TorchScript tracer cannot follow."""
    keys = attention_mask.shape[1]
    queries = keys if queries is None else queries
    key_pos = torch.arange(keys, device=attention_mask.device)
    query_pos = torch.arange(queries, device=attention_mask.device) + (keys - queries)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _attention_fixed_at_build(model: nn.Module) -> bool:
    from transformers.models.distilbert import modeling_distilbert

    classes = getattr(modeling_distilbert, "DISTILBERT_ATTENTION_CLASSES", None)  # transformers 4.x only
    return classes is not None and any(isinstance(m, tuple(classes.values())) for m in model.modules())


@contextlib.contextmanager
def attention_implementation(model: nn.Module, implementation: str | None) -> Iterator[None]:
    """Temporarily switch every config in ``model`` to ``implementation`` ("eager", "sdpa"); None: keep.

    Models whose attention modules were fixed when they were built (transformers 4.x DistilBERT picks its
    attention class from the config then, and its forward prepares the mask for that class) are left as
    they are: switching only the config would hand their modules the wrong mask."""
    if implementation is None or _attention_fixed_at_build(model):
        yield
        return
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    saved = {key: cfg._attn_implementation for key, cfg in configs.items()}
    try:
        for cfg in configs.values():
            cfg._attn_implementation = implementation
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation = saved[key]


def select_head(model: nn.Module, head: str | None) -> tuple[nn.Module, str]:
    """The module to export for ``head`` and the head name; ``head="base"`` on a head model exports its body."""
    actual = infer_head(model)
    if head is None or head == actual:
        return model, actual
    if head not in HEAD_OUTPUTS:
        raise InputError(f"unknown head {head!r}; choose one of: {', '.join(HEAD_OUTPUTS)}")
    if head == "base" and getattr(model, "base_model", model) is not model:
        return model.base_model, "base"
    raise InputError(
        f"the model is a {type(model).__name__} ({actual} head) and cannot be exported with head={head!r}; "
        f"export it with head={actual!r} or 'base', or load it with the head you want"
    )


def load_for_export(path: Path, head: str | None, attn_implementation: str | None = "eager") -> nn.Module:
    """Load a model directory (dense or ppkit-pruned) for export, with the head from its config by default,
    built with ``attn_implementation`` (transformers 4.x picks some attention classes, DistilBERT's, when
    the model is built, so switching the config afterwards is not enough there)."""
    if head is None:
        config_file = path / "config.json"
        try:
            head = head_from_config(json.loads(config_file.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not a model directory (cannot read config.json: {exc})") from None
    from .models import load_model

    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    return load_model(str(path), head=head, **kwargs)


# ----------------------------------------------------------------------------- export
def export_onnx(
    model_or_dir: nn.Module | str | Path,
    out_file: str | Path | None = None,
    *,
    opset: int = 17,
    head: str | None = None,
    check: bool = True,
    atol: float = 1e-4,
    exporter: str = "torchscript",
    attn_implementation: str | None = "eager",
    overwrite: bool = False,
    quantize: str | None = None,
    optimize: bool = False,
    min_cosine: float | None = None,
    dtype: str = "fp32",
) -> ExportReport:
    """Export a model (instance or model directory, dense or pruned) to ONNX and verify it.

    Inputs are ``input_ids``, ``attention_mask`` (and ``token_type_ids`` for BERT-like encoders
    with segment embeddings), int64 with dynamic ``batch`` and ``sequence`` axes. Outputs follow the
    head: ``last_hidden_state`` (base), ``logits`` (sequence / token classification, causal / masked
    LM), ``start_logits`` + ``end_logits`` (question answering). GPT-2 is exported without a KV
    cache here (:func:`ppkit.export_past.export_with_past` writes the graph for generation). For a model directory, ``out_file`` defaults to ``<dir>/model.onnx`` and the head to the
    one in its config; a hub name is loaded with :func:`ppkit.models.load_model` (head "base" by
    default); an existing directory as ``out_file`` means ``<out_file>/model.onnx``. With ``check`` the
    graph is validated with ``onnx.checker`` and run with onnxruntime on two input sizes; an
    :class:`ExportError` is raised when outputs differ from torch by more than ``atol``. The file is
    written atomically; ``overwrite=False`` raises :class:`OutputError` if it exists. ``quantize="int8"``
    writes onnxruntime's dynamic int8 quantization of the checked fp32 graph instead (default file
    ``model-int8.onnx``), checked against fp32 by output cosine (at least :data:`ppkit.quantize.MIN_COSINE`).
    ``dtype="fp16"`` writes the half-precision copy instead (for GPUs; default file ``model-fp16.onnx``;
    fp32 inputs and outputs), checked the same way (at least :data:`ppkit.quantize.FP16_MIN_COSINE`).
    ``min_cosine`` replaces either bound (bench, which scores the converted model itself, passes -1). ``optimize``
    applies onnxruntime's transformer fusions with each fused attention node's own head count
    (:mod:`ppkit.ort_optimize`), checked against the unfused graph (``atol``), before quantizing.
    """
    start = time.perf_counter()
    if exporter not in ("torchscript", "dynamo"):
        raise InputError(f"unknown exporter {exporter!r}: use 'torchscript' or 'dynamo'")
    from .quantize import DTYPES, QUANTIZATIONS

    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InputError(f"unknown quantization {quantize!r}: use {', '.join(QUANTIZATIONS)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    if quantize is not None and dtype != "fp32":
        raise InputError(f"--quantize {quantize} quantizes the fp32 graph: leave out --dtype {dtype}")
    precision = quantize or (dtype if dtype != "fp32" else None)  # None: the checked fp32 graph itself
    default_name = "model.onnx" if precision is None else f"model-{precision}.onnx"
    if isinstance(model_or_dir, (str, Path)) and Path(model_or_dir).is_dir():
        source = Path(model_or_dir)
        model = load_for_export(source, head, attn_implementation)
        if out_file is None:
            out_file = source / default_name
    elif isinstance(model_or_dir, (str, Path)):  # a hub name (or a missing path: load_model says which)
        from .models import load_model

        model = load_model(str(model_or_dir), head=head or "base")
        if out_file is None:
            raise InputError(f"out_file is required when exporting {model_or_dir} (not a local directory)")
    elif isinstance(model_or_dir, nn.Module):
        model = model_or_dir
        if out_file is None:
            raise InputError("out_file is required when exporting a model object")
    else:
        raise InputError(f"expected a model or a model directory, got {type(model_or_dir).__name__}")

    target = output_target(out_file, default_name, overwrite)
    module, head_name = select_head(model, head)
    decoder = is_decoder_model(module)
    inputs = input_names_for(module)
    outputs = list(HEAD_OUTPUTS[head_name])
    family = model_family(module)

    was_training = module.training
    module.eval()
    wrapper = _OnnxWrapper(module, inputs, outputs, decoder).eval()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp_file = tmp_dir / target.name
    try:
        with attention_implementation(module, attn_implementation), torch.no_grad():
            _trace_to_onnx(wrapper, module, tmp_file, inputs, outputs, head_name, opset, exporter)
            opset = _annotate(tmp_file, family=family, head=head_name, model=module)
            max_diff: float | None = None
            shapes: list[tuple[int, int]] = []
            if check:
                max_diff, shapes = verify_onnx(tmp_file, wrapper, module, inputs, outputs, atol=atol)
            quantization = optimization = None
            if optimize or precision is not None:  # the inputs both compare the rewritten graph on
                feeds = [{n: v.numpy() for n, v in sample_inputs(module, b, min(s, max_sequence_length(module)),
                                                                  seed=200 + i).items() if n in inputs}
                         for i, (b, s) in enumerate(CHECK_SHAPES)]
            if optimize:
                optimization = _optimize_in_place(tmp_file, module, family, outputs, feeds, atol)
            if precision is not None:
                from .quantize import convert_checked

                fp32_file = tmp_file.with_name("fp32-" + tmp_file.name)
                tmp_file.rename(fp32_file)
                quantization = convert_checked(precision, fp32_file, tmp_file, outputs, feeds, min_cosine)
                fp32_file.unlink()
        _move_into_place(tmp_dir, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        module.train(was_training)
    seconds = time.perf_counter() - start
    log.info("exported %s to %s (max |onnx - torch| = %s, %.1fs)", type(module).__name__, target, max_diff, seconds)
    return ExportReport(target, opset, max_diff, inputs, outputs, seconds, head_name, family, exporter, shapes,
                        quantization, optimization)


def output_target(out_file: str | Path, default_name: str, overwrite: bool) -> Path:
    """The ONNX file to write: ``out_file``, or ``default_name`` inside it when it is a directory; its
    folder is created. :class:`OutputError` when it exists and ``overwrite`` is false."""
    target = Path(out_file)
    if target.is_dir():
        target = target / default_name
    if target.exists() and not overwrite:
        raise OutputError(f"{target} exists already; choose another --out or pass --overwrite (overwrite=True)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {target.parent}: {exc}") from None
    return target


def _optimize_in_place(path: Path, module: nn.Module, family: str, outputs: Sequence[str],
                       feeds: Sequence[dict[str, np.ndarray]], atol: float) -> dict[str, Any]:
    """Replace ``path`` by its fused graph (per-layer head counts) after checking it against the unfused one."""
    from .ort_optimize import optimize_graph
    from .quantize import compare_outputs

    config = module.config
    fused = path.with_name("fused-" + path.name)
    info = optimize_graph(path, fused, family=family, num_heads=config.num_attention_heads,
                          hidden_size=config.hidden_size)
    diff = compare_outputs(path, fused, outputs, feeds)["max_abs_diff"]
    if not diff <= atol:
        fused.unlink()
        raise ExportError(f"the optimized graph differs from the unfused one by {diff:.3g} (> atol {atol:g}); "
                          "export without --optimize")
    os.replace(fused, path)
    return {**info, "max_abs_diff_vs_unfused": diff}


def _dynamic_axes(inputs: Sequence[str], outputs: Sequence[str], head: str) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {name: {0: "batch", 1: "sequence"} for name in inputs}
    for name in outputs:
        axes[name] = {0: "batch"} if head == "sequence-classification" else {0: "batch", 1: "sequence"}
    return axes


def _trace_to_onnx(
    wrapper: nn.Module,
    module: nn.Module,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    head: str,
    opset: int,
    exporter: str,
) -> None:
    feed = sample_inputs(module, *TRACE_SHAPE, seed=1)
    args = tuple(feed[name].to(_device(module)) for name in inputs)
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter's deprecation notice and tracer notes about Python-side shape
            # checks in transformers' mask code (they are constant for every input size)
            warnings.simplefilter("ignore")
            if exporter == "torchscript":
                torch.onnx.export(
                    wrapper,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=inputs,
                    output_names=outputs,
                    dynamic_axes=_dynamic_axes(inputs, outputs, head),
                    do_constant_folding=True,
                )
            else:
                _dynamo_export(wrapper, args, path, inputs, outputs, opset, max_sequence_length(module))
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracer failure becomes one actionable error
        raise ExportError(
            f"ONNX export of {type(module).__name__} failed ({exporter} exporter, opset {opset}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _dynamo_export(wrapper, args, path, inputs, outputs, opset, max_seq) -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError("exporter='dynamo' needs onnxscript: pip install onnxscript (or use exporter='torchscript')") from None
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("sequence", max=max_seq)
    shapes = {name: {0: batch, 1: seq} for name in inputs}
    # the dynamo exporter prints progress to stdout and logs a warning per missing torchvision op
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=max(opset, 18),
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes={"args": tuple(shapes[n] for n in inputs)},
                verbose=False,
            )
            program.save(str(path))
    finally:
        registry_log.setLevel(level)


def _annotate(path: Path, *, family: str, head: str, model: nn.Module) -> int:
    """Record what the graph is in the ONNX metadata (read by :func:`read_onnx_metadata`); return
    the graph's opset (the dynamo exporter needs >= 18)."""
    import onnx

    from . import __version__

    proto = onnx.load(str(path), load_external_data=False)
    config = getattr(model, "config", None)
    meta = {
        "ppkit_version": __version__,
        "family": family,
        "head": head,
        "model_class": type(model).__name__,
        "vocab_size": str(getattr(config, "vocab_size", "")),
    }
    for key in ("ppkit_heads_per_layer", "ppkit_neurons_per_layer"):
        value = getattr(config, key, None)
        if value is not None:
            meta[key] = json.dumps(list(value))
    existing = {p.key for p in proto.metadata_props}
    for key, value in meta.items():
        if key not in existing:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ppkit metadata stored in an exported ONNX file (family, head, pruned sizes...)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def verify_onnx(
    path: Path,
    wrapper: nn.Module,
    module: nn.Module,
    inputs: Sequence[str],
    outputs: Sequence[str],
    *,
    atol: float,
    shapes: Sequence[tuple[int, int]] = CHECK_SHAPES,
) -> tuple[float, list[tuple[int, int]]]:
    """Check the graph with onnx.checker and compare onnxruntime with torch; return (max diff, shapes)."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"the exported graph does not pass onnx.checker: {exc}") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 4  # failures surface as the ExportError below, not as log lines
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load the exported graph: {exc}") from exc
    limit = max_sequence_length(module)
    checked = [(b, min(s, limit)) for b, s in shapes]
    worst = 0.0
    for i, (batch, seq) in enumerate(checked):
        feed = sample_inputs(module, batch, seq, seed=100 + i)
        expected = wrapper(*(feed[n].to(_device(module)) for n in inputs))
        try:
            got = session.run(list(outputs), {n: feed[n].numpy() for n in inputs})
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"onnxruntime failed on inputs of batch {batch}, sequence {seq}: {exc}") from exc
        for name, ref, out in zip(outputs, expected, got):
            ref = ref.detach().float().cpu().numpy()
            if ref.shape != out.shape:
                raise ExportError(f"output {name!r} has shape {out.shape} in onnxruntime but {ref.shape} in torch "
                                  f"(batch {batch}, sequence {seq}): the dynamic axes are wrong")
            worst = max(worst, float(np.max(np.abs(ref - out))) if ref.size else 0.0)
    if not worst <= atol:  # also catches NaN
        raise ExportError(
            f"onnxruntime output differs from torch by {worst:.3g} (> atol {atol:g}) on inputs "
            f"{checked}; the export is not faithful (try attn_implementation='eager' or another opset)"
        )
    return worst, checked


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _move_into_place(tmp_dir: Path, target: Path) -> None:
    """Move the verified file (and any external-data files) next to the target; the .onnx goes last."""
    try:
        for item in sorted(tmp_dir.iterdir()):
            if item.name != target.name:
                os.replace(item, target.parent / item.name)
        os.replace(tmp_dir / target.name, target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc}") from None


# ----------------------------------------------------------------------------- onnxruntime sessions
def ort_session(
    path: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    optimization: str = "all",
    spinning: bool = False,
) -> Any:
    """An onnxruntime session tuned for inference: ORT_ENABLE_ALL, ``threads`` intra-op threads
    (default: the cores this process may use), CUDAExecutionProvider for ``device="cuda"``.

    Intra-op thread spinning is off by default: on a machine whose cores are shared with other work,
    spinning threads were measured to make BERT-base batch-1 latency ~1.4x worse and to distort
    dense-vs-pruned ratios (pruned graphs have shorter ops, so more synchronisation per FLOP); on
    an idle machine it changes little for transformer-sized ops. ``spinning=True`` restores ORT's default.

    Raises :class:`InputError` when ``device="cuda"`` but onnxruntime has no CUDA provider.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.graph_optimization_level = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[optimization]
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise InputError(
                "device='cuda' needs onnxruntime with the CUDA execution provider, which is not available "
                f"(providers: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                "(pip install 'ppkit[gpu]') with a matching CUDA/cuDNN, or use device='cpu' or backend='torch'"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)
