"""ONNX export of a causal LM *with* its KV cache, and greedy decoding in onnxruntime.

The graph takes ``input_ids`` [batch, new], ``attention_mask`` [batch, past + new] and, per layer,
``past_key_values.{i}.key`` / ``.value`` [batch, heads_i, past, head_dim]; it returns ``logits``
[batch, new, vocab] and ``present.{i}.key`` / ``.value`` [batch, heads_i, past + new, head_dim]
(the names optimum and onnxruntime-genai use). ``heads_i`` is each layer's own head count after
pruning; a layer without heads carries a [batch, 1, past, 1] placeholder, as the pruned model's own
cache does (:mod:`ppkit.modeling_pruned`). Position ids follow the attention mask as transformers'
``generate`` computes them, so left-padded batches decode as they do in torch.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ExportError, InputError
from .export import _annotate, _move_into_place, attention_implementation, causal_additive_mask, is_decoder_model, \
    load_for_export, model_family, output_target


@dataclass
class PastExportReport:
    """What :func:`export_with_past` wrote; ``max_abs_diff`` compares onnxruntime's logits with torch's
    on a prompt step and a cached step (None without ``check``)."""

    path: Path
    opset: int
    layers: int
    cache_heads: list[int]
    max_abs_diff: float | None
    seconds: float
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def cache_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _cache_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(heads, head_dim) of each layer's cached keys: the placeholder's (1, 1) for a layer without heads.
    With grouped-query attention a layer caches one key/value head per kept group."""
    from .adapters import get_adapter

    shape = get_adapter(model).shape()
    return [(h, shape.kv_dim or shape.head_dim) if h else (1, 1) for h in shape.heads_per_layer]


class _PastWrapper(nn.Module):
    """Flat tensors in and out around a transformers DynamicCache."""

    def __init__(self, model: nn.Module, num_layers: int) -> None:
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        # transformers 5.24 renamed the ``past_key_values`` argument and output to ``cache``
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        new = input_ids.shape[1]
        total = attention_mask.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, total - new:]
        out = self.model(input_ids=input_ids, attention_mask=causal_additive_mask(attention_mask, self.model.dtype, new),
                         position_ids=positions, cache_position=torch.arange(new, device=input_ids.device) + (total - new),
                         use_cache=True, return_dict=True, **{self.cache_argument: cache})
        cache = getattr(out, self.cache_argument)
        presents = []
        for layer in range(self.num_layers):
            presents += [cache.layers[layer].keys, cache.layers[layer].values]
        return (out.logits, *presents)


def empty_past(model_or_shapes: nn.Module | Sequence[tuple[int, int]], batch: int, length: int = 0,
               dtype=np.float32, seed: int | None = None) -> list[np.ndarray]:
    """Past key/value arrays for every layer (zeros, or seeded noise when ``seed`` is given)."""
    shapes = _cache_shapes(model_or_shapes) if isinstance(model_or_shapes, nn.Module) else list(model_or_shapes)
    rng = np.random.default_rng(seed)
    out = []
    for heads, dim in shapes:
        for _ in range(2):
            size = (batch, heads, length, dim)
            out.append(np.zeros(size, dtype) if seed is None else rng.standard_normal(size).astype(dtype))
    return out


