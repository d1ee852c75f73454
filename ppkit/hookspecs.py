"""Hook specifications for ppkit plugins (pluggy project name ``"ppkit"``).

A plugin is any module or object with functions marked ``@hookimpl`` whose names match the specs
below. Installed packages expose plugins through the entry-point group ``ppkit``::

    [project.entry-points.ppkit]
    magnitude = "ppkit_magnitude"

The built-in strategies (``dual-cp``, ``kcm``, ``random``, ``worst``) are registered the same way,
from ppkit's own ``pyproject.toml``. Plugins can also be registered at run time with
:func:`ppkit.registry.register_plugin` (tests, notebooks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .strategy import Strategy

#: marks a hook specification (used only in this module)
hookspec = pluggy.HookspecMarker("ppkit")
#: marks a plugin's implementation of a hook: ``@hookimpl def ppkit_strategies(): ...``
hookimpl = pluggy.HookimplMarker("ppkit")


@hookspec
def ppkit_strategies() -> "list[Strategy]":
    """Return the pruning strategies this plugin provides.

    Each item is a :class:`ppkit.strategy.Strategy`: a unique ``name`` (what users pass to
    ``--strategy``), a one-line ``description``, the set of inputs it ``needs`` (``"activations"``
    when it reads :class:`ppkit.statistics.ActivationStats`; the pipeline collects them only then),
    and a ``prune(ctx: PruningContext) -> PruningPlan`` callable. The plan must list kept heads and
    neurons for every layer of the dense model and keep at most ``ctx.flops_budget`` of its FLOPs;
    the registry validates both and reports a violation as a :class:`ppkit.errors.PluginError`
    naming the strategy and its package.

    Called once when the registry loads plugins; the results of all plugins are concatenated.
    This hook should not do heavy work (import models, read data): do that inside ``prune``.
    """
