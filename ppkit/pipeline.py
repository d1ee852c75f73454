"""`prune()`: the whole P-pruning run in one call (the Python twin of ``ppkit prune``).

load model -> calibration batches -> activation statistics -> strategy (plugin) -> plan
-> optional compensation -> physical surgery -> save (atomically) + report + plot.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import InputError
from .plan import PruningPlan

log = logging.getLogger("ppkit")

COMPENSATIONS = ("auto", "none", "lstsq", "lstsq-seq", "mask-tuning", "merge")
#: heads that only a fine-tuned checkpoint has (their weights are trained, and kept by prune)
FINE_TUNED_HEADS = ("sequence-classification", "question-answering", "token-classification")


def auto_compensation(head: str | None, causal: bool, can_compensate: bool) -> str:
    """What ``--compensate auto`` means for a source: ``lstsq-seq`` for a fine-tuned one (nothing
    retrains it), ``lstsq`` for a pre-trained encoder (fine-tuning follows and ends better from the
    compensated weights: reproduction v2 in benchmarks/README.md), ``none`` for a pre-trained decoder
    (not measured) or a family that cannot be compensated."""
    if not can_compensate:
        return "none"
    if head in FINE_TUNED_HEADS:
        return "lstsq-seq"
    return "none" if causal else "lstsq"


@dataclass
class PruneResult:
    """What :func:`prune` produced: the pruned model, its plan, the report and where it was saved."""

    model: nn.Module
    plan: PruningPlan
    report: dict[str, Any]
    tokenizer: Any = None
    out_dir: Path | None = None


@dataclass
class StageTimer:
    """Wall-clock seconds per named stage, in the order they ran."""

    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def check_budget(flops: float) -> float:
    """Validate a kept-FLOPs fraction: a number in (0, 1]."""
    try:
        value = float(flops)
    except (TypeError, ValueError):
        raise InputError(f"--flops must be a number in (0, 1] (the fraction of FLOPs to keep), got {flops!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise InputError(f"--flops must be in (0, 1] (the fraction of FLOPs to keep), got {flops}")
    return value


def parse_tokens(tokens: int | str | None, option: str = "--tokens") -> int | None:
    """A token count option (``--tokens``, ``--compensate-tokens``): a positive count, or ``all`` (None)."""
    if tokens is None or (isinstance(tokens, str) and tokens.strip().lower() == "all"):
        return None
    try:
        value = int(tokens)
    except (TypeError, ValueError):
        raise InputError(f"{option} must be a positive integer or 'all', got {tokens!r}") from None
    if value <= 0:
        raise InputError(f"{option} must be a positive integer or 'all', got {value}")
    return value


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse, before any work starts, an output that exists (without ``overwrite``) or cannot be written
    (see :func:`ppkit.saving.check_output_dir`)."""
    from .saving import check_output_dir as check

    check(path, overwrite)


