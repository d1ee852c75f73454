"""The ``ppkit`` command line: parses options, calls the library, prints. No algorithm lives here."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ppkit.errors import PpkitError

stdout = Console()
stderr = Console(stderr=True)
# Piped or captured output has no terminal width; 80 columns would squeeze the tables unreadably.
if not stdout.is_terminal:
    stdout = Console(width=140)
if not stderr.is_terminal:
    stderr = Console(stderr=True, width=140)

app = typer.Typer(
    name="ppkit",
    help=(
        "P-pruning for pre-trained language models: prune attention heads and FFN neurons of a "
        "pre-trained BERT-family model (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT), GPT-2 or a Llama-style "
        "decoder (Llama, Qwen2, Mistral) before fine-tuning, without labels, under a FLOPs budget.\n\n"
        "Typical flow: [bold]ppkit prune[/] -> [bold]ppkit finetune[/] -> [bold]ppkit export --onnx[/] -> [bold]ppkit bench[/]."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


class Linkage(str, Enum):
    average = "average"
    complete = "complete"
    reference = "reference"


class Selection(str, Enum):
    centroid = "centroid"
    random = "random"


class Threshold(str, Enum):
    exact = "exact"
    scan = "scan"


class Compensation(str, Enum):
    auto = "auto"
    none = "none"
    lstsq = "lstsq"
    lstsq_seq = "lstsq-seq"
    mask_tuning = "mask-tuning"
    merge = "merge"


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors (accepted anywhere on the line)."),
) -> None:
    """Global options."""


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _strategy_options(strategy: str, pairs: list[str]) -> dict[str, str]:
    """``--option KEY=VALUE`` pairs, checked against the options ``strategy`` declares."""
    from ppkit import registry
    from ppkit.errors import InputError

    declared = registry.get_strategy(strategy).options
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option expects KEY=VALUE, got {pair!r}")
        if key.strip() not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise InputError(f"strategy {strategy!r} has no option {key.strip()!r}; its options: {known}")
        options[key.strip()] = value.strip()
    return options


def _default_out(model: str, task: str, strategy: str, flops: float) -> Path:
    name = Path(model.rstrip("/")).name or "model"
    return Path(f"{name}-{task}-{strategy}-{flops:g}")


@app.command()
def prune(
    model: str = typer.Argument(..., help="Hub name (e.g. bert-base-uncased, gpt2) or local model directory."),
    task: str = typer.Option(..., "--task", "-t", help="Task whose train split calibrates the pruning: cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, squad, squad_v2, wikitext-2, wikitext-103, ptb."),
    flops: str = typer.Option(..., "--flops", "-f", help="Fraction of the FLOPs to keep, in (0, 1]. 0.5 halves the transformer layers' FLOPs."),
    strategy: str = typer.Option("dual-cp", "--strategy", "-s", help="Pruning strategy (see `ppkit strategies`)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Local data instead of the hub: a GLUE-style folder (train.tsv/dev.tsv) or a tsv/csv/json/jsonl/txt file."),
    samples: int = typer.Option(3000, "--samples", help="Calibration samples drawn from the train split (paper: 3000)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate calibration samples to this many tokens (default: the task's, e.g. 128; SST-2 64)."),
    tokens: str = typer.Option("200", "--tokens", help="Tokens sampled for similarity (paper's T=200), or 'all' for streaming statistics over every token."),
    lambda_: float = typer.Option(5.0, "--lambda", help="Pruned FFN FLOPs = lambda x pruned MHA FLOPs (paper: 5)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling and every random choice: the same seed gives the same plan."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: <model>-<task>-<strategy>-<flops>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory (atomically, at the end)."),
    flops_seq_len: Optional[float] = typer.Option(None, "--flops-seq-len", help="Sequence length FLOPs are counted at (default: mean calibration length, the paper's convention)."),
    linkage: Linkage = typer.Option(Linkage.average, "--linkage", help="Dual-CP clustering: average (paper), complete, or reference (the authors' code: complete on Chebyshev distances)."),
    selection: Selection = typer.Option(Selection.centroid, "--selection", help="Dual-CP member kept per cluster: centroid (largest mean |activation|) or random (the paper's +MC ablation)."),
    threshold: Threshold = typer.Option(Threshold.exact, "--threshold", help="How the global distance threshold is found: exact (from the dendrograms) or scan (the paper's delta scan)."),
    step: float = typer.Option(0.001, "--step", help="Step of the delta scan (--threshold scan; paper: 0.001)."),
    rebalance: bool = typer.Option(True, "--rebalance/--no-rebalance", help="Give the FLOPs left by coarse head granularity to the FFN so the total lands on the budget (off: the strict lambda split)."),
    compensate: Compensation = typer.Option(Compensation.auto, "--compensate", help="Fold what pruned units did into the kept weights: auto (lstsq-seq for a fine-tuned source with a task head, lstsq for a pre-trained encoder, none for a pre-trained decoder), none (the paper), lstsq (one shot, on the dense model's inputs), lstsq-seq (sublayer by sublayer, on the pruned model's own inputs), mask-tuning (Kwon et al.: one scale per kept head / neuron, sublayer by sublayer) or merge."),
    compensate_tokens: str = typer.Option("2048", "--compensate-tokens", help="Calibration tokens the compensation is fitted and judged on, or 'all' (more: closer fit, slower; see benchmarks/README.md)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Calibration batch size."),
    multiple_of: int = typer.Option(1, "--multiple-of", help="Keep every layer's FFN width a multiple of N (e.g. 8 or 64 for fast matmuls), inside the budget; 1: off."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="A strategy option as KEY=VALUE (repeatable), e.g. --option rearrange_steps=0 for fisher; `ppkit strategies` lists each strategy's options."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Write plan.png (kept heads grid, kept neurons per layer)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow loading pickled .bin weights (pickle can run code: only for files you trust)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout (the table goes to stderr)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Prune a pre-trained model to a FLOPs budget and save it with plan.json, report.json and plan.png.

    Examples:

      ppkit prune bert-base-uncased --task qqp --flops 0.5

      ppkit prune ../shared/data/models/all-MiniLM-L6-v2 --task sst2 --data ../shared/data/glue/SST-2 --flops 0.6 --out minilm-sst2-60

    A pre-trained encoder's kept weights are then compensated (--compensate auto = lstsq: better after
    fine-tuning, benchmarks/README.md); --compensate none is the paper's method exactly.
    """
    from ppkit.pipeline import check_budget, prune as run_prune
    from ppkit.report import summary_table

    budget = check_budget(flops)
    out_dir = out or _default_out(model, task, strategy, budget)
    options = {"linkage": linkage.value, "selection": selection.value, "threshold": threshold.value,
               "step": step, "rebalance": rebalance, **_strategy_options(strategy, option or [])}
    result = run_prune(
        model, task=task, flops=budget, strategy=strategy, data=data, samples=samples,
        max_length=max_length, tokens=tokens, lambda_=lambda_, seed=seed, flops_seq_len=flops_seq_len,
        options=options, compensate=compensate.value,
        compensate_tokens=compensate_tokens, out=out_dir, overwrite=overwrite, plot=plot,
        progress=not quiet, allow_pickle=allow_pickle, batch_size=batch_size, multiple_of=multiple_of,
    )
    (stderr if as_json else stdout).print(summary_table(result.report))
    stderr.print(f"[green]saved[/] {escape(str(out_dir))}  (load with ppkit.load_pruned({escape(repr(str(out_dir)))}))", soft_wrap=True)
    if as_json:
        _emit_json(result.report)


