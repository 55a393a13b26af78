"""Errors layerdiff raises for bad input, one class per kind.

Every one reads '<where>: <what>'. The CLI prints it as a single line and exits
with status 1; it names its flags (`--max-memory`) where the library names the
option (`max_memory`). Anything else escaping is a bug in layerdiff.
"""

from __future__ import annotations

from pathlib import Path


class LayerdiffError(Exception):
    """A problem with the user's input, phrased as '<where>: <what>'."""

    def __init__(self, where: str | Path, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Raised in a worker process, it is pickled back to the parent.
        return (type(self), (self.where, self.problem))


class FormatError(LayerdiffError):
    """A file breaks the safetensors format, or holds what layerdiff cannot read."""


class SourceError(LayerdiffError):
    """A MODEL argument names nothing readable: a missing path, an uncached repo."""


class BudgetError(LayerdiffError):
    """The memory budget (`max_memory`) is too small for the work asked for."""


class SelectionError(LayerdiffError):
    """A stack, family or layer selection names nothing, or options conflict."""


class OutputError(LayerdiffError):
    """An output file cannot or must not be written."""


class ArchitectureError(LayerdiffError):
    """An architecture data file is malformed (names the file and the field)."""
