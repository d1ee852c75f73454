"""Retraining-free pruning of an already fine-tuned model (issue 21): prune -> evaluate, no training after.

Sources: all-MiniLM-L6-v2 fine-tuned densely by ``ppkit finetune``'s defaults (the reproduction's dense
cells, kept as the ``-kd`` teachers; computed here through ``reproduce.py`` when missing). Each cell
prunes one source with ``ppkit.pipeline.prune`` (2000 calibration samples of the task's train split, as
Kwon et al.; labels unused) and scores the pruned model on the full dev set. Per task, the CPU time
of one forward pass of the dense model over the same calibration batches is the cost yardstick.

Grid: SST-2, MRPC, STS-B x FLOPs 0.6, 0.4, 0.8, 0.5, 0.7 x fisher (search alone),
fisher-r (with mask rearrangement; no / sequential / mask-tuning reconstruction only), Dual-CP, KCM,
random (seeds 0-2; seeds 1-2 last) x reconstruction none / lstsq (one shot) / lstsq-seq (sequential), and
fisher with Kwon et al.'s own mask tuning (``--compensate mask-tuning``: per-unit scales, sequential).
Run order: ``CORE`` (fisher, Kwon et al.'s method and Dual-CP on STS-B and SST-2) at every budget, then the rest by budget.
One JSON per cell in ``benchmarks/results/retraining_free/``; resumable, two runners share the grid.

    python benchmarks/retraining_free.py --stop-at 10:00     # run (resumable)
    python benchmarks/retraining_free.py --list              # what is done
    python benchmarks/retraining_free.py --report            # table + plot into benchmarks/README.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import replace_section  # noqa: E402
from reproduce import GLUE, RECIPE, TASK_DIRS, ensure_teacher, machine  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "retraining_free"
README = HERE / "README.md"
PLOT = HERE / "plots" / "retraining_free.png"
START, END = "<!-- retraining-free:start -->", "<!-- retraining-free:end -->"
TASKS = ("stsb", "mrpc", "sst2")
BUDGETS = (0.6, 0.4, 0.8, 0.5, 0.7)
STRATEGIES = ("fisher", "fisher-r", "dual-cp", "kcm", "random")
#: grid name -> (ppkit strategy, its options): "fisher" is the mask search alone (how the first cells ran),
#: "fisher-r" adds Kwon et al.'s mask rearrangement (the strategy's default)
STRATEGY_RUNS = {"fisher": ("fisher", {"rearrange_steps": 0}), "fisher-r": ("fisher", None)}
COMPENSATIONS = ("none", "lstsq", "lstsq-seq", "mask-tuning")
SAMPLES = 2000
NAMES = {"sst2": "SST-2", "mrpc": "MRPC", "stsb": "STS-B"}


#: run first, at every budget: fisher (Kwon et al.'s full method included) and Dual-CP with their main
#: reconstructions on STS-B and SST-2
CORE = {"fisher": ("none", "lstsq-seq", "mask-tuning"), "fisher-r": ("mask-tuning",), "dual-cp": ("lstsq", "lstsq-seq")}


def grid() -> list[tuple[str, str, float, int, str]]:
    """(task, strategy, budget, seed, compensation), the most informative first."""
    first = [(t, s, b, 0, c) for b in BUDGETS for t in TASKS for s in STRATEGIES for c in compensations(s)]
    core = [c for c in first if c[0] in ("stsb", "sst2") and c[4] in CORE.get(c[1], ())]
    more_seeds = [(t, "random", b, seed, c) for seed in (1, 2) for b in BUDGETS for t in TASKS for c in compensations("random")]
    return core + [c for c in first if c not in core] + more_seeds


def compensations(strategy: str) -> tuple[str, ...]:
    """Reconstructions run after ``strategy``: mask tuning is the fisher method's own step (Kwon et al.)."""
    if strategy == "fisher-r":
        return ("none", "lstsq-seq", "mask-tuning")
    return COMPENSATIONS if strategy == "fisher" else COMPENSATIONS[:3]


def slug(cell: tuple) -> str:
    task, strategy, budget, seed, comp = cell
    return f"{task}__{strategy}__{budget:g}__s{seed}__{comp}"


def source(task: str) -> Path:
    """The dense fine-tuned model of ``task`` (fine-tuned through reproduce.py's dense cell if missing)."""
    return ensure_teacher(task)


def max_length(task: str, config) -> int:
    """The reproduction's max length for ``task``, within the model's positions."""
    return min(RECIPE.max_length[task], int(getattr(config, "max_position_embeddings", 10**6)))


def dev_score(model, tokenizer, task: str) -> dict[str, float]:
    from ppkit.data import load_task_dataset
    from ppkit.training import evaluate_model

    dev = load_task_dataset(task, tokenizer, "dev", data=GLUE / TASK_DIRS[task], max_length=max_length(task, model.config))
    return evaluate_model(model.eval(), dev)


