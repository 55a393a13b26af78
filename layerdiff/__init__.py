"""layerdiff: how transformer layers relate, straight from safetensors shards.

The API: `scan(model, **options)` (adjacent layers of one checkpoint),
`diff(a, b, **options)` (two checkpoints, tensor by tensor),
`inspect(model)` (headers only), `open_model` and `plan` for the steps, typed
results (`ScanResult`), and one error type per kind of bad input. Names are
imported on first use, so `layerdiff --help` does not pay for numpy.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "api": ("Model", "ScanJob", "inspect", "open_model", "plan", "scan", "scan_options"),
    "compare.run": ("DiffJob", "diff", "plan_diff"),
    "compare.result": ("DiffResult", "TensorDiff"),
    "errors": ("BudgetError", "FormatError", "LayerdiffError", "OutputError", "SelectionError", "SourceError"),
    "options": ("ScanOptions",),
    "result": ("SCHEMA", "Pair", "PairStats", "ScanResult", "Skip", "StackResult"),
    "sweep": ("SweepResult", "sweep"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'layerdiff' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
