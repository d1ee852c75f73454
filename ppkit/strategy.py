"""What a pruning strategy is and what it is given: the plain data shared by plugins, the registry
and the hook specification (kept apart so that :mod:`ppkit.hookspecs` and :mod:`ppkit.registry` do
not import each other).

A plugin builds :class:`Strategy` objects; the registry calls ``strategy.prune(ctx)`` with a
:class:`PruningContext`. ``as_bool`` / ``positive_float`` parse strategy options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from .adapters.base import ArchitectureAdapter, ModelShape
from .errors import InputError
from .plan import PruningPlan

__all__ = ["PruningContext", "Strategy", "as_bool", "positive_float"]


@dataclass
class PruningContext:
    """Everything a strategy may use to build a plan.

    ``flops_budget`` is the fraction of the dense model's FLOPs to keep, counted at ``seq_len``
    tokens (the calibration mean non-padding length). ``lambda_`` is pruned FFN FLOPs / pruned MHA
    FLOPs. ``stats`` is set when the strategy ``needs`` ``"activations"``, ``batches`` when it needs
    ``"batches"``. ``options`` carries the
    strategy options from the CLI / API (e.g. ``linkage``, ``threshold``, ``step``, ``selection``);
    a strategy ignores keys it does not know.
    """

    model: nn.Module | None
    adapter: ArchitectureAdapter | None
    shape: ModelShape
    stats: Any
    flops_budget: float
    seq_len: float
    lambda_: float = 5.0
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    #: the calibration batches (model inputs), set when the strategy ``needs`` ``"batches"``
    batches: list[dict[str, Any]] | None = None
    #: by-products a strategy may leave for the core. Known key: ``"assignments"``, used by
    #: ``--compensate merge``: {(layer, "attention" | "ffn"): {pruned unit: kept unit of its cluster}}
    artifacts: dict[str, Any] = field(default_factory=dict)

    def option(self, key: str, default: Any, *, choices: tuple | None = None, cast: Callable[[Any], Any] | None = None) -> Any:
        """``options[key]`` (``default`` when absent or None), converted by ``cast`` and checked against ``choices``.

        A bad value raises :class:`InputError` naming the option and what it accepts.
        """
        value = self.options.get(key)
        if value is None:
            value = default
        if cast is not None:
            try:
                value = cast(value)
            except (TypeError, ValueError) as exc:
                raise InputError(f"option {key}={self.options.get(key)!r} is invalid: {exc}") from None
        if choices is not None and value not in choices:
            raise InputError(f"option {key}={value!r} is not one of: {', '.join(map(str, choices))}")
        return value


def as_bool(value: Any) -> bool:
    """Parse a boolean option given as bool, int or string ("true"/"false", "yes"/"no", "1"/"0", "on"/"off")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def positive_float(value: Any) -> float:
    """Parse a finite number > 0."""
    out = float(value)
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"expected a number > 0, got {value!r}")
    return out


@dataclass(frozen=True)
class Strategy:
    """A pruning strategy as a plugin provides it (see :func:`ppkit.hookspecs.ppkit_strategies`)."""

    name: str
    description: str
    prune: Callable[[PruningContext], PruningPlan]
    needs: frozenset[str] = frozenset()
    #: option name -> one-line help, for documentation and the CLI
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs", frozenset(self.needs))