@app.command()
def strategies(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """List the pruning strategies installed (built-in and third-party plugins)."""
    from rich.table import Table

    from ppkit.registry import list_strategies

    infos = list_strategies()
    if as_json:
        _emit_json([
            {"name": s.name, "description": s.description, "needs": sorted(s.needs), "package": s.package, "version": s.version,
             "options": s.options}
            for s in infos
        ])
        return
    table = Table(title="ppkit strategies (options: --option KEY=VALUE)")
    for col in ("name", "description", "options", "needs", "package"):
        table.add_column(col)
    for s in infos:
        table.add_row(s.name, s.description, ", ".join(sorted(s.options)) or "-", ", ".join(sorted(s.needs)) or "-",
                      f"{s.package} {s.version}")
    stdout.print(table)


@app.command()
def finetune(
    model: str = typer.Argument(..., help="Pruned directory (from `ppkit prune`), local model directory or hub name."),
    task: str = typer.Option(..., "--task", "-t", help="Task to fine-tune on (train split) and evaluate on (dev split)."),
    out: Path = typer.Option(..., "--out", "-o", help="Where the best epoch's model and finetune.json go."),
    data: Optional[Path] = typer.Option(None, "--data", help="Local data instead of the hub (GLUE-style folder or file)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default GLUE: 3, more on small train sets to reach --min-steps, at most 10; SQuAD / LM: the paper's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size (default GLUE: 16 below 10,000 train examples, else 32); split across torchrun processes."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (default GLUE: by model width; regression 1e-4 up to hidden 384, classification 5e-5 up to 512, else 2e-5)."),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Share of the steps with a linear learning-rate warm-up, in [0, 1) (default GLUE 0.1), then linear decay."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay, not applied to biases and LayerNorm (default GLUE 0.01)."),
    min_steps: Optional[int] = typer.Option(None, "--min-steps", help="With no --epochs, add epochs until this many optimizer steps (default 1000; 0: off)."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="BERT classifier input: cls ([CLS] pooler) or mean (masked mean of the last layer). Default: what the checkpoint was trained with (sentence-transformers' 1_Pooling), else cls."),
    head_init: bool = typer.Option(True, "--head-init/--no-head-init", help="Start a fresh head's bias at the label mean (regression) / log class prior."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Fine-tuned dense model directory to distil from (its predictions, optionally its hidden states); for an LM task, the dense language model (per-token KL)."),
    distill_weight: float = typer.Option(0.5, "--distill-weight", help="With --teacher: weight of the prediction loss; the task loss gets 1 - this."),
    distill_temperature: float = typer.Option(2.0, "--distill-temperature", help="With --teacher: softmax temperature of the KL divergence."),
    distill_hidden: float = typer.Option(0.0, "--distill-hidden", help="With --teacher: weight of the layer-to-layer hidden-state MSE (0: off)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (on a shared machine 1 per process is often fastest)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or mixed precision: bf16 (GPUs that have it, and CPUs: 0.64x the fp32 step time for MiniLM on an AMX Xeon) or fp16 (CUDA only). Weights stay and are saved in fp32."),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout probability of every dropout layer (embeddings, attention, hidden, classifier) while fine-tuning, in [0, 1). Default: the checkpoint's (0.1 for BERT and GPT-2)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Max tokens per example (default: the task's)."),
    seed: int = typer.Option(0, "--seed", help="Seed for data order, head initialisation and subsets."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use a seeded random subset of this many training examples."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Evaluate on the first N dev examples."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory (atomically, at the end)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .bin weights (only for files you trust)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Fine-tune a pruned (or dense) model on a task, keep the best epoch, record time per epoch.

    Runs unchanged on several processes: torchrun --nproc_per_node 2 $(which ppkit) finetune ...

    The defaults learn on a small or pruned model too (see ppkit.recipe); every one can be overridden.

    Examples:

      ppkit finetune minilm-sst2-60 --task sst2 --data ../shared/data/glue/SST-2 --epochs 1 --train-limit 2000 --out minilm-sst2-60-ft

      ppkit finetune minilm-stsb-60 --task stsb --data ../shared/data/glue/STS-B --teacher minilm-stsb-dense-ft --out minilm-stsb-60-kd
    """
    import os

    from ppkit.distill import DistillSettings
    from ppkit.training import finetune as run_finetune

    distill = DistillSettings(weight=distill_weight, temperature=distill_temperature, hidden_weight=distill_hidden)
    result = run_finetune(
        model, task, out_dir=out, data=data, epochs=epochs, batch_size=batch_size, learning_rate=lr,
        max_length=max_length, seed=seed, train_limit=train_limit, eval_limit=eval_limit,
        progress=not quiet, overwrite=overwrite, allow_pickle=allow_pickle, warmup_ratio=warmup_ratio,
        weight_decay=weight_decay, min_steps=min_steps, pooling=pooling, init_head_bias=head_init,
        threads=threads, teacher=teacher, distill=distill, precision=precision, dropout=dropout,
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from rich.table import Table

    table = Table(title=f"ppkit finetune · {model} · task {result.task}")
    for col in ("epoch", result.metric, "train s", "eval s"):
        table.add_column(col, justify="right")
    for rec in result.epochs:
        value = rec.metrics.get(result.metric)
        table.add_row(str(rec.epoch), f"{value:.4f}" if isinstance(value, (int, float)) else str(value),
                      f"{rec.train_seconds:.1f}", f"{rec.eval_seconds:.1f}")
    table.caption = f"best epoch {result.best_epoch}: {result.metric} {result.best_metric:.4f} · total {result.total_seconds:.1f}s"
    (stderr if as_json else stdout).print(table)
    stderr.print(f"[green]saved[/] {escape(str(out))}", soft_wrap=True)
    if as_json:
        _emit_json(result.to_dict())


def _opset_range() -> tuple[int, int]:
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_MIN_OPSET), int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):  # private module moved: let the exporter decide
        return 1, 10**6


@app.command()
def export(
    model: str = typer.Argument(..., help="Pruned or dense model directory (or hub name)."),
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Export to ONNX (the only format for now)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="ONNX file (default: <dir>/model.onnx)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
    head: Optional[str] = typer.Option(None, "--head", help="Head to export: base, sequence-classification, question-answering, causal-lm (default: the saved one)."),
    atol: float = typer.Option(1e-4, "--atol", help="Largest allowed |onnxruntime - torch| on the check inputs."),
    check: bool = typer.Option(True, "--check/--no-check", help="Validate with onnx.checker and compare onnxruntime with torch on two input sizes."),
    as_json: bool = typer.Option(False, "--json", help="Print the export report as JSON on stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing ONNX file (atomically, after the check passes)."),
    optimize: bool = typer.Option(False, "--optimize", help="onnxruntime's transformer fusions with each layer's own head count, checked against the unfused graph (generic optimizers given the config's head count break pruned models)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: onnxruntime dynamic quantization of the checked fp32 graph (default file model-int8.onnx), checked by output cosine against fp32."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp16: half-precision weights and compute for GPUs (onnxruntime CUDA), fp32 inputs/outputs (default file model-fp16.onnx), checked by output cosine against fp32. On CPU it runs, but slower than fp32."),
    with_past: bool = typer.Option(False, "--with-past", help="GPT-2 LM for generation: KV-cache inputs/outputs per layer (uneven heads kept), default file model-with-past.onnx."),
) -> None:
    """Export a model to ONNX with dynamic batch/sequence axes, then check it against torch in onnxruntime.

    Examples:

      ppkit export minilm-sst2-60 --onnx

      ppkit export minilm-sst2-60 --onnx --quantize int8     # writes minilm-sst2-60/model-int8.onnx

      ppkit export minilm-sst2-60 --onnx --dtype fp16        # for onnxruntime-gpu: model-fp16.onnx

      ppkit export gpt2-ptb-50 --with-past                    # writes gpt2-ptb-50/model-with-past.onnx
    """
    from ppkit.errors import InputError
    from ppkit.export import export_onnx

    if not onnx:
        raise InputError("only ONNX export is available: pass --onnx")
    if out is not None and not out.is_dir():
        from ppkit.saving import check_parent_writable

        check_parent_writable(out, "--out")
    low, high = _opset_range()
    if not low <= opset <= high:
        raise InputError(f"--opset must be between {low} and {high} (the opsets torch's ONNX exporter supports), got {opset}")
    if with_past:
        if quantize or optimize or dtype != "fp32" or head not in (None, "causal-lm"):
            raise InputError("--with-past exports a causal LM as it is: leave out --quantize, --dtype, --optimize and --head")
        from ppkit.export_past import export_with_past

        past = export_with_past(model, out, opset=opset, check=check, atol=atol, overwrite=overwrite)
        diff = "not checked" if past.max_abs_diff is None else f"{past.max_abs_diff:.2e}"
        stderr.print(f"[green]exported[/] {past.path} · opset {past.opset} · KV cache of {past.layers} layers, heads "
                     f"{past.cache_heads} · max |ORT - torch| {diff} · {past.seconds:.1f}s")
        if as_json:
            _emit_json({k: str(v) if isinstance(v, Path) else v for k, v in vars(past).items()})
        return
    report = export_onnx(model, out, opset=opset, head=head, atol=atol, check=check, overwrite=overwrite,
                         quantize=quantize, optimize=optimize, dtype=dtype)
    diff = "not checked" if report.max_abs_diff is None else f"{report.max_abs_diff:.2e}"
    stderr.print(f"[green]exported[/] {report.path} · opset {report.opset} · head {report.head} · "
                 f"max |ORT - torch| {diff} on shapes {report.checked_shapes} · {report.seconds:.1f}s")
    if report.optimization:
        o = report.optimization
        stderr.print(f"fused {o['fused_operators']} · heads per attention node {o['attention_heads']} · "
                     f"max |fused - unfused| {o['max_abs_diff_vs_unfused']:.2e}")
    if report.quantization:
        q = report.quantization
        stderr.print(f"{q['precision']} vs fp32: min cosine {q['min_cosine']:.5f} (mean {q['mean_cosine']:.5f}), max |diff| "
                     f"{q['max_abs_diff']:.3g} · {q['bytes'] / 1e6:.1f} MB (fp32 {q['fp32_bytes'] / 1e6:.1f} MB)")
    if as_json:
        _emit_json(report.to_dict())


def _int_list(text: str, what: str) -> list[int]:
    from ppkit.errors import InputError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise InputError(f"{what} must be comma-separated positive integers, got {text!r}")
    return values


@app.command()
def bench(
    models: list[str] = typer.Argument(..., help="One or more pruned / dense model directories (or hub names)."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Dense model measured side by side in the same run; speedups are against it."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Also measure quality on the task's dev data (accuracy, F1, Matthews, Pearson/Spearman, EM/F1, perplexity)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Local dev data (GLUE-style folder or file)."),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Comma-separated batch sizes (default 1,8,32; with --decode 1,8)."),
    seq_len: int = typer.Option(128, "--seq-len", help="Sequence length of the timing inputs (and of the FLOPs count); with --decode the prompt length."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (ORT with CUDAExecutionProvider needs onnxruntime-gpu)."),
    backend: str = typer.Option("ort", "--backend", help="ort, torch or both."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed repeats per batch size after warm-up (default 20; with --decode 3)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up calls."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="Evaluate quality on the first N dev examples."),
    quality: bool = typer.Option(True, "--quality/--no-quality", help="Measure task quality (needs --task)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime / torch intra-op threads (default: all available cores)."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the JSON report to this file."),
    int8: bool = typer.Option(False, "--int8", help="Also time (and score) each model's onnxruntime int8 variant in the same rounds; a quality-vs-latency plot goes beside --plot."),
    fp16: bool = typer.Option(False, "--fp16", help="Also time (and score) each model's fp16 variant in the same rounds: its onnxruntime fp16 export, or with --backend torch the model in half precision (for --device cuda; on CPU fp16 runs slower than fp32)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: latency and quality vs FLOPs ratio."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report on stdout (the table goes to stderr)."),
    decode: bool = typer.Option(False, "--decode", help="Causal LMs: greedy-decode throughput (tokens/s) with the KV cache instead of forward latency; --backend both times torch generate and onnxruntime."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="With --decode: tokens generated per run."),
) -> None:
    """Latency (p50/p90/mean), throughput, speedup vs a baseline, FLOPs, parameters and task quality.

    Examples:

      ppkit bench minilm-sst2-60 --baseline ../shared/data/models/all-MiniLM-L6-v2 --task sst2 --data ../shared/data/glue/SST-2 --batch-sizes 1,8

      ppkit bench gpt2-ptb-50 --baseline gpt2-small --decode --backend both     # tokens/s, prompt 128 + 64 new
    """
    from ppkit.bench import benchmark, render_table
    from ppkit.saving import check_output_file

    for path, flag in ((json_out, "--json-out"), (plot, "--plot")):
        check_output_file(path, flag)  # fail now, not after minutes of timing
    if decode:
        _bench_decode(models, baseline, batch_sizes or "1,8", seq_len, new_tokens, backend, repeats or 3, warmup,
                      threads, json_out, as_json)
        return
    report = benchmark(
        models, baseline=baseline, task=task, data=data, batch_sizes=_int_list(batch_sizes or "1,8,32", "--batch-sizes"),
        seq_len=seq_len, device=device, backend=backend, repeats=20 if repeats is None else repeats, warmup=warmup,
        eval_limit=eval_limit, json_out=json_out, plot=plot, progress=True, quality=quality, threads=threads, int8=int8,
        fp16=fp16)
    (stderr if as_json else stdout).print(render_table(report))
    if as_json:
        _emit_json(report.to_dict())


def _bench_decode(models: list[str], baseline: Optional[str], batch_sizes: str, prompt_len: int, new_tokens: int,
                  backend: str, repeats: int, warmup: int, threads: Optional[int], json_out: Optional[Path],
                  as_json: bool) -> None:
    import json

    from ppkit.decode_bench import decode_throughput, render_decode_table
    from ppkit.errors import InputError
    from ppkit.models import load_model

    if backend not in ("ort", "torch", "both"):
        raise InputError(f"unknown backend {backend!r}: use 'ort', 'torch' or 'both'")
    if new_tokens < 1:
        raise InputError(f"--new-tokens must be positive, got {new_tokens}")
    names = ([baseline] if baseline else []) + list(models)
    loaded = [(Path(n).name or n, load_model(n, head="causal-lm")) for n in names]
    results = decode_throughput(loaded, prompt_len=prompt_len, new_tokens=new_tokens,
                                batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
                                backends=("torch", "ort") if backend == "both" else (backend,),
                                repeats=repeats, warmup=min(warmup, 1), threads=threads)
    report = {"settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "decoding": "greedy, KV cache",
                           "baseline": loaded[0][0] if baseline else None, "threads": threads},
              "results": [r.to_dict() for r in results]}
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    (stderr if as_json else stdout).print(render_decode_table(results))
    if as_json:
        _emit_json(report)


def _cli_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], type]:
    """(Exit classes, Abort classes, ClickException) of the click that typer runs on.

    typer >= 0.2x vendors its own click (``typer._click``) whose exception classes are not those of a
    separately installed ``click``, and keeps Exit / Abort in ``typer.exceptions``; older typer uses
    plain click. Catching the wrong classes turns a usage error into an "internal error".
    """
    try:
        from typer import _click as click  # type: ignore[attr-defined]
    except ImportError:  # older typer: plain click
        import click
    exc = click.exceptions
    exits = tuple({typer.Exit, *([exc.Exit] if hasattr(exc, "Exit") else [])})
    aborts = tuple({typer.Abort, *([exc.Abort] if hasattr(exc, "Abort") else [])})
    return exits, aborts, exc.ClickException


def _interrupted(signum: int | None) -> None:
    stderr.print("[red]ppkit: interrupted[/] (partial output removed; earlier output untouched)", highlight=False)
    sys.exit(128 + (signum or 2))


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one red line and exit code 2 for user errors, tracebacks with --debug.

    Ctrl-C (SIGINT) and SIGTERM stop a run cleanly: both raise KeyboardInterrupt, so atomic outputs
    remove their temporary directories and leave an earlier output untouched; the exit code is
    128 + the signal number (130 for SIGINT, 143 for SIGTERM). Warnings are printed as one line each.
    """
    import signal
    import warnings

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    def show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if debug:
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        else:
            stderr.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

    previous_term = None
    try:  # only the main thread may install signal handlers (main() called from a thread: skip)
        previous_term = signal.signal(signal.SIGTERM, on_signal)
    except ValueError:
        pass
    # catch_warnings restores the warning settings afterwards and lets every call show its warnings
    # again (main() may run several times in one process, e.g. in tests)
    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            _run(args, debug, received)
        finally:
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)


def _run(args: list[str], debug: bool, received: list[int]) -> None:
    """Run the app; turn every outcome into an exit code and at most one line on stderr."""
    import signal

    exits, aborts, click_error = _cli_exceptions()
    try:
        rv = app(args=args, prog_name="ppkit", standalone_mode=False)
        # typer turns Ctrl-C into Exit(130) and, without standalone mode, returns the exit code
        if isinstance(rv, int) and not isinstance(rv, bool) and rv:
            if rv == 130:
                _interrupted(received[-1] if received else signal.SIGINT)
            sys.exit(rv)
    except exits as exc:
        sys.exit(exc.exit_code)
    except aborts:
        _interrupted(received[-1] if received else signal.SIGINT)
    except click_error as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except PpkitError as exc:
        if debug:
            raise
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted(received[-1] if received else signal.SIGINT)
    except Exception as exc:  # an internal error: say so, keep it to one line unless --debug
        if debug:
            raise
        stderr.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)",
                     highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
