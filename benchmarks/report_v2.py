"""The cpu-v2 reproduction (the fine-tuning recipe that learns) from its JSON cells into benchmarks/README.md.

Reads ``benchmarks/results/reproduce-v2/*.json`` (written by ``python benchmarks/reproduce.py``) and
writes the section between ``<!-- reproduce-v2:start -->`` and ``<!-- reproduce-v2:end -->``: what is
done, the recipe each task ran with, the dense scores against the targets of issue 17, one table per
task (mean ± std over fine-tune seeds; † = closer to the trivial predictor than to dense), and what
the teacher adds. The verdict paragraph also goes into the top-level README, and each
``<!-- fact:NAME -->...<!-- /fact -->`` span in either README's prose is rewritten from the cells
(:func:`facts`). The cpu-v1 section (``make_report.py``) stays as history.

    python benchmarks/report_v2.py            # write the section
    python benchmarks/report_v2.py --print    # print it instead
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grid_cells import (PLOTS, README, TASK_NAMES, failed_cells, fmt, load_glue, load_lm, majority_rate,  # noqa: E402
                        plot_glue, score)
from sections import replace_section  # noqa: E402
from reproduce import LABELS, RECIPE_V2, RESULTS_BY_RECIPE, V2_BUDGETS, grid_v2, is_current  # noqa: E402
from reproduce_lm import RECIPE_V2 as LM_RECIPE_V2  # noqa: E402
from reproduce_lm import RESULTS_BY_RECIPE as LM_RESULTS_BY_RECIPE  # noqa: E402
from reproduce_lm import V2_CELLS as LM_V2_CELLS  # noqa: E402

START, END = "<!-- reproduce-v2:start -->", "<!-- reproduce-v2:end -->"
#: the verdict paragraph also goes into the top-level README, between these markers
VERDICT_START, VERDICT_END = "<!-- verdict-v2:start -->", "<!-- verdict-v2:end -->"
TOP_README = Path(__file__).resolve().parents[1] / "README.md"
#: a step becomes a recommended default only with a paired gain at least this significant
DEFAULT_P = 0.05
PLOT = PLOTS / "reproduce_v2_glue.png"
PLOT_STRATEGIES = ("dual-cp", "random", "kcm", "worst", "dual-cp-mc", "dual-cp-lstsq", "random-lstsq", "kcm-lstsq",
                   "worst-lstsq", "dual-cp-lstsq-kd", "random-lstsq-kd")
#: issue 17's bar for the dense model (dev x100, full dev sets)
DENSE_TARGETS = {"sst2": 88.0, "mrpc": 82.0, "stsb": 85.0, "rte": 60.0}
ROWS = ("dense", "dual-cp", "random", "kcm", "worst", "dual-cp-mc", "dual-cp-lstsq", "random-lstsq", "kcm-lstsq",
        "worst-lstsq", "dual-cp-kd", "dual-cp-lstsq-kd", "random-lstsq-kd", "dual-cp-lstsq-kdh")


def cell_text(cells: list[dict], failed: set[str]) -> str:
    """make_report's cell text (mean ± std (n), †), and "·" for a cell not run yet."""
    return fmt(cells, failed=failed) if cells else "·"


def load_lm_v2(results: Path = LM_RESULTS_BY_RECIPE[LM_RECIPE_V2.name]) -> list[dict]:
    """The lm-cpu-v2 cells of the small GPT-2 (``reproduce_lm.py --recipe lm-cpu-v2``) that are current."""
    return [r for r in load_lm(results).get("small-gpt2-here", []) if r.get("recipe_key") == LM_RECIPE_V2.key()]