def versions() -> dict[str, str]:
    """Versions that decide a run's numbers, recorded in every report."""
    import transformers

    from . import __version__

    return {
        "ppkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def prune(
    model: str | Path | nn.Module,
    *,
    task: str,
    flops: float,
    strategy: str = "dual-cp",
    data: str | Path | None = None,
    samples: int = 3000,
    max_length: int | None = None,
    tokens: int | str | None = 200,
    lambda_: float = 5.0,
    seed: int = 0,
    flops_seq_len: float | None = None,
    options: dict[str, Any] | None = None,
    compensate: str = "auto",
    compensate_tokens: int | str | None = 2048,
    out: str | Path | None = None,
    overwrite: bool = False,
    plot: bool = True,
    progress: bool = True,
    tokenizer: Any = None,
    allow_pickle: bool = False,
    batch_size: int = 32,
    multiple_of: int = 1,
) -> PruneResult:
    """Prune a pre-trained (or fine-tuned) model of a supported family to ``flops`` of its FLOPs with a registered strategy.

    ``model`` is a hub name, a local model directory or an already loaded model (then pass
    ``tokenizer``). Calibration data comes from ``task``'s train split (hub) or ``data`` (local files).
    When ``out`` is given, the pruned model, ``plan.json``, ``report.json`` and ``plan.png`` are
    written there atomically (an existing directory is refused unless ``overwrite``).
    ``compensate`` (auto | none | lstsq | lstsq-seq | mask-tuning | merge) corrects the kept weights from
    ``compensate_tokens`` calibration tokens (``"all"``/None: every token); ``lstsq-seq`` refits
    sublayer by sublayer on the pruned model's own inputs, ``mask-tuning`` fits one scale per kept unit
    the same way (:mod:`ppkit.sequential`); ``auto`` is ``lstsq-seq`` for a fine-tuned source (a task
    head: no training follows, so the kept weights must carry the pruned units' work), ``lstsq`` for a
    pre-trained encoder (measured: a better model after fine-tuning, benchmarks/README.md, reproduction
    v2) and ``none`` for a pre-trained decoder (not measured yet); ``none`` is the paper. ``multiple_of``
    N > 1 makes every layer's kept FFN width a multiple of N inside the budget (:mod:`ppkit.align`).
    """
    from . import registry
    from .adapters import get_adapter
    from .data import calibration_batches
    from .flops import count_flops, plan_flops
    from .models import load_model, load_tokenizer, pruning_head
    from .report import plot_plan, write_json
    from .saving import atomic_output_dir, save_pruned
    from .statistics import collect_statistics
    from .surgery import prune_model
    from .tasks import get_task

    # Everything a user can get wrong is checked before any heavy work starts.
    budget = check_budget(flops)
    n_tokens = parse_tokens(tokens)
    spec = get_task(task)
    info = registry.get_strategy(strategy)
    if isinstance(samples, bool) or int(samples) <= 0:
        raise InputError(f"--samples must be a positive integer, got {samples}")
    if not (math.isfinite(lambda_) and lambda_ >= 0):
        raise InputError(f"--lambda must be a finite number >= 0, got {lambda_}")
    if compensate not in COMPENSATIONS:
        raise InputError(f"--compensate must be one of {', '.join(COMPENSATIONS)}, got {compensate!r}")
    moment_tokens = parse_tokens(compensate_tokens, option="--compensate-tokens")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise InputError(f"--multiple-of must be a positive integer, got {multiple_of!r}")
    if flops_seq_len is not None and not flops_seq_len > 0:
        raise InputError(f"--flops-seq-len must be positive, got {flops_seq_len}")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        check_output_dir(out_dir, overwrite)

    timer = StageTimer()
    start = time.perf_counter()
    with timer.stage("load"):
        model_name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
        if isinstance(model, nn.Module):
            net = model
            if tokenizer is None:
                raise InputError("pass tokenizer=... when giving prune() a loaded model")
        else:
            net = load_model(model, head=pruning_head(model), allow_pickle=allow_pickle)
            tokenizer = tokenizer or load_tokenizer(model)
        net.eval()
        from .models import infer_head

        head = infer_head(net)
        adapter = get_adapter(net)
        shape = adapter.shape()
        if not shape.is_dense:
            raise InputError("the model is already pruned: P-pruning starts from a dense pre-trained model")
        params_before = sum(p.numel() for p in net.parameters())
        requested_compensation = compensate
        if compensate == "auto":
            compensate = auto_compensation(head, shape.is_causal, adapter.can_compensate)
        elif compensate != "none" and not adapter.can_compensate:
            raise InputError(f"--compensate {compensate}: {adapter.compensation_refusal()}")

    with timer.stage("calibration_data"):
        calib = calibration_batches(
            spec.name, tokenizer, data=data, samples=int(samples), max_length=max_length,
            seed=seed, batch_size=batch_size, max_positions=shape.max_positions,
        )
    seq_len = float(flops_seq_len) if flops_seq_len is not None else float(calib.mean_length)

    stats = None
    collector = None  # the compensation moments, collected in the statistics pass when there is one
    if "activations" in info.needs:
        if compensate in ("lstsq", "merge"):
            from .compensate import MomentCollector

            collector = MomentCollector(net, seed=seed, max_tokens=moment_tokens)
        with timer.stage("statistics"):
            stats = collect_statistics(net, calib.batches, tokens=n_tokens, seed=seed, progress=progress,
                                       observers=[collector] if collector else [])

    with timer.stage("selection"):
        ctx = registry.PruningContext(
            model=net, adapter=adapter, shape=shape, stats=stats, flops_budget=budget,
            seq_len=seq_len, lambda_=float(lambda_), seed=seed, options=dict(options or {}),
            batches=calib.batches if "batches" in info.needs else None,
        )
        plan = registry.run_strategy(strategy, ctx)
        if multiple_of > 1:
            from .align import align_plan

            scores = [layer.neuron_abs_mean for layer in stats.layers] if stats is not None else None
            aligned = align_plan(plan, multiple_of, shape, seq_len, budget, scores)
            if aligned.layers != plan.layers:
                ctx.artifacts.pop("assignments", None)  # cluster -> kept unit maps no longer hold
            plan = aligned

    compensation_report: dict[str, Any] = {"method": compensate}
    if compensate in ("lstsq-seq", "mask-tuning"):
        from .sequential import reconstruct_sequential

        with timer.stage("compensation"):
            compensation_report = reconstruct_sequential(net, plan, calib.batches, seed=seed, max_tokens=moment_tokens,
                                                         solver="rows" if compensate == "lstsq-seq" else "scales")
    elif compensate != "none":
        from .compensate import collect_moments, compensate_model

        with timer.stage("compensation"):
            if collector is None:  # the strategy needed no statistics pass to ride on
                t0 = time.perf_counter()
                moments = collect_moments(net, calib.batches, seed=seed, max_tokens=moment_tokens)
                moments_s = time.perf_counter() - t0
            else:
                moments, moments_s = collector.moments(), collector.seconds
            compensation_report = compensate_model(
                net, plan, moments, method=compensate, assignments=ctx.artifacts.get("assignments"),
            )
            # times live in timings_s (the rest of the report is reproducible); a dotted key is a part of
            # the stage it names, not a stage of its own
            timer.timings["statistics.moments" if collector is not None else "compensation.moments"] = moments_s

    with timer.stage("surgery"):
        prune_model(net, plan)
    params_after = sum(p.numel() for p in net.parameters())
    achieved = plan_flops(plan, shape, seq_len)
    dense = count_flops(shape, list(shape.heads_per_layer), list(shape.neurons_per_layer), seq_len)

    report: dict[str, Any] = {
        "model": model_name,
        "family": shape.family,
        "head": head,
        # a task head (classifier, QA) is trained: the source was fine-tuned, and the head is kept
        "source_fine_tuned": head in FINE_TUNED_HEADS,
        "task": spec.name,
        "data": calib.source,
        "strategy": strategy,
        "strategy_package": info.package,
        "options": dict(options or {}),
        "seed": seed,
        "samples": calib.num_samples,
        "samples_requested": int(samples),
        "max_length": calib.max_length,
        "tokens": "all" if n_tokens is None else n_tokens,
        "lambda": float(lambda_),
        "multiple_of": multiple_of,
        "flops_budget": budget,
        "flops_ratio": achieved.ratio,
        "flops_seq_len": seq_len,
        "mha_flops_ratio": achieved.mha_ratio,
        "ffn_flops_ratio": achieved.ffn_ratio,
        "flops_before": dense.total,
        "flops_after": achieved.total,
        "params_before": params_before,
        "params_after": params_after,
        "heads_per_layer": plan.heads_per_layer,
        "neurons_per_layer": plan.neurons_per_layer,
        "num_heads": plan.num_heads,
        "ffn_dim": plan.ffn_dim,
        "plan_meta": plan.meta,
        "compensation": {**compensation_report, "requested": requested_compensation},
        "warnings": list(getattr(calib, "warnings", []) or []) + (
            ["the source is fine-tuned and nothing was compensated: to use the pruned model without training "
             "it again, prune with --compensate auto or lstsq-seq (benchmarks/README.md, retraining-free pruning)"]
            if head in FINE_TUNED_HEADS and compensate == "none" else []),
        "timings_s": {},
        "versions": versions(),
    }

    if out_dir is not None:
        with timer.stage("save"), atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            save_pruned(net, tmp, plan=plan, tokenizer=tokenizer,
                        source=None if isinstance(model, nn.Module) else model)
            if plot:
                plot_plan(plan, tmp / "plan.png", title=f"{Path(model_name).name} · {spec.name} · {strategy} · {achieved.ratio:.1%} FLOPs")
            report["timings_s"] = {**timer.timings, "total": time.perf_counter() - start}
            write_json(report, tmp / "report.json")
    report["timings_s"] = {**timer.timings, "total": time.perf_counter() - start}
    if out_dir is not None:
        write_json(report, out_dir / "report.json")
    return PruneResult(model=net, plan=plan, report=report, tokenizer=tokenizer, out_dir=out_dir)
