"""Tables and plots of the reproduction, from the JSON results only, into benchmarks/README.md.

Reads ``benchmarks/results/reproduce/*.json`` (MiniLM + GLUE cells of ``reproduce.py``),
``benchmarks/results/reproduce_lm/<model>/*.json`` (``reproduce_lm.py``) and
``benchmarks/results/small_gpt2_train.json`` (``train_small_gpt2.py``); writes PNG plots to
``benchmarks/plots/`` and replaces the text between ``<!-- reproduce:start -->`` and
``<!-- reproduce:end -->`` in ``benchmarks/README.md`` (appending a "Reproduction" section with those
markers when absent). Every number in that section comes from the JSON files; nothing is typed by hand.

    python benchmarks/make_report.py            # README section + plots
    python benchmarks/make_report.py --print    # print the section instead of writing README.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import ABLATION_BUDGET, BUDGETS, LSTSQ_BUDGETS, RANDOM_SEEDS, TASKS, grid  # noqa: E402
from reproduce import RECIPE_V1 as RECIPE  # noqa: E402  (this report renders the cpu-v1 grid)
from reproduce import is_current as _is_current  # noqa: E402
from grid_cells import (COLORS, MAIN, METRIC_NAMES, NAMES, PLOTS, README, RESULTS, TASK_NAMES, agg,  # noqa: E402
                        failed_cells, fmt, index, load_glue, load_lm, majority_rate, metric_of, plot_glue, score)

START, END = "<!-- reproduce:start -->", "<!-- reproduce:end -->"
PAPER_SPEEDUP = 1.8  # the paper's reported fine-tuning speedup at 60% FLOPs (MNLI), quoted for comparison


def by_task(value) -> str:
    """A recipe field that may differ per task, as text ("SST-2 1, MRPC 3" or "1")."""
    if isinstance(value, dict):
        return ", ".join(f"{TASK_NAMES.get(t, t)} {v}" for t, v in value.items())
    return str(value)


def tie_band(task: str, rows: list[dict], p: float) -> float:
    """Half-width (points) under which two dev scores count as a tie: one standard error of the
    difference of two accuracies on this dev set (unpaired binomial, sqrt(2 p (1-p) / n)); 1 point for
    STS-B's Spearman."""
    if task == "stsb":
        return 1.0
    n = next((r["finetune"]["eval_examples"] for r in rows if r["task"] == task and r.get("finetune")), 0)
    if not n:
        return math.nan
    p = min(max(p / 100.0, 0.01), 0.99)
    return 100.0 * math.sqrt(2 * p * (1 - p) / n)


def verdict(task: str, rows: list[dict], ours: list[dict], theirs: list[dict]) -> tuple[float, str]:
    """(Dual-CP − baseline in points, "win" / "tie" / "loss") from the mean scores over seeds."""
    o, t = statistics.fmean(score(r) for r in ours), statistics.fmean(score(r) for r in theirs)
    d = o - t
    return d, "tie" if abs(d) < tie_band(task, rows, (o + t) / 2) else ("win" if d > 0 else "loss")


def compare(idx: dict, rows: list[dict], failed: set[str] = frozenset()) -> tuple[list[str], dict]:
    """Dual-CP vs each baseline per (task, budget): win / tie / loss counts over every point ("all") and
    over the points where no fine-tune involved is in ``failed`` ("learned", see :func:`failed_cells`)."""
    counts = {b: {"all": Counter(), "learned": Counter(), "cells": [], "grid": {}} for b in ("random", "kcm", "worst")}
    done = lambda key: [r for r in idx.get(key, []) if score(r) is not None]  # noqa: E731
    for task in TASKS:
        for budget in BUDGETS:
            ours = done((task, "dual-cp", budget))
            if not ours:
                continue
            for base, c in counts.items():
                theirs = done((task, base, budget))
                if not theirs:
                    continue
                d, v = verdict(task, rows, ours, theirs)
                c["all"][v] += 1
                ours_ok, theirs_ok = ([r for r in x if r["cell"] not in failed] for x in (ours, theirs))
                if ours_ok and theirs_ok:
                    c["learned"][verdict(task, rows, ours_ok, theirs_ok)[1]] += 1
                dagger = " †" if len(ours_ok) < len(ours) or len(theirs_ok) < len(theirs) else ""
                c["cells"].append(f"{TASK_NAMES[task]} {budget:g}: {d:+.1f} ({v}){dagger}")
                c["grid"][(task, budget)] = v[0].upper() + dagger
    lines = verdict_table(counts)
    if failed:
        per_task = Counter(cell.split("/")[0] for cell in failed)
        lines.append(f"- **†: a fine-tune did not learn the task** (dev score closer to the trivial predictor than to "
                     f"dense) in {len(failed)} cells ("
                     + ", ".join(f"{TASK_NAMES[t]} {per_task[t]}" for t in TASKS if per_task[t])
                     + "). Such a plan is a real outcome of pruning with this recipe (see \"Why some fine-tunes do "
                     "not learn\" below), so the points are counted as measured; the counts are repeated without the "
                     "points that involve one.")
        lines += ["", f"  <details><summary>The {len(failed)} cells marked †</summary>", "",
                  "  " + ", ".join(sorted(failed)), "", "  </details>", ""]

    def tally(c: Counter) -> str:
        return ", ".join(f"{c[k]} {k if c[k] == 1 else plural}"
                         for k, plural in (("win", "wins"), ("tie", "ties"), ("loss", "losses")))

    for base, c in counts.items():
        n = sum(c["all"].values())
        if not n:
            continue
        line = f"- **vs {NAMES[base]}** ({n} task x budget points): **{tally(c['all'])}**"
        if failed:
            m = sum(c["learned"].values())
            line += f"; without the † points ({m} left): **{tally(c['learned'])}**"
        lines.append(line + f". Δ (Dual-CP − {NAMES[base]}, points): " + "; ".join(c["cells"]) + ".")
    return lines + weak_tasks(rows), counts


