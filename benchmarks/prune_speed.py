"""How fast is pruning? Stage timings and peak memory of statistics + Dual-CP against a plain forward pass.

For each model (the real all-MiniLM-L6-v2 and a random BERT-base-shaped model) and each statistics
mode (``--tokens 200`` and ``all``), one fresh subprocess:

1. loads the model and the calibration batches (SST-2 train sentences, seeded sample, padded per
   batch to at most ``--max-length``; ``ppkit.data.calibration_batches``),
2. times a plain forward pass over all batches (``inference_mode``; best of ``--repeats``),
3. times ``collect_statistics`` (the same forward pass with ppkit's hooks; best of ``--repeats``),
4. times ``run_strategy("dual-cp")`` (similarity, head mapping, linkage, threshold, centroids),

and reports per stage: plain forward, statistics overhead (3 - 2), clustering/selection (4),
``ratio = (3 + 4) / 2`` (target <= 1.3 for tokens=200) and peak RSS (``resource.getrusage``) after
each stage, plus the bytes held by the statistics object. Results go to
``benchmarks/results/prune_speed.json`` with the machine, versions and command.

    python benchmarks/prune_speed.py                       # MiniLM 3000 x 128 and BERT-base 300 x 128
    python benchmarks/prune_speed.py --bert-base-samples 0 # MiniLM only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PPKIT_SHARED_DATA", REPO.parent / "shared" / "data"))
MINILM = SHARED / "models" / "all-MiniLM-L6-v2"
SST2 = SHARED / "glue" / "SST-2"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def tensor_bytes(obj) -> int:
    import torch

    seen, total, stack = set(), 0, [obj]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif hasattr(x, "__dict__"):
            stack.extend(vars(x).values())
    return total


def measure(model_kind: str, tokens: str, samples: int, max_length: int, flops: float, repeats: int, threads: int) -> dict:
    """One measurement (runs inside a fresh subprocess so peak RSS belongs to this configuration)."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    from ppkit.adapters import get_adapter
    from ppkit.data import calibration_batches
    from ppkit.registry import PruningContext, run_strategy
    from ppkit.statistics import collect_statistics

    torch.set_num_threads(threads)
    rss = {"start": peak_rss_mb()}
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    if model_kind == "minilm":
        model = AutoModel.from_pretrained(MINILM)
    else:
        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size))  # bert-base shape, random weights
    model.eval()
    shape = get_adapter(model).shape()
    calib = calibration_batches("sst2", tokenizer, data=SST2, samples=samples, max_length=max_length, seed=0, batch_size=32)
    batches = calib.batches
    rss["loaded"] = peak_rss_mb()

    def plain() -> None:
        with torch.inference_mode():
            for b in batches:
                model(**b)

    with torch.inference_mode():
        model(**batches[0])  # warm-up
    n_tokens = None if tokens == "all" else int(tokens)
    plain_s, stats_s, plain_cpu, stats_cpu = [], [], [], []
    stats = None
    for _ in range(repeats):  # interleaved, so a busy machine slows both alike
        t0, c0 = time.perf_counter(), time.process_time()
        plain()
        plain_s.append(time.perf_counter() - t0)
        plain_cpu.append(time.process_time() - c0)
        rss["plain_forward"] = peak_rss_mb()
        stats = None
        t0, c0 = time.perf_counter(), time.process_time()
        stats = collect_statistics(model, batches, tokens=n_tokens, seed=0, progress=False)
        stats_s.append(time.perf_counter() - t0)
        stats_cpu.append(time.process_time() - c0)
    rss["statistics"] = peak_rss_mb()
    ctx = PruningContext(model, get_adapter(model), shape, stats, flops, calib.mean_length, 5.0, 0, {})
    t0, c0 = time.perf_counter(), time.process_time()
    plan = run_strategy("dual-cp", ctx)
    select_s, select_cpu = time.perf_counter() - t0, time.process_time() - c0
    rss["selection"] = peak_rss_mb()
    fwd, st = min(plain_s), min(stats_s)
    fwd_c, st_c = min(plain_cpu), min(stats_cpu)
    return {
        "model": "all-MiniLM-L6-v2" if model_kind == "minilm" else "BERT-base shape (random init)",
        "shape": {"layers": shape.num_layers, "heads": shape.num_heads, "hidden": shape.hidden_size, "ffn": shape.ffn_dim},
        "tokens": tokens,
        "samples": calib.num_samples,
        "max_length": max_length,
        "calibration_tokens": stats.num_tokens,
        "mean_seq_len": round(calib.mean_length, 2),
        "batches": len(batches),
        "seconds": {
            "plain_forward": round(fwd, 3),
            "statistics": round(st, 3),
            "statistics_overhead": round(st - fwd, 3),
            "clustering_selection": round(select_s, 3),
            "total_pruning": round(st + select_s, 3),
            "plain_forward_runs": [round(x, 3) for x in plain_s],
            "statistics_runs": [round(x, 3) for x in stats_s],
        },
        "cpu_seconds": {
            "plain_forward": round(fwd_c, 3),
            "statistics": round(st_c, 3),
            "statistics_overhead": round(st_c - fwd_c, 3),
            "clustering_selection": round(select_cpu, 3),
        },
        "ratio_total_over_forward": round((st + select_s) / fwd, 3),
        "ratio_total_over_forward_cpu_time": round((st_c + select_cpu) / fwd_c, 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "statistics_tensor_mb": round(tensor_bytes(stats) / 2**20, 2),
        "flops_budget": flops,
        "achieved_flops_ratio": round(plan.meta["flops_ratio"], 4),
        "heads_per_layer": plan.heads_per_layer,
        "neurons_per_layer": plan.neurons_per_layer,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000, help="MiniLM calibration samples (paper: 3000)")
    ap.add_argument("--bert-base-samples", type=int, default=300, help="samples for the BERT-base-shaped model (0: skip)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--flops", type=float, default=0.6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--tokens", nargs="+", default=["200", "all"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prune_speed.json")
    ap.add_argument("--_one", nargs=2, metavar=("MODEL", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._one:
        kind, tokens = args._one
        samples = args.samples if kind == "minilm" else args.bert_base_samples
        print(json.dumps(measure(kind, tokens, samples, args.max_length, args.flops, args.repeats, args.threads)))
        return

    import numpy
    import scipy
    import torch
    import transformers

    runs = []
    plan = [("minilm", t) for t in args.tokens]
    if args.bert_base_samples > 0:
        plan += [("bert-base", t) for t in args.tokens]
    for kind, tokens in plan:
        cmd = [sys.executable, __file__, "--_one", kind, tokens, "--samples", str(args.samples),
               "--bert-base-samples", str(args.bert_base_samples), "--max-length", str(args.max_length),
               "--flops", str(args.flops), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            raise SystemExit(f"measurement {kind} tokens={tokens} failed")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(result)
        s = result["seconds"]
        print(f"{result['model']:<32} tokens={tokens:<4} forward {s['plain_forward']:7.2f}s  stats +{s['statistics_overhead']:6.2f}s  "
              f"select {s['clustering_selection']:6.2f}s  ratio {result['ratio_total_over_forward']:.2f} "
              f"(cpu-time {result['ratio_total_over_forward_cpu_time']:.2f})  "
              f"peak RSS {result['peak_rss_mb']['selection']:.0f} MB (after forward {result['peak_rss_mb']['plain_forward']:.0f})",
              file=sys.stderr)
    report = {
        "benchmark": "prune_speed",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": numpy.__version__, "scipy": scipy.__version__},
        "notes": "ratio = (statistics incl. forward + dual-cp selection) / plain forward over the same batches; "
                 "timings are best of --repeats interleaved runs on a shared machine (wall and process CPU time; the "
                 "load average is recorded); peak RSS from getrusage per subprocess.",
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
