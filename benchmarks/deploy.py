"""Deployment latency: pruning x int8 (CPU) or fp16 (CUDA) x aligned FFN widths (issue 18).

Per shape and intra-op thread count, one :func:`ppkit.bench.benchmark` run times, in the same
interleaved rounds: dense fp32 (the baseline), and at FLOPs 0.6 and 0.5 the pruned model with the
FFN widths the strategy chose and aligned to multiples of 8 and 64 (``--multiple-of``), every model
also as onnxruntime dynamic int8 (``ppkit export --quantize int8``) on CPU, or, with ``--device cuda``,
in torch CUDA fp32 and fp16 (``bench --backend torch --fp16``: the GPU machine lent here has no
onnxruntime-gpu). Shapes:

* **minilm**: all-MiniLM-L6-v2 fine-tuned on STS-B (the retraining-free source, fine-tuned through
  ``reproduce.py`` when missing), pruned by fisher + ``lstsq-seq`` (usable without training), so the
  STS-B dev Spearman of every variant stands beside its latency;
* **bert-base**: random-weight BERT-base (latency only; weight values do not change speed), uniform
  plans (``latency.uniform_plan``) aligned by :func:`ppkit.align.align_plan`.

    python benchmarks/deploy.py              # about 25 min on 2 idle cores; writes results/deploy_cpu.json + README
    python benchmarks/deploy.py --report     # README section only, from the JSON
    python benchmarks/deploy.py --quick      # smoke run (few repeats, MiniLM at 0.6 only)
    python benchmarks/deploy.py --device cuda  # on a GPU: results/deploy_cuda.json + its README section
    python benchmarks/deploy.py --label vnni   # a second CPU kept beside the first: results/deploy_cpu-vnni.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sections import replace_section  # noqa: E402

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BUDGETS = (0.6, 0.5)
MULTIPLES = (1, 8, 64)
#: device -> shape -> batch sizes timed (BERT-base at batch 8 would take most of an hour on one CPU thread)
BATCHES = {"cpu": {"minilm": (1, 8), "bert-base": (1,)}, "cuda": {"minilm": (1, 32), "bert-base": (1, 32)}}
PRECISION = {"cpu": "int8", "cuda": "fp16"}  # the low-precision variant timed beside each model
SEQ_LEN = 128


def results_path(device: str, label: str = "") -> Path:
    return HERE / "results" / f"deploy_{device}{'-' + label if label else ''}.json"


def markers(device: str, label: str = "") -> tuple[str, str]:
    name = ("deploy" if device == "cpu" else f"deploy-{device}") + (f"-{label}" if label else "")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def minilm_models(budgets, multiples, samples: int):
    """The dense STS-B MiniLM and its pruned variants ({name: model}), with the tokenizer."""
    from retraining_free import max_length, source
    from transformers import AutoConfig

    from ppkit.models import load_model, load_tokenizer
    from ppkit.pipeline import prune

    src = source("stsb")
    models = {}
    for budget in budgets:
        for multiple in multiples:
            res = prune(str(src), task="stsb", flops=budget, strategy="fisher", compensate="lstsq-seq",
                        data=_stsb_dir(), samples=samples, multiple_of=multiple, plot=False,
                        progress=False, max_length=max_length("stsb", AutoConfig.from_pretrained(src)))
            models[_name(budget, multiple)] = res.model
    return load_model(src, head="sequence-classification"), models, load_tokenizer(src)


def bert_base_models(budgets, multiples):
    import copy

    from latency import dense_model, uniform_plan

    from ppkit.adapters import get_adapter
    from ppkit.align import align_plan
    from ppkit.surgery import prune_model

    dense = dense_model("bert")
    shape = get_adapter(dense).shape()
    models = {}
    for budget in budgets:
        plan = uniform_plan(dense, budget, SEQ_LEN)
        for multiple in multiples:
            models[_name(budget, multiple)] = prune_model(copy.deepcopy(dense), align_plan(plan, multiple, shape, SEQ_LEN, budget))
    return dense, models, None


def _name(budget: float, multiple: int) -> str:
    return f"{budget:g}" + (f" x{multiple}" if multiple > 1 else "")


def measure(shape: str, threads: list[int], repeats: int, budgets, multiples, samples: int, device: str) -> list[dict]:
    from ppkit.bench import benchmark

    dense, models, tokenizer = (minilm_models(budgets, multiples, samples) if shape == "minilm"
                                else bert_base_models(budgets, multiples))
    runs = []
    for i, t in enumerate(threads):
        quality = shape == "minilm" and i == 0  # quality does not depend on the thread count
        report = benchmark(list(models.values()), baseline=dense, names=list(models), baseline_name="dense",
                           tokenizer=tokenizer, task="stsb" if quality else None,
                           data=_stsb_dir() if quality else None, quality=quality, threads=t, device=device,
                           backend="ort" if device == "cpu" else "torch", int8=device == "cpu", fp16=device == "cuda",
                           batch_sizes=BATCHES[device][shape], seq_len=SEQ_LEN, repeats=repeats, warmup=2, progress=True)
        runs.append({"threads": t, "loadavg_1m_after": os.getloadavg()[0], **_compact(report.to_dict())})
        print(f"{shape} threads={t}: " + ", ".join(f"{m['name']} {_ratio(m, BATCHES[device][shape][-1]):.2f}"
                                                      for m in runs[-1]["models"]), file=sys.stderr)
    return runs


def _stsb_dir() -> Path:
    from retraining_free import GLUE, TASK_DIRS

    return GLUE / TASK_DIRS["stsb"]


def _compact(report: dict) -> dict:
    keep = ("name", "precision", "params", "flops", "neurons_per_layer", "heads_per_layer", "latency", "quality")
    return {"settings": report["settings"], "machine": report["machine"], "seconds": report["seconds"],
            "models": [{k: m[k] for k in keep} for m in report["models"]]}


def _ratio(model: dict, batch: int) -> float:
    """Latency relative to dense fp32 (its p50 / dense p50, same rounds)."""
    row = next(r for r in model["latency"] if r["batch_size"] == batch)
    return 1.0 / row["speedup"]


def render(data: dict) -> str:
    device, label = data.get("device", "cpu"), data.get("label", "")
    start, end = markers(device, label)
    cpu = data["machine"].get("cpu", "a CPU")
    if "cpu_int8_features" in data["machine"]:
        cpu += f" (int8 instructions: {', '.join(data['machine']['cpu_int8_features']) or 'none: no VNNI or AMX'})"
    runtime = (f"onnxruntime CPU on {cpu}, ORT_ENABLE_ALL, spinning off" if device == "cpu"
               else f"torch CUDA on {data['machine'].get('gpu', 'a GPU')}")
    low = ("int8: `ppkit export --quantize int8`" if device == "cpu"
           else "fp16: the model in half precision (`ppkit bench --backend torch --fp16`)")
    where = "onnxruntime CPU" if device == "cpu" else "torch CUDA"
    out = [start, "", f"## Deployment: pruning x {PRECISION[device]} x aligned widths ({where}{', ' + label if label else ''})", "",
           f"Generated by `{data['command']}` on {data['date']} ({data['minutes']:.0f} min). Latency is relative to "
           f"dense fp32 (p50 over interleaved rounds of all variants of one shape, same inputs, {runtime}, "
           "sequence 128); `x8` / `x64`: `--multiple-of 8` / `64` (every layer's FFN width a "
           f"multiple, inside the budget); {low}. MiniLM: all-MiniLM-L6-v2 "
           "fine-tuned on STS-B, pruned by fisher + `lstsq-seq` without training, STS-B dev Spearman x100 "
           "beside; BERT-base: random weights, uniform plans, latency only. " + data["note"], ""]
    for shape, runs in data["shapes"].items():
        batches = BATCHES[device][shape]
        cols = [(run["threads"], b) for run in runs for b in batches]
        quality = {m["name"]: m["quality"] for m in runs[0]["models"] if m.get("quality")}
        out += [f"**{shape}**", "", "| variant | FFN width per layer | FLOPs | " + " | ".join(
            f"{t} thr b{b}" for t, b in cols) + (" | STS-B |" if quality else " |"),
                "| --- | --- | ---: |" + " ---: |" * len(cols) + (" ---: |" if quality else "")]
        by_run = [{m["name"]: m for m in run["models"]} for run in runs]
        for name, m in by_run[0].items():
            widths = m["neurons_per_layer"] if len(set(m["neurons_per_layer"])) > 1 else [f"{m['neurons_per_layer'][0]} (all)"]
            cells = [f"{_ratio(by_run[i][name], b):.2f}" for i, run in enumerate(runs) for b in batches]
            q = quality.get(name, {}).get("spearman")
            out.append(f"| {name} | {', '.join(map(str, widths))} | {m['flops']['ratio_vs_baseline']:.3f} | "
                       + " | ".join(cells) + (f" | {100 * q:.1f} |" if quality else " |"))
        out += ["", _summary(runs, batches[-1], PRECISION[device]), ""]
    out.append(end)
    return "\n".join(out) + "\n"


def _summary(runs: list[dict], batch: int, low: str) -> str:
    """The ratios at 0.6 and what alignment changes, per thread count, at the largest batch timed."""
    parts, spread = [], []
    for run in runs:
        r = {m["name"]: _ratio(m, batch) for m in run["models"]}
        if "0.6" in r:
            parts.append(f"{run['threads']} thread(s): pruned fp32 {r['0.6']:.2f}, dense {low} {r[f'dense · {low}']:.2f}, "
                         f"pruned {low} {r[f'0.6 · {low}']:.2f}")
        for budget in BUDGETS:
            for precision in ("", f" · {low}"):
                aligned = [r[n] for n in (f"{budget:g} x{m}{precision}" for m in MULTIPLES[1:]) if n in r]
                if f"{budget:g}{precision}" in r and aligned:
                    spread += [a / r[f"{budget:g}{precision}"] - 1 for a in aligned]
    text = f"At 0.6 FLOPs, batch {batch}, latency relative to dense fp32: " + "; ".join(parts) + "."
    if spread:
        text += (f" Aligned widths (x8, x64) against the unaligned plan of the same budget and precision, every "
                 f"thread count: median {100 * statistics.median(spread):+.0f}%, range {100 * min(spread):+.0f}% to "
                 f"{100 * max(spread):+.0f}%.")
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", action="store_true", help="rewrite the README section from the JSON")
    p.add_argument("--quick", action="store_true", help="smoke run: MiniLM at 0.6, 2 repeats, 1 thread; writes nothing")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--samples", type=int, default=512, help="calibration samples for MiniLM's pruning")
    p.add_argument("--shapes", default="minilm,bert-base")
    p.add_argument("--device", choices=sorted(PRECISION), default="cpu",
                   help="cpu: onnxruntime fp32 + int8 at 1 and 2 threads; cuda: torch fp32 + fp16")
    p.add_argument("--label", default="", help="a name for this machine: its own JSON and README section, so results "
                                               "from another CPU stay beside the first (e.g. vnni)")
    args = p.parse_args(argv)
    results = results_path(args.device, args.label)
    if not args.report:
        from ppkit.machine import machine_info

        t0 = time.time()
        shapes = args.shapes.split(",")
        threads, budgets, multiples = ([1], BUDGETS[:1], MULTIPLES) if args.quick else ([1, 2], BUDGETS, MULTIPLES)
        if args.quick:
            shapes = ["minilm"]
        if args.device == "cuda":
            threads = [1]  # torch's CPU threads barely matter to CUDA kernels
        command = "python benchmarks/deploy.py" + (f" --repeats {args.repeats}" if args.repeats != 15 else "") + (
            f" --device {args.device}" if args.device != "cpu" else "") + (f" --label {args.label}" if args.label else "")
        data = {"command": command, "date": time.strftime("%Y-%m-%d"), "device": args.device, "label": args.label,
                "machine": machine_info(args.device),
                "shapes": {s: measure(s, threads, 2 if args.quick else args.repeats, budgets, multiples, args.samples,
                                      args.device) for s in shapes}}
        data["minutes"] = (time.time() - t0) / 60
        data["note"] = (f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at the end "
                        "(other jobs on the cores add noise to every ratio alike).")
        if args.quick:
            print(render(data))
            return 0
        results.write_text(json.dumps(data, indent=1), encoding="utf-8")
    replace_section(README, *markers(args.device, args.label), render(json.loads(results.read_text(encoding="utf-8"))),
                    before="<!-- int8-variants:start -->")  # a new machine's section lands beside the first
    print(f"wrote {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
