"""The sweep's directory: one JSON file per finished piece of work, named by what it depends on.

`scan-<key>.json` holds one checkpoint's scan, `drift-<key>-<refkey>.json` its
drift against a reference. A key is a hash of the resolved source (a hub
repo's commit; for a local checkpoint the names, sizes and mtimes of the files
read) and of the options that change the numbers. A file that exists is done:
a rerun reads it and never writes it again. Files are written whole, through a
temp file renamed into place (`output.atomic`), so a sweep killed at any moment
leaves finished files and at most a `.*.tmp` temp file, which is ignored and
removed by the next sweep once it is clearly orphaned.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..api import Model
from ..checkpoint.jsonfile import read_json
from ..errors import FormatError, LayerdiffError, OutputError
from ..options import ScanOptions
from ..output import write_json
from ..result import SCHEMA

STORE = "layerdiff.sweep/1"  # the store's own format; part of every key
SCAN_DOC = "layerdiff.sweep.scan/1"
DRIFT_DOC = "layerdiff.sweep.drift/1"
ORPHAN_SECONDS = 600  # a temp file this old belongs to no live writer (writes take milliseconds)


def identity(model: Model) -> dict[str, Any]:
    """What a checkpoint's numbers depend on: a hub commit, or its files' names, sizes and mtimes."""
    src = model.source
    if src is None:
        raise LayerdiffError("sweep", "a checkpoint without a source (a layout built by hand) cannot be stored")
    if src.repo_id and src.commit:
        return {"repo_id": src.repo_id, "commit": src.commit}
    paths = [s.path for s in model.index.shards] if model.index is not None else list(src.files)
    paths += [p for p in (src.index_file, src.root / "config.json") if p is not None]
    files = []
    for p in sorted(set(Path(x) for x in paths)):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue  # no config.json
        except OSError as e:
            raise LayerdiffError(p, f"cannot read: {e.strerror}") from None
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return {"files": files}


def scan_settings(options: ScanOptions) -> dict[str, Any]:
    """The options that change a scan's numbers: all but the workers and the budget
    (which decides only where an approximate rank is exact, so it counts there)."""
    d = {k: v for k, v in asdict(options).items() if k not in ("max_memory", "jobs")}
    if not options.pca_biases:  # the default: left out, so results stored before the option keep their names
        del d["pca_biases"]
    if options.rank in ("auto", "sketch"):
        d["max_memory"] = options.max_memory
    return d


def key(*parts: Any) -> str:
    blob = json.dumps([STORE, SCHEMA, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class Store:
    """The finished work of sweeps in one directory."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def prepare(self) -> None:
        """Create the directory if needed, and remove temp files no writer is holding."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(self.folder, f"cannot create the output directory: {e.strerror}") from None
        if not os.access(self.folder, os.W_OK):
            raise OutputError(self.folder, "output directory is not writable")
        now = time.time()
        for tmp in self.folder.glob(".*.json.*.tmp"):
            try:
                if now - tmp.stat().st_mtime > ORPHAN_SECONDS:
                    tmp.unlink()
            except OSError:
                pass

    def scan_path(self, k: str) -> Path:
        return self.folder / f"scan-{k}.json"

    def drift_path(self, k: str, ref: str) -> Path:
        return self.folder / f"drift-{k}-{ref}.json"

    def load(self, path: Path, schema: str) -> dict[str, Any] | None:
        """A finished document, or None when there is none (or it is not one: it is redone)."""
        if not path.exists():
            return None
        try:
            doc = read_json(path, "sweep result")
        except FormatError:
            return None
        ok = isinstance(doc, dict) and doc.get("schema") == schema and isinstance(doc.get("result"), dict)
        return doc if ok else None

    def save(self, path: Path, doc: dict[str, Any]) -> None:
        write_json(path, doc)
