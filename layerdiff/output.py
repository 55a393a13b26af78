"""Files layerdiff writes: checked before the work starts, written whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import LayerdiffError
from .checkpoint.sources import Source


def check_writable(path: Path, source: Source | None = None) -> None:
    """Fail before a long scan, not after it, on an output that cannot be written,
    or that would land in the checkpoint directory or the repo's hub cache folder."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise LayerdiffError(path, "output directory does not exist")
    if not os.access(parent, os.W_OK):
        raise LayerdiffError(path, "output directory is not writable")
    if source is None:
        return
    protected = [source.root.resolve()]
    if source.repo_id:
        protected.append(source.root.resolve().parent.parent)  # the repo's cache folder
    for p in protected:
        if parent == p or p in parent.parents:
            raise LayerdiffError(path, "refusing to write into the checkpoint directory or the hub cache")


@contextmanager
def atomic(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A temp file beside `path`, renamed onto it only once written completely."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path, doc: dict[str, Any]) -> None:
    with atomic(path) as f:
        json.dump(doc, f, indent=2)
