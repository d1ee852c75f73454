"""Activation statistics for label-free pruning, collected in one forward pass over calibration data.

Forward pre-hooks on each layer's attention output projection (input = merged per-head context,
the paper's H^A) and FFN down projection (input = post-nonlinearity activations, H^F) see every
calibration token. Padding is excluded through ``attention_mask``.

Two modes (``tokens``):

* ``tokens=T`` (default 200, the paper's T): T token positions are drawn uniformly *without
  replacement* from all non-padding tokens of the whole calibration set with a seeded generator,
  and the activations at exactly these positions are kept for every layer and for both module
  types (the paper and the reference code use the same tokens everywhere). Only the T rows are
  stored, never all tokens.
* ``tokens=None`` ("all"): no rows are stored; per layer, Gram matrices ``X^T X`` over all
  non-padding tokens are accumulated (float32 products summed over a few batches, then added
  into a float64 accumulator), so memory does not grow with the number of samples. |cos| between units
  follows from the Gram matrix and its diagonal.

In both modes the per-column sum over *all* non-padding tokens is accumulated (one masked
matrix-vector product per hook call, float64 across batches). ``abs_mean`` (the paper's centroid
score) and ``sq_mean`` (mean a^2, e.g. for KCM's D2) are taken over the same tokens the similarity
uses: the T sampled rows, or all tokens in "all" mode (there the Gram diagonal gives sum a^2).

The hooks do as little as possible per call (a handful of tensor ops, no per-token Python): the
masks, flat indices of real tokens and sampled coordinates are prepared once per batch and shared
by every layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch
from torch import nn

from .errors import DataError, InputError

log = logging.getLogger("ppkit.statistics")

#: batches summed in float32 before the Gram partial sum is added to the float64 total (the float64
#: read-modify-write of a 3072 x 3072 matrix per batch costs more than the precision it buys)
GRAM_FLUSH_BATCHES = 8


class ActivationObserver(Protocol):
    """Something that wants to see the same activations in the same forward pass (e.g. the moment
    collector of :mod:`ppkit.compensate`), so that a second pass over the calibration data is not needed."""

    def start(self, masks: list[torch.Tensor]) -> None:
        """Called once before the pass with every batch's [batch, seq] bool mask of real tokens."""

    def begin_batch(self, index: int) -> None:
        """Called before batch ``index`` runs."""

    def observe(self, layer: int, kind: str, x: torch.Tensor) -> None:
        """``x`` [batch, seq, cols]: the input of layer ``layer``'s attention output projection
        (``kind="head"``) or FFN down projection (``kind="neuron"``)."""


@dataclass
class LayerStats:
    """Statistics of one transformer layer; head tensors are over the merged H*dh context columns."""

    #: sampled rows [T, H*dh] / [T, N] (float32, CPU); None in "all" mode
    head_samples: torch.Tensor | None
    neuron_samples: torch.Tensor | None
    #: Gram matrices X^T X over all non-padding tokens (float64, CPU); None unless "all" mode or keep_gram
    head_gram: torch.Tensor | None
    neuron_gram: torch.Tensor | None
    #: per-column sums of a over all non-padding tokens (float64)
    head_sum: torch.Tensor
    neuron_sum: torch.Tensor
    #: per-column mean a^2 over the similarity tokens (sampled rows, or all tokens), float64
    head_sq_mean: torch.Tensor
    neuron_sq_mean: torch.Tensor
    #: mean |activation| per head [H] (over tokens x dh) and per neuron [N], over the similarity tokens
    head_abs_mean: torch.Tensor
    neuron_abs_mean: torch.Tensor
    #: non-padding tokens seen in this layer
    num_tokens: int


