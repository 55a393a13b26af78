"""Files layerdiff writes: checked before the work starts, written whole or not at all.

An output path is followed through symlinks to the file that would really be
written (as a shell's `>` would), and that file is written by a temporary file
beside it, renamed onto it once complete. Refused before any work: a
directory that does not exist or cannot be written, a target that is not a
regular file (`/dev/stdout`, a FIFO), any file of the model (its shards, index
and config.json, through whatever symlink or hard link), the checkpoint
directory and the hub cache, and two outputs that are one file. Inside
`together()`, the outputs of a run appear at once when it ends, or none does.
"""

from __future__ import annotations

import json
import os
import stat
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

from .checkpoint.files import first_line, kind
from .checkpoint.sources import Source
from .errors import OutputError

# huggingface_hub's repo folders in a cache: models--org--name, ...
_HUB_REPO = ("models--", "datasets--", "spaces--")
# Renames waiting for the end of a `together()` block: (temporary, target, as given).
_STAGED: ContextVar[list[tuple[Path, Path, Path]] | None] = ContextVar("layerdiff_staged", default=None)


def target(path: Path) -> Path:
    """The file writing `path` changes: absolute, every symlink followed."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _protected(source: Source, files: Iterable[Path]) -> tuple[list[Path], set[tuple[int, int]]]:
    """Directories no output may go into, and the (device, inode) of every file of the model."""
    named = [*source.files, *files, source.root / "config.json"]
    if source.index_file is not None:
        named.append(source.index_file)
    dirs = [target(source.root)]
    # A hub cache's repo folder (snapshots/<commit>/ links, blobs/), however MODEL named it.
    for p in (dirs[0], *(target(f).parent for f in named)):
        up = p.parent if p.parent.name == "snapshots" else p if p.name == "blobs" else None
        if up is not None and up.parent.name.startswith(_HUB_REPO):
            dirs.append(up.parent)
    inodes = {(st.st_dev, st.st_ino) for st in map(_stat, named) if st is not None}  # through symlinks
    return dirs, inodes


def check_writable(path: Path, source: Source | None = None) -> None:
    """Fail before a long scan, not after it, on an output that cannot or must not be written."""
    check_outputs([path], source)


def check_outputs(paths: Iterable[Path | None], source: Source | None = None, files: Iterable[Path] = (),
                  inputs: Iterable[Path] = ()) -> None:
    """Fail before a long scan, not after it: every output of a run writable,
    none onto the model (`source`, and its shards `files`) or another input
    of the run, no two the same file."""
    dirs, inodes = _protected(source, files) if source is not None else ([], set())
    read = {(st.st_dev, st.st_ino) for st in map(_stat, inputs) if st is not None}
    seen: dict[Path, Path] = {}
    for path in paths:
        if path is None:
            continue
        real = target(path)
        if real in seen:
            raise OutputError(path, f"is the same file as the other output {seen[real]}")
        seen[real] = Path(path)
        try:
            st = os.stat(path)  # through every symlink, as /dev/stdout -> /proc/self/fd/1 -> a pipe
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise OutputError(path, f"cannot be written: {e.strerror or first_line(e)}") from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(path, f"{kind(st.st_mode)}: outputs are written to regular files only "
                                    "(whole, by a temporary file renamed onto them)")
        parent = real.parent
        if not parent.is_dir():
            raise OutputError(path, "output directory does not exist")
        if not os.access(parent, os.W_OK):
            raise OutputError(path, "output directory is not writable")
        if st is not None:
            if (st.st_dev, st.st_ino) in inodes:
                raise OutputError(path, "is a file of the checkpoint: refusing to overwrite it")
            if (st.st_dev, st.st_ino) in read:
                raise OutputError(path, "is the input of this run: refusing to overwrite it")
            for other, given in seen.items():
                if other != real and _same(other, st):
                    raise OutputError(path, f"is the same file as the other output {given}")
        for p in dirs:
            if parent == p or p in parent.parents:
                raise OutputError(path, "refusing to write into the checkpoint directory or the hub cache")


def _stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _same(path: Path, st: os.stat_result) -> bool:
    other = _stat(path)
    return other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def _temporary(real: Path) -> tuple[int, Path]:
    """A new file beside `real`, with the mode `real` has (or the umask gives a new file)."""
    short = os.fsdecode(os.fsencode(real.name)[:100])  # the name stays legal whatever the target's length
    tmp = real.with_name(f".{short}.{os.urandom(4).hex()}.tmp")  # (secrets would import OpenSSL: 4 MiB)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        os.fchmod(fd, stat.S_IMODE(os.stat(real).st_mode))
    except FileNotFoundError:
        pass
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def _problem(e: OSError) -> str:
    return f"cannot write: {e.strerror or first_line(e)}"


@contextmanager
def atomic(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """A temporary file beside `path`'s target, renamed onto it once written
    completely (inside `together()`: once every output of the block is)."""
    real = target(path)
    try:
        fd, tmp = _temporary(real)
    except OSError as e:
        raise OutputError(path, _problem(e)) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        staged = _STAGED.get()
        if staged is None:
            os.replace(tmp, real)
        else:
            staged.append((tmp, real, Path(path)))
    except OSError as e:
        _remove(tmp)
        raise OutputError(path, _problem(e)) from None
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def together() -> Iterator[None]:
    """Every file `atomic` writes in this block appears when the block ends,
    all at once; if any fails (a full disk, Ctrl-C), none of them does."""
    staged: list[tuple[Path, Path, Path]] = []
    token = _STAGED.set(staged)
    try:
        try:
            yield
        finally:
            _STAGED.reset(token)
        renamed: list[Path] = []
        for tmp, real, given in staged:
            try:
                os.replace(tmp, real)
            except OSError as e:
                for done in renamed:  # the outputs of a run appear together or not at all
                    _remove(done)
                raise OutputError(given, _problem(e)) from None
            renamed.append(real)
    except BaseException:
        for tmp, _, _ in staged:
            _remove(tmp)
        raise


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json(path: Path, doc: dict[str, Any]) -> None:
    with atomic(path) as f:
        json.dump(doc, f, indent=2)