def render_lm(rows: list[dict]) -> list[str]:
    """The GPT-2 table: perplexity of each lm-cpu-v2 cell before and after one full PTB epoch (the dense
    cell fine-tunes the same epoch: the reference, and the -kd cells' teacher)."""
    out = ["**GPT-2** (the small GPT-2 trained here, not OpenAI's; recipe `lm-cpu-v2`: pruned to 0.5 FLOPs, then "
           "one full PTB train epoch; the dense model fine-tuned for the same epoch is the reference and the "
           "`-kd` cells' teacher; perplexity on the first 8,192 tokens of each test split, lower is better)", ""]
    done = {r["cell"]: r for r in rows}
    if not done:
        return out + [f"Not run yet: `python benchmarks/reproduce_lm.py --recipe lm-cpu-v2` computes "
                      f"{', '.join(LM_V2_CELLS)} (about half an hour each on one thread).", ""]
    out += ["| cell | PTB test, before the epoch | PTB test, after | WikiText-2 test, after | fine-tune min |",
            "| --- | ---: | ---: | ---: | ---: |"]
    for cell in LM_V2_CELLS:
        key = f"{cell}/0"
        if key not in done:
            out.append(f"| {cell} | · | · | · | · |")
            continue
        r = done[key]
        out.append(f"| {cell} | {r['ppl_before_ft']['ptb/test']:.1f} | {r['ppl_after_ft']['ptb/test']:.1f} | "
                   f"{r['ppl_after_ft']['wikitext-2/test']:.1f} | {r['finetune']['train_seconds'] / 60:.0f} |")
    return out + [""]


def todo_cells(rows: list[dict]) -> list:
    """The grid's cells (in run order) that ``rows`` do not hold yet."""
    done = {r["cell"] for r in rows}
    return [c for c in grid_v2() if c.id not in done]


def render(rows: list[dict], lm_rows: list[dict] = ()) -> str:
    expected = grid_v2()
    todo = todo_cells(rows)
    failed = failed_cells(rows)
    cpu_h = sum((r.get("finetune") or {}).get("cpu_seconds", 0.0) for r in rows) / 3600
    wall_h = sum(r.get("wall_seconds", 0.0) for r in rows) / 3600
    per_cpu = Counter(_cpu(r) for r in rows)
    machines = "; ".join(f"{n} on {cpu}" for cpu, n in per_cpu.most_common())
    out = [START, "", "## Reproduction v2 (recipe cpu-v2: the fine-tuning recipe that learns)", "",
           "Generated by `python benchmarks/report_v2.py` from `benchmarks/results/reproduce-v2/*.json`; do not "
           "edit by hand.", "",
           f"**Status:** {len(expected) - len(todo)} of {len(expected)} cells of the cpu-v2 grid are done "
           f"({wall_h:.1f} h of cell wall time, {cpu_h:.1f} CPU-hours inside fine-tuning, one thread per cell; cells run {machines}); "
           + (f"{len(todo)} remain, first {', '.join(c.id for c in todo[:3])}{remaining_time(rows, todo)}. "
              "`python benchmarks/reproduce.py` computes them in this order (two runners share the grid)."
              if todo else "the grid is complete."),
           "",
           "Recipe `cpu-v2`: all-MiniLM-L6-v2, full train sets (SST-2: 20,000 rows), pruning calibrated on 3000 "
           "unlabeled train samples (T = 200, λ = 5, pruning seed 0), then `ppkit finetune` **with its defaults** "
           "(mean pooling as the checkpoint was trained, head bias at the label mean / class prior, learning rate by "
           "width, at least 1000 steps, warm-up 10%, weight decay 0.01, batches grouped by length); `-kd` cells add "
           "`--teacher` (the dense model fine-tuned by the same recipe; KL at T = 2, weight 0.5). Dev x100 "
           "(accuracy; Spearman for STS-B), best epoch; mean ± std over fine-tune seeds where n > 1; † = closer to "
           "the trivial predictor than to dense (did not learn).", "",
           ("**Verdict so far.** " if todo else "**Verdict.** ") + verdict(rows, lm_rows), ""]
    if rows:
        out += [f"![dev metric vs FLOPs, cpu-v2](plots/{PLOT.name})", ""]
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
    out += issue17_bars(rows, failed)
    gains = []
    for t in tasks:
        for b in V2_BUDGETS:
            plain = {r.get("ft_seed", 0): r for r in by_cell.get((t, "dual-cp", b), [])}
            kd = {r.get("ft_seed", 0): r for r in by_cell.get((t, "dual-cp-kd", b), [])}
            seeds = sorted(set(plain) & set(kd))
            if seeds:
                diff = [score(kd[s]) - score(plain[s]) for s in seeds]
                # a time ratio means something only between two runs on the same CPU model
                cost = [_epoch_seconds(kd[s]) / _epoch_seconds(plain[s]) for s in seeds if _cpu(kd[s]) == _cpu(plain[s])]
                timing = f"training time per epoch x{statistics.fmean(cost):.2f}" if cost else "run on different CPUs"
                gains.append(f"{TASK_NAMES[t]} {b:g}: {statistics.fmean(diff):+.1f} (fine-tune seeds {seeds}; {timing})")
    if gains:
        out += ["What `--teacher` adds to Dual-CP (same fine-tune seeds, points): " + "; ".join(gains) + ".", ""]
    tests = [(a, b, paired(rows, a, b)) for a, b in PAIRS]
    lines = [f"- {LABELS[a]} vs {LABELS[b]}: {_summary(t)}" for a, b, t in tests if t]
    out += ["Paired comparisons (two-sided Wilcoxon signed-rank test over every task × budget × fine-tune seed "
            "both strategies ran, pruning seed 0):", ""] + (lines or ["- fewer than 3 pairs so far for every comparison"]) + [""]
    out += render_lm(lm_rows)
    out.append(END)
    return "\n".join(out) + "\n"


