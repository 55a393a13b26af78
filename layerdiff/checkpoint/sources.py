"""MODEL argument -> the shard files to read (one resolver for every command).

A MODEL is a local directory, a single `.safetensors` file, an index file, or a
Hugging Face repo id looked up in the hub cache through huggingface_hub (so its
cache layout and HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE rules are the
library's, not a copy of them). Nothing here writes anywhere, except
huggingface_hub's own download of a repo that is not cached yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FormatError, LayerdiffError, SourceError
from .files import first_line, kind as file_kind
from .jsonfile import read_json

# What a download fetches: the weights, their index and the config, nothing else.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json"]
# Real ones are a few KB (multimodal ones tens of KB).
MAX_CONFIG_BYTES = 16 << 20
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Source:
    """Where a MODEL resolved to: its kind, its shard files, the index file and config.json read."""

    spec: str
    kind: str  # "file", "dir", "hub"
    root: Path
    files: list[Path]
    index_file: Path | None
    config: dict[str, Any] | None
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "root": str(self.root),
            "index_file": str(self.index_file) if self.index_file else None,
            "files": [str(f) for f in self.files],
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
        }


def resolve(model: str, revision: str | None = None, cache_dir: str | None = None) -> Source:
    """Find the safetensors weights a MODEL argument names.

    A path that exists is local. One that does not is a hub repo id only if it
    looks like one (`name` or `org/name`) and nothing marks it as a path: a
    start of `/`, `./`, `../` or `~`, a `.safetensors` or `.json` ending, or a
    first component that is a local directory (`ckpts/run1` with `./ckpts`
    present is a missing checkpoint, not a repo)."""
    if not model.strip():
        raise SourceError("MODEL", "is empty: name a checkpoint directory, a .safetensors or index file, or a hub repo id")
    path = Path(model).expanduser()
    try:
        if path.exists():
            if revision is not None:
                raise LayerdiffError(model, "--revision applies to hub repo ids, not to local paths")
            return _local(model, path)
    except OSError as e:  # a name too long, a directory we may not list...
        raise LayerdiffError(e.filename or model, f"cannot read: {e.strerror or first_line(e)}") from None
    repo_id, at, rev = model.partition("@")  # org/name@REV: the hub's own convention for a revision
    if at:
        if revision is not None and revision != rev:
            raise LayerdiffError(model, f"names revision {rev!r} and --revision {revision!r}: give one")
        revision = rev
    if not REPO_ID.match(repo_id) or repo_id.startswith((".", "/", "~")) or repo_id.endswith((".safetensors", ".json")):
        raise SourceError(model, "no such file or directory")
    first = Path(repo_id.split("/")[0])
    if "/" in repo_id and first.is_dir():
        raise SourceError(model, f"no such file or directory (a path, not a hub repo id: {first}/ is a local directory)")
    source = _hub(repo_id, revision, cache_dir)
    source.spec = model
    return source


def _local(spec: str, path: Path, **hub: Any) -> Source:
    if not path.is_dir() and not path.is_file():  # a FIFO or a device: its first read could block forever
        raise FormatError(path, f"{file_kind(path.stat().st_mode)}, not a .safetensors file, an index or a checkpoint directory")
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return Source(spec, "file", path.parent, [], path, _config(path.parent), **hub)
        if path.suffix == ".safetensors":
            return Source(spec, "file", path.parent, [path], None, _config(path.parent), **hub)
        raise LayerdiffError(path, "not a .safetensors file, an index or a checkpoint directory")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        preferred = path / "model.safetensors.index.json"
        if preferred not in indexes:
            names = ", ".join(i.name for i in indexes)
            raise LayerdiffError(path, f"several index files ({names}); name one of them")
        indexes = [preferred]
    kind = "hub" if hub else "dir"
    if indexes:
        return Source(spec, kind, path, [], indexes[0], _config(path), **hub)
    weights = sorted(path.glob("*.safetensors"))
    if (path / "model.safetensors").exists():
        weights = [path / "model.safetensors"]
    if len(weights) == 1:
        return Source(spec, kind, path, weights, None, _config(path), **hub)
    if weights:
        raise LayerdiffError(path, f"{len(weights)} .safetensors files but no *.safetensors.index.json to join them")
    raise LayerdiffError(path, "no .safetensors weights in this directory")


def _config(folder: Path) -> dict[str, Any] | None:
    cfg = folder / "config.json"
    if not cfg.exists():
        return None
    doc = read_json(cfg, "config.json", limit=MAX_CONFIG_BYTES)
    if not isinstance(doc, dict):
        raise LayerdiffError(cfg, "not a JSON object")
    return doc


def _check_revision(repo_id: str, revision: str) -> None:
    # Git refuses these in ref names too; huggingface_hub would join them into a path under refs/.
    bad = not revision or revision.startswith(("/", "-")) or ".." in revision or "\\" in revision or "//" in revision
    if bad or any(c.isspace() or ord(c) < 32 or c in "~^:?*[" for c in revision) or revision.endswith(("/", ".lock")):
        raise LayerdiffError(repo_id, f"--revision {revision!r} is not a branch, tag or commit name")


def _hub(repo_id: str, revision: str | None, cache_dir: str | None) -> Source:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    if revision is not None:
        _check_revision(repo_id, revision)
    cache = str(cache_dir or constants.HF_HUB_CACHE)
    try:
        folder = snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True, allow_patterns=HUB_PATTERNS
        )
    except HFValidationError as e:
        raise LayerdiffError(repo_id, f"not a path and not a valid repo id ({first_line(e)})") from None
    except IncompleteSnapshotError as e:
        if constants.HF_HUB_OFFLINE:
            raise LayerdiffError(repo_id, f"the cached snapshot at {e.snapshot_path} is incomplete (files are missing), "
                                          "and HF_HUB_OFFLINE is set") from None
        folder = _download(repo_id, revision, cache_dir, cache)
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            what = f"revision {revision!r} is " if revision else ""
            raise LayerdiffError(repo_id, f"{what}not in the hub cache at {cache}"
                                          f"{_cached_refs(cache, repo_id)}, and HF_HUB_OFFLINE is set") from None
        folder = _download(repo_id, revision, cache_dir, cache)
    except OSError as e:
        raise LayerdiffError(repo_id, f"cannot read the hub cache at {cache}: {first_line(e)}") from None
    snapshot = Path(folder)
    return _local(repo_id, snapshot, repo_id=repo_id, revision=revision or "main", commit=snapshot.name)


def _download(repo_id: str, revision: str | None, cache_dir: str | None, cache: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=HUB_PATTERNS)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        where = f"{repo_id}@{revision}" if revision else repo_id
        raise LayerdiffError(where, f"not in the hub cache at {cache} and not downloadable: {first_line(e)}") from None


def _cached_refs(cache: str, repo_id: str) -> str:
    """' (cached revisions: main, v1)' when the repo is cached, but not at the revision asked for."""
    refs = Path(cache) / ("models--" + repo_id.replace("/", "--")) / "refs"
    try:
        names = sorted(p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file())
    except OSError:
        return ""
    return f" (cached revisions: {', '.join(names)})" if names else ""
