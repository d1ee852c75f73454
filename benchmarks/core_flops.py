"""FLOPs, parameters and CPU latency of uniformly pruned BERT-base / GPT-2-small shaped models.

For each FLOPs target (kept fraction, 0.9 .. 0.3) a simple uniform plan keeps the first k heads
and the first m neurons of every layer (k = round(target * heads), m chosen so that the total
matches the target at ``--seq``); this is an accounting benchmark, not a pruning method. Models are
randomly initialised (no weights needed). Dense and pruned latency are measured in the same run and
interleaved (dense, pruned, dense, pruned, ...) for every target; the speedup is the ratio of the
minimum times, which is robust to other processes sharing the CPU (all times are recorded too).

    python benchmarks/core_flops.py            # ~2 min on 2 CPU cores
    python benchmarks/core_flops.py --quick    # smaller: batch 2, 1 repeat

Writes benchmarks/results/core_flops.json (machine, versions and command recorded).
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

import torch
import transformers
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

import ppkit
from ppkit.adapters import get_adapter
from ppkit.flops import count_params, plan_flops
from ppkit.plan import LayerPlan, PruningPlan
from ppkit.surgery import prune_model

TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
RESULTS = Path(__file__).resolve().parent / "results" / "core_flops.json"


def build(family: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "bert-base":
        config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                            attn_implementation=attn)
        return BertModel(config, add_pooling_layer=False).eval()
    config = GPT2Config(n_embd=768, n_layer=12, n_head=12, attn_implementation=attn)
    return GPT2Model(config).eval()


def uniform_plan(shape, target: float, seq: int) -> PruningPlan:
    """Keep the first k heads and first m neurons per layer so the FLOPs ratio is close to ``target``."""
    dense = plan_flops(PruningPlan.keep_all(shape.num_layers, shape.num_heads, shape.ffn_dim), shape, seq)
    per_head = dense.dense_mha / (shape.num_layers * shape.num_heads)
    per_neuron = dense.dense_ffn / (shape.num_layers * shape.ffn_dim)
    k = max(1, round(target * shape.num_heads))
    budget_per_layer = target * dense.dense_total / shape.num_layers - k * per_head
    m = min(shape.ffn_dim, max(0, round(budget_per_layer / per_neuron)))
    layer = LayerPlan(tuple(range(k)), tuple(range(m)))
    return PruningPlan([layer] * shape.num_layers, shape.num_heads, shape.ffn_dim, {"uniform_target": target})


def timed_ms(model: torch.nn.Module, inputs: dict) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(**inputs)
        return (time.perf_counter() - start) * 1000


def interleaved_ms(dense: torch.nn.Module, pruned: torch.nn.Module, inputs: dict, warmup: int, repeats: int):
    """(dense times, pruned times), measured alternately after ``warmup`` untimed calls of the pruned
    model (the dense model is warmed up once, before the first target)."""
    for _ in range(warmup):
        timed_ms(pruned, inputs)
    dense_t, pruned_t = [], []
    for _ in range(repeats):
        dense_t.append(timed_ms(dense, inputs))
        pruned_t.append(timed_ms(pruned, inputs))
    return dense_t, pruned_t


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = []
    for family in ("bert-base", "gpt2-small"):
        dense_model = build(family, args.attn)
        adapter = get_adapter(dense_model)
        shape = adapter.shape()
        gen = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, 1000, (args.batch, args.seq), generator=gen)}
        dense_params = sum(p.numel() for p in dense_model.parameters())
        dense_layer_params = count_params(shape, shape.heads_per_layer, shape.neurons_per_layer)
        for _ in range(args.warmup):
            timed_ms(dense_model, inputs)
        rows = []
        for target in TARGETS:
            plan = uniform_plan(shape, target, args.seq)
            report = plan_flops(plan, shape, args.seq)
            pruned = prune_model(copy.deepcopy(dense_model), plan)
            params = sum(p.numel() for p in pruned.parameters())
            dense_t, pruned_t = interleaved_ms(dense_model, pruned, inputs, args.warmup, args.repeats)
            rows.append({
                "target": target,
                "heads_per_layer": plan.heads_per_layer[0],
                "neurons_per_layer": plan.neurons_per_layer[0],
                "flops_dense": report.dense_total,
                "flops_pruned": report.total,
                "flops_ratio": report.ratio,
                "mha_ratio": report.mha_ratio,
                "ffn_ratio": report.ffn_ratio,
                "params_dense": dense_params,
                "params_pruned": params,
                "layer_params_dense": dense_layer_params,
                "layer_params_pruned": count_params(shape, plan.heads_per_layer, plan.neurons_per_layer),
                "latency_dense_ms": min(dense_t),
                "latency_pruned_ms": min(pruned_t),
                "speedup": min(dense_t) / min(pruned_t),
                "latency_dense_all_ms": dense_t,
                "latency_pruned_all_ms": pruned_t,
            })
            del pruned
        results.append({"model": family, "shape": {k: v for k, v in vars(shape).items() if not isinstance(v, tuple)},
                        "rows": rows})
    return {
        "benchmark": "core_flops",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": {"batch": args.batch, "seq": args.seq, "warmup": args.warmup, "repeats": args.repeats,
                     "threads": args.threads, "attn_implementation": args.attn, "dtype": "float32", "device": "cpu"},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    # other processes on the CPU distort latency; a load above cpu_count means contention
                    "loadavg_1_5_15_before": load_before, "loadavg_1_5_15_after": os.getloadavg()},
        "wall_s": time.perf_counter() - started,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "ppkit": ppkit.__version__},
        "flops_note": "FLOPs per sequence of --seq tokens, transformer layers only (ppkit.flops); "
                      "params are whole-model parameter counts, layer_params the prunable projections",
        "results": results,
    }


def print_table(data: dict) -> None:
    s = data["settings"]
    m = data["machine"]
    print(f"CPU latency: batch {s['batch']}, seq {s['seq']}, {s['threads']} threads, {s['attn_implementation']} attention; "
          f"load average {m['loadavg_1_5_15_before'][0]:.1f} -> {m['loadavg_1_5_15_after'][0]:.1f} on {m['cpu_count']} CPUs")
    for result in data["results"]:
        dense_ms = min(r["latency_dense_ms"] for r in result["rows"])
        print(f"\n{result['model']}  (dense latency {dense_ms:.0f} ms, min over all interleaved runs)")
        print(f"{'target':>6} {'k':>3} {'m':>5} {'GFLOPs dense':>12} {'pruned':>8} {'ratio':>6} "
              f"{'Mparams dense':>13} {'pruned':>7} {'ms pruned':>9} {'speedup':>7}")
        for r in result["rows"]:
            print(f"{r['target']:>6.1f} {r['heads_per_layer']:>3} {r['neurons_per_layer']:>5} "
                  f"{r['flops_dense'] / 1e9:>12.2f} {r['flops_pruned'] / 1e9:>8.2f} {r['flops_ratio']:>6.3f} "
                  f"{r['params_dense'] / 1e6:>13.1f} {r['params_pruned'] / 1e6:>7.1f} "
                  f"{r['latency_pruned_ms']:>9.0f} {r['speedup']:>6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 repeat (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats = 2, 1
    data = run(args)
    print_table(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