def scores_by_ft_seed(rows: list[dict], task: str, strategy: str, budget: float) -> dict[int, float]:
    """{fine-tune seed: score} of one table cell (pruning seed 0), for the cells that have a score."""
    return {r.get("ft_seed", 0): score(r) for r in rows if (r["task"], r["strategy"], r.get("seed", 0)) ==
            (task, strategy, 0) and round(float(r["budget"]), 2) == budget and score(r) is not None}


def dense_scores(rows: list[dict]) -> dict[str, list[float]]:
    """{task: the dense cells' scores} for every task, empty where no dense cell ran."""
    return {t: [score(r) for r in rows if r["task"] == t and r["strategy"] == "dense" and score(r) is not None]
            for t in TASK_NAMES}


def issue17_bars(rows: list[dict], failed: set[str]) -> list[str]:
    """Issue 17's two bars for pruned models, generated: does every plan at 0.6 and 0.4 learn (plain
    fine-tuning, and with lstsq, ``ppkit prune``'s default), and is Dual-CP at 0.6 with ``--teacher``
    (predictions only, then with hidden states) within 2 points of the dense mean (mean over fine-tune
    seeds), with its difference to the same seeds with fewer steps."""
    first = {(r["task"], r["strategy"], round(float(r["budget"]), 2)): r for r in rows
             if r.get("seed", 0) == 0 and r.get("ft_seed", 0) == 0}
    out = ["**Does every plan learn?** (the four strategies at 0.6 and 0.4 on all four tasks, pruning seed 0, "
           "fine-tune seed 0; issue 17 asks it of STS-B, MRPC and RTE)", ""]
    for label, suffix in (("plain fine-tuning (the paper's P-pruning, `--compensate none`)", ""),
                          ("`--compensate lstsq` before fine-tuning (`ppkit prune`'s default for a pre-trained "
                           "encoder)", "-lstsq")):
        keys = [(t, s + suffix, b) for t in TASK_NAMES for b in (0.6, 0.4) for s in ("dual-cp", "random", "kcm", "worst")]
        ran = [k for k in keys if k in first and score(first[k]) is not None]
        missed = [f"{TASK_NAMES[t]} {LABELS[s]} {b:g}" for t, s, b in ran if first[(t, s, b)]["cell"] in failed]
        out.append(f"- {label}: {len(ran) - len(missed)} of {len(ran)} cells run learned"
                   + (f"; did not learn (†): {', '.join(missed)}" if missed else "")
                   + (f"; {len(keys) - len(ran)} not run yet" if len(ran) < len(keys) else "") + ".")
    dense = dense_scores(rows)
    for student, bases in (("dual-cp-lstsq-kd", ("dual-cp-lstsq", "dual-cp")),
                           ("dual-cp-lstsq-kdh", ("dual-cp-lstsq-kd", "dual-cp-lstsq", "dual-cp"))):
        lines = []
        for t in TASK_NAMES:
            kd = scores_by_ft_seed(rows, t, student, 0.6)
            if not kd or not dense[t]:
                continue
            gap = statistics.fmean(kd.values()) - statistics.fmean(dense[t])
            text = (f"{TASK_NAMES[t]} {statistics.fmean(kd.values()):.1f} (n={len(kd)}) vs dense "
                    f"{statistics.fmean(dense[t]):.1f}: {gap:+.1f}, {'within' if gap >= -2 else 'not within'} 2 points")
            for base in bases:
                plain = scores_by_ft_seed(rows, t, base, 0.6)
                seeds = sorted(set(kd) & set(plain))
                if seeds:
                    text += f"; vs {LABELS[base]} {statistics.fmean(kd[s] - plain[s] for s in seeds):+.1f} (seeds {seeds})"
            lines.append(text)
        if lines:
            out += ["", f"**{LABELS[student]} at 0.6** (lstsq being the default), mean over fine-tune seeds, against "
                    "the dense mean (issue 17: within 2 points on SST-2, MRPC and STS-B), and the difference to the "
                    "same fine-tune seeds with less: " + "; ".join(lines) + "."]
    return out + [""]