@dataclass
class ActivationStats:
    """What :func:`collect_statistics` measured: one :class:`LayerStats` per layer plus run facts."""

    layers: list[LayerStats]
    num_heads: int
    head_dim: int
    ffn_dim: int
    #: non-padding tokens in the calibration data
    num_tokens: int
    #: sequences in the calibration data
    num_sequences: int
    #: mean non-padding length per sequence (the FLOPs sequence length)
    mean_seq_len: float
    #: requested sample size (None = all tokens); ``num_sampled`` rows were actually kept
    tokens: int | None
    num_sampled: int | None
    seed: int
    #: global indices (into the flattened non-padding tokens, instance then position order) of the samples
    sample_index: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(
        cls,
        head_samples: list[torch.Tensor],
        neuron_samples: list[torch.Tensor],
        num_heads: int,
        head_dim: int,
        *,
        mean_seq_len: float = 1.0,
        seed: int = 0,
    ) -> "ActivationStats":
        """Statistics of given activation rows (per layer [T, H*dh] and [T, N]), as if all T tokens were sampled.

        For tests, notebooks and plugins that compute activations themselves.
        """
        if len(head_samples) != len(neuron_samples) or not head_samples:
            raise InputError("need the same, non-zero number of head and neuron sample tensors (one per layer)")
        layers = []
        for hs, ns in zip(head_samples, neuron_samples):
            if hs.dim() != 2 or ns.dim() != 2 or hs.shape[0] != ns.shape[0] or hs.shape[1] != num_heads * head_dim:
                raise InputError(
                    f"layer samples must be [T, {num_heads * head_dim}] and [T, N] with the same T, got "
                    f"{tuple(hs.shape)} and {tuple(ns.shape)}"
                )
            acc = _LayerAccumulator(hs.shape[1], ns.shape[1], sampled=True, gram=False, device=torch.device("cpu"))
            rows = torch.arange(hs.shape[0])
            batch = _BatchIndex.build(torch.ones(1, hs.shape[0], dtype=torch.bool), (torch.zeros_like(rows), rows), torch.device("cpu"))
            for kind, x in (("head", hs), ("neuron", ns)):
                acc.update(kind, x.unsqueeze(0), batch)
            layers.append(acc.finish(num_heads, head_dim))
        t = head_samples[0].shape[0]
        return cls(
            layers=layers, num_heads=num_heads, head_dim=head_dim, ffn_dim=neuron_samples[0].shape[1], num_tokens=t,
            num_sequences=max(1, round(t / mean_seq_len)), mean_seq_len=float(mean_seq_len), tokens=t, num_sampled=t,
            seed=seed, sample_index=torch.arange(t),
        )


