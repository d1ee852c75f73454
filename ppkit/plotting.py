"""Small matplotlib helpers (Agg backend, no display needed) shared by bench, benchmarks and reports.

Every function writes one PNG atomically and returns its path; none of them shows a window or keeps
figures open.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Save ``fig`` as PNG atomically (temp file beside the target, then rename) and close it."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path


def plot_series(
    ax: Any,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    reference: float | None = None,
    reference_label: str = "",
    errors: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Draw one line with markers per named (xs, ys) series on ``ax`` (sorted by x), with optional
    y error bars and a dashed horizontal reference line."""
    for name, (xs, ys) in series.items():
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        x = [xs[i] for i in order]
        y = [ys[i] for i in order]
        if errors and name in errors:
            e = [errors[name][i] for i in order]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
        else:
            ax.plot(x, y, marker="o", label=name)
    if reference is not None:
        ax.axhline(reference, linestyle="--", color="grey", linewidth=1, label=reference_label or None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=8)


def plot_vs_flops(
    path: str | Path,
    panels: Sequence[dict[str, Any]],
    *,
    suptitle: str = "",
) -> Path:
    """One row of panels, each ``dict(series=..., ylabel=..., title=..., reference=..., errors=...)``,
    all with the FLOPs ratio on the x axis (reversed, so more pruning is to the right)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        plot_series(
            ax,
            panel["series"],
            xlabel=panel.get("xlabel", "FLOPs ratio (kept / dense)"),
            ylabel=panel["ylabel"],
            title=panel.get("title", ""),
            reference=panel.get("reference"),
            reference_label=panel.get("reference_label", ""),
            errors=panel.get("errors"),
        )
        ax.invert_xaxis()
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bench(report: Mapping[str, Any], path: str | Path) -> Path:
    """Plot a :func:`ppkit.bench.benchmark` report (its ``to_dict()``): p50 latency per backend and
    batch size vs FLOPs ratio, and the task's main metric vs FLOPs ratio when quality was measured."""
    models = report["models"]
    latency: dict[str, tuple[list[float], list[float]]] = {}
    for entry in models:
        ratio = entry["flops"]["ratio"]
        for row in entry["latency"]:
            key = f"{row['backend']} b{row['batch_size']}"
            xs, ys = latency.setdefault(key, ([], []))
            xs.append(ratio)
            ys.append(row["p50_ms"])
    panels: list[dict[str, Any]] = [dict(series=latency, ylabel="p50 latency (ms)", title="latency")]
    main = report.get("settings", {}).get("main_metric")
    quality: dict[str, tuple[list[float], list[float]]] = {}
    for e in models:  # one series per state, so fine-tuned and untrained-head points are never joined
        if e.get("quality") and main in e["quality"]:
            xs, ys = quality.setdefault(e.get("state") or "quality", ([], []))
            xs.append(e["flops"]["ratio"])
            ys.append(e["quality"][main])
    if main and quality:
        panels.append(dict(series=quality, ylabel=main, title=f"{report['settings'].get('task')} {main}"))
    settings = report.get("settings", {})
    out = plot_vs_flops(path, panels, suptitle=f"ppkit bench · seq {settings.get('seq_len')} · {settings.get('device')}")
    if main and quality:
        plot_pareto(report, Path(path).with_name(Path(path).stem + "-pareto.png"))
    return out


def plot_pareto(report: Mapping[str, Any], path: str | Path) -> Path:
    """Quality against latency, one point per model (and precision), one panel per batch size of the first
    backend: the models up and to the left are the ones worth deploying."""
    main = report["settings"]["main_metric"]
    models = [m for m in report["models"] if m.get("quality") and main in m["quality"] and m["latency"]]
    backend = models[0]["latency"][0]["backend"]
    batches = sorted({row["batch_size"] for m in models for row in m["latency"] if row["backend"] == backend})
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for m in models:
            row = next(r for r in m["latency"] if r["backend"] == backend and r["batch_size"] == batch)
            marker = {"int8": "s", "fp16": "^"}.get(m.get("precision"), "o")
            ax.scatter(row["p50_ms"], m["quality"][main], marker=marker)
            ax.annotate(m["name"], (row["p50_ms"], m["quality"][main]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(f"p50 latency (ms), {backend} batch {batch}")
        ax.set_ylabel(main)
        ax.grid(alpha=0.3)
    fig.suptitle(f"quality vs latency ({report['settings'].get('task')}; squares: int8, triangles: fp16)")
    fig.tight_layout()
    return save_figure(fig, path)
