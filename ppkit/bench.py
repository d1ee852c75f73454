"""Latency, throughput, FLOPs, parameters and (optionally) task quality of dense and pruned models.

Latency is measured the same way for every model in one run: the same random inputs, warm-up calls
first, then the timed repeats *interleaved* across models (one call of each model per round, the
order rotating from round to round), so background load and CPU frequency changes hit all models
alike and speedups against the baseline are fair. onnxruntime runs the graph written by
:func:`ppkit.export.export_onnx` (verified against torch) with ORT_ENABLE_ALL and one intra-op thread
per available core. Quality is computed separately (with torch) and only when a task is given.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .export import (
    export_onnx,
    input_names_for,
    max_sequence_length,
    model_family,
    ort_session,
    uses_token_type_ids,
)
from .machine import available_cores, check_device, machine_info
from .models import infer_head, saved_head

log = logging.getLogger(__name__)

BACKENDS = ("ort", "torch")


# ----------------------------------------------------------------------------- report types
@dataclass
class LatencyStats:
    """Timing of one model, backend and batch size over the timed repeats (milliseconds).

    ``throughput`` is samples per second at the mean latency; ``speedup`` is the baseline's p50
    divided by this p50 (``None`` without a baseline); ``cv`` the coefficient of variation.
    """

    backend: str
    batch_size: int
    seq_len: int
    repeats: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    throughput: float
    speedup: float | None = None

    @property
    def cv(self) -> float:
        return self.std_ms / self.mean_ms if self.mean_ms else 0.0

    @classmethod
    def from_times(cls, backend: str, batch_size: int, seq_len: int, seconds: Sequence[float]) -> "LatencyStats":
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        mean = float(ms.mean())
        return cls(
            backend=backend,
            batch_size=batch_size,
            seq_len=seq_len,
            repeats=int(ms.size),
            p50_ms=float(np.percentile(ms, 50)),
            p90_ms=float(np.percentile(ms, 90)),
            mean_ms=mean,
            std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
            min_ms=float(ms.min()),
            throughput=batch_size * 1000.0 / mean if mean > 0 else math.inf,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cv"] = self.cv
        return data


@dataclass
class ModelResult:
    """Everything measured for one model; ``flops`` is :class:`ppkit.flops.FlopsReport` as a dict
    (``ratio`` against the model's own dense shape) plus ``ratio_vs_baseline``."""

    name: str
    source: str
    role: str  # "baseline" or "model"
    family: str
    model_class: str
    params: int
    params_ratio: float | None
    flops: dict[str, Any]
    heads_per_layer: list[int]
    neurons_per_layer: list[int]
    latency: list[LatencyStats] = field(default_factory=list)
    quality: dict[str, float] | None = None
    export: dict[str, Any] | None = None
    state: str = "in memory"  # pre-trained / fine-tuned / untrained head / in memory (see model_state)
    precision: str = "fp32"  # or "int8" / "fp16" (the same model's onnxruntime conversion)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency"] = [row.to_dict() for row in self.latency]
        return data


@dataclass
class BenchReport:
    """The result of :func:`benchmark`: settings, machine, and one :class:`ModelResult` per model
    (the baseline first when there is one). ``to_dict()`` is JSON-serialisable."""

    settings: dict[str, Any]
    machine: dict[str, Any]
    models: list[ModelResult]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "ppkit-bench",
            "version": 1,
            "settings": self.settings,
            "machine": self.machine,
            "models": [m.to_dict() for m in self.models],
            "seconds": self.seconds,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            from .report import write_json

            write_json(self.to_dict(), path)
        return text

    @property
    def baseline(self) -> ModelResult | None:
        return next((m for m in self.models if m.role == "baseline"), None)


# ----------------------------------------------------------------------------- models
@dataclass
class _Loaded:
    name: str
    source: str
    model: nn.Module
    tokenizer: Any = None
    state: str = "in memory"
    precision: str = "fp32"  # "int8" / "fp16": onnxruntime's conversion at export, or (torch, fp16) a half copy
    session: Any = None  # its onnxruntime session, once exported


def _variant(entry: _Loaded, precision: str, backend: str) -> _Loaded:
    """``entry``'s int8 / fp16 variant: onnxruntime converts the fp32 model at export; torch runs an fp16
    copy of it (``.half()``: weights and compute in half precision, as on a GPU)."""
    model = copy.deepcopy(entry.model).half() if backend == "torch" else entry.model
    return _Loaded(f"{entry.name} · {precision}", entry.source, model, entry.tokenizer, entry.state, precision)


def model_state(source: str | Path, head: str) -> str:
    """What a checkpoint's weights under ``head`` are: "fine-tuned" (written by ``ppkit finetune``, or
    saved with this task head), "untrained head" (the task head is new: its outputs are chance level),
    or "pre-trained" (no task head, or GPT-2's LM head, which is tied to the pre-trained embeddings)."""
    if (Path(str(source)) / "finetune.json").is_file():
        return "fine-tuned"
    if head in ("base", "causal-lm"):
        return "pre-trained"
    return "fine-tuned" if saved_head(source) == head else "untrained head"


def _task_head(task_spec: Any) -> tuple[str, int | None]:
    kind = task_spec.kind
    if kind == "lm":
        return "causal-lm", None
    if kind == "qa":
        return "question-answering", None
    return "sequence-classification", int(task_spec.num_labels)


def _load(item: Any, name: str | None, task_spec: Any, tokenizer: Any, need_tokenizer: bool) -> _Loaded:
    """A model from a path / hub name (loaded with the task's head, or the saved head) or an nn.Module."""
    if isinstance(item, nn.Module):
        if need_tokenizer and tokenizer is None:
            raise InputError("measuring quality of an in-memory model needs tokenizer=...")
        if task_spec is not None and infer_head(item) != _task_head(task_spec)[0]:
            raise InputError(
                f"{name or type(item).__name__} is a {type(item).__name__}; task {task_spec.name} needs a "
                f"{_task_head(task_spec)[0]} model"
            )
        return _Loaded(name or type(item).__name__, f"<{type(item).__name__} object>", item.eval(), tokenizer)
    from .models import load_model, load_tokenizer

    source = str(item)
    if task_spec is not None:
        head, num_labels = _task_head(task_spec)
    else:
        head = saved_head(source) or "base"
        num_labels = None
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    model = load_model(source, head=head, **kwargs).eval()
    tok = tokenizer
    if need_tokenizer and tok is None:
        tok = load_tokenizer(source)
    return _Loaded(name or Path(source).name or source, source, model, tok, model_state(source, head))


def _shape_info(model: nn.Module, seq_len: int) -> tuple[dict[str, Any], list[int], list[int], str]:
    from .adapters import get_adapter
    from .flops import count_flops

    adapter = get_adapter(model)
    shape = adapter.shape()
    report = count_flops(shape, shape.heads_per_layer, shape.neurons_per_layer, seq_len)
    return report.to_dict(), list(shape.heads_per_layer), list(shape.neurons_per_layer), adapter.family


def check_compatible(baseline: nn.Module, model: nn.Module, names: tuple[str, str]) -> None:
    """Raise :class:`InputError` unless ``model`` can be compared with ``baseline``: same family
    (architecture), same vocabulary size, same hidden size and number of layers."""
    b_cfg, m_cfg = baseline.config, model.config
    b_fam, m_fam = model_family(baseline), model_family(model)
    if b_fam != m_fam:
        raise InputError(
            f"baseline {names[0]} is a {b_fam} model but {names[1]} is {m_fam}: compare models of the same architecture"
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        b_val, m_val = getattr(b_cfg, key, None), getattr(m_cfg, key, None)
        if b_val != m_val:
            what = "vocabulary" if key == "vocab_size" else key.replace("_", " ")
            raise InputError(
                f"baseline {names[0]} has {what} {b_val} but {names[1]} has {m_val}: the baseline must be the dense "
                "model the pruned one comes from (same architecture and vocabulary)"
            )


# ----------------------------------------------------------------------------- timing
def make_inputs(model: nn.Module, batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Benchmark inputs: random token ids, no padding, segment ids 0 (same for every model of a family)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen, dtype=torch.long)
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if uses_token_type_ids(model):
        feed["token_type_ids"] = torch.zeros_like(ids)
    return feed


def _torch_runner(model: nn.Module, feed: dict[str, torch.Tensor], device: str) -> Callable[[], None]:
    kwargs: dict[str, Any] = {k: v.to(device) for k, v in feed.items()}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> None:
        with torch.inference_mode():
            model(**kwargs)
        sync()

    return run


def _ort_runner(session: Any, feed: dict[str, torch.Tensor], names: Sequence[str]) -> Callable[[], None]:
    arrays = {n: feed[n].numpy() for n in names}

    def run() -> None:
        session.run(None, arrays)

    return run


def time_interleaved(
    runners: Sequence[Callable[[], None]], *, repeats: int, warmup: int, progress: Callable[[], None] | None = None
) -> list[list[float]]:
    """Seconds per call for each runner: ``warmup`` untimed calls each, then ``repeats`` rounds of one
    timed call per runner, the starting runner rotating every round (fair under varying load)."""
    for run in runners:
        for _ in range(warmup):
            run()
    times: list[list[float]] = [[] for _ in runners]
    n = len(runners)
    for r in range(repeats):
        for k in range(n):
            i = (r + k) % n
            start = time.perf_counter()
            runners[i]()
            times[i].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    return times


# ----------------------------------------------------------------------------- quality
@torch.no_grad()
def evaluate_quality(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    *,
    data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str = "cpu",
    session: Any = None,
) -> dict[str, float] | None:
    """The task's dev-set metrics for ``model`` (with torch): accuracy / F1 / Matthews / Pearson-Spearman
    for GLUE, exact match / F1 for SQuAD, strided perplexity for LM tasks (test split, falling back to
    dev). ``limit`` keeps the first N examples (LM: N windows). With ``session`` (an onnxruntime session
    of the model's export, e.g. its int8 variant) the logits come from it; that is measured for sentence
    classification / regression only (None for other tasks)."""
    from .data import load_task_dataset, lm_token_ids, postprocess_qa
    from .errors import DataError
    from .metrics import compute_task_metrics, model_max_positions, perplexity
    from .tasks import get_task

    spec = get_task(task)
    if session is not None and spec.kind not in ("classification", "regression"):
        return None
    model = model.to(device).eval()
    positions = model_max_positions(model)
    if spec.kind == "lm":
        window = min(max_length or positions or 1024, positions or 1024)
        stride = max(1, window // 2)
        try:
            ids = lm_token_ids(spec, tokenizer, "test", data=data)
        except DataError:
            ids = lm_token_ids(spec, tokenizer, "dev", data=data)
        if limit is not None:
            ids = ids[:, : window + (max(1, limit) - 1) * stride]
        ppl = perplexity(model, ids, max_length=window, stride=stride)
        return {"perplexity": ppl, "loss": math.log(ppl) if ppl > 0 else math.nan, "tokens": float(ids.shape[1])}

    dataset = load_task_dataset(spec, tokenizer, "dev", data=data, max_length=max_length, limit=limit,
                                max_positions=positions)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=dataset.collator(tokenizer))
    inputs = set(input_names_for(model))
    if spec.kind == "qa":
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        for batch in loader:
            out = model(**{k: v.to(device) for k, v in batch.items() if k in inputs})
            starts.extend(out.start_logits.float().cpu().numpy())
            ends.extend(out.end_logits.float().cpu().numpy())
        answers = postprocess_qa(dataset, starts, ends)
        result = compute_task_metrics(spec, answers, dataset.references)
    else:
        logits = []
        for batch in loader:
            if session is not None:
                logits.append(session.run(["logits"], {k: v.numpy() for k, v in batch.items() if k in inputs})[0])
            else:
                out = model(**{k: v.to(device) for k, v in batch.items() if k in inputs})
                logits.append(out.logits.float().cpu().numpy())
        result = compute_task_metrics(spec, np.concatenate(logits), dataset.references)
    result = {k: float(v) for k, v in result.items()}
    result["examples"] = float(dataset.num_examples)
    return result


def pruned_at(source: str | Path) -> dict[str, float] | None:
    """The FLOPs ratio ``ppkit prune`` reported for a pruned directory and the sequence length it was
    counted at (the mean calibration length), or None. bench counts at its own ``seq_len``; the two
    differ because attention's s^2 term weighs more at longer sequences."""
    for name in ("report.json", "plan.json"):
        try:
            data = json.loads((Path(str(source)) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        data = data.get("meta", data) if name == "plan.json" else data
        if "flops_ratio" in data and "flops_seq_len" in data:
            return {"ratio": float(data["flops_ratio"]), "seq_len": float(data["flops_seq_len"])}
    return None


def _describe(entry: _Loaded, role: str, seq_len: int) -> ModelResult:
    flops, heads, neurons, family = _shape_info(entry.model, seq_len)
    flops["seq_len"] = seq_len
    flops["at_prune"] = pruned_at(entry.source)
    return ModelResult(
        state=entry.state,
        precision=entry.precision,
        name=entry.name,
        source=entry.source,
        role=role,
        family=family,
        model_class=type(entry.model).__name__,
        params=int(sum(p.numel() for p in entry.model.parameters())),
        params_ratio=None,
        flops=flops,
        heads_per_layer=heads,
        neurons_per_layer=neurons,
    )


def measure_latency(
    loaded: Sequence[_Loaded],
    results: Sequence[ModelResult],
    *,
    backends: Sequence[str],
    batch_sizes: Sequence[int],
    seq_len: int,
    device: str,
    repeats: int,
    warmup: int,
    threads: int | None,
    spinning: bool,
    onnx_dir: str | Path | None,
    has_baseline: bool,
    bar: "_Progress",
) -> None:
    """Export (for ORT) and time every model per backend and batch size, interleaved; append a
    :class:`LatencyStats` per (backend, batch) to each result (speedups against ``results[0]``
    when ``has_baseline``)."""
    with tempfile.TemporaryDirectory(prefix="ppkit-bench-") as tmp:
        out_dir = Path(onnx_dir) if onnx_dir is not None else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        sessions: list[Any] = []
        if "ort" in backends:
            bar.stage("export to ONNX", len(loaded))
            for i, (entry, res) in enumerate(zip(loaded, results)):
                rep = export_onnx(entry.model.cpu(), out_dir / f"{i:02d}-{_safe(entry.name)}.onnx",
                                  quantize="int8" if entry.precision == "int8" else None,
                                  dtype="fp16" if entry.precision == "fp16" else "fp32",
                                  min_cosine=-1.0)  # bench scores the int8 / fp16 model itself; an untrained
                # head's near-zero logits would fail the export's output-cosine guard
                entry.model.to(device)
                res.export = rep.to_dict()
                entry.session = ort_session(rep.path, device=device, threads=threads, spinning=spinning)
                sessions.append(entry.session)
                bar.advance()
        saved_threads = torch.get_num_threads()
        try:
            for backend in backends:
                if backend == "torch" and threads:
                    torch.set_num_threads(threads)
                for batch in batch_sizes:
                    bar.stage(f"{backend} batch {batch}", repeats)
                    runners = []
                    for i, entry in enumerate(loaded):
                        feed = make_inputs(entry.model, batch, seq_len)
                        if backend == "ort":
                            runners.append(_ort_runner(sessions[i], feed, input_names_for(entry.model)))
                        else:
                            runners.append(_torch_runner(entry.model, feed, device))
                    times = time_interleaved(runners, repeats=repeats, warmup=warmup, progress=bar.advance)
                    stats = [LatencyStats.from_times(backend, batch, seq_len, t) for t in times]
                    if has_baseline:
                        for st in stats:
                            st.speedup = stats[0].p50_ms / st.p50_ms if st.p50_ms > 0 else None
                    for res, st in zip(results, stats):
                        res.latency.append(st)
        finally:
            torch.set_num_threads(saved_threads)
            sessions.clear()


# ----------------------------------------------------------------------------- main entry
def benchmark(
    models: Sequence[str | Path | nn.Module],
    *,
    baseline: str | Path | nn.Module | None = None,
    task: str | None = None,
    data: str | Path | None = None,
    batch_sizes: Sequence[int] = (1, 8, 32),
    seq_len: int = 128,
    device: str = "cpu",
    backend: str = "ort",
    repeats: int = 20,
    warmup: int = 3,
    eval_limit: int | None = None,
    json_out: str | Path | None = None,
    plot: str | Path | None = None,
    threads: int | None = None,
    names: Sequence[str] | None = None,
    baseline_name: str | None = None,
    tokenizer: Any = None,
    quality: bool = True,
    onnx_dir: str | Path | None = None,
    ort_spinning: bool = False,
    progress: bool = False,
    int8: bool = False,
    fp16: bool = False,
) -> BenchReport:
    """Measure latency (p50/p90/mean over ``repeats`` timed calls after ``warmup``), throughput and
    speedup against ``baseline`` for each model, backend ("ort", "torch" or "both") and batch size at
    ``seq_len`` tokens, plus FLOPs (:mod:`ppkit.flops` at ``seq_len``) and parameter counts, and,
    when ``task`` is given (and ``quality``), the task's dev metrics on ``eval_limit`` examples.

    ``models`` and ``baseline`` are model directories (dense or ppkit-pruned), hub names or model
    objects (``names`` labels them). The baseline is timed in the same interleaved rounds as the
    models. It must have the same architecture and vocabulary as every model (:class:`InputError`).
    ``device="cuda"`` uses torch CUDA / onnxruntime's CUDAExecutionProvider and raises
    :class:`InputError` when they are missing. ORT sessions use ``threads`` intra-op threads (default:
    the available cores; thread spinning off unless ``ort_spinning``, see :func:`ppkit.export.ort_session`).
    ONNX files go to a temporary directory unless ``onnx_dir`` is given. ``int8`` adds, for every model
    and the baseline, its onnxruntime int8 variant (:mod:`ppkit.quantize`), timed in the same rounds;
    its quality is measured in onnxruntime (sentence classification / regression tasks); ``fp16`` does
    the same with the half-precision variant: with backend "ort" its fp16 export, with backend "torch"
    a ``.half()`` copy of the model (timed and scored in torch). fp16 is meant for ``device="cuda"``
    (for torch CUDA without onnxruntime-gpu, use backend "torch"); on CPU it runs, slower than fp32.
    Writes the report as JSON to ``json_out`` and a PNG to ``plot`` when given.
    """
    started = time.perf_counter()
    backends = list(BACKENDS) if backend == "both" else [backend]
    if any(b not in BACKENDS for b in backends):
        raise InputError(f"unknown backend {backend!r}: use 'ort', 'torch' or 'both'")
    check_device(device, backends)
    if not models:
        raise InputError("give at least one model to benchmark")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if seq_len < 1:
        raise InputError(f"seq_len must be positive, got {seq_len}")
    if repeats < 1 or warmup < 0:
        raise InputError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    if names is not None and len(names) != len(models):
        raise InputError(f"{len(names)} names for {len(models)} models")
    if eval_limit is not None and eval_limit < 1:
        raise InputError(f"eval_limit must be a positive integer, got {eval_limit}")
    precisions = [name for name, wanted in (("int8", int8), ("fp16", fp16)) if wanted]
    if int8 and backends != ["ort"]:
        raise InputError("int8 variants run in onnxruntime: use backend 'ort'")
    if fp16 and len(backends) > 1:
        raise InputError("fp16 variants run in one backend: use backend 'ort' (onnxruntime fp16 export) or "
                         "'torch' (the model in half precision), not both")
    from .saving import check_output_file

    for path, flag in ((json_out, "json_out"), (plot, "plot")):
        check_output_file(path, flag)  # fail now, not after minutes of timing

    task_spec = None
    if task is not None:
        from .tasks import get_task

        task_spec = get_task(task)
    need_tok = task_spec is not None and quality

    loaded: list[_Loaded] = []
    roles: list[str] = []
    if baseline is not None:
        loaded.append(_load(baseline, baseline_name, task_spec, tokenizer, need_tok))
        if baseline_name is None and isinstance(baseline, nn.Module):
            loaded[-1].name = "baseline"
        roles.append("baseline")
    for i, item in enumerate(models):
        loaded.append(_load(item, names[i] if names else None, task_spec, tokenizer, need_tok))
        roles.append("model")
    _unique_names(loaded)
    if baseline is not None:
        for entry in loaded[1:]:
            check_compatible(loaded[0].model, entry.model, (loaded[0].name, entry.name))
    if precisions:  # each model's variants right after it: the baseline stays first
        loaded = [v for e in loaded for v in (e, *(_variant(e, p, backends[0]) for p in precisions))]
        roles = [r for role in roles for r in (role, *["model"] * len(precisions))]
    for entry in loaded:
        entry.model.to(device)
        limit = max_sequence_length(entry.model)
        if seq_len > limit:
            raise InputError(f"seq_len {seq_len} is longer than {entry.name}'s {limit} positions")

    results = [_describe(entry, role, seq_len) for entry, role in zip(loaded, roles)]
    notes = []
    if task_spec is not None and quality:
        for res in results:
            if res.state == "untrained head" and res.precision == "fp32":
                notes.append(f"{res.role} {res.name} has an untrained {task_spec.name} head, so its quality is chance "
                             f"level; compare against a fine-tuned dense model (ppkit finetune DENSE --task "
                             f"{task_spec.name} --out DENSE-FT, then --baseline DENSE-FT)")
                warnings.warn(notes[-1], stacklevel=2)
    if fp16 and device != "cuda":
        notes.append("fp16 variants on CPU: " + ("onnxruntime casts around the ops it has no fp16 kernels for"
                                                 if backends == ["ort"] else "torch has few fast half-precision CPU kernels")
                     + ", so they run slower than fp32 here; their latency means something with --device cuda")
    if baseline is not None:
        base = results[0]
        for res in results:
            res.params_ratio = res.params / base.params
            res.flops["ratio_vs_baseline"] = res.flops["total"] / base.flops["total"] if base.flops["total"] else None

    bar = _Progress(progress)
    try:
        measure_latency(loaded, results, backends=backends, batch_sizes=batch_sizes, seq_len=seq_len,
                        device=device, repeats=repeats, warmup=warmup, threads=threads, spinning=ort_spinning,
                        onnx_dir=onnx_dir, has_baseline=baseline is not None, bar=bar)
        if task_spec is not None and quality:
            bar.stage(f"quality on {task_spec.name}", len(loaded))
            for entry, res in zip(loaded, results):
                res.quality = evaluate_quality(entry.model, entry.tokenizer, task_spec.name, data=data,
                                               limit=eval_limit, device=device,
                                               session=entry.session if entry.precision != "fp32" and entry.session is not None else None)
                bar.advance()
    finally:
        bar.stop()

    settings = {
        "batch_sizes": batch_sizes,
        "seq_len": seq_len,
        "device": device,
        "backends": backends,
        "repeats": repeats,
        "warmup": warmup,
        "ort_threads": threads or available_cores(),
        "ort_optimization": "ORT_ENABLE_ALL",
        "ort_spinning": ort_spinning,
        "timing": "interleaved rounds, rotating order; same random inputs (no padding) for all models",
        "task": task_spec.name if task_spec else None,
        "main_metric": _main_metric(task_spec),
        "eval_limit": eval_limit,
        "quality_backend": (f"torch ({' / '.join(precisions)} variants: onnxruntime)" if precisions else "torch")
        if task_spec is not None and quality else None,
        "int8": int8,
        "fp16": fp16,
        "baseline": results[0].name if baseline is not None else None,
        "notes": notes,
    }
    report = BenchReport(settings, machine_info(device), results, time.perf_counter() - started)
    log.info("benchmarked %d models in %.1fs", len(results), report.seconds)
    if json_out is not None:
        report.to_json(json_out)
    if plot is not None:
        from .plotting import plot_bench

        plot_bench(report.to_dict(), plot)
    return report


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _main_metric(task_spec: Any) -> str | None:
    if task_spec is None:
        return None
    if task_spec.kind == "lm":
        return "perplexity"
    if task_spec.kind == "qa":
        return "f1"
    return task_spec.metrics[0] if task_spec.metrics else None


def _unique_names(loaded: list[_Loaded]) -> None:
    seen: dict[str, int] = {}
    for entry in loaded:
        count = seen.get(entry.name, 0)
        seen[entry.name] = count + 1
        if count:
            entry.name = f"{entry.name}#{count + 1}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "model"


class _Progress:
    """rich progress on stderr, one bar per stage; a no-op when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        self.job = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()

    def stage(self, description: str, total: int) -> None:
        if self.bar is not None:
            if self.job is not None:
                self.bar.remove_task(self.job)
            self.job = self.bar.add_task(description, total=total)

    def advance(self) -> None:
        if self.bar is not None and self.job is not None:
            self.bar.advance(self.job)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- presentation
def render_table(report: BenchReport | dict[str, Any]):  # -> rich.table.Table
    """A rich table for the CLI: one row per model, backend and batch size."""
    from rich.table import Table

    data = report.to_dict() if isinstance(report, BenchReport) else report
    settings = data["settings"]
    main = settings.get("main_metric")
    table = Table(title=f"ppkit bench · seq {settings['seq_len']} · {settings['device']}"
                        + (f" · {settings['task']}" if settings.get("task") else ""))
    table.add_column("model", overflow="fold", ratio=1)
    for col in (f"FLOPs @{settings['seq_len']}", "params", "backend", "batch", "p50 ms", "p90 ms", "mean ms", "sd ms",
                "samples/s", "speedup"):
        table.add_column(col, justify="left" if col == "backend" else "right", no_wrap=True)
    if main:
        table.add_column(main, justify="right", no_wrap=True)
    for m in data["models"]:
        name = m["name"] + (" (baseline)" if m["role"] == "baseline" and m["name"] != "baseline" else "")
        if m.get("state") and m.get("precision", "fp32") == "fp32":
            name += f" · {m['state']}"
        quality = ""
        if main and m.get("quality") and main in m["quality"]:
            quality = f"{m['quality'][main]:.4g}"
        first = True
        for row in m["latency"] or [None]:
            at_prune = m["flops"].get("at_prune")
            flops = f"{m['flops']['ratio']:.1%}" + (f" ({at_prune['ratio']:.1%} @{at_prune['seq_len']:.0f} in prune)"
                                                    if at_prune else "")
            cells = [name if first else "", flops if first else "",
                     _count(m["params"]) if first else ""]
            if row is None:
                cells += [""] * 8
            else:
                cells += [row["backend"], str(row["batch_size"]), f"{row['p50_ms']:.2f}", f"{row['p90_ms']:.2f}",
                          f"{row['mean_ms']:.2f}", f"{row['std_ms']:.2f}", f"{row['throughput']:.1f}",
                          f"{row['speedup']:.2f}x" if row.get("speedup") else "-"]
            if main:
                cells.append(quality if first else "")
            table.add_row(*cells)
            first = False
        table.add_section()
    machine = data.get("machine", {})
    table.caption = (f"{machine.get('cpu', '')} · {settings.get('ort_threads')} ORT threads · "
                     f"{settings['repeats']} repeats after {settings['warmup']} warm-up · FLOPs kept vs dense at sequence length "
                     f"{settings['seq_len']} (prune counts at the mean calibration length)")
    return table