def verdict_table(counts: dict) -> list[str]:
    """Task x budget table of Dual-CP's verdicts (W / T / L) against random, KCM and worst; "–" where the
    baseline has no result (not run yet, or infeasible), † where a fine-tune involved did not learn."""
    points = sorted({k for c in counts.values() for k in c["grid"]}, key=lambda k: (TASKS.index(k[0]), -k[1]))
    if not points:
        return []
    tasks = [t for t in TASKS if any(k[0] == t for k in points)]
    budgets = [b for b in BUDGETS if any(k[1] == b for k in points)]
    lines = ["Dual-CP against random / KCM / worst at each point: **W** win, **T** tie, **L** loss, – no baseline "
             "result (not run yet or infeasible); † a fine-tune involved did not learn.", "",
             "| task | " + " | ".join(f"{b:g}" for b in budgets) + " |",
             "| --- | " + " | ".join(":---:" for _ in budgets) + " |"]
    for task in tasks:
        cells = []
        for b in budgets:
            marks = [counts[base]["grid"].get((task, b), "–") for base in ("random", "kcm", "worst")]
            dagger = " †" if any(m.endswith("†") for m in marks) else ""
            cells.append(" / ".join(m.rstrip(" †") for m in marks) + dagger
                         if any(m != "–" for m in marks) else "")
        lines.append(f"| {TASK_NAMES[task]} | " + " | ".join(cells) + " |")
    return lines + [""]


def weak_tasks(rows: list[dict]) -> list[str]:
    """A sentence per task whose dense fine-tune beats the trivial predictor by less than 1.5 tie bands:
    on such a task no strategy can be told apart from the others with this recipe."""
    out = []
    for task in TASKS:
        dense = [score(r) for r in rows if r["task"] == task and r["strategy"] == "dense" and score(r) is not None]
        trivial = majority_rate(task)
        if not dense or trivial is None:
            continue
        d = statistics.fmean(dense)
        band = tie_band(task, rows, d)
        if d - trivial < 1.5 * band:
            out.append(f"- **{TASK_NAMES[task]} barely learns even dense:** the dense fine-tune is {d - trivial:.1f} "
                       f"points above always predicting the majority class ({d:.1f} vs {trivial:.1f}), against a tie "
                       f"band of ±{band:.1f}; with this recipe its points cannot tell the strategies apart.")
    return out


def fidelity_summary(idx: dict) -> list[str]:
    """How often Dual-CP's pruned (not yet fine-tuned) model keeps the dense embeddings best."""
    best, total, lines = 0, 0, []
    for task in TASKS:
        for b in BUDGETS:
            vals = {}
            for s in MAIN + ("dual-cp-mc",):
                f = [r["fidelity"]["mean_cosine"] for r in idx.get((task, s, b), []) if r.get("fidelity")]
                if f:
                    vals[s] = statistics.fmean(f)
            if "dual-cp" in vals and len(vals) > 1:
                total += 1
                top = max(vals, key=vals.get)
                best += top == "dual-cp"
                lines.append(f"{TASK_NAMES[task]} {b:g}: " + ", ".join(f"{NAMES[k]} {v:.3f}" for k, v in
                                                                      sorted(vals.items(), key=lambda kv: -kv[1])))
    if not total:
        return []
    return ["", f"- **Embedding fidelity before fine-tuning:** Dual-CP keeps the dense sentence embeddings best "
                f"(highest mean cosine) at {best} of {total} task x budget points: " + "; ".join(lines) + "."]


