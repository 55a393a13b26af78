"""The one exception type layerdiff raises for bad input.

The CLI turns it into a single line on stderr and exit status 1; anything else
escaping is a bug in layerdiff, not in the user's files.
"""

from __future__ import annotations

from pathlib import Path


class LayerdiffError(Exception):
    """A problem with the user's input, phrased as '<where>: <what>'."""

    def __init__(self, where: str | Path, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")
