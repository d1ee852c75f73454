"""The reproduction grid's JSON cells: loading, the main score, table text with the "did not learn"
mark (†) and the score-vs-FLOPs plot. Shared by ``make_report.py`` (recipe cpu-v1, history) and
``report_v2.py`` (cpu-v2), so the current report does not depend on the historical one."""

from __future__ import annotations

import functools
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import BUDGETS, TASKS  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PLOTS = BENCH / "plots"
README = BENCH / "README.md"
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE"}
METRIC_NAMES = {"accuracy": "accuracy", "spearman": "Spearman"}
MAIN = ("dual-cp", "random", "kcm", "worst")
NAMES = {"dense": "dense", "dual-cp": "Dual-CP", "dual-cp-mc": "+MC", "random": "random", "kcm": "KCM",
         "worst": "worst", "dual-cp-lstsq": "Dual-CP + lstsq", "random-lstsq": "random + lstsq",
         "dual-cp-lstsq-kd": "Dual-CP + lstsq + teacher", "random-lstsq-kd": "random + lstsq + teacher",
         "kcm-lstsq": "KCM + lstsq", "worst-lstsq": "worst + lstsq"}
COLORS = {"dual-cp": "tab:red", "random": "tab:gray", "kcm": "tab:blue", "worst": "tab:green",
          "dual-cp-mc": "tab:orange"}


def load_glue(results: Path = RESULTS / "reproduce") -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(results.glob("*.json"))]



def load_lm(results: Path = RESULTS / "reproduce_lm") -> dict[str, list[dict]]:
    out = {}
    for d in sorted(p for p in results.glob("*") if p.is_dir()):
        rows = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(d.glob("*.json"))]
        if rows:
            out[d.name] = rows
    return out



def score(r: dict) -> float | None:
    """The task's main dev metric in points (x100), or None for an infeasible cell."""
    ft = r.get("finetune")
    return None if ft is None else 100.0 * ft["best_metric"]



def index(rows: list[dict]) -> dict:
    """(task, strategy, budget) -> list of results (one per seed)."""
    idx: dict = defaultdict(list)
    for r in rows:
        idx[(r["task"], r["strategy"], round(float(r["budget"]), 4))].append(r)
    return idx



def agg(vals: list[float]) -> tuple[float, float, int]:
    vals = [v for v in vals if v is not None]
    if not vals:
        return math.nan, math.nan, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)



def failed_cells(rows: list[dict]) -> set[str]:
    """Cells whose fine-tune did not learn the task: a dev score closer to the trivial predictor
    (majority class; Spearman 0 for STS-B) than to the dense model's. They are marked † in the tables,
    and the win / tie / loss counts are given with and without them."""
    out = set()
    for task in TASKS:
        dense = [score(r) for r in rows if r["task"] == task and r["strategy"] == "dense" and score(r) is not None]
        if not dense:
            continue
        floor = (statistics.fmean(dense) + (majority_rate(task) or 0.0)) / 2
        out |= {r["cell"] for r in rows if r["task"] == task and r["strategy"] != "dense"
                and score(r) is not None and score(r) < floor}
    return out



def fmt(cell: list[dict], key=score, digits: int = 1, failed: set[str] = frozenset()) -> str:
    """Mean (± std over seeds) of ``key`` over a table cell's results; † when one of them is in ``failed``."""
    if not cell:
        return "—"
    if all(r.get("finetune") is None for r in cell) and key is score:
        return "infeasible"
    m, s, n = agg([key(r) for r in cell])
    if n == 0:
        return "infeasible" if any(r.get("infeasible") for r in cell) else "—"
    mark = " †" if key is score and any(r["cell"] in failed for r in cell) else ""
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f} (n={n})" if n > 1 else "") + mark



def metric_of(rows: list[dict], task: str) -> str:
    for r in rows:
        if r["task"] == task and r.get("finetune"):
            return r["finetune"]["metric"]
    return "spearman" if task == "stsb" else "accuracy"



@functools.lru_cache(maxsize=None)
def majority_rate(task: str) -> float | None:
    """Dev accuracy (x100) of always predicting the most frequent dev label, from the dev file; None for
    regression."""
    if task == "stsb":
        return None
    from ppkit.data import load_split
    from reproduce import GLUE, TASK_DIRS

    labels = [r["label"] for r in load_split(task, "dev", data=GLUE / TASK_DIRS[task]).rows]
    return 100.0 * Counter(labels).most_common(1)[0][1] / len(labels)



def plot_glue(rows: list[dict], path: Path, key=score, ylabel: str = "dev metric x100", title: str = "",
              failed: set[str] = frozenset(), budgets=BUDGETS, strategies=MAIN + ("dual-cp-mc",)) -> bool:
    """One panel per task: ``key`` vs FLOPs ratio, a line per strategy (mean over seeds, min-max band
    where seeds differ; in its base strategy's colour, dotted with squares for "-lstsq", dashed and
    hollow for "-lstsq-kd"), dense dashed; points with a fine-tune in ``failed`` get a black cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = index(rows)
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    if not tasks:
        return False
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for s in strategies:
            xs, ys, lo, hi = [], [], [], []
            for b in sorted(budgets):
                vals = [key(r) for r in idx.get((task, s, b), []) if key(r) is not None]
                if vals:
                    xs.append(b)
                    ys.append(statistics.fmean(vals))
                    lo.append(min(vals))
                    hi.append(max(vals))
            if not xs:
                continue
            color = COLORS.get(s, COLORS.get(s.split("-lstsq")[0], "tab:purple"))
            if s == "dual-cp-mc":
                ax.scatter(xs, ys, marker="*", s=80, color=color, label=NAMES[s], zorder=3)
                continue
            spread = any(h > l for h, l in zip(hi, lo))
            kd, lstsq = s.endswith("-kd"), "-lstsq" in s
            ax.plot(xs, ys, marker="s" if lstsq else "o", color=color, linestyle="--" if kd else ":" if lstsq else "-",
                    markerfacecolor="white" if kd else color, label=NAMES[s])
            if spread:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.15)
            bad = [(x, y) for x, y in zip(xs, ys) if any(r["cell"] in failed for r in idx.get((task, s, x), []))]
            if bad:
                ax.scatter(*zip(*bad), marker="x", s=60, color="black", zorder=4, label="† did not learn")
        dense = [key(r) for r in idx.get((task, "dense", 1.0), []) if key(r) is not None]
        if dense:
            ax.axhline(statistics.fmean(dense), color="black", linestyle="--", label="dense")
        maj = majority_rate(task) if key is score else None
        if maj is not None and maj >= ax.get_ylim()[0] - 3:
            ax.axhline(maj, color="gray", linestyle=":", label="majority class")
        elif maj is not None:  # far below every point: a line would squash the panel
            ax.text(0.98, 0.02, f"majority class: {maj:.1f}", transform=ax.transAxes, ha="right", fontsize=7,
                    color="gray")
        ax.set_title(f"{TASK_NAMES[task]} ({METRIC_NAMES.get(metric_of(rows, task), '')})")
        ax.set_xlabel("FLOPs ratio kept")
        ax.set_xlim(max(budgets) + 0.05, min(budgets) - 0.05)  # high to low, as the paper
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), fontsize=8, loc="lower center", ncol=min(len(handles), 6),
               frameon=False)
    rows_of_legend = -(-len(handles) // 6)
    if title:
        fig.suptitle(title + " (bands: min-max over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