def glue_tables(rows: list[dict], failed: set[str] = frozenset()) -> list[str]:
    idx = index(rows)
    out: list[str] = []
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    for task in tasks:
        metric = METRIC_NAMES.get(metric_of(rows, task), metric_of(rows, task))
        dense = idx.get((task, "dense", 1.0), [])
        maj = majority_rate(task)
        out += [f"**{TASK_NAMES[task]}** — dev {metric} x100 after fine-tuning (dense: {fmt(dense)}"
                + (f"; always predicting the majority class: {maj:.1f}" if maj is not None else "")
                + "); random: mean ± std over seeds.", "",
                "| strategy | " + " | ".join(f"{b:g}" for b in BUDGETS) + " |",
                "| --- | " + " | ".join("---:" for _ in BUDGETS) + " |"]
        for s in MAIN:
            out.append(f"| {NAMES[s]} | " + " | ".join(fmt(idx.get((task, s, b), []), failed=failed) for b in BUDGETS)
                       + " |")
        out.append("")
        out += [f"Sentence-embedding fidelity before fine-tuning ({TASK_NAMES[task]} dev sentences): mean cosine "
                "between dense and pruned mean-pooled embeddings.", "",
                "| strategy | " + " | ".join(f"{b:g}" for b in BUDGETS) + " |",
                "| --- | " + " | ".join("---:" for _ in BUDGETS) + " |"]
        fid = lambda r: None if r.get("fidelity") is None else r["fidelity"]["mean_cosine"]  # noqa: E731
        for s in MAIN:
            out.append(f"| {NAMES[s]} | " + " | ".join(fmt(idx.get((task, s, b), []), key=fid, digits=3)
                                                         for b in BUDGETS) + " |")
        out.append("")
    return out


def ablation_table(rows: list[dict], failed: set[str] = frozenset()) -> list[str]:
    idx = index(rows)
    b = ABLATION_BUDGET
    tasks = [t for t in TASKS if idx.get((t, "dual-cp", b)) or idx.get((t, "dual-cp-mc", b))]
    if not tasks:
        return ["(no ablation cells yet)"]
    out = ["| method | " + " | ".join(TASK_NAMES[t] for t in tasks) + " |",
           "| --- | " + " | ".join("---:" for _ in tasks) + " |"]
    base = {t: agg([score(r) for r in idx.get((t, "random", b), [])])[0] for t in tasks}
    for s, label in (("dense", "dense (no pruning)"), ("random", "Random"), ("dual-cp-mc", "+MC"),
                     ("dual-cp", "+CS (= Dual-CP)")):
        cells = []
        for t in tasks:
            c = idx.get((t, s, 1.0 if s == "dense" else b), [])
            text = fmt(c, failed=failed)
            m = agg([score(r) for r in c])[0]
            if s in ("dual-cp-mc", "dual-cp") and not math.isnan(m) and not math.isnan(base[t]):
                text += f" ({m - base[t]:+.1f})"
            cells.append(text)
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def compensation_lines(rows: list[dict], failed: set[str] = frozenset()) -> list[str]:
    """Issue 9: Dual-CP and random with and without ``--compensate lstsq``, before and after fine-tuning."""
    idx = index(rows)
    fid = lambda r: None if r.get("fidelity") is None else r["fidelity"]["mean_cosine"]  # noqa: E731
    out = []
    for task in TASKS:
        for b in LSTSQ_BUDGETS:
            for base in ("dual-cp", "random"):
                plain = [r for r in idx.get((task, base, b), []) if r["seed"] == 0]
                comp = idx.get((task, f"{base}-lstsq", b), [])
                if not plain or not comp:
                    continue
                d = score(comp[0]) - score(plain[0]) if score(comp[0]) is not None and score(plain[0]) is not None else math.nan
                out.append(f"| {TASK_NAMES[task]} | {b:g} | {NAMES[base]} | {fmt(plain, key=fid, digits=3)} → "
                           f"{fmt(comp, key=fid, digits=3)} | {fmt(plain, failed=failed)} → {fmt(comp, failed=failed)} ({d:+.1f}) |")
    if not out:
        return ["(no `-lstsq` cells yet)"]
    return ["| task | FLOPs | strategy (seed 0) | fidelity before fine-tuning, none → lstsq | dev score after "
            "fine-tuning, none → lstsq (Δ) |", "| --- | ---: | --- | ---: | ---: |"] + out


def speedup_lines(rows: list[dict]) -> list[str]:
    idx = index(rows)
    out = []
    for task in TASKS:
        dense = idx.get((task, "dense", 1.0), [])
        pr = idx.get((task, "dual-cp", ABLATION_BUDGET), [])
        if not dense or not pr or pr[0].get("finetune") is None:
            continue
        d, p = dense[0], pr[0]
        td, tp = d["finetune"]["train_seconds"], p["finetune"]["train_seconds"]
        cd, cp = d["finetune"].get("cpu_seconds"), p["finetune"].get("cpu_seconds")
        cpu = f"{cd:.0f} / {cp:.0f} = **{cd / cp:.2f}x**" if cd and cp else "— (not recorded)"
        others = [r["finetune"]["train_seconds"] for st in MAIN + ("dual-cp-mc",)
                  for r in idx.get((task, st, ABLATION_BUDGET), []) if r.get("finetune")]
        spread = f"{min(others):.0f}–{max(others):.0f} s ({len(others)} cells)"
        out.append(f"| {TASK_NAMES[task]} | {td:.0f} | {tp:.0f} | **{td / tp:.2f}x** | {spread} | {cpu} | {p['prune']['flops_ratio']:.3f} | "
                   f"{p['prune']['params_after'] / 1e6:.1f} / {p['prune']['params_before'] / 1e6:.1f} | "
                   f"{d['loadavg_1m']['start']:.1f} / {p['loadavg_1m']['start']:.1f} |")
    if not out:
        return ["(needs the dense and Dual-CP 0.6 cells of a task)"]
    return ["| task | dense train wall s | Dual-CP 0.6 train wall s | wall speedup | train wall s of every 0.6 cell "
            "(all strategies, same FLOPs) | CPU s of finetune() dense / pruned = speedup | FLOPs ratio | "
            "params M (pruned / dense) | load avg at start (dense / pruned) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"] + out


