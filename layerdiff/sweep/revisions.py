"""MODEL arguments of a sweep -> checkpoints: `org/name@REV`, and `--revisions REGEX` expanded.

A hub id with `--revisions REGEX` stands for every branch and tag of the repo
whose whole name matches REGEX: listed by the hub (`list_repo_refs`) when
online, read from the hub cache's `refs/` folder when HF_HUB_OFFLINE is set.
They come in natural order, by the numbers in their names (step1000 before
step20000). A MODEL that exists on disk is a local checkpoint, whatever it
holds; `@` in it is only a revision for a hub id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint.index import first_line
from ..checkpoint.sources import _REPO_ID
from ..errors import SelectionError, SourceError

_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a sweep: the MODEL as given (or expanded), and how to open it."""

    spec: str  # the table's `checkpoint`: the path, `org/name`, or `org/name@REV`
    model: str  # what open_model takes: the path or the repo id
    revision: str | None = None  # hub revision (None: a local path, or the repo's main)


def natural_key(name: str) -> tuple[object, ...]:
    """step1000 < step20000 < step100000: the digit runs compare as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(name))


def split_spec(spec: str) -> Checkpoint:
    """`org/name@REV` -> repo and revision; a path on disk (even with an @) stays a path."""
    if "@" in spec and not Path(spec).expanduser().exists():
        repo, _, rev = spec.rpartition("@")
        if not repo or not rev:
            raise SourceError(spec, "expected a path, a repo id, or org/name@REVISION")
        return Checkpoint(spec, repo, rev)
    return Checkpoint(spec, spec, None)


def expand(specs: list[str] | tuple[str, ...], revisions: str | None = None,
           cache_dir: str | None = None) -> list[Checkpoint]:
    """The checkpoints the MODEL arguments name, in the order given (revisions expanded in place)."""
    if not specs:
        raise SelectionError("sweep", "no MODEL given")
    pattern = None
    if revisions is not None:
        try:
            pattern = re.compile(revisions)
        except re.error as e:
            raise SelectionError("revisions", f"{revisions!r} is not a regular expression ({e})") from None
    out: list[Checkpoint] = []
    for spec in specs:
        ck = split_spec(spec)
        if pattern is None or ck.revision is not None or not _is_repo_id(spec):
            out.append(ck)
            continue
        names = [n for n in list_refs(ck.model, cache_dir) if pattern.fullmatch(n)]
        if not names:
            known = sorted(list_refs(ck.model, cache_dir), key=natural_key)
            shown = ", ".join(known[:12]) + (f" (and {len(known) - 12} more)" if len(known) > 12 else "")
            raise SelectionError("revisions", f"no branch or tag of {ck.model} matches {revisions!r} "
                                              f"(whole name); it has: {shown or 'none'}")
        out += [Checkpoint(f"{ck.model}@{n}", ck.model, n) for n in sorted(names, key=natural_key)]
    seen: set[str] = set()
    dupes = [c.spec for c in out if c.spec in seen or seen.add(c.spec)]  # type: ignore[func-returns-value]
    if dupes:
        raise SelectionError("sweep", f"{dupes[0]} is given twice")
    return out


def _is_repo_id(spec: str) -> bool:
    """What `sources.resolve` would look up in the hub: not a path on disk, not path-like."""
    return bool(_REPO_ID.match(spec)) and not spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists()


def list_refs(repo_id: str, cache_dir: str | None = None) -> list[str]:
    """Branch and tag names of a hub repo: from the hub, or from the cache when offline."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return cached_refs(repo_id, cache_dir)
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    try:
        refs = huggingface_hub.list_repo_refs(repo_id)
    except HFValidationError as e:
        raise SourceError(repo_id, f"not a valid repo id ({first_line(e)})") from None
    except Exception as e:  # network, authentication, a missing repo: all one line
        raise SourceError(repo_id, f"cannot list its branches and tags ({type(e).__name__}: {first_line(e)}); "
                                   "set HF_HUB_OFFLINE=1 to use the revisions in the hub cache") from None
    return [r.name for r in (*refs.branches, *refs.tags)]


def cached_refs(repo_id: str, cache_dir: str | None = None) -> list[str]:
    """The refs huggingface_hub recorded in the cache (refs/<name>, each holding a commit)."""
    from huggingface_hub import constants

    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    refs = cache / ("models--" + repo_id.replace("/", "--")) / "refs"
    if not refs.is_dir():
        raise SourceError(repo_id, f"not in the hub cache at {cache}, and HF_HUB_OFFLINE is set")
    try:
        return [p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()]
    except OSError as e:
        raise SourceError(refs, f"cannot read: {e.strerror or first_line(e)}") from None