def export_with_past(model_or_dir: nn.Module | str | Path, out_file: str | Path | None = None, *, opset: int = 17,
                     check: bool = True, atol: float = 1e-4, overwrite: bool = False) -> PastExportReport:
    """Export a (pruned or dense) causal LM (GPT-2, Llama-style) with KV-cache inputs and outputs (default file
    ``<dir>/model-with-past.onnx``), atomically, checked against torch on a prompt and a cached step."""
    start = time.perf_counter()
    if isinstance(model_or_dir, (str, Path)):
        source = Path(model_or_dir)
        if not source.is_dir():
            raise InputError(f"{source} is not a model directory")
        model = load_for_export(source, "causal-lm")
        out_file = source / "model-with-past.onnx" if out_file is None else out_file
    else:
        model = model_or_dir
        if out_file is None:
            raise InputError("out_file is required when exporting a model object")
    if not is_decoder_model(model) or getattr(model, "lm_head", None) is None:
        raise InputError(f"a KV-cache export needs a causal LM with its LM head, got {type(model).__name__}")
    target = output_target(out_file, "model-with-past.onnx", overwrite)

    shapes = _cache_shapes(model)
    num_layers = len(shapes)
    past_in, past_out = cache_names(num_layers, "past_key_values"), cache_names(num_layers, "present")
    inputs, outputs = ["input_ids", "attention_mask", *past_in], ["logits", *past_out]
    axes: dict[str, dict[int, str]] = {"input_ids": {0: "batch", 1: "sequence"},
                                       "attention_mask": {0: "batch", 1: "past_sequence + sequence"},
                                       "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past_in})
    axes.update({n: {0: "batch", 2: "past_sequence + sequence"} for n in past_out})

    was_training = model.training
    model.eval()
    wrapper = _PastWrapper(model, num_layers).eval()
    ids = torch.randint(0, int(model.config.vocab_size), (2, 3), generator=torch.Generator().manual_seed(1))
    args = (ids, torch.ones(2, 7, dtype=torch.long), *[torch.from_numpy(a) for a in empty_past(shapes, 2, 4, seed=1)])
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp_file = tmp_dir / target.name
    try:
        with attention_implementation(model, "eager"), torch.no_grad():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the TorchScript exporter's notes on Python-side shape checks
                    torch.onnx.export(wrapper, args, str(tmp_file), dynamo=False, opset_version=opset,
                                      input_names=inputs, output_names=outputs, dynamic_axes=axes,
                                      do_constant_folding=True)
            except Exception as exc:  # noqa: BLE001 - any tracer failure becomes one actionable error
                raise ExportError(f"ONNX export with KV cache of {type(model).__name__} failed: "
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
            opset = _annotate(tmp_file, family=model_family(model), head="causal-lm-with-past", model=model)
            max_diff = _check(tmp_file, wrapper, shapes, int(model.config.vocab_size), atol) if check else None
        _move_into_place(tmp_dir, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        model.train(was_training)
    from .adapters import get_adapter

    return PastExportReport(target, opset, num_layers, list(get_adapter(model).shape().heads_per_layer), max_diff,
                            time.perf_counter() - start, inputs, outputs)


def _check(path: Path, wrapper: nn.Module, shapes, vocab: int, atol: float) -> float:
    """Largest |onnxruntime - torch| over a prompt step (empty past, right-padded row) and a cached step."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(7)
    worst = 0.0
    for batch, new, past in ((2, 6, 0), (3, 2, 5)):
        ids = torch.randint(0, vocab, (batch, new), generator=gen)
        mask = torch.ones(batch, past + new, dtype=torch.long)
        if past == 0:
            mask[-1, new - 2:] = 0
        cache = empty_past(shapes, batch, past, seed=past + 3)
        with torch.no_grad():
            expected = wrapper(ids, mask, *[torch.from_numpy(a) for a in cache])
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                 **dict(zip(cache_names(len(shapes), "past_key_values"), cache))})
        for e, g in zip(expected, got):
            worst = max(worst, float(np.abs(e.numpy() - g).max()) if g.size else 0.0)
    if not worst <= atol:
        raise ExportError(f"onnxruntime differs from torch by {worst:.3g} (> atol {atol:g}) in the KV-cache graph")
    return worst


def greedy_decode(session: Any, input_ids: np.ndarray, max_new_tokens: int, *,
                  attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Greedy decoding with a KV-cache graph from :func:`export_with_past`: the prompt in one step, then
    one token per step from the cache. Returns prompt + new tokens [batch, prompt + max_new_tokens]."""
    names = [i.name for i in session.get_inputs()]
    past_names = [n for n in names if n.startswith("past_key_values.")]
    batch = input_ids.shape[0]
    shapes = [tuple(session.get_inputs()[names.index(n)].shape) for n in past_names[::2]]
    past = []
    for shape in shapes:  # [batch, heads, past, head_dim] with fixed heads / head_dim
        past += [np.zeros((batch, int(shape[1]), 0, int(shape[3])), np.float32)] * 2
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask.astype(np.int64)
    tokens, step = input_ids.astype(np.int64), input_ids.astype(np.int64)
    for _ in range(max_new_tokens):
        logits, *past = session.run(None, {"input_ids": step, "attention_mask": mask, **dict(zip(past_names, past))})
        step = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens = np.concatenate([tokens, step], axis=1)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return tokens
