"""int8 and fp16 ONNX models: converted from an exported fp32 graph, and checked against it.

Pruning and int8 multiply (``benchmarks/deploy.py``: on a BERT-base shape at 0.6 FLOPs, one CPU
thread, pruned fp32 ran at 0.60 of the dense fp32 latency, dense int8 at 0.55, pruned int8 at 0.35).
Dynamic quantization stores MatMul / Gather weights as int8 and quantizes
activations per call, so it needs no calibration data. int8 cannot match fp32 to 1e-4, so the check
is the cosine between the int8 and the fp32 outputs of every example (all its token states, or its
logits), reported, and at least ``MIN_COSINE``: a guard against a broken graph, not a quality claim
(on a pruned MiniLM the per-example cosine of the token states of random ids was 0.97; quantizing the
empty weights of a layer pruned to nothing gave 0.01-0.63). Task quality of an int8 model is what
``ppkit bench`` measures.

fp16 (:func:`convert_fp16`, for GPUs) stores weights and computes in half precision with fp32 inputs
and outputs; its check is the same per-example cosine at ``FP16_MIN_COSINE``. onnxruntime's CPU
provider runs such a graph by casting back to fp32 around ops without fp16 kernels: correct, not fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ExportError

#: the int8 model's outputs must point where the fp32 model's do, example by example
MIN_COSINE = 0.9
#: half precision keeps about three significant digits: an fp16 graph far below this is broken
FP16_MIN_COSINE = 0.999
QUANTIZATIONS = ("int8",)
DTYPES = ("fp32", "fp16")


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Write the dynamically quantized (int8 weights, QInt8) copy of ``fp32_path`` to ``int8_path``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process goes to the root logger
    try:
        # DefaultTensorType: shape inference cannot type the outputs of onnxruntime's fused operators
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                         nodes_to_exclude=empty_weight_nodes(fp32_path),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    except Exception as exc:  # noqa: BLE001 - any quantizer failure becomes one actionable error
        raise ExportError(f"int8 quantization failed: {type(exc).__name__}: {exc}") from exc
    finally:
        root.setLevel(level)


def empty_weight_nodes(path: Path) -> list[str]:
    """Nodes with a zero-size weight (the projections of a layer pruned to no heads or no neurons).
    onnxruntime's quantizer derives a scale from the weight's range, which an empty tensor does not
    have, and the quantized graph then computes garbage without an error; they stay fp32 (they cost
    nothing)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    empty = {init.name for init in graph.initializer if 0 in init.dims}
    return [node.name for node in graph.node if any(name in empty for name in node.input)]


def compare_outputs(reference: Path, candidate: Path, outputs: Sequence[str],
                    feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Run both graphs on ``feeds`` in onnxruntime (CPU); per example and output, the cosine between the
    flattened candidate (int8, fp16, fused) and reference outputs. Returns min / mean cosine, max |candidate -
    reference| and the number of examples; :class:`ExportError` when an output's shape differs."""
    ref_session, cand_session = ort_cpu_session(reference), ort_cpu_session(candidate)
    cosines: list[float] = []
    worst = 0.0
    for feed in feeds:
        for ref, got in zip(ref_session.run(list(outputs), feed), cand_session.run(list(outputs), feed)):
            if ref.shape != got.shape:
                raise ExportError(f"{candidate.name} returns shape {got.shape} where {reference.name} returns {ref.shape}")
            ref = ref.reshape(ref.shape[0], -1).astype(np.float64)
            got = got.reshape(got.shape[0], -1).astype(np.float64)
            norm = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
            cosines.extend((np.sum(ref * got, axis=1) / np.maximum(norm, 1e-12)).tolist())
            worst = max(worst, float(np.max(np.abs(ref - got))) if ref.size else 0.0)
    return {"min_cosine": float(min(cosines)), "mean_cosine": float(np.mean(cosines)), "max_abs_diff": worst,
            "examples": len(cosines)}


def convert_fp16(fp32_path: Path, fp16_path: Path) -> None:
    """Write the half-precision copy of ``fp32_path`` (weights and compute in fp16, inputs and outputs
    kept fp32 so that clients feed and read the same arrays) to ``fp16_path``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
        onnx.save(model, str(fp16_path))
    except Exception as exc:  # noqa: BLE001 - any converter failure becomes one actionable error
        raise ExportError(f"fp16 conversion failed: {type(exc).__name__}: {exc}") from exc


#: precision -> (what the report calls it, converter, the cosine an export must reach by default)
CONVERSIONS = {
    "int8": ("dynamic int8 (onnxruntime quantize_dynamic, QInt8 weights)", quantize_int8, MIN_COSINE),
    "fp16": ("fp16 weights and compute, fp32 inputs / outputs (onnxruntime.transformers.float16)", convert_fp16,
             FP16_MIN_COSINE),
}


def convert_checked(precision: str, fp32_path: Path, out_path: Path, outputs: Sequence[str],
                    feeds: Sequence[dict[str, np.ndarray]], min_cosine: float | None = None) -> dict[str, Any]:
    """Convert ``fp32_path`` to ``precision`` (int8 / fp16), compare with the fp32 graph on ``feeds``,
    and raise :class:`ExportError` below ``min_cosine`` (default: the precision's own)."""
    method, convert, default_cosine = CONVERSIONS[precision]
    min_cosine = default_cosine if min_cosine is None else min_cosine
    convert(fp32_path, out_path)
    stats = {"method": method, "precision": precision, **compare_outputs(fp32_path, out_path, outputs, feeds)}
    stats["fp32_bytes"] = fp32_path.stat().st_size
    stats["bytes"] = out_path.stat().st_size
    stats["min_cosine_required"] = min_cosine
    if not stats["min_cosine"] >= min_cosine:
        raise ExportError(f"the {precision} model's outputs drift from fp32 (cosine {stats['min_cosine']:.4f} < "
                          f"{min_cosine}); export fp32 instead")
    return stats


def ort_cpu_session(path: Path):
    """An onnxruntime CPU session that reports a graph it cannot load as an ExportError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime cannot load {path.name}: {exc}") from exc
