"""`layerdiff sweep`: many checkpoints or revisions, their scans and drift, one tidy table.

`layerdiff.sweep(models, out_dir=..., ...)` runs one (this package is callable
as that function); `plan_sweep` and `SweepJob.run` are its two steps.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .run import Entry, SweepJob, SweepResult, plan_sweep, sweep

__all__ = ["Entry", "SweepJob", "SweepResult", "plan_sweep", "sweep"]


class _CallableModule(types.ModuleType):
    """`layerdiff.sweep` names this package once a submodule is imported, and the
    function before: calling either runs a sweep."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
