"""The cpu-v2 reproduction (the fine-tuning recipe that learns) from its JSON cells into benchmarks/README.md.

Reads ``benchmarks/results/reproduce-v2/*.json`` (written by ``python benchmarks/reproduce.py``) and
writes the section between ``<!-- reproduce-v2:start -->`` and ``<!-- reproduce-v2:end -->``: what is
done, the recipe each task ran with, the dense scores against the targets of issue 17, one table per
task (mean ± std over fine-tune seeds; † = closer to the trivial predictor than to dense), and what
the teacher adds. The cpu-v1 section (``make_report.py``) stays as history.

    python benchmarks/report_v2.py            # write the section
    python benchmarks/report_v2.py --print    # print it instead
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_report import README, agg, load_glue, majority_rate, score  # noqa: E402
from reproduce import LABELS, RECIPE_V2, RESULTS_BY_RECIPE, V2_BUDGETS, grid_v2, is_current  # noqa: E402

START, END = "<!-- reproduce-v2:start -->", "<!-- reproduce-v2:end -->"
TASK_NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B", "rte": "RTE"}
#: issue 17's bar for the dense model (dev x100, full dev sets)
DENSE_TARGETS = {"sst2": 88.0, "mrpc": 82.0, "stsb": 85.0, "rte": 60.0}
ROWS = ("dense", "dual-cp", "random", "kcm", "worst", "dual-cp-mc", "dual-cp-lstsq", "dual-cp-kd", "dual-cp-lstsq-kd",
        "random-lstsq-kd")


def did_not_learn(rows: list[dict]) -> set[str]:
    """Cells closer to the trivial predictor (majority class; Spearman 0) than to the dense model."""
    dense = defaultdict(list)
    for r in rows:
        if r["strategy"] == "dense" and score(r) is not None:
            dense[r["task"]].append(score(r))
    out = set()
    for r in rows:
        if r["strategy"] != "dense" and score(r) is not None and dense[r["task"]]:
            floor = (statistics.fmean(dense[r["task"]]) + (majority_rate(r["task"]) or 0.0)) / 2
            if score(r) < floor:
                out.add(r["cell"])
    return out


def cell_text(cells: list[dict], failed: set[str]) -> str:
    if not cells:
        return "·"
    if all(r.get("finetune") is None for r in cells):
        return "infeasible"
    m, s, n = agg([score(r) for r in cells])
    mark = " †" if any(r["cell"] in failed for r in cells) else ""
    return f"{m:.1f}" + (f" ± {s:.1f} (n={n})" if n > 1 else "") + mark


def render(rows: list[dict]) -> str:
    expected = grid_v2()
    done = {r["cell"] for r in rows}
    todo = [c for c in expected if c.id not in done]
    failed = did_not_learn(rows)
    cpu_h = sum((r.get("finetune") or {}).get("cpu_seconds", 0.0) for r in rows) / 3600
    wall_h = sum(r.get("wall_seconds", 0.0) for r in rows) / 3600
    out = [START, "",
           f"**Status:** {len(expected) - len(todo)} of {len(expected)} cells of the cpu-v2 grid are done "
           f"({wall_h:.1f} h of cell wall time, {cpu_h:.1f} CPU-hours inside fine-tuning, one thread per cell); "
           + (f"{len(todo)} remain, first {', '.join(c.id for c in todo[:3])}. `python benchmarks/reproduce.py` "
              "computes them in this order (two runners share the grid)." if todo else "the grid is complete."),
           "",
           "Recipe `cpu-v2`: all-MiniLM-L6-v2, full train sets (SST-2: 20,000 rows), pruning calibrated on 3000 "
           "unlabeled train samples (T = 200, λ = 5, pruning seed 0), then `ppkit finetune` **with its defaults** "
           "(mean pooling as the checkpoint was trained, head bias at the label mean / class prior, learning rate by "
           "width, at least 1000 steps, warm-up 10%, weight decay 0.01, batches grouped by length); `-kd` cells add "
           "`--teacher` (the dense model fine-tuned by the same recipe; KL at T = 2, weight 0.5). Dev x100 "
           "(accuracy; Spearman for STS-B), best epoch; mean ± std over fine-tune seeds where n > 1; † = closer to "
           "the trivial predictor than to dense (did not learn).", ""]
    by_cell = defaultdict(list)
    for r in rows:
        by_cell[(r["task"], r["strategy"], round(float(r["budget"]), 2))].append(r)
    tasks = [t for t in TASK_NAMES if any(r["task"] == t for r in rows)]
    if tasks:
        out += ["| task | epochs | batch | lr | dense | target | majority |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t in tasks:
            dense = by_cell.get((t, "dense", 1.0), [])
            st = dense[0]["finetune"]["settings"] if dense and dense[0].get("finetune") else {}
            maj = majority_rate(t)
            out.append(f"| {TASK_NAMES[t]} | {st.get('epochs', '·')} | {st.get('batch_size', '·')} | "
                       f"{st.get('learning_rate', '·')} | {cell_text(dense, failed)} | {DENSE_TARGETS[t]:.0f} | "
                       f"{'—' if maj is None else f'{maj:.1f}'} |")
        out.append("")
    for t in tasks:
        budgets = [1.0] + list(V2_BUDGETS)
        out += [f"**{TASK_NAMES[t]}**", "", "| strategy | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                "| --- |" + " ---: |" * len(budgets)]
        for s in ROWS:
            cells = [by_cell.get((t, s, b), []) for b in budgets]
            if any(cells):
                out.append(f"| {LABELS[s]} | " + " | ".join(cell_text(c, failed) for c in cells) + " |")
        out.append("")
    gains = []
    for t in tasks:
        for b in V2_BUDGETS:
            plain = {r.get("ft_seed", 0): score(r) for r in by_cell.get((t, "dual-cp", b), [])}
            kd = {r.get("ft_seed", 0): score(r) for r in by_cell.get((t, "dual-cp-kd", b), [])}
            seeds = sorted(set(plain) & set(kd))
            if seeds:
                diff = [kd[s] - plain[s] for s in seeds]
                gains.append(f"{TASK_NAMES[t]} {b:g}: {statistics.fmean(diff):+.1f} (fine-tune seeds {seeds})")
    if gains:
        out += ["What `--teacher` adds to Dual-CP (same fine-tune seeds, points): " + "; ".join(gains) + ".", ""]
    out.append(END)
    return "\n".join(out) + "\n"


def write(text: str, readme: Path = README) -> None:
    current = readme.read_text(encoding="utf-8")
    if START in current and END in current:
        head, rest = current.split(START, 1)
        current = head + text.rstrip("\n") + rest.split(END, 1)[1]
    else:  # first time: before the cpu-v1 section, which becomes history
        anchor = "<!-- reproduce:start -->"
        current = current.replace(anchor, text + "\n" + anchor, 1) if anchor in current else current + "\n" + text
    readme.write_text(current, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--print", action="store_true", help="print the section instead of writing README.md")
    p.add_argument("--results", type=Path, default=RESULTS_BY_RECIPE[RECIPE_V2.name])
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    rows = [r for r in load_glue(args.results) if is_current(r, RECIPE_V2)]
    text = render(rows)
    if args.print:
        print(text)
    else:
        write(text, args.readme)
        print(f"wrote the cpu-v2 section of {args.readme} ({len(rows)} cells)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