def collect_statistics(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    tokens: int | None = 200,
    seed: int = 0,
    progress: bool = True,
    keep_gram: bool = False,
    observers: Sequence[ActivationObserver] = (),
) -> ActivationStats:
    """Run the calibration ``batches`` through ``model`` once and return per-layer activation statistics.

    ``tokens`` is the number of non-padding token positions sampled uniformly (seeded by ``seed``)
    for similarity and centroid scores, the same positions for every layer and both module types;
    ``None`` keeps streaming float64 Gram matrices over all tokens instead. ``keep_gram=True`` also
    accumulates the Gram matrices in sampled mode. Batches are dicts of tensors
    as produced by :func:`ppkit.data.calibration_batches` (``input_ids``, ``attention_mask``, ...).
    ``observers`` are shown the same activations during the same pass.
    """
    from .adapters import get_adapter

    if tokens is not None and (isinstance(tokens, bool) or int(tokens) <= 0):
        raise InputError(f"tokens must be a positive integer or None (all tokens), got {tokens!r}")
    batches = list(batches)
    if not batches:
        raise DataError("no calibration batches: the calibration data is empty")
    adapter = get_adapter(model)
    shape = adapter.shape()
    if not shape.is_dense:
        raise InputError("activation statistics need the dense model (it is already pruned)")
    masks = [_valid_mask(b) for b in batches]
    lengths = torch.cat([m.sum(dim=1) for m in masks])
    total = int(lengths.sum())
    if total == 0:
        raise DataError("the calibration batches contain no non-padding tokens")

    sampled = tokens is not None
    picks: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(batches)
    sample_index = None
    num_sampled = None
    if sampled:
        num_sampled = min(int(tokens), total)
        if num_sampled < int(tokens):
            log.warning("only %d non-padding calibration tokens, fewer than --tokens %d: using all of them", total, tokens)
        gen = torch.Generator().manual_seed(int(seed))
        sample_index = torch.randperm(total, generator=gen)[:num_sampled].sort().values
        picks = _positions_per_batch(masks, sample_index)

    L, H, dh, N = shape.num_layers, shape.num_heads, shape.head_dim, shape.ffn_dim
    device = _model_device(model)
    acc = [_LayerAccumulator(H * dh, N, sampled=sampled, gram=(not sampled) or keep_gram, device=device) for _ in range(L)]
    state: dict[str, Any] = {}

    def make_hook(layer: int, kind: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            acc[layer].update(kind, args[0], state["batch"])
            for observer in observers:
                observer.observe(layer, kind, args[0])

        return hook

    handles = []
    try:
        for l in range(L):
            handles.append(adapter.head_context_module(l).register_forward_pre_hook(make_hook(l, "head")))
            handles.append(adapter.ffn_activation_module(l).register_forward_pre_hook(make_hook(l, "neuron")))
        was_training = model.training
        model.eval()
        for observer in observers:
            observer.start(masks)
        try:
            with torch.inference_mode(), _progress(progress, len(batches)) as advance:
                for i, (batch, mask, pick) in enumerate(zip(batches, masks, picks)):
                    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items() if k != "labels"}
                    state["batch"] = _BatchIndex.build(mask, pick, device)
                    for observer in observers:
                        observer.begin_batch(i)
                    model(**inputs)
                    advance()
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()

    layers = [a.finish(H, dh) for a in acc]
    for i, layer in enumerate(layers):
        if layer.num_tokens != total:
            raise DataError(
                f"layer {i} saw {layer.num_tokens} tokens but the batches have {total}: the model did not run every "
                "layer on every token (early exit or cached inputs?)"
            )
    return ActivationStats(
        layers=layers, num_heads=H, head_dim=dh, ffn_dim=N, num_tokens=total, num_sequences=int(lengths.numel()),
        mean_seq_len=float(total) / float(lengths.numel()), tokens=None if tokens is None else int(tokens),
        num_sampled=num_sampled, seed=int(seed), sample_index=sample_index,
    )


@dataclass
class _BatchIndex:
    """Per-batch index data shared by every hook call: padding weights, real-token rows, sampled coordinates."""

    weight: torch.Tensor  # [1, B*S] float 0/1: masks padding in one matrix-vector product
    valid: torch.Tensor  # flat indices of the non-padding positions, instance then position order
    count: int
    pick: torch.Tensor | None  # flat indices of this batch's sampled positions (subset of valid)

    @classmethod
    def build(cls, mask: torch.Tensor, pick: tuple[torch.Tensor, torch.Tensor] | None, device: torch.device) -> "_BatchIndex":
        flat = mask.reshape(-1)
        seq = mask.shape[1]
        chosen = None if pick is None else (pick[0] * seq + pick[1]).to(device)
        return cls(flat.to(device=device, dtype=torch.float32)[None, :], flat.nonzero().squeeze(1).to(device), int(flat.sum()), chosen)