def forward_seconds(task: str) -> float:
    """One forward pass of the dense fine-tuned model over the calibration batches a cell uses."""
    import torch

    from ppkit.data import calibration_batches
    from ppkit.models import load_model, load_tokenizer

    src = source(task)
    model = load_model(src, head="sequence-classification").eval()
    calib = calibration_batches(task, load_tokenizer(src), data=GLUE / TASK_DIRS[task], samples=SAMPLES,
                                max_length=max_length(task, model.config), seed=0)
    t0 = time.process_time()  # CPU time (one thread): the ratio to pruning's holds on a shared machine
    with torch.inference_mode():
        for batch in calib.batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    return time.process_time() - t0


def run(cell: tuple) -> dict:
    import torch

    from transformers import AutoConfig

    from ppkit.errors import BudgetError
    from ppkit.pipeline import prune

    task, strategy, budget, seed, comp = cell
    src = source(task)
    out = {"cell": slug(cell), "task": task, "strategy": strategy, "budget": budget, "seed": seed,
           "compensation": comp, "source": str(src.name), "samples": SAMPLES, "torch_threads": torch.get_num_threads()}
    if task not in _DENSE:
        from ppkit.models import load_model, load_tokenizer

        dense_dev = dev_score(load_model(src, head="sequence-classification"), load_tokenizer(src), task)
        check_same_source(task, dense_dev)
        _DENSE[task] = {"dev": dense_dev, "forward_cpu_seconds": forward_seconds(task)}
    out["dense"] = _DENSE[task]
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        name, options = STRATEGY_RUNS.get(strategy, (strategy, None))
        res = prune(str(src), task=task, flops=budget, strategy=name, options=options, data=GLUE / TASK_DIRS[task],
                    samples=SAMPLES, seed=seed, compensate=comp, plot=False, progress=False,
                    max_length=max_length(task, AutoConfig.from_pretrained(src)))
    except BudgetError as exc:  # KCM prunes FFN neurons only and cannot reach low budgets
        return {**out, "infeasible": str(exc)}
    r = res.report
    out["prune_seconds"] = time.perf_counter() - t0
    out["prune_cpu_seconds"] = time.process_time() - cpu0
    out["timings_s"] = {k: round(v, 2) for k, v in r["timings_s"].items()}
    out["flops_ratio"] = r["flops_ratio"]
    out["plan_meta"] = {k: v for k, v in r["plan_meta"].items() if isinstance(v, (int, float, str))}
    out["compensation_report"] = {k: v for k, v in r.get("compensation", {}).items() if k != "layers"}
    out["dev"] = dev_score(res.model, res.tokenizer, task)
    return out


_DENSE: dict[str, dict] = {}


def check_same_source(task: str, dense_dev: dict[str, float]) -> None:
    """Stop before mixing source models: on a fresh machine the dense fine-tuned model is fine-tuned
    again, and on another CPU that can give other weights; cells pruned from it would then be compared
    with cells pruned from the first one. Scores within 1e-4 count as the same model: the same weights
    score a few 1e-7 apart on an Intel and an AMD CPU (STS-B's Spearman here)."""
    path = min(RESULTS.glob(f"{task}__*.json"), default=None)  # every finished cell records the same source
    if path is None:
        return
    done = json.loads(path.read_text(encoding="utf-8"))["dense"]["dev"]
    if any(not abs(done[k] - dense_dev.get(k, math.nan)) <= 1e-4 for k in done if k != "loss"):
        raise SystemExit(f"the dense {task} model here scores {_fmt(dense_dev)} on dev, but the cells already "
                         f"in {RESULTS.name}/ were pruned from one scoring {_fmt(done)} (e.g. {path.name}): "
                         "restore that model in the cache, or move the old cells aside to start the task over")


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if k != "loss")


