"""Decode throughput of causal LMs (``ppkit bench --decode``): greedy generation with the KV cache, in
torch (``generate``) and onnxruntime (the :mod:`ppkit.export_past` graph), timed in interleaved rounds.

Every run decodes exactly ``new_tokens`` tokens after a ``prompt_len``-token random prompt (no early
stop), so tokens/s = batch x new_tokens / seconds, prompt processing included. Decoding one token at a
time is memory-bound: the weights are read once per step, so throughput follows the bytes of the
weights that are read (the LM head, which pruning does not touch, included) more than the FLOPs.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import InputError


@dataclass
class DecodeResult:
    """Median over the timed rounds of one (model, backend, batch) decode."""

    model: str
    backend: str
    batch: int
    prompt_len: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    params: int
    speedup: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _torch_decoder(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    mask = torch.ones_like(ids)

    def run() -> None:
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)

    return run


def _ort_decoder(session: Any, ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    from .export_past import greedy_decode

    array = ids.numpy()
    return lambda: greedy_decode(session, array, new_tokens)


def decode_throughput(models: Sequence[tuple[str, nn.Module]], *, prompt_len: int = 128, new_tokens: int = 64,
                      batch_sizes: Sequence[int] = (1, 8), backends: Sequence[str] = ("torch", "ort"),
                      repeats: int = 3, warmup: int = 1, threads: int | None = None,
                      onnx_dir: str | Path | None = None) -> list[DecodeResult]:
    """Greedy-decode throughput of each named causal LM per backend and batch size; the first model is
    the baseline of ``speedup`` (its tokens/s ratio)."""
    from .export import is_decoder_model, max_sequence_length, ort_session
    from .export_past import export_with_past

    if not models:
        raise InputError("give at least one causal LM to time")
    if repeats < 1 or warmup < 0 or new_tokens < 1 or prompt_len < 1:
        raise InputError(f"repeats, new_tokens and prompt_len must be >= 1 and warmup >= 0 "
                         f"(got {repeats}, {new_tokens}, {prompt_len}, {warmup})")
    for name, model in models:
        if not is_decoder_model(model) or getattr(model, "lm_head", None) is None:
            raise InputError(f"--decode times causal LMs with their LM head; {name} is a {type(model).__name__}")
        limit = max_sequence_length(model)
        if prompt_len + new_tokens > limit:
            raise InputError(f"prompt {prompt_len} + {new_tokens} new tokens exceed {name}'s {limit} positions")
    if threads:
        torch.set_num_threads(threads)
    tmp = None if onnx_dir is not None else tempfile.TemporaryDirectory(prefix="ppkit-decode-")
    folder = Path(onnx_dir if onnx_dir is not None else tmp.name)
    try:
        runners: list[tuple[tuple[str, str, int], Callable[[], None]]] = []
        for i, (name, model) in enumerate(models):
            model.eval()
            session = None
            if "ort" in backends:
                path = export_with_past(model, folder / f"{i}-model-with-past.onnx", overwrite=True).path
                session = ort_session(path, threads=threads)
            vocab = int(model.config.vocab_size)
            for batch in batch_sizes:
                ids = torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
                if "torch" in backends:
                    runners.append(((name, "torch", batch), _torch_decoder(model, ids, new_tokens)))
                if session is not None:
                    runners.append(((name, "ort", batch), _ort_decoder(session, ids, new_tokens)))
        for _, run in runners:
            for _ in range(warmup):
                run()
        times: dict[tuple[str, str, int], list[float]] = {key: [] for key, _ in runners}
        for round_ in range(repeats):  # interleaved, rotating the order so no runner is always first
            shift = round_ % len(runners)
            for key, run in runners[shift:] + runners[:shift]:
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
    finally:
        if tmp is not None:
            tmp.cleanup()
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models}
    results = []
    for (name, backend, batch), seconds in times.items():
        median = statistics.median(seconds)
        results.append(DecodeResult(name, backend, batch, prompt_len, new_tokens, median,
                                    batch * new_tokens / median, params[name]))
    base = models[0][0]
    for r in results:
        ref = next(b for b in results if b.model == base and b.backend == r.backend and b.batch == r.batch)
        r.speedup = r.tokens_per_s / ref.tokens_per_s
    return results


def render_decode_table(results: Sequence[DecodeResult]):  # -> rich.table.Table
    from rich.table import Table

    first = results[0] if results else None
    title = (f"greedy decode, prompt {first.prompt_len} + {first.new_tokens} new tokens (median of interleaved rounds)"
             if first else "greedy decode")
    table = Table(title=title)
    for col in ("model", "backend", "batch", "params", "s / run", "tokens/s", "vs first model"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in results:
        table.add_row(r.model, r.backend, str(r.batch), f"{r.params / 1e6:.1f}M", f"{r.seconds:.2f}",
                      f"{r.tokens_per_s:.0f}", f"{r.speedup:.2f}x" if r.speedup is not None else "")
    return table