def verdict(rows: list[dict], lm_rows: list[dict] = ()) -> str:
    """One generated paragraph: the dense scores against their targets, the best strategy per task at 0.6
    and 0.4, the paired tests, what lstsq + teacher and the teacher alone add, and what that means for
    the defaults of ``--compensate`` and ``--teacher``; then the GPT-2 cells."""
    by = defaultdict(list)
    for r in rows:
        if score(r) is not None and r.get("seed", 0) == 0:
            by[(r["task"], r["strategy"], round(float(r["budget"]), 2))].append(score(r))
    mean = {k: statistics.fmean(v) for k, v in by.items()}
    tasks = [t for t in TASK_NAMES if (t, "dense", 1.0) in mean]
    n_cells = len(grid_v2())
    parts = [f"{len(rows)} of {n_cells} cells, so every statement is provisional." if todo_cells(rows)
             else f"All {n_cells} cells of the grid."]
    if tasks:
        met = [t for t in tasks if mean[(t, "dense", 1.0)] >= DENSE_TARGETS[t]]
        parts.append("Dense: " + ", ".join(f"{TASK_NAMES[t]} {mean[(t, 'dense', 1.0)]:.1f}" for t in tasks)
                     + f" (targets {', '.join(f'{TASK_NAMES[t]} {DENSE_TARGETS[t]:.0f}' for t in tasks)}: met on "
                       f"{len(met)} of {len(tasks)}).")
    best = []
    for t in tasks:
        for b in (0.6, 0.4):
            ran = {s: mean[(t, s, b)] for s in ("dual-cp", "random", "kcm", "worst") if (t, s, b) in mean}
            if len(ran) >= 2:
                top = max(ran, key=ran.get)
                dcp = "" if top == "dual-cp" or "dual-cp" not in ran else f", Dual-CP {ran['dual-cp']:.1f}"
                best.append(f"{TASK_NAMES[t]} {b:g}: {LABELS[top]} {ran[top]:.1f}{dcp} ({len(ran)} strategies run)")
    if best:
        parts.append("Best pruning strategy per task and budget (among those run): " + "; ".join(best) + ".")
    for (a, b) in PAIRS:
        t = paired(rows, a, b)
        if t:
            parts.append(f"{LABELS[a]} vs {LABELS[b]}: {_summary(t)}.")
    for step, comparisons, supported in STEPS:
        t = paired_over(rows, comparisons)
        against = " and ".join(f"{LABELS[a]} vs {LABELS[b]}" for a, b in comparisons)
        if t is None:
            parts.append(f"{step} ({against}): fewer than 3 paired cells so far.")
        elif t["mean"] > 0 and t["p"] < DEFAULT_P:
            parts.append(f"{step} ({against}): {_summary(t)}, a significant gain: {supported}")
        else:
            parts.append(f"{step} ({against}): {_summary(t)}, no significant gain (p < {DEFAULT_P} is the bar), "
                         "so it stays opt-in.")
    lm = {r["cell"]: r for r in lm_rows}
    ran = [(name, lm[f"{cell}/0"]) for cell, name in LM_NAMES.items() if f"{cell}/0" in lm]
    if ran:
        parts.append("GPT-2 (the small one trained here; one run each; pruned cells at 0.5 FLOPs), PTB test perplexity "
                     "after one more PTB epoch (lower is better; before it in parentheses): "
                     + ", ".join(f"{name} {r['ppl_after_ft']['ptb/test']:.1f} ({r['ppl_before_ft']['ptb/test']:.1f})"
                                 for name, r in ran) + ".")
    return " ".join(parts)


