"""Presenting a pruning run: the JSON report file, the rich summary table and the plan picture."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .plan import PruningPlan


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=_jsonable)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def summary_table(report: dict[str, Any]):  # -> rich.table.Table
    """A rich table: heads and neurons kept per layer, then FLOPs, parameters and stage times."""
    from rich.table import Table

    table = Table(title=f"ppkit prune · {report['model']} · {report['strategy']} · task {report['task']}")
    table.add_column("layer", justify="right")
    table.add_column("heads kept", justify="right")
    table.add_column("neurons kept", justify="right")
    heads, neurons = report["heads_per_layer"], report["neurons_per_layer"]
    for i, (h, n) in enumerate(zip(heads, neurons)):
        table.add_row(str(i), f"{h}/{report['num_heads']}", f"{n}/{report['ffn_dim']}")
    table.add_section()
    table.add_row("FLOPs", f"{report['flops_ratio']:.1%} kept", f"budget {report['flops_budget']:.0%} @ seq {report['flops_seq_len']:.1f}")
    table.add_row("MHA / FFN", f"{report['mha_flops_ratio']:.1%}", f"{report['ffn_flops_ratio']:.1%}")
    table.add_row("params", f"{report['params_before'] / 1e6:.2f}M", f"-> {report['params_after'] / 1e6:.2f}M")
    comp = report.get("compensation") or {}
    if comp.get("method", "none") != "none" and "layers" in comp:
        table.add_row("compensation", f"{comp['method']}: {comp['accepted']}/{len(comp['layers'])} sublayers",
                      f"held-out error {comp['mean_error_before']:.4g} -> {comp['mean_error_after']:.4g}")
    times = ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items() if k != "total" and "." not in k)
    notes = [str(n) for n in (report.get("plan_meta") or {}).get("notes", [])] + [str(w) for w in report.get("warnings", [])]
    caption = f"samples {report['samples']} · seed {report['seed']} · {times} · total {report['timings_s'].get('total', 0):.1f}s"
    table.caption = "\n".join([caption] + [f"note: {n}" for n in notes])
    return table


def plot_plan(plan: PruningPlan, path: str | Path, title: str = "") -> Path:
    """Save a picture of a plan: kept heads as a layer x head grid, kept FFN neurons per layer as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array(plan.head_mask(), dtype=float)
    fig, (ax_heads, ax_ffn) = plt.subplots(
        1, 2, figsize=(10, 0.45 * plan.num_layers + 2), gridspec_kw={"width_ratios": [max(plan.num_heads, 4), 8]}
    )
    ax_heads.imshow(grid, cmap="Greens", vmin=0, vmax=1.25, aspect="auto")
    ax_heads.set_xticks(range(plan.num_heads))
    ax_heads.set_yticks(range(plan.num_layers))
    ax_heads.set_xlabel("head")
    ax_heads.set_ylabel("layer")
    ax_heads.set_title(f"heads kept (green): {sum(plan.heads_per_layer)}/{plan.num_layers * plan.num_heads}")
    counts = plan.neurons_per_layer
    ax_ffn.barh(range(plan.num_layers), counts, color="tab:green")
    ax_ffn.barh(range(plan.num_layers), [plan.ffn_dim - c for c in counts], left=counts, color="lightgrey")
    ax_ffn.set_xlim(0, plan.ffn_dim)
    ax_ffn.set_yticks(range(plan.num_layers))
    ax_ffn.invert_yaxis()
    ax_ffn.set_xlabel("FFN neurons")
    ax_ffn.set_title(f"neurons kept: {sum(counts)}/{plan.num_layers * plan.ffn_dim}")
    for layer, c in enumerate(counts):
        ax_ffn.text(c, layer, f" {c}", va="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
