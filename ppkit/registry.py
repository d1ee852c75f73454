"""The strategy registry: discovers pruning strategies from plugins and runs them safely.

Plugins are found through the entry-point group ``ppkit`` (the built-ins are declared in ppkit's
own ``pyproject.toml`` exactly like a third-party package would) and must implement the
:func:`ppkit.hookspecs.ppkit_strategies` hook. A plugin that fails to import or whose hook fails is
skipped with a warning that names it; the other plugins still load.

Public API (used by the pipeline and the CLI)::

    list_strategies() -> list[StrategyInfo]
    get_strategy(name) -> StrategyInfo          # InputError listing the available names
    run_strategy(name, ctx) -> PruningPlan      # validated against the model and the FLOPs budget
    register_plugin(obj, name=None, package=None, version=None)   # programmatic registration
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .adapters.base import ModelShape
from .errors import PlanError, PluginError, PpkitError, InputError
from .hookspecs import hookimpl
from .plan import PruningPlan
from .strategy import PruningContext, Strategy, as_bool, positive_float  # re-exported: plugins import them here too

log = logging.getLogger("ppkit.registry")

ENTRY_POINT_GROUP = "ppkit"
#: relative tolerance of the FLOPs budget check (float noise only; a whole unit is far larger)
BUDGET_RTOL = 1e-9

__all__ = [
    "ENTRY_POINT_GROUP", "PruningContext", "as_bool", "positive_float", "Registry", "Strategy", "StrategyInfo", "default_registry",
    "get_strategy", "hookimpl", "list_strategies", "register_plugin", "reset_registry", "run_strategy",
    "unregister_plugin",
]


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy and where it comes from (distribution name and version)."""

    name: str
    description: str
    needs: frozenset[str]
    package: str
    version: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass
class _Entry:
    strategy: Strategy
    package: str
    version: str
    plugin_name: str