#: the lm-cpu-v2 cells as the verdict names them
LM_NAMES = {"dense/1": "dense", "dual-cp/0.5": "Dual-CP", "random/0.5": "random",
            "dual-cp-kd/0.5": "Dual-CP + --teacher", "random-kd/0.5": "random + --teacher"}


#: the comparisons the verdict rests on: (strategy, against)
PAIRS = (("dual-cp", "random"), ("dual-cp", "kcm"), ("dual-cp", "worst"), ("dual-cp-lstsq", "random-lstsq"),
         ("dual-cp-lstsq", "kcm-lstsq"), ("dual-cp-lstsq", "worst-lstsq"), ("dual-cp-lstsq-kd", "random-lstsq-kd"),
         # the paper's Table 2 ablation at 0.6: what centroid selection adds to module clustering, and what
         # module clustering with a random member adds to random
         ("dual-cp", "dual-cp-mc"), ("dual-cp-mc", "random"))
#: what each step beyond the paper adds, as a 2 x 2 design: (step, the comparisons that isolate it with
#: the other step held fixed (absent, then present), pooled into one test, and what a significant
#: gain means for the CLI)
STEPS = (
    ("`--teacher`", (("dual-cp-kd", "dual-cp"), ("dual-cp-lstsq-kd", "dual-cp-lstsq")),
     "use it whenever a fine-tuned dense model is at hand (it cannot be a default: it needs that model)."),
    ("`--compensate lstsq`", (("dual-cp-lstsq", "dual-cp"), ("dual-cp-lstsq-kd", "dual-cp-kd")),
     "`ppkit prune --compensate auto` (the default) applies it to a pre-trained encoder; `none` is the paper."),
    ("`--distill-hidden 1` on top of `--teacher`", (("dual-cp-lstsq-kdh", "dual-cp-lstsq-kd"),),
     "with a teacher, match its layer outputs too (`--distill-hidden 1`)."),
)


def _summary(t: dict) -> str:
    return f"{t['mean']:+.1f} points over {t['n']} pairs ({t['wins']}–{t['losses']}, p = {t['p']:.2g})"