def main_run(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stop = _deadline(args.stop_at)
    for cell in grid():
        if args.tasks and cell[0] not in args.tasks.split(","):
            continue
        path, lock = RESULTS / f"{slug(cell)}.json", RESULTS / f".{slug(cell)}.lock"
        if path.exists():
            continue
        if stop and time.time() > stop:
            print("stop time reached", file=sys.stderr)
            return
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # another runner has it
        except FileExistsError:
            continue
        os.close(fd)
        try:
            t0 = time.perf_counter()
            result = run(cell)
            result.update(wall_seconds=time.perf_counter() - t0, machine=machine(),
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
            tmp.replace(path)
            print(f"{slug(cell)}: {_main(result):.1f} in {result['wall_seconds']:.0f}s", file=sys.stderr)
        finally:
            lock.unlink(missing_ok=True)


def _deadline(hhmm: str | None) -> float | None:
    if not hhmm:
        return None
    h, m = map(int, hhmm.split(":"))
    now = time.localtime()
    return time.mktime(now[:3] + (h, m, 0) + now[6:])


def _main(r: dict, key: str = "dev") -> float:
    """The dev metric x100 (Spearman for STS-B, accuracy otherwise)."""
    metrics = r[key] if key == "dev" else r["dense"]["dev"]
    return 100 * metrics.get("spearman", metrics.get("accuracy", float("nan")))


def load() -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(RESULTS.glob("*.json"))]


def render(rows: list[dict]) -> str:
    from ppkit.plotting import plot_vs_flops

    cells = defaultdict(list)
    for r in rows:
        if "dev" in r:
            cells[(r["task"], r["strategy"], r["compensation"], r["budget"])].append(_main(r))
    done, total = len(rows), len(grid())
    out = [START, "", "## Retraining-free pruning of a fine-tuned MiniLM (no training after pruning)", "",
           "Generated by `python benchmarks/retraining_free.py --report` from `benchmarks/results/retraining_free/`.", "",
           f"**Status:** {done} of {total} cells done. Source: all-MiniLM-L6-v2 fine-tuned densely by `ppkit finetune` "
           f"(recipe cpu-v2); pruned with {SAMPLES} calibration samples of the train split, then scored on the full dev set "
           "(x100; Spearman for STS-B). Reconstruction: none / `--compensate lstsq` (one shot) / `lstsq-seq` "
           "(sequential) for every strategy, and for fisher also `mask-tuning` (Kwon et al.'s per-unit scales, fit "
           "sublayer by sublayer). random: mean over the pruning seeds done. `fisher` is the mask search alone; "
           "`fisher-r` adds the mask rearrangement (the strategy's default; plugins/fisher.py).", ""]
    panels = []
    for task in [t for t in TASKS if any(k[0] == t for k in cells)]:
        dense = next(_main(r, "dense") for r in rows if r["task"] == task)
        budgets = sorted({k[3] for k in cells if k[0] == task}, reverse=True)
        out += [f"**{NAMES[task]}** (dense fine-tuned: {dense:.1f})", "",
                "| strategy | reconstruction | " + " | ".join(f"{b:g}" for b in budgets) + " |",
                "| --- | --- |" + " ---: |" * len(budgets)]
        series = {}
        for strategy in STRATEGIES:
            for comp in COMPENSATIONS:
                vals = [cells.get((task, strategy, comp, b)) for b in budgets]
                if any(vals):
                    out.append(f"| {strategy} | {comp} | " + " | ".join(
                        f"{statistics.fmean(v):.1f}" + (f" ({len(v)})" if len(v) > 1 else "") if v else "·" for v in vals) + " |")
                    pts = [(b, statistics.fmean(v)) for b, v in zip(budgets, vals) if v]
                    if comp != "lstsq":
                        series[f"{strategy} {comp}"] = ([p[0] for p in pts], [p[1] for p in pts])
        out += ["", "Best per budget (vs dense fine-tuned; Kwon et al.'s full method, fisher-r + mask-tuning, beside): " + "; ".join(
            _best(cells, task, b, dense) for b in budgets) + ".", ""]
        panels.append({"series": series, "ylabel": "dev x100", "title": NAMES[task], "reference": dense,
                       "reference_label": "dense fine-tuned"})
    cost = [r for r in rows if "prune_cpu_seconds" in r]
    if cost:
        out += ["CPU time to prune / CPU time of one forward pass of the dense model over the same calibration "
                "samples (median over cells, one thread): " + "; ".join(
            f"{s} {c}: {statistics.median(r['prune_cpu_seconds'] / r['dense']['forward_cpu_seconds'] for r in cost if r['strategy'] == s and r['compensation'] == c):.1f}x"
            for s in STRATEGIES for c in COMPENSATIONS
            if any(r["strategy"] == s and r["compensation"] == c for r in cost)) + ".", ""]
    if panels:
        plot_vs_flops(PLOT, panels, suptitle="Pruning a fine-tuned MiniLM without retraining")
        out += [f"![retraining-free]({os.path.relpath(PLOT, HERE)})", ""]
    out.append(END)
    return "\n".join(out) + "\n"


def _best(cells: dict, task: str, budget: float, dense: float) -> str:
    """The best strategy + reconstruction at ``budget`` (random: mean over seeds), and Kwon et al.'s method."""
    scored = {(s, c): statistics.fmean(v) for (t, s, c, b), v in cells.items() if t == task and b == budget}
    (strategy, comp), best = max(scored.items(), key=lambda kv: kv[1])
    kwon = scored.get(("fisher-r", "mask-tuning"))
    return (f"{budget:g}: {strategy} + {comp} {best:.1f} ({best - dense:+.1f})"
            + (f", Kwon {kwon:.1f} ({kwon - dense:+.1f})" if kwon is not None else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="show done / remaining cells")
    p.add_argument("--report", action="store_true", help="write the table and plot into benchmarks/README.md")
    p.add_argument("--tasks", help="comma list (default: stsb,mrpc,sst2)")
    p.add_argument("--stop-at", help="HH:MM local time: start no cell after it")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: run two runners instead)")
    args = p.parse_args(argv)
    if args.list:
        done = {p.stem for p in RESULTS.glob("*.json")}
        todo = [slug(c) for c in grid() if slug(c) not in done]
        print(f"{len(done)} done, {len(todo)} remain; next: {', '.join(todo[:5])}")
    elif args.report:
        replace_section(README, START, END, render(load()))
        print(f"wrote {README}", file=sys.stderr)
    else:
        main_run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
