"""ppkit: P-pruning for pre-trained language models.

Prune attention heads and FFN neurons of a pre-trained BERT or GPT-2 *before* fine-tuning, without
labels, under a FLOPs budget (Wang et al., LREC-COLING 2024), then fine-tune, export and benchmark
the physically smaller model. Every CLI command has a twin here:

    prune -> ppkit.prune          finetune -> ppkit.finetune
    export -> ppkit.export_onnx   bench -> ppkit.benchmark
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names, imported lazily so `import ppkit` (and the CLI's --help) stays fast.
_EXPORTS = {
    "prune": "ppkit.pipeline",
    "PruneResult": "ppkit.pipeline",
    "PruningPlan": "ppkit.plan",
    "LayerPlan": "ppkit.plan",
    "get_adapter": "ppkit.adapters",
    "apply_masks": "ppkit.masking",
    "prune_model": "ppkit.surgery",
    "count_flops": "ppkit.flops",
    "plan_flops": "ppkit.flops",
    "load_model": "ppkit.models",
    "load_tokenizer": "ppkit.models",
    "save_pruned": "ppkit.saving",
    "load_pruned": "ppkit.models",
    "collect_statistics": "ppkit.statistics",
    "list_strategies": "ppkit.registry",
    "export_onnx": "ppkit.export",
    "benchmark": "ppkit.bench",
    "finetune": "ppkit.training",
    "PpkitError": "ppkit.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ppkit' has no attribute {name!r}")
