"""One exception family for everything ppkit reports to a user.

Every error raised on purpose by the library is a :class:`PpkitError` whose message says what is
wrong and what to do. The CLI prints it as one red line and exits with code 2; anything else is an
internal error and points the user to ``--debug``.
"""

from __future__ import annotations


class PpkitError(Exception):
    """Base class: an error a user can act on."""

    exit_code = 2


class InputError(PpkitError):
    """A bad argument: budget, sample count, sequence length, unknown name."""


class ModelLoadError(PpkitError):
    """The model could not be found or loaded (missing path, offline hub name, not a model)."""


class UnsupportedModelError(PpkitError):
    """The architecture has no ppkit adapter."""


class DataError(PpkitError):
    """Calibration or evaluation data is missing, empty or malformed."""


class PlanError(PpkitError):
    """A pruning plan is invalid for the model it is applied to."""


class BudgetError(PpkitError):
    """No plan can reach the requested FLOPs budget."""


class PluginError(PpkitError):
    """A strategy plugin failed, or returned something invalid; the message names the plugin."""


class ExportError(PpkitError):
    """ONNX export failed or the exported graph does not match torch."""


class OutputError(PpkitError):
    """The output location exists already or cannot be written."""