def lm_section(lm: dict[str, list[dict]]) -> tuple[list[str], list[str]]:
    """Markdown lines and plot paths for the GPT-2 grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, plots = [], []
    train = RESULTS / "small_gpt2_train.json"
    if train.is_file():
        t = json.loads(train.read_text(encoding="utf-8"))
        c, tr = t["config"], t["training"]
        out += [f"Model: **{t['what']}**. {c['n_layer']} layers, hidden {c['n_embd']}, {c['n_head']} heads, FFN "
                f"{c['n_inner']}, {c['n_positions']} positions, {c['params'] / 1e6:.1f}M parameters (tied embeddings "
                f"over the real GPT-2 vocabulary of {c['vocab_size']}); {tr['steps']} steps x {tr['batch_size']} x "
                f"{tr['block']} tokens = {tr['epochs']:.2f} epochs of PTB train ({tr['ptb_train_tokens']} GPT-2 tokens), "
                f"first {tr['restricted_softmax_steps']} steps with the softmax restricted to the {tr['restricted_vocab']} "
                f"token ids PTB uses, then full softmax; {t['wall_minutes']:.0f} min on CPU. PTB valid perplexity "
                f"(first {t['valid_ppl_blocks']} blocks) during training: "
                + ", ".join(f"step {s}: {p:.0f}" for s, p in t["valid_ppl_progress"])
                + f" (up to step {tr['restricted_softmax_steps']} the model never learnt to lower the ids PTB does not "
                "use, so its full-vocabulary perplexity is inflated). The model saw only PTB (lower-case, 10k words, "
                "`<unk>`), so its WikiText-2 perplexities are far higher than its PTB ones.", ""]
    for tag, rows in lm.items():
        idx: dict = defaultdict(list)
        for r in rows:
            idx[(r["strategy"], round(float(r["budget"]), 4))].append(r)
        dense = idx.get(("dense", 1.0), [])
        sets = ("ptb/valid", "ptb/test", "wikitext-2/valid", "wikitext-2/test")
        win = next((r.get("window") for r in rows if r.get("window")), None)
        ev = next((r["recipe"]["eval_tokens"] for r in rows), None)
        out += [f"**{tag}** — perplexity (full 50,257-token softmax) on the first {ev} GPT-2 tokens of each split, "
                f"windows of {win} tokens; *before* = pruned, no training; *after* = after the short PTB fine-tune.", ""]
        if dense:
            d = dense[0]
            out.append("dense: " + ", ".join(f"{s} {d['ppl_before_ft'][s]:.1f} (after ft {d['ppl_after_ft'][s]:.1f})"
                                             for s in sets) + ".")
            out.append("")
        for when in ("ppl_before_ft", "ppl_after_ft"):
            out += [f"PTB test / WikiText-2 test perplexity, {'before' if when == 'ppl_before_ft' else 'after'} fine-tuning:", "",
                    "| strategy | " + " | ".join(f"{b:g}" for b in BUDGETS) + " |",
                    "| --- | " + " | ".join("---:" for _ in BUDGETS) + " |"]
            for s in MAIN:
                cells = []
                for b in BUDGETS:
                    c = idx.get((s, b), [])
                    if not c:
                        cells.append("—")
                    elif c[0].get(when) is None:
                        cells.append("infeasible")
                    else:
                        cells.append(f"{statistics.fmean(r[when]['ptb/test'] for r in c):.1f} / "
                                     f"{statistics.fmean(r[when]['wikitext-2/test'] for r in c):.1f}")
                out.append(f"| {NAMES[s]} | " + " | ".join(cells) + " |")
            out.append("")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
        for ax, when in zip(axes[0], ("ppl_before_ft", "ppl_after_ft")):
            for s in MAIN:
                xs = [b for b in sorted(BUDGETS) if idx.get((s, b)) and idx[(s, b)][0].get(when)]
                if xs:
                    for es, ls in (("ptb/test", "-"), ("wikitext-2/test", ":")):
                        ax.plot(xs, [statistics.fmean(r[when][es] for r in idx[(s, b)]) for b in xs], ls,
                                marker="o", color=COLORS[s], label=f"{NAMES[s]} {es}")
            if dense and dense[0].get(when):
                for es, ls in (("ptb/test", "--"), ("wikitext-2/test", "-.")):
                    ax.axhline(dense[0][when][es], color="black", linestyle=ls, label=f"dense {es}")
            ax.set_yscale("log")
            ax.invert_xaxis()
            ax.set_xlabel("FLOPs ratio kept")
            ax.set_title(f"{tag}: {'before' if when == 'ppl_before_ft' else 'after'} fine-tuning")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("perplexity (log)")
        axes[0][1].legend(fontsize=6)
        fig.tight_layout()
        p = PLOTS / f"reproduce_lm_{tag}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=110)
        plt.close(fig)
        plots.append(p)
        out += [f"![perplexity vs FLOPs, {tag}](plots/{p.name})", ""]
    return out, plots


def diagnosis_section(rows: list[dict], path: Path, failed: set[str] = frozenset()) -> list[str]:
    """The step-level fine-tuning traces of ``diagnose_finetune.py``: a table, a plot and what they show."""
    src = RESULTS / "finetune_diagnosis.json"
    if not src.is_file():
        return []
    d = json.loads(src.read_text(encoding="utf-8"))
    task, budget, diag = d["task"], d["budget"], d["rows"]
    total = diag[0]["trace"][-1]["step"]
    per_epoch = total // d["epochs"]
    steps = sorted({p["step"] for p in diag[0]["trace"][:5]} | {per_epoch * e for e in range(1, d["epochs"] + 1)})
    idx = index(rows)
    main_metric = d.get("metric") or metric_of(rows, task)
    out = [f"### Why some fine-tunes do not learn ({TASK_NAMES[task]} at {budget:g} FLOPs)", "",
           f"`{d['command']}` (JSON: `benchmarks/results/finetune_diagnosis.json`). Each plan is pruned as in the "
           f"grid (seed 0) and fine-tuned with the recipe's settings in a plain PyTorch loop that scores the first "
           f"{d['eval_examples']} dev examples every {d['every']} steps ({per_epoch} steps per epoch). *Frozen probe*: "
           f"ridge regression / least-squares classifier on the untouched model's final [CLS] vectors of the same "
           f"train subset — how much of the task the features hold before any fine-tuning.", "",
           "| strategy | heads per layer | frozen probe | " + " | ".join(f"step {s}" for s in steps)
           + " | grid cell (full dev) |", "| --- | --- | ---: | " + " | ".join("---:" for _ in steps) + " | ---: |"]
    at = lambda r, s: next((p["dev"] for p in r["trace"] if p["step"] == s), math.nan)  # noqa: E731
    grid_cells = {r["strategy"]: [g for g in idx.get((task, r["strategy"], 1.0 if r["strategy"] == "dense" else budget), [])
                                  if g["seed"] == 0] for r in diag}
    for r in diag:
        grid_cell = grid_cells[r["strategy"]]
        heads = ", ".join(map(str, r["heads_per_layer"])) if r.get("heads_per_layer") else "all"
        out.append(f"| {NAMES.get(r['strategy'], r['strategy'])} | {heads} | "
                   f"{100 * r['frozen_probe'][main_metric]:.1f} | "
                   + " | ".join(f"{100 * at(r, s):.1f}" for s in steps) + f" | {fmt(grid_cell, failed=failed)} |")
    dense = next((r for r in diag if r["strategy"] == "dense"), None)
    pruned = [r for r in diag if r["strategy"] != "dense"]
    if dense and pruned:
        probes = [100 * r["frozen_probe"][main_metric] for r in pruned]
        first = [100 * at(r, per_epoch) for r in pruned]
        dense_probe = 100 * dense["frozen_probe"][main_metric]
        dense_first = 100 * at(dense, per_epoch)
        out += ["", f"After one epoch the dense model is at {dense_first:.1f} and the pruned plans at "
                f"{min(first):.1f}–{max(first):.1f}; their frozen probes are {min(probes):.1f}–{max(probes):.1f} "
                f"(dense {dense_probe:.1f})."]
        if dense_probe - min(probes) < (dense_first - max(first)) / 2:
            out[-1] += (" The probes trail dense by far less than the fine-tunes do: the task's information is "
                        "largely in the pruned representations, and what lags is the fine-tune leaving the plateau of "
                        "a nearly constant prediction (see the plot) within the recipe's few hundred steps.")
        trivial = majority_rate(task) or 0.0
        dense_end = 100 * dense["trace"][-1]["dev"]
        # seed-0 grid outcome per plan; plans whose grid cell is missing or infeasible have none
        learned_in_grid = {s: cells[0]["cell"] not in failed for s, cells in grid_cells.items()
                           if s != "dense" and cells and score(cells[0]) is not None}
        plans = [r for r in pruned if r["strategy"] in learned_in_grid]
        for r in plans:
            cells = grid_cells[r["strategy"]]
            here = 100 * r["trace"][-1]["dev"]
            learned_here = here - trivial > dense_end - here
            learned_grid = learned_in_grid[r["strategy"]]
            if learned_here != learned_grid:
                name = NAMES[r["strategy"]]
                out[-1] += (f" {name[0].upper() + name[1:]} {'learned' if learned_here else 'did not learn'} in this run "
                            f"({here:.1f} on the first {d['eval_examples']} dev examples) but "
                            f"{'did' if learned_grid else 'did not'} in the grid ({score(cells[0]):.1f}): with this "
                            "short recipe the outcome depends on the run (data order, the Trainer's details), not only "
                            "on the plan.")
        shape = lambda r: (r["heads_per_layer"], r.get("neurons_per_layer"))  # noqa: E731
        if any(shape(r) == shape(o) and learned_in_grid[r["strategy"]] != learned_in_grid[o["strategy"]]
               for r in plans for o in plans):
            out[-1] += (" Plans with the same heads and neurons per layer can land on either side, so the shape "
                        "alone does not decide it.")
        out[-1] += (" The paper's recipe (the full train set, 3 epochs of batch 32, a 110M model) is much longer "
                    "than this CPU one.")
    plot_diagnosis(d, path, main_metric, per_epoch)
    return out + ["", f"![dev score during fine-tuning](plots/{path.name})", ""]


def plot_diagnosis(d: dict, path: Path, main_metric: str, per_epoch: int) -> None:
    """Dev score vs fine-tuning step, one line per plan, epochs marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diag, task, budget = d["rows"], d["task"], d["budget"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in diag:
        xs = [p["step"] for p in r["trace"]]
        ax.plot(xs, [100 * p["dev"] for p in r["trace"]], marker=".", label=NAMES.get(r["strategy"], r["strategy"]),
                color=COLORS.get(r["strategy"], "black"), linestyle="--" if r["strategy"] == "dense" else "-")
    for e in range(1, d["epochs"]):
        ax.axvline(per_epoch * e, color="gray", linewidth=0.5)
    ax.set_xlabel("fine-tuning step (batch %d)" % d["recipe"]["batch_size"])
    ax.set_ylabel(f"dev {METRIC_NAMES.get(main_metric, main_metric)} x100 (first {d['eval_examples']})")
    ax.set_title(f"{TASK_NAMES[task]}: fine-tuning from dense and {budget:g}-FLOPs plans", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def split_stale(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(current, stale): a cell is stale when the part of the current ``RECIPE`` that concerns its task
    has changed since it ran; ``reproduce.py`` recomputes it, and the tables leave it out."""
    current = [_is_current(r, RECIPE) for r in rows]
    return [r for r, ok in zip(rows, current) if ok], [r for r, ok in zip(rows, current) if not ok]


def versions_line(rows: list[dict]) -> str:
    """'torch 2.13.0+cpu, transformers 5.23.0 (160 cells) / 5.24.0 (8 cells)': each package once, with cell counts
    only where the cells ran under more than one version."""
    counts: dict[str, Counter] = {}
    for r in rows:
        for name, version in r["versions"].items():
            counts.setdefault(name, Counter())[version] += 1
    parts = []
    for name, by_version in counts.items():
        if len(by_version) == 1:
            parts.append(f"{name} {next(iter(by_version))}")
        else:
            parts.append(f"{name} " + " / ".join(f"{v} ({n} cell{'s' * (n != 1)})" for v, n in sorted(by_version.items())))
    return ", ".join(parts)


def render(rows: list[dict], lm: dict[str, list[dict]], stale: list[dict] = (), failed: set[str] = frozenset()) -> str:
    """The README section from current ``rows`` (``stale`` ones are only named; ``failed`` cells get †)."""
    idx = index(rows)
    lines = [START, "", "## Reproduction v1 (recipe cpu-v1, history: half of its fine-tunes did not learn; see v2 above)", "",
             "Generated by `python benchmarks/make_report.py` from `benchmarks/results/reproduce/*.json`, "
             "`benchmarks/results/reproduce_lm/*/*.json` and `benchmarks/results/small_gpt2_train.json`; "
             "do not edit by hand.", ""]
    feasible = [r for r in rows if r.get("finetune")]
    if rows:
        rec = RECIPE.to_dict()
        machines = sorted({f"{r['machine']['cpu']} ({r['machine']['cpus_visible']} cores visible)" for r in rows})
        vers = versions_line(rows)
        threads = sorted({r.get("torch_threads") for r in rows if r.get("torch_threads")})
        loads = [r["loadavg_1m"]["start"] for r in rows]
        wall = sum(r["wall_seconds"] for r in rows)
        expected = grid()
        have = {(r["task"], r["strategy"], round(float(r["budget"]), 4), r["seed"]) for r in rows}
        missing = [c for c in expected if (c.task, c.strategy, round(c.budget, 4), c.seed) not in have]
        evaluated = "full dev set" if rec["eval_limit"] is None else f"first {rec['eval_limit']} dev rows"
        lines += [
            f"**Status:** {len(rows)} of {len(expected)} GLUE cells done ({len(rows) - len(feasible)} infeasible), "
            f"{wall / 3600:.1f} h of cell wall time; {len(missing)} remain"
            + (f" (e.g. {', '.join(c.id for c in missing[:6])}{', …' if len(missing) > 6 else ''})" if missing else "")
            + (". Run `python benchmarks/reproduce.py --recipe cpu-v1` to fill them in (finished cells are skipped)." if missing else
               ": the grid is complete. `python benchmarks/reproduce.py --recipe cpu-v1` reruns it from the cached cells in seconds; "
               "`--recompute TASK/STRATEGY/BUDGET/SEED` redoes one cell.")
            + (f" Left out of the tables: {len(stale)} cell(s) from an earlier recipe, recomputed on the next run "
               f"({', '.join(r['cell'] for r in stale)})." if stale else ""), "",
            f"**Machine:** {'; '.join(machines)}, shared with other jobs (1-min load average at cell start: "
            f"{min(loads):.1f}–{max(loads):.1f}), torch threads per cell: {', '.join(map(str, threads))}. "
            f"**Versions:** {vers}.", "",
            "**Recipe (CPU)** "
            + f"`{rec['name']}`: model all-MiniLM-L6-v2; calibration {rec['calibration_samples']} random train samples "
            f"(labels unused), T = {rec['tokens']} tokens, λ = {rec['lambda_']:g}; fine-tune epochs {by_task(rec['epochs'])} on a "
            f"seeded subset of train ({', '.join(f'{TASK_NAMES[t]} {n}' for t, n in rec['train_limit'].items())} rows), "
            f"batch {rec['batch_size']}, lr {rec['learning_rate']:g} (linear decay, warm-up {rec['warmup_ratio']:g}, "
            f"weight decay {rec['weight_decay']:g}), max length "
            f"{', '.join(f'{TASK_NAMES[t]} {n}' for t, n in rec['max_length'].items())}, fine-tune seed "
            f"{rec['finetune_seed']} for every cell (so differences come from the pruning plan); evaluated on the "
            f"{evaluated}"
            f"; fidelity on the first {rec['fidelity_sentences']} dev sentences. Random: seeds "
            f"{', '.join(map(str, RANDOM_SEEDS))} (pruning seed).", "",
        ]
    lines += ["### Commands", "", "```bash",
              "nice -n 10 python benchmarks/reproduce.py --recipe cpu-v1 # this GLUE grid, resumable",
              "nice -n 10 python benchmarks/train_small_gpt2.py          # small GPT-2 trained here (once)",
              "nice -n 10 python benchmarks/reproduce_lm.py              # GPT-2 perplexity grid, resumable",
              "python benchmarks/reproduce_lm.py --model gpt2            # same grid on OpenAI's GPT-2 (needs the hub)",
              "nice -n 10 python benchmarks/diagnose_finetune.py         # step-level look at fine-tunes that do not learn",
              "python benchmarks/make_report.py                          # this section and the plots",
              "```", ""]
    ran = sorted({r["command"] for r in rows} | {r["command"] for rs in lm.values() for r in rs})
    if ran:
        lines += ["Commands that produced the results below: " + "; ".join(f"`{c}`" for c in ran) + ".", ""]

    if rows:
        lines += ["### Accuracy vs FLOPs (paper Fig. 5)", "",
                  "![dev metric vs FLOPs ratio](plots/reproduce_glue.png)", "",
                  "![embedding fidelity vs FLOPs ratio](plots/reproduce_fidelity.png)", ""]
        lines += glue_tables(rows, failed)
        lines += ["### Where Dual-CP wins, ties or loses", "",
                  "Computed from the tables above. A difference counts as a tie when it is smaller than one standard "
                  "error of the difference of two accuracies on that dev set, sqrt(2p(1−p)/n) at the pair's mean "
                  "accuracy p (at the dense score: "
                  + ", ".join(f"{TASK_NAMES[t]} ±{tie_band(t, rows, agg([score(r) for r in idx[(t, 'dense', 1.0)]])[0]):.1f}"
                              for t in TASKS if t != "stsb" and idx.get((t, "dense", 1.0)))
                  + " points); 1 point for STS-B's Spearman. Random uses the mean over its seeds. Infeasible baseline "
                  "cells (KCM prunes no heads, so it cannot reach low budgets) are not counted.", ""]
        comp, _ = compare(idx, rows, failed)
        lines += comp or ["(no comparable cells yet)"]
        lines += fidelity_summary(idx)
        lines += ["", f"### Table 2 ablation at {ABLATION_BUDGET:g} FLOPs", "",
                  "+MC = Dual-CP's module clustering with a random member kept per cluster; +CS = clustering and "
                  "centroid selection (= Dual-CP). In parentheses: the gain over Random (mean over seeds), as in the "
                  "paper's Table 2.", ""]
        lines += ablation_table(rows, failed)
        lines += ["", "### Does `--compensate lstsq` still matter after fine-tuning?", "",
                  "The same cells with the kept weights re-solved before fine-tuning (`ppkit prune --compensate "
                  "lstsq`, default 2048 moment tokens); same fine-tuning recipe. Differences within the tie band "
                  "above are noise.", ""]
        lines += compensation_lines(rows, failed)
        lines += ["", f"### Fine-tuning speedup at {ABLATION_BUDGET:g} FLOPs (paper: {PAPER_SPEEDUP}x on MNLI with BERT-base)", "",
                  "Training wall time of the fine-tune (evaluation excluded), same recipe, one torch thread; and the "
                  "process CPU time of the whole `finetune()` call (loading, training, evaluation), which depends less "
                  "on the other jobs sharing the machine. The load average at the start of each cell is shown: the "
                  "wall-time ratio is noisy.", ""]
        lines += speedup_lines(rows)
        lines.append("")
        lines += diagnosis_section(rows, PLOTS / "finetune_diagnosis.png", failed)
    if lm or (RESULTS / "small_gpt2_train.json").is_file():
        lines += ["### GPT-2: perplexity vs FLOPs (paper Fig. 3)", ""]
        lm_lines, _ = lm_section(lm)
        lines += lm_lines
    lines += differences(rows, lm) + ["", END]
    return "\n".join(lines) + "\n"


def differences(rows: list[dict], lm: dict[str, list[dict]]) -> list[str]:
    """The list of deviations from the paper; recipe numbers come from the results' recipes."""
    rec = RECIPE.to_dict() if rows else None
    lm_rec = next((r["recipe"] for rs in lm.values() for r in rs), None)
    calib = (f"{rec['calibration_samples']} samples instead of 3000 (T = {rec['tokens']} and λ = {rec['lambda_']:g}"
             if rec else "fewer samples than the paper's 3000 (T and λ")
    ft = (f"epochs {by_task(rec['epochs'])} on a seeded subset of {min(rec['train_limit'].values())}–"
          f"{max(rec['train_limit'].values())} training rows with batch {rec['batch_size']} and lr "
          f"{rec['learning_rate']:g}" if rec else "a short fine-tune on a training subset")
    lm_ft = (f"{lm_rec['ft_train_blocks']} PTB blocks ({lm_rec['ft_epochs']} epoch, batch {lm_rec['ft_batch_size']}, "
             f"lr {lm_rec['ft_learning_rate']:g})" if lm_rec else "a short run on PTB")
    return ["### How this differs from the paper", "",
              "- **Model:** all-MiniLM-L6-v2 (6 layers, 384 hidden, 12 heads of 32, FFN 1536; a "
              "sentence-embedding model distilled from a larger one) instead of BERT-base (12 layers, 768, 110M). "
              "A smaller, already-distilled model probably has less redundancy to remove than BERT-base.",
              "- **GPT-2:** no OpenAI GPT-2 weights are available offline; the GPT-2 numbers are from a **small GPT-2 "
              "trained here** on PTB train for about one epoch (see above), not OpenAI's GPT-2 (124M, trained on WebText). "
              "Its perplexities are not comparable to the paper's. `--model gpt2` runs the same grid on the real one.",
              "- **Data:** no MNLI, QQP or QNLI-train files are available, so those columns of Fig. 5 / Table 2 are "
              "missing; SST-2, MRPC, STS-B and RTE are used. WikiText-103 is not available and WikiText-2 has no train "
              "split; the local WikiText-2 valid/test are the **tokenised** variant (`<unk>`, `@-@`), and perplexity "
              "is measured on the first tokens of each split, not all of it.",
              f"- **Calibration:** {calib} as the paper); ppkit's exact "
              "threshold from the dendrogram instead of the δ scan.",
              f"- **Fine-tuning:** {ft}, "
              "instead of the BERT recipe (3 epochs on the full training set, batch 32, lr 2e-5); the LM fine-tune is "
              f"{lm_ft} instead of 20 epochs of PTB. Absolute scores are therefore lower than the paper's, "
              "and differences between strategies within a tie band are not meaningful.",
              "- **Seeds:** random pruning uses 3 seeds; KCM, Dual-CP and worst are deterministic given the "
              "calibration sample (seed 0); the paper averages KCM over 10 runs. One fine-tuning seed for all cells.",
              "- **KCM** is ppkit's re-implementation (FFN neurons only, as in Nova et al.); it cannot reach budgets "
              "below the attention share of FLOPs, which are marked infeasible.",
              "- **Speedup:** measured on shared CPU cores with one torch thread, not on a GPU."]


def write_readme(text: str, readme: Path = README) -> None:
    current = readme.read_text(encoding="utf-8") if readme.is_file() else "# Benchmarks\n"
    if START in current and END in current:
        head, rest = current.split(START, 1)
        tail = rest.split(END, 1)[1]
        new = head + text.rstrip("\n") + tail
    else:
        new = current.rstrip("\n") + "\n\n" + text
    readme.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    global RESULTS, PLOTS
    p = argparse.ArgumentParser(description="Reproduction tables + plots from the JSON results into benchmarks/README.md")
    p.add_argument("--print", action="store_true", help="print the section instead of writing README.md")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--plots", type=Path, default=PLOTS, help="where the PNGs go (default benchmarks/plots)")
    args = p.parse_args(argv)
    RESULTS, PLOTS = args.results, args.plots
    rows, stale = split_stale(load_glue(args.results / "reproduce"))  # tables and plots leave out stale cells
    failed = failed_cells(rows)
    lm = load_lm(args.results / "reproduce_lm")
    if rows:
        plot_glue(rows, PLOTS / "reproduce_glue.png", failed=failed,
                  title="MiniLM-L6 P-pruned then fine-tuned (CPU recipe; dashed = dense)")
        plot_glue(rows, PLOTS / "reproduce_fidelity.png",
                  key=lambda r: None if r.get("fidelity") is None else r["fidelity"]["mean_cosine"],
                  ylabel="mean cosine to dense embedding", title="Sentence-embedding fidelity before fine-tuning")
    text = render(rows, lm, stale, failed)
    if args.print:
        print(text)
    else:
        write_readme(text, args.readme)
        print(f"wrote the reproduction section of {args.readme} ({len(rows)} GLUE cells, "
              f"{sum(len(v) for v in lm.values())} LM cells)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