class Registry:
    """A pluggy plugin manager plus the strategies its plugins provide (loaded lazily)."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("ppkit")
        self.pm.add_hookspecs(hookspecs)
        self._load_entry_points = load_entry_points
        self._entry_points_loaded = False
        self._origin: dict[str, tuple[str, str]] = {}  # plugin name -> (package, version)
        self._strategies: dict[str, _Entry] | None = None
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- loading
    def load_entry_points(self) -> None:
        """Register every plugin of the ``ppkit`` entry-point group that imports; warn about the others.

        Same discovery as pluggy's ``load_setuptools_entrypoints("ppkit")``, but one entry point at a
        time, so a broken plugin cannot stop the others from loading.
        """
        with self._lock:
            self._entry_points_loaded = True
            seen: set[str] = set()
            for dist in importlib.metadata.distributions():
                eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
                if not eps:
                    continue
                package = dist.metadata["Name"] or "?"
                version = dist.version or "?"
                for ep in eps:
                    if ep.name in seen or self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                        continue  # the same distribution can be visible twice on sys.path
                    seen.add(ep.name)
                    try:
                        plugin = ep.load()
                        self.pm.register(plugin, name=ep.name)
                    except Exception as exc:  # noqa: BLE001 - any failure of third-party code
                        _warn(f"ppkit plugin {ep.name!r} ({ep.value}) from package {package} {version} could not be loaded "
                              f"and is skipped: {type(exc).__name__}: {exc}")
                        continue
                    self._origin[ep.name] = (package, version)
                    self._check_hook_names(ep.name, plugin, package, version)
            self._strategies = None

    def _check_hook_names(self, name: str, plugin: Any, package: str, version: str) -> None:
        """Warn about ``ppkit_*`` functions that match no hook (a typo would silently do nothing)."""
        known = {n for n in dir(self.pm.hook) if n.startswith("ppkit_")}
        for attr in dir(plugin):
            if attr.startswith("ppkit_") and attr not in known and callable(getattr(plugin, attr, None)):
                _warn(f"ppkit plugin {name!r} from package {package} {version} defines {attr}(), which is not a ppkit hook "
                      f"(known hooks: {', '.join(sorted(known))})")

    def register_plugin(self, plugin: Any, name: str | None = None, package: str | None = None, version: str | None = None) -> str:
        """Register a plugin object or module programmatically; returns its plugin name."""
        with self._lock:
            self._ensure_loaded(collect=False)
            try:
                plugin_name = self.pm.register(plugin, name=name)
            except (ValueError, pluggy.PluginValidationError) as exc:
                raise InputError(f"cannot register plugin: {exc}") from None
            if plugin_name is None:
                raise InputError(f"plugin {name or plugin!r} is blocked")
            mod = getattr(plugin, "__name__", None) or type(plugin).__module__
            self._origin[plugin_name] = (package or str(mod), version or "unversioned")
            self._check_hook_names(plugin_name, plugin, *self._origin[plugin_name])
            self._strategies = None
            return plugin_name

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin (by plugin name) and its strategies."""
        with self._lock:
            self.pm.unregister(name=name)
            self._origin.pop(name, None)
            self._strategies = None

    def _ensure_loaded(self, collect: bool = True) -> dict[str, _Entry]:
        with self._lock:
            if self._load_entry_points and not self._entry_points_loaded:
                self.load_entry_points()
            if collect and self._strategies is None:
                self._strategies = self._collect()
            return self._strategies or {}

    def _collect(self) -> dict[str, _Entry]:
        found: dict[str, _Entry] = {}
        for impl in self.pm.hook.ppkit_strategies.get_hookimpls():
            package, version = self._origin.get(impl.plugin_name, (impl.plugin_name, "?"))
            try:
                items = impl.function()
                items = list(items) if items is not None else []
            except Exception as exc:  # noqa: BLE001
                _warn(f"ppkit plugin {impl.plugin_name!r} from package {package} {version} failed to list its strategies "
                      f"and is skipped: {type(exc).__name__}: {exc}")
                continue
            for item in items:
                if not _is_strategy(item):
                    _warn(f"ppkit plugin {impl.plugin_name!r} from package {package} returned {item!r}, not a Strategy; ignored")
                    continue
                if item.name in found:
                    other = found[item.name]
                    _warn(f"strategy {item.name!r} from package {package} is ignored: package {other.package} "
                          "already provides a strategy of that name")
                    continue
                found[item.name] = _Entry(item, package, version, impl.plugin_name)
        return found

    # ---------------------------------------------------------------- queries
    def list_strategies(self) -> list[StrategyInfo]:
        """All registered strategies, sorted by name."""
        return [self._info(e) for _, e in sorted(self._ensure_loaded().items())]

    def get_strategy(self, name: str) -> StrategyInfo:
        """The registered strategy ``name``; :class:`InputError` listing the available ones otherwise."""
        return self._info(self._entry(name))

    def _entry(self, name: str) -> _Entry:
        entries = self._ensure_loaded()
        if name not in entries:
            available = ", ".join(sorted(entries)) or "none (is ppkit installed? `pip install -e .`)"
            raise InputError(f"unknown strategy {name!r}; available strategies: {available}")
        return entries[name]

    @staticmethod
    def _info(e: _Entry) -> StrategyInfo:
        s = e.strategy
        return StrategyInfo(s.name, s.description, frozenset(s.needs), e.package, e.version, dict(getattr(s, "options", {}) or {}))

    # ---------------------------------------------------------------- running
    def run_strategy(self, name: str, ctx: PruningContext) -> PruningPlan:
        """Run strategy ``name`` on ``ctx`` and return its plan, validated and within the FLOPs budget.

        Whatever goes wrong inside the strategy becomes a :class:`PluginError` naming the strategy
        and its package; deliberate ppkit errors (``InputError`` for a bad option, ``BudgetError``
        for an unreachable budget) keep their type, with the strategy named in the message.
        """
        entry = self._entry(name)
        who = f"strategy {name!r} (package {entry.package} {entry.version})"
        if "activations" in entry.strategy.needs and ctx.stats is None:
            raise InputError(f"{who} needs activation statistics, but the context has none")
        if "batches" in entry.strategy.needs and ctx.batches is None:
            raise InputError(f"{who} needs the calibration batches, but the context has none")
        try:
            plan = entry.strategy.prune(ctx)
        except PluginError:
            raise
        except PpkitError as exc:
            raise _same_error(exc, f"{who}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - third-party code
            raise PluginError(f"{who} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(plan, PruningPlan):
            raise PluginError(f"{who} returned {type(plan).__name__}, not a PruningPlan")
        shape = ctx.shape
        try:
            plan.validate(shape.num_layers, shape.num_heads, shape.ffn_dim)
        except PlanError as exc:
            raise PluginError(f"{who} returned an invalid plan: {exc}") from None
        ratio = _plan_ratio(plan, shape, ctx.seq_len)
        if not math.isfinite(ratio) or ratio > ctx.flops_budget * (1.0 + BUDGET_RTOL):
            raise PluginError(
                f"{who} returned a plan that keeps {ratio:.6f} of the FLOPs, over the budget {ctx.flops_budget:.6f}"
            )
        plan.meta.setdefault("strategy", name)
        plan.meta.setdefault("strategy_package", entry.package)
        plan.meta.setdefault("strategy_version", entry.version)
        plan.meta.setdefault("flops_ratio", ratio)
        return plan


def _plan_ratio(plan: PruningPlan, shape: ModelShape, seq_len: float) -> float:
    from .flops import plan_flops

    return float(plan_flops(plan, shape, seq_len).ratio)


def _same_error(exc: PpkitError, message: str) -> PpkitError:
    try:
        return type(exc)(message)
    except Exception:  # noqa: BLE001 - an exotic subclass signature
        return PluginError(message)


def _is_strategy(item: Any) -> bool:
    return (
        isinstance(getattr(item, "name", None), str)
        and bool(item.name)
        and callable(getattr(item, "prune", None))
        and isinstance(getattr(item, "description", ""), str)
    )


def _warn(message: str) -> None:
    log.debug(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- module-level default registry
_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry (entry points loaded on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default


def reset_registry() -> None:
    """Forget all loaded plugins; the next call re-discovers entry points (after installing a package)."""
    global _default
    with _default_lock:
        _default = None


def list_strategies() -> list[StrategyInfo]:
    """All strategies of the default registry, sorted by name."""
    return default_registry().list_strategies()


def get_strategy(name: str) -> StrategyInfo:
    """Strategy ``name`` of the default registry (:class:`InputError` listing the available ones)."""
    return default_registry().get_strategy(name)


def run_strategy(name: str, ctx: PruningContext) -> PruningPlan:
    """Run strategy ``name`` of the default registry; see :meth:`Registry.run_strategy`."""
    return default_registry().run_strategy(name, ctx)


def register_plugin(plugin: Any, name: str | None = None, package: str | None = None, version: str | None = None) -> str:
    """Register a plugin object or module with the default registry; returns its plugin name."""
    return default_registry().register_plugin(plugin, name=name, package=package, version=version)


def unregister_plugin(name: str) -> None:
    """Remove a plugin from the default registry by its plugin name."""
    default_registry().unregister_plugin(name)