def paired(rows: list[dict], a: str, b: str, budgets=V2_BUDGETS) -> dict | None:
    """``a`` against ``b`` over every (task, budget, fine-tune seed) both ran (pruning seed 0): mean
    difference in points, wins / losses, and the two-sided Wilcoxon signed-rank p-value (scipy; exact
    for small n). None when fewer than 3 pairs exist."""
    return paired_over(rows, ((a, b),), budgets)


def paired_over(rows: list[dict], comparisons, budgets=V2_BUDGETS) -> dict | None:
    """:func:`paired` with the differences of several (a, b) comparisons pooled into one test (each
    pair still matched on task, budget and fine-tune seed)."""
    from scipy.stats import wilcoxon

    def keyed(strategy: str) -> dict:
        return {(r["task"], round(float(r["budget"]), 2), r.get("ft_seed", 0)): score(r) for r in rows
                if r["strategy"] == strategy and r.get("seed", 0) == 0 and score(r) is not None
                and round(float(r["budget"]), 2) in budgets}

    diffs = []
    for a, b in comparisons:
        left, right = keyed(a), keyed(b)
        diffs += [left[k] - right[k] for k in sorted(set(left) & set(right))]
    if len(diffs) < 3:
        return None
    p = 1.0 if all(d == 0 for d in diffs) else float(wilcoxon(diffs).pvalue)
    return {"n": len(diffs), "mean": statistics.fmean(diffs), "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs), "p": p}


def remaining_time(rows: list[dict], todo: list) -> str:
    """", about N h of one-thread cell time" for the cells not run yet: each priced at the median wall
    time of the done cells of its task and kind (with or without a teacher), preferring those run on
    the CPU of the latest cell; empty when a task has no done cell."""
    timed = [r for r in rows if r.get("wall_seconds")]
    if not timed:
        return ""
    cpu = _cpu(max(timed, key=lambda r: r.get("finished", "")))

    def wall(cell) -> float | None:
        kd = cell.strategy.endswith("-kd")
        for pool in ([r for r in timed if _cpu(r) == cpu], timed):
            for match in (lambda r: r["task"] == cell.task and r["strategy"].endswith("-kd") == kd,
                          lambda r: r["task"] == cell.task):
                walls = [r["wall_seconds"] for r in pool if match(r)]
                if walls:
                    return statistics.median(walls)
        return None

    walls = [wall(c) for c in todo]
    if None in walls:
        return ""
    total = sum(walls) / 3600

    def hours(h: float) -> str:  # one decimal below 10 h, so the two figures stay consistent near the end
        return f"{h:.1f}" if h < 10 else f"{h:.0f}"

    return (f", about {hours(total)} h of one-thread cell time at the speed of {cpu} where measured "
            f"({hours(total / 2)} h as two runners)")


def _cpu(r: dict) -> str:
    return (r.get("machine") or {}).get("cpu") or "an unrecorded CPU"


def _epoch_seconds(r: dict) -> float:
    ft = r["finetune"]
    return ft["train_seconds"] / max(len(ft["epochs"]), 1)


#: a generated phrase inside hand-written prose: <!-- fact:NAME -->text<!-- /fact -->
FACT = re.compile(r"<!-- fact:(?P<name>[^\s>]+) -->.*?<!-- /fact -->", re.S)


def _mean_n(rows: list[dict], task: str, strategy: str, budget: float) -> str:
    """"83.9 (n=3)": the mean over fine-tune seeds (pruning seed 0), or "·" where none ran."""
    vals = list(scores_by_ft_seed(rows, task, strategy, budget).values())
    if not vals:
        return "·"
    return f"{statistics.fmean(vals):.1f}" + (f" (n={len(vals)})" if len(vals) > 1 else "")


def facts(rows: list[dict]) -> dict[str, str]:
    """The phrases the hand-written prose of README.md and benchmarks/README.md quotes from the grid, by
    name, so the prose moves with the grid (see :func:`write_facts`)."""
    def test(comparisons, text) -> str:
        t = paired_over(rows, comparisons)
        return "· (fewer than 3 pairs)" if t is None else text(t)

    out = {
        "compensation-gain": test(STEPS[1][1], lambda t: f"{t['mean']:+.1f} dev points after fine-tuning over "
                                                         f"{t['n']} paired cells"),
        "compensation-wins": test(STEPS[1][1], lambda t: f"in {t['wins']} of {t['n']} paired cells ({t['mean']:+.1f} "
                                                         f"points, Wilcoxon p = {t['p']:.2g})"),
        "teacher-gain": test(STEPS[0][1], lambda t: f"{t['mean']:+.1f} points over {t['n']} pairs"),
    }
    for name, base in (("selection-plain", ""), ("selection-lstsq", "-lstsq")):
        out[name] = "; ".join(
            f"{LABELS[b + base] if base else LABELS[b]} " + test(((f"dual-cp{base}", b + base),), _summary)
            for b in ("random", "kcm", "worst"))
    dense = dense_scores(rows)
    out["expect-0.6"] = "; ".join(
        f"{TASK_NAMES[t]}: dense {statistics.fmean(dense[t]):.1f}, " + " / ".join(
            _mean_n(rows, t, s, 0.6) for s in ("dual-cp", "dual-cp-lstsq", "dual-cp-lstsq-kd"))
        for t in ("stsb", "sst2", "mrpc", "rte") if dense[t])
    return out


def write_facts(path: Path, values: dict[str, str]) -> None:
    """Replace every ``<!-- fact:NAME -->...<!-- /fact -->`` span of ``path`` with ``values[NAME]``; a
    name that :func:`facts` does not produce is an error (a stale marker would silently keep old text)."""
    text = path.read_text(encoding="utf-8")
    if text.count("<!-- fact:") != len(FACT.findall(text)):
        raise SystemExit(f"{path}: a '<!-- fact:NAME -->' marker without its '<!-- /fact -->' (or a malformed one)")
    unknown = sorted({m["name"] for m in FACT.finditer(text)} - set(values))
    if unknown:
        raise SystemExit(f"{path}: unknown generated fact(s) {', '.join(unknown)}; facts are {', '.join(values)}")
    path.write_text(FACT.sub(lambda m: f"<!-- fact:{m['name']} -->{values[m['name']]}<!-- /fact -->", text),
                    encoding="utf-8")


def write(text: str, readme: Path = README) -> None:
    """The section goes before the cpu-v1 one (history) the first time."""
    replace_section(readme, START, END, text, before="<!-- reproduce:start -->")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--print", action="store_true", help="print the section instead of writing README.md")
    p.add_argument("--results", type=Path, default=RESULTS_BY_RECIPE[RECIPE_V2.name])
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--plots", type=Path, default=PLOTS, help="where the PNG goes (default benchmarks/plots)")
    args = p.parse_args(argv)
    rows = [r for r in load_glue(args.results) if is_current(r, RECIPE_V2)]
    lm_rows = load_lm_v2()
    text = render(rows, lm_rows)
    if rows and not args.print:
        plot_glue(rows, args.plots / PLOT.name, failed=failed_cells(rows), budgets=V2_BUDGETS,
                  strategies=PLOT_STRATEGIES,
                  title="MiniLM-L6 pruned, then fine-tuned by the cpu-v2 recipe")
    if args.print:
        print(text)
    else:
        values = facts(rows)  # first: a stale fact marker stops the run before any section is rewritten
        for path in (args.readme, TOP_README):
            write_facts(path, values)
        write(text, args.readme)
        replace_section(TOP_README, VERDICT_START, VERDICT_END,
                        f"{VERDICT_START}\n**Reproduction v2, generated by `python benchmarks/report_v2.py`:** "
                        f"{verdict(rows, lm_rows)}\n{VERDICT_END}\n")
        print(f"wrote the cpu-v2 section of {args.readme} ({len(rows)} cells)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
