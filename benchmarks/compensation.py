"""Does `--compensate` make a pruned model better *before* fine-tuning? (real all-MiniLM-L6-v2)

For dual-cp and random (3 seeds each), worst and kcm at FLOPs 0.8 / 0.6 / 0.4, each with compensation
none / merge / lstsq, this measures on held-out SST-2 dev sentences:

- fidelity to the dense model: mean cosine between dense and pruned mean-pooled embeddings, and the
  relative error |H_pruned - H_dense| / |H_dense| of the last hidden states (padding excluded);
- SST-2 dev accuracy of a logistic-regression probe trained on frozen mean-pooled embeddings of
  SST-2 train sentences (the dense model's probe is the reference);
- the cost of compensation beside the calibration forward pass, on 3000 SST-2 samples as
  `ppkit prune --samples 3000`: a plain forward pass, the statistics pass alone, and the statistics
  pass with the moment collector riding on it (interleaved rounds, medians), plus the lstsq solve
  of the Dual-CP plan at each budget, all on one thread;
- whether capping the moments at ``MOMENT_TOKENS`` tokens costs quality: ``lstsq-all`` cells use
  every calibration token (dual-cp and random seed 0).

Statistics and moments are collected once on the dense model and shared by every cell. Results:
``benchmarks/results/compensation.json`` and ``compensation.png``.

    python benchmarks/compensation.py                 # the full grid (~20-40 min on 2 busy cores)
    python benchmarks/compensation.py --budgets 0.6 --strategies dual-cp --seeds 0 --probe-train 500   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PPKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
SST2 = SHARED / "glue" / "SST-2"
RESULTS = REPO / "benchmarks" / "results"


def pooled_and_hidden(model, batches) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pooled, hidden = [], []
    with torch.inference_mode():
        for b in batches:
            h = model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled.append((h * mask).sum(1) / mask.sum(1))
            hidden.append(h[b["attention_mask"].bool()])
    return torch.cat(pooled), hidden


def probe_accuracy(train_x, train_y, dev_x, dev_y, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(scaler.transform(train_x), train_y)
    return float(clf.score(scaler.transform(dev_x), dev_y))


def batches_of(dataset, tokenizer, batch_size: int = 64):
    collate = dataset.collator(tokenizer)
    feats = [dataset[i] for i in range(len(dataset))]
    out, labels = [], []
    for i in range(0, len(feats), batch_size):
        batch = collate(feats[i:i + batch_size])
        labels.append(batch.pop("labels"))
        out.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return out, torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.8,0.6,0.4")
    parser.add_argument("--strategies", default="dual-cp,random,worst,kcm")
    parser.add_argument("--methods", default="none,merge,lstsq")
    parser.add_argument("--seeds", default="0,1,2", help="seeds for dual-cp and random (calibration sample, random choices)")
    parser.add_argument("--samples", type=int, default=1000, help="calibration samples (SST-2 train)")
    parser.add_argument("--timing-samples", type=int, default=3000, help="calibration samples for the cost measurement")
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--probe-train", type=int, default=2000, help="SST-2 train sentences for the probe")
    parser.add_argument("--out", type=Path, default=RESULTS / "compensation.json")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the README section from --out")
    parser.add_argument("--no-readme", action="store_true", help="leave benchmarks/README.md alone (side runs, e.g. "
                        "--methods none,lstsq,lstsq-seq --out benchmarks/results/compensation-seq.json)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only re-measure the cost section into the existing --out (the cells stay)")
    args = parser.parse_args()
    if args.report_only:
        write_readme_section(json.loads(args.out.read_text(encoding="utf-8")))
        return
    if args.timing_only:
        from ppkit.models import load_model, load_tokenizer

        result = json.loads(args.out.read_text(encoding="utf-8"))
        result["timing_s"] = measure_cost(load_model(MINILM), load_tokenizer(MINILM), args.timing_samples,
                                          args.timing_rounds, [float(b) for b in args.budgets.split(",")])
        result["timing_command"] = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        write_readme_section(result)
        return
    torch.manual_seed(0)

    from ppkit import registry
    from ppkit.adapters import get_adapter
    from ppkit.compensate import MOMENT_TOKENS, MomentCollector, compensate_model
    from ppkit.sequential import reconstruct_sequential
    from ppkit.data import calibration_batches, load_task_dataset
    from ppkit.models import load_model, load_tokenizer
    from ppkit.pipeline import versions
    from ppkit.plotting import save_figure
    from ppkit.statistics import collect_statistics
    from ppkit.surgery import prune_model

    dense = load_model(MINILM)
    tokenizer = load_tokenizer(MINILM)
    adapter = get_adapter(dense)
    shape = adapter.shape()
    timing = measure_cost(dense, tokenizer, args.timing_samples, args.timing_rounds,
                          [float(b) for b in args.budgets.split(",")])
    print(f"cost: {timing}", file=sys.stderr)
    calibrated: dict[int, tuple] = {}

    def calibrate(seed: int):
        """Calibration sample, statistics and moments for ``seed`` (as ``ppkit prune --seed``), cached."""
        if seed not in calibrated:
            calib = calibration_batches("sst2", tokenizer, data=SST2, samples=args.samples, seed=seed)
            collectors = {"lstsq": MomentCollector(dense, seed=seed)}
            if seed == 0:
                collectors["lstsq-all"] = MomentCollector(dense, seed=seed, max_tokens=None)
            stats = collect_statistics(dense, calib.batches, tokens=200, seed=seed, progress=False,
                                       observers=list(collectors.values()))
            moments = {k: c.moments() for k, c in collectors.items()}
            moments["merge"] = moments["lstsq"]
            calibrated[seed] = (calib, stats, moments)
        return calibrated[seed]

    calib = calibrate(0)[0]

    probe_train = load_task_dataset("sst2", tokenizer, "train", data=SST2, limit=args.probe_train, limit_seed=1)
    train_batches, train_y = batches_of(probe_train, tokenizer)
    dev_batches, dev_y = batches_of(load_task_dataset("sst2", tokenizer, "dev", data=SST2), tokenizer)

    def evaluate(model) -> dict[str, float]:
        dev_pooled, dev_hidden = pooled_and_hidden(model, dev_batches)
        train_pooled, _ = pooled_and_hidden(model, train_batches)
        cos = torch.nn.functional.cosine_similarity(dev_pooled, dense_dev_pooled).mean().item()
        num = sum(float((h - d).pow(2).sum()) for h, d in zip(dev_hidden, dense_dev_hidden))
        den = sum(float(d.pow(2).sum()) for d in dense_dev_hidden)
        acc = probe_accuracy(train_pooled.numpy(), train_y.numpy(), dev_pooled.numpy(), dev_y.numpy(), seed=0)
        return {"cosine": cos, "hidden_rel_error": (num / den) ** 0.5, "probe_accuracy": acc}

    dense_dev_pooled, dense_dev_hidden = pooled_and_hidden(dense, dev_batches)
    dense_eval = evaluate(dense)
    print(f"dense: {dense_eval}", file=sys.stderr)

    cells: list[dict] = []
    result = {
        "benchmark": "compensation",
        "command": "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
        "model": "all-MiniLM-L6-v2 (real weights, no fine-tuning)",
        "calibration": {"task": "sst2", "samples": calib.num_samples, "tokens": calib.num_tokens, "mean_length": calib.mean_length},
        "probe": {"train_sentences": len(train_y), "dev_sentences": len(dev_y)},
        "moment_tokens": MOMENT_TOKENS,
        "timing_s": timing,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0]},
        "versions": versions(),
        "dense": dense_eval,
        "complete": False,
        "cells": cells,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    for budget in [float(b) for b in args.budgets.split(",")]:
        for strategy in args.strategies.split(","):
            for seed in (seeds if strategy in ("random", "dual-cp") else [0]):
                seed_calib, stats, moments = calibrate(seed)
                ctx = registry.PruningContext(
                    model=dense, adapter=adapter, shape=shape, stats=stats, flops_budget=budget,
                    seq_len=seed_calib.mean_length, lambda_=5.0, seed=seed, options={},
                )
                plan = registry.run_strategy(strategy, ctx)
                methods = args.methods.split(",")
                if "lstsq" in methods and strategy in ("dual-cp", "random") and seed == 0:
                    methods.append("lstsq-all")
                for method in methods:
                    model = copy.deepcopy(dense)
                    solve_s, comp = 0.0, None
                    if method == "lstsq-seq":  # sequential: its own truncated passes over the calibration batches
                        t0 = time.perf_counter()
                        comp = reconstruct_sequential(model, plan, seed_calib.batches, seed=seed)
                        solve_s = time.perf_counter() - t0
                    elif method != "none":
                        t0 = time.perf_counter()
                        comp = compensate_model(model, plan, moments[method], method=method.removesuffix("-all"),
                                                assignments=ctx.artifacts.get("assignments"))
                        solve_s = time.perf_counter() - t0
                    prune_model(model, plan)
                    metrics = evaluate(model)
                    cell = {"budget": budget, "strategy": strategy, "seed": seed, "compensation": method,
                            **metrics, "solve_seconds": solve_s,
                            "accepted_sublayers": None if comp is None else comp["accepted"],
                            "heldout_error_before": None if comp is None else comp["mean_error_before"],
                            "heldout_error_after": None if comp is None else comp["mean_error_after"]}
                    cells.append(cell)
                    print(json.dumps(cell), file=sys.stderr)
                    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")  # partial results survive

    result["complete"] = True
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    plot(result, args.out.with_suffix(".png"), save_figure)
    if not args.no_readme:
        write_readme_section(result)
    print(f"wrote {args.out}", file=sys.stderr)


def measure_cost(dense, tokenizer, samples: int, rounds: int, budgets: list[float]) -> dict[str, Any]:
    """What compensation costs beside the calibration forward pass, on ``samples`` SST-2 rows, one
    thread (a fair ratio on a shared machine): median seconds of a plain forward pass, the statistics
    pass, and the statistics pass with the moment collector (interleaved rounds), then the lstsq
    solve of the Dual-CP plan at each budget."""
    from statistics import median

    from ppkit import registry
    from ppkit.adapters import get_adapter
    from ppkit.compensate import MomentCollector, compensate_model
    from ppkit.data import calibration_batches
    from ppkit.statistics import collect_statistics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        calib = calibration_batches("sst2", tokenizer, data=SST2, samples=samples, seed=0)
        times: dict[str, list[float]] = {"plain_forward": [], "statistics": [], "statistics_with_moments": [],
                                         "moments_in_collector": []}
        for _ in range(rounds):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for b in calib.batches:
                    dense(**b)
            times["plain_forward"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            collect_statistics(dense, calib.batches, tokens=200, seed=0, progress=False)
            times["statistics"].append(time.perf_counter() - t0)
            collector = MomentCollector(dense, seed=0)
            t0 = time.perf_counter()
            stats = collect_statistics(dense, calib.batches, tokens=200, seed=0, progress=False, observers=[collector])
            moments = collector.moments()
            times["statistics_with_moments"].append(time.perf_counter() - t0)
            times["moments_in_collector"].append(collector.seconds)
        out: dict[str, Any] = {k: median(v) for k, v in times.items()}
        out.update(samples=calib.num_samples, tokens=calib.num_tokens, rounds=rounds, threads=1, solve_lstsq={})
        adapter = get_adapter(dense)
        for budget in budgets:
            ctx = registry.PruningContext(model=dense, adapter=adapter, shape=adapter.shape(), stats=stats,
                                          flops_budget=budget, seq_len=calib.mean_length)
            plan = registry.run_strategy("dual-cp", ctx)
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            compensate_model(model, plan, moments, method="lstsq")
            out["solve_lstsq"][f"{budget:g}"] = time.perf_counter() - t0
        return out
    finally:
        torch.set_num_threads(threads)


def write_readme_section(result: dict) -> None:
    """Replace the compensation section of benchmarks/README.md with tables generated from ``result``."""
    from collections import defaultdict

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in result["cells"]:
        groups[(c["budget"], c["strategy"], c["compensation"])].append(c)
    methods = ["none", "merge", "lstsq"]
    lines = [
        "<!-- compensation:start (generated by benchmarks/compensation.py, do not edit) -->",
        "",
        f"Command: `{result['command']}` · {result['model']} · calibration {result['calibration']['samples']} SST-2 train "
        f"sentences ({result['calibration']['tokens']} tokens) · probe: logistic regression on "
        f"{result['probe']['train_sentences']} SST-2 train embeddings, scored on {result['probe']['dev_sentences']} dev sentences · "
        f"{result['machine']['cpu_count']} cores (load {result['machine']['load_average_1min']:.1f}) · torch {result['versions']['torch']}.",
        "",
        ("" if result.get("complete", True) else "**Partial run** (the script was stopped before the last cell). ")
        + f"Dense probe accuracy: **{result['dense']['probe_accuracy']:.3f}**. Dual-CP and random: mean of "
        f"{len({c['seed'] for c in result['cells'] if c['strategy'] in ('random', 'dual-cp')})} seeds (the seed picks the calibration "
        "sample and every random choice, as `--seed`).",
        "",
        "| FLOPs | strategy | cosine none / merge / lstsq | hidden rel. error none / merge / lstsq | probe acc. none / merge / lstsq |",
        "| --- | --- | --- | --- | --- |",
    ]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    wins = total = 0
    for (budget, strategy) in sorted({(b, s) for b, s, _ in groups}, key=lambda x: (-x[0], x[1])):
        cols = []
        for key, fmt in (("cosine", "{:.3f}"), ("hidden_rel_error", "{:.3f}"), ("probe_accuracy", "{:.3f}")):
            cols.append(" / ".join(fmt.format(mean(groups[(budget, strategy, m)], key)) if groups.get((budget, strategy, m)) else "-" for m in methods))
        lines.append(f"| {budget:.1f} | {strategy} | " + " | ".join(cols) + " |")
        if groups.get((budget, strategy, "lstsq")) and groups.get((budget, strategy, "none")):
            for a, b in zip(groups[(budget, strategy, "lstsq")], groups[(budget, strategy, "none")]):
                total += 1
                wins += a["cosine"] > b["cosine"]
    t = result["timing_s"]
    capped = {(c["budget"], c["strategy"]): c["cosine"] for c in result["cells"]
              if c["compensation"] == "lstsq" and c["seed"] == 0}
    every = [(k, c["cosine"]) for c in result["cells"] if c["compensation"] == "lstsq-all"
             for k in [(c["budget"], c["strategy"])] if k in capped]
    lines += [
        "",
        f"`lstsq` is closer to the dense model (cosine) than `none` in **{wins} of {total}** (strategy, budget, seed) cells.",
    ]
    per_seed = [
        f"{b:.1f}: " + ", ".join(f"s{n['seed']} {n['cosine']:.3f}→{l['cosine']:.3f}" for n, l in
                                 zip(groups[(b, "dual-cp", "none")], groups[(b, "dual-cp", "lstsq")]))
        for b in sorted({b for b, s_, m in groups if s_ == "dual-cp" and m == "lstsq"}, reverse=True)]
    if per_seed:
        lines.append("Dual-CP per seed, cosine `none`→`lstsq`: " + "; ".join(per_seed) + ".")
    if every:
        lines.append(
            f"Moments from {result['moment_tokens']} sampled calibration tokens (the default) vs all "
            f"{result['calibration']['tokens']}: cosine " + ", ".join(
                f"{s} {b:.1f}: {capped[(b, s)]:.3f} vs {v:.3f}" for (b, s), v in sorted(every)) + ".")
    if "solve_lstsq" in t:
        cost = {b: (t["moments_in_collector"] + v) / t["plain_forward"] for b, v in t["solve_lstsq"].items()}
        lines.append(
            (f"(`{result['timing_command']}`) " if result.get("timing_command") else "")
            + f"Cost on {t['samples']} SST-2 calibration samples ({t['tokens']} tokens), one thread, medians of "
            f"{t['rounds']} interleaved rounds: plain forward {t['plain_forward']:.1f} s, statistics pass "
            f"{t['statistics']:.1f} s, statistics pass with the moment collector {t['statistics_with_moments']:.1f} s "
            f"(inside the collector: {t['moments_in_collector']:.2f} s); the lstsq solve of the Dual-CP plan "
            + ", ".join(f"{v:.2f} s at {b}" for b, v in t["solve_lstsq"].items())
            + ". Compensation (collector + solve) as a share of the plain calibration forward pass: "
            + ", ".join(f"**{v:.1%}** at {b}" for b, v in cost.items()) + ".")
    lines += [
        "",
        "![compensation](results/compensation.png)",
        "",
        "<!-- compensation:end -->",
    ]
    readme = Path(__file__).with_name("README.md")
    text = readme.read_text(encoding="utf-8")
    block = "\n".join(lines)
    start, end = "<!-- compensation:start", "<!-- compensation:end -->"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Compensation before fine-tuning (`--compensate`)\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


def plot(result: dict, path: Path, save_figure) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    strategies = sorted({c["strategy"] for c in result["cells"]})
    styles = {"none": ":", "merge": "--", "lstsq": "-", "lstsq-seq": "-."}
    for ax, key, label in ((axes[0], "cosine", "cosine to dense embeddings"), (axes[1], "probe_accuracy", "SST-2 probe accuracy")):
        for i, strategy in enumerate(strategies):
            for method, style in styles.items():
                rows = [c for c in result["cells"] if c["strategy"] == strategy and c["compensation"] == method]
                if not rows:
                    continue
                budgets = sorted({c["budget"] for c in rows})
                values = [sum(c[key] for c in rows if c["budget"] == b) / sum(1 for c in rows if c["budget"] == b) for b in budgets]
                ax.plot(budgets, values, style, marker="o", color=f"C{i}", label=f"{strategy} / {method}")
        if key == "probe_accuracy":
            ax.axhline(result["dense"][key], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_xlabel("FLOPs kept")
        ax.set_ylabel(label)
        ax.invert_xaxis()
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("MiniLM pruned without fine-tuning: compensation none (dotted) / merge (dashed) / lstsq (solid)")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
