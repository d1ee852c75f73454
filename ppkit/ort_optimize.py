"""onnxruntime's transformer fusions for pruned models: one head count per fused attention node.

``onnxruntime.transformers.optimizer.optimize_model`` fuses each layer's attention subgraph into one
``Attention`` node whose ``num_heads`` attribute comes from a single model-wide argument. A ppkit model
has a different number of heads in every layer, so with the config's head count the fused graph
either fails to load (``hidden_size should be divisible by num_heads``) or, where the widths happen to
divide, loads and computes the wrong attention (max |diff| 0.68 seen on MiniLM with heads
[12, 9, 6, 9, 6, 12]). Here every fused node gets the head count of its own packed QKV weight
(``width / 3 / head_dim``), and the result is checked against the unfused graph.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any


from .errors import ExportError

#: ppkit family -> onnxruntime optimizer model_type
MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "electra": "bert", "distilbert": "bert",
               "gpt2": "gpt2"}


def optimize_graph(fp32_path: Path, out_path: Path, *, family: str, num_heads: int, hidden_size: int) -> dict[str, Any]:
    """Write the fused graph of ``fp32_path`` to ``out_path`` with per-node head counts; return the
    fused operator counts and the head count written into each attention node."""
    from onnxruntime.transformers import optimizer

    if family not in MODEL_TYPES:
        raise ExportError(f"--optimize supports {', '.join(MODEL_TYPES)} models, not {family}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the optimizer reports each fusion on the root logger
    try:
        opt = optimizer.optimize_model(str(fp32_path), model_type=MODEL_TYPES[family], num_heads=num_heads,
                                       hidden_size=hidden_size, opt_level=0)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxruntime's transformer optimizer failed: {type(exc).__name__}: {exc}") from exc
    finally:
        root.setLevel(level)
    graph = opt.model.graph
    if any(node.op_type == "MultiHeadAttention" for node in graph.node):
        raise ExportError("the optimizer fused attention into MultiHeadAttention nodes, whose head counts ppkit "
                          "cannot set per layer; export without --optimize")
    head_dim = hidden_size // num_heads
    weights = {init.name: init for init in graph.initializer}
    heads_written = []
    for node in graph.node:
        if node.op_type != "Attention":
            continue
        width = int(weights[node.input[1]].dims[1])
        heads = width // (3 * head_dim)
        if heads * 3 * head_dim != width:
            raise ExportError(f"fused attention node {node.name} has a QKV width {width} that is not 3 x heads x {head_dim}")
        for attr in node.attribute:
            if attr.name == "num_heads":
                attr.i = heads
        heads_written.append(heads)
    opt.save_model_to_file(str(out_path))  # also declares the com.microsoft opset the fused ops need
    fused = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
    return {"fused_operators": fused, "attention_heads": heads_written}