class _LayerAccumulator:
    """Streaming per-layer accumulators for the head-context and FFN-activation inputs."""

    def __init__(self, head_cols: int, ffn_dim: int, *, sampled: bool, gram: bool, device: torch.device) -> None:
        self.cols = {"head": head_cols, "neuron": ffn_dim}
        self.sampled = sampled
        zeros = lambda *size: torch.zeros(*size, dtype=torch.float64, device=device)  # noqa: E731
        self.sums = {k: zeros(c) for k, c in self.cols.items()}
        self.abs = None if sampled else {k: zeros(c) for k, c in self.cols.items()}
        self.gram = {k: zeros(c, c) for k, c in self.cols.items()} if gram else None
        # float32 partial Gram of the last few batches (addmm in place), flushed into the float64 total
        self.gram32 = {k: torch.zeros(c, c, device=device) for k, c in self.cols.items()} if gram else None
        self.pending = {"head": 0, "neuron": 0}
        self.samples: dict[str, list[torch.Tensor]] = {"head": [], "neuron": []}
        self.count = {"head": 0, "neuron": 0}

    def update(self, kind: str, x: torch.Tensor, batch: _BatchIndex) -> None:
        c = self.cols[kind]
        if x.dim() != 3 or x.shape[-1] != c:
            raise DataError(f"unexpected {kind} activation shape {tuple(x.shape)} (expected [batch, seq, {c}])")
        x2 = x.reshape(-1, c).float()
        self.count[kind] += batch.count
        # Few, large ops: per-op overhead (thread-pool wake-ups) dominates small element-wise
        # kernels on a busy CPU, while matrix-vector products are cheap.
        self.sums[kind] += (batch.weight @ x2)[0]
        if self.gram is not None or self.abs is not None:
            rows = x2.index_select(0, batch.valid)
            if self.gram is not None:
                self.gram32[kind].addmm_(rows.T, rows)
                self.pending[kind] += 1
                if self.pending[kind] >= GRAM_FLUSH_BATCHES:
                    self._flush(kind)
            if self.abs is not None:
                self.abs[kind] += rows.abs().sum(0)
        if self.sampled and batch.pick is not None and batch.pick.numel():
            self.samples[kind].append(x2.index_select(0, batch.pick).cpu())

    def _flush(self, kind: str) -> None:
        self.gram[kind] += self.gram32[kind]
        self.gram32[kind].zero_()
        self.pending[kind] = 0

    def finish(self, num_heads: int, head_dim: int) -> LayerStats:
        if self.gram is not None:
            for kind in self.cols:
                self._flush(kind)
        if self.count["head"] != self.count["neuron"]:
            raise DataError(
                f"the attention and FFN hooks saw different token counts ({self.count['head']} vs {self.count['neuron']}): "
                "the model does not run both sublayers on every token"
            )
        n = max(self.count["head"], 1)
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        samples: dict[str, torch.Tensor | None] = {}
        abs_mean: dict[str, torch.Tensor] = {}
        sq_mean: dict[str, torch.Tensor] = {}
        for kind, c in self.cols.items():
            if self.sampled:
                rows = torch.cat(self.samples[kind]) if self.samples[kind] else torch.zeros(0, c)
                samples[kind] = rows
                r = rows.double()
                abs_mean[kind] = r.abs().mean(0) if len(r) else torch.zeros(c, dtype=torch.float64)
                sq_mean[kind] = (r * r).mean(0) if len(r) else torch.zeros(c, dtype=torch.float64)
            else:
                samples[kind] = None
                abs_mean[kind] = self.abs[kind].cpu() / n
                sq_mean[kind] = torch.diagonal(self.gram[kind]).cpu() / n
        gram = self.gram or {}
        return LayerStats(
            head_samples=samples["head"], neuron_samples=samples["neuron"],
            head_gram=cpu(gram.get("head")), neuron_gram=cpu(gram.get("neuron")),
            head_sum=self.sums["head"].cpu(), neuron_sum=self.sums["neuron"].cpu(),
            head_sq_mean=sq_mean["head"], neuron_sq_mean=sq_mean["neuron"],
            head_abs_mean=abs_mean["head"].view(num_heads, head_dim).mean(1),
            neuron_abs_mean=abs_mean["neuron"],
            num_tokens=self.count["head"],
        )


def _valid_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    ids = batch.get("input_ids")
    if ids is None:
        ids = batch.get("inputs_embeds")
    if ids is None:
        raise DataError("calibration batch has neither input_ids nor inputs_embeds")
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(ids.shape[:2], dtype=torch.bool)
    return mask.detach().cpu().bool()


def _positions_per_batch(masks: list[torch.Tensor], sample_index: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split sorted global token indices into per-batch (row, position) coordinates."""
    out = []
    offset = 0
    for mask in masks:
        n = int(mask.sum())
        lo = int(torch.searchsorted(sample_index, offset))
        hi = int(torch.searchsorted(sample_index, offset + n))
        local = sample_index[lo:hi] - offset
        coords = mask.nonzero()  # row-major: instance, then position, matching x[mask]
        sel = coords[local]
        out.append((sel[:, 0], sel[:, 1]))
        offset += n
    return out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _progress:
    """A rich progress bar on stderr (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("activation statistics"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), transient=True,
        )
        self._bar.__enter__()
        task = self._bar.add_task("stats", total=self.total)
        return lambda: self._bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
