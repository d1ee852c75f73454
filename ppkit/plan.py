"""The pruning plan: plain, JSON-serialisable data that every strategy returns.

A plan lists, for each transformer layer of the *dense* model, the indices of the attention heads
and FFN neurons that are kept. Everything after a strategy (masking, surgery, FLOPs, saving,
export) reads only this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import PlanError

PLAN_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LayerPlan:
    """Kept head and neuron indices of one layer (sorted, unique)."""

    heads: tuple[int, ...]
    neurons: tuple[int, ...]


@dataclass
class PruningPlan:
    """Kept heads and neurons per layer of a dense model with ``num_heads`` heads and ``ffn_dim`` neurons.

    ``meta`` is free-form, JSON-serialisable information a strategy wants to record (thresholds,
    cluster counts, notes); it never changes what is kept.
    """

    layers: list[LayerPlan]
    num_heads: int
    ffn_dim: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [
            layer if isinstance(layer, LayerPlan) else LayerPlan(tuple(layer[0]), tuple(layer[1]))
            for layer in self.layers
        ]
        self.layers = [LayerPlan(tuple(int(h) for h in l.heads), tuple(int(n) for n in l.neurons)) for l in self.layers]

    # ---------------------------------------------------------------- construction
    @classmethod
    def keep_all(cls, num_layers: int, num_heads: int, ffn_dim: int) -> "PruningPlan":
        """The plan that keeps every head and neuron."""
        layer = LayerPlan(tuple(range(num_heads)), tuple(range(ffn_dim)))
        return cls([layer] * num_layers, num_heads, ffn_dim)

    @classmethod
    def from_masks(cls, head_mask: Any, neuron_mask: Any, meta: dict[str, Any] | None = None) -> "PruningPlan":
        """Build a plan from 0/1 masks of shape [layers, heads] and [layers, neurons] (tensors or lists)."""
        heads = [[i for i, v in enumerate(row) if float(v) != 0.0] for row in _rows(head_mask)]
        neurons = [[i for i, v in enumerate(row) if float(v) != 0.0] for row in _rows(neuron_mask)]
        if len(heads) != len(neurons):
            raise PlanError(f"head mask has {len(heads)} layers but neuron mask has {len(neurons)}")
        num_heads = len(_rows(head_mask)[0]) if heads else 0
        ffn_dim = len(_rows(neuron_mask)[0]) if neurons else 0
        return cls([LayerPlan(tuple(h), tuple(n)) for h, n in zip(heads, neurons)], num_heads, ffn_dim, dict(meta or {}))

    # ---------------------------------------------------------------- views
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def heads_per_layer(self) -> list[int]:
        return [len(l.heads) for l in self.layers]

    @property
    def neurons_per_layer(self) -> list[int]:
        return [len(l.neurons) for l in self.layers]

    def head_mask(self) -> list[list[float]]:
        """0/1 mask [layers][heads] (the paper's m^A)."""
        return [[1.0 if h in set(l.heads) else 0.0 for h in range(self.num_heads)] for l in self.layers]

    def neuron_mask(self) -> list[list[float]]:
        """0/1 mask [layers][neurons] (the paper's m^F)."""
        out = []
        for l in self.layers:
            row = [0.0] * self.ffn_dim
            for n in l.neurons:
                row[n] = 1.0
            out.append(row)
        return out

    # ---------------------------------------------------------------- validation
    def validate(self, num_layers: int | None = None, num_heads: int | None = None, ffn_dim: int | None = None) -> "PruningPlan":
        """Check ranges, order and uniqueness (and the model's shape when given); return self.

        Raises :class:`PlanError` with a message naming the first offending layer.
        """
        if num_layers is not None and self.num_layers != num_layers:
            raise PlanError(f"plan has {self.num_layers} layers but the model has {num_layers}")
        if num_heads is not None and self.num_heads != num_heads:
            raise PlanError(f"plan is for {self.num_heads} heads per layer but the model has {num_heads}")
        if ffn_dim is not None and self.ffn_dim != ffn_dim:
            raise PlanError(f"plan is for {self.ffn_dim} FFN neurons per layer but the model has {ffn_dim}")
        if self.num_layers == 0:
            raise PlanError("plan has no layers")
        for i, layer in enumerate(self.layers):
            _check_indices(layer.heads, self.num_heads, f"layer {i} heads")
            _check_indices(layer.neurons, self.ffn_dim, f"layer {i} neurons")
        return self

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "ppkit-plan",
            "version": PLAN_FORMAT_VERSION,
            "num_heads": self.num_heads,
            "ffn_dim": self.ffn_dim,
            "layers": [{"heads": list(l.heads), "neurons": list(l.neurons)} for l in self.layers],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruningPlan":
        """Parse and validate a plan dictionary (as written by :meth:`to_dict`)."""
        if not isinstance(data, dict) or data.get("format") != "ppkit-plan":
            raise PlanError("not a ppkit plan (missing \"format\": \"ppkit-plan\")")
        try:
            layers = [LayerPlan(tuple(int(h) for h in l["heads"]), tuple(int(n) for n in l["neurons"])) for l in data["layers"]]
            plan = cls(layers, int(data["num_heads"]), int(data["ffn_dim"]), dict(data.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"malformed plan: {exc!r}") from None
        return plan.validate()

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "PruningPlan":
        """Read a plan from a JSON file path or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.is_file():
                raise PlanError(f"plan file not found: {path}")
            text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _rows(mask: Any) -> list[list[float]]:
    if hasattr(mask, "tolist"):
        mask = mask.tolist()
    return [list(r) for r in mask]


def _check_indices(indices: Sequence[int], size: int, what: str) -> None:
    previous = -1
    for idx in indices:
        if idx < 0 or idx >= size:
            raise PlanError(f"{what}: index {idx} is out of range 0..{size - 1}")
        if idx <= previous:
            raise PlanError(f"{what}: indices must be sorted and unique (got {idx} after {previous})")
        previous = idx


def sorted_unique(indices: Iterable[int]) -> tuple[int, ...]:
    """Helper for strategies: indices as a sorted tuple without duplicates."""
    return tuple(sorted({int(i) for i in indices}))
