"""Opening the files a MODEL names, safely: regular files only, and noticing when one changes.

Anything that is not a regular file is refused before a byte is read from it:
a FIFO would block the first read forever, a character device (`/dev/zero`)
never ends. A file's `Stamp` (device, inode, size, modification time) is taken
when its header is read; a shard whose stamp differs later (truncated,
rewritten or replaced while a scan reads it) is an error naming it, never
bytes silently read from another file.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import FormatError


def first_line(e: BaseException) -> str:
    """An exception's message, cut to one line for an error message."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def a(what: str) -> str:
    """'an index', 'a safetensors file'."""
    return f"{'an' if what[:1] in 'aeiou' else 'a'} {what}"


def os_problem(e: OSError, what: str) -> str:
    """An OSError met while reading `what`, as the problem part of a one-line error."""
    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, IsADirectoryError):
        return f"is a directory, not {a(what)}"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot read: {e.strerror or first_line(e)}"


def open_regular(path: Path, what: str) -> int:
    """A read-only fd for `path`, refused unless it is a regular file.

    Checked before it is opened (opening some devices does something: a tape
    rewinds), then opened non-blocking (a FIFO's open would block until a
    writer comes) and checked again with fstat on the fd itself, so no rename
    between the check and the open can slip another file in; the flag is
    cleared again for the reads."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(path, f"{kind(st.st_mode)}, not {a(what)}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FormatError(path, os_problem(e, what)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(path, f"{kind(st.st_mode)}, not {a(what)}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def kind(mode: int) -> str:
    """'is a FIFO (named pipe)': what a file that is not a regular file is."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {name}"
    return "is not a regular file"


@dataclass(frozen=True)
class Stamp:
    """What a file was when its header was read."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def change(self, st: os.stat_result) -> str | None:
        """How the file `st` describes differs from this stamp, or None."""
        if (st.st_dev, st.st_ino) != (self.dev, self.ino):
            return "it was replaced by another file"
        if st.st_size != self.size:
            verb = "shrank" if st.st_size < self.size else "grew"
            return f"it {verb} from {self.size} to {st.st_size} bytes"
        if st.st_mtime_ns != self.mtime_ns:
            return "it was modified"
        return None


def changed(path: Path, stamp: Stamp, st: os.stat_result | None = None) -> FormatError | None:
    """The error to raise if `path` (or the open file `st` describes) no longer matches `stamp`."""
    if st is None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return FormatError(path, "the file changed during the scan: it was removed")
        except OSError as e:
            return FormatError(path, f"the file changed during the scan: {os_problem(e, 'safetensors file')}")
    what = stamp.change(st)
    return None if what is None else FormatError(path, f"the file changed during the scan: {what}")


def check_unchanged(stamped: Iterable[tuple[Path, Stamp | None]]) -> None:
    """Raise a FormatError naming the first file that no longer matches its stamp."""
    for path, stamp in stamped:
        if stamp is not None:
            err = changed(path, stamp)
            if err is not None:
                raise err


@contextmanager
def watching(stamped: list[tuple[Path, Stamp | None]]) -> Iterator[None]:
    """A pass reading these files: if one of them changed meanwhile, that is
    the error, whether the pass failed (a worker died, a short read) or not."""
    try:
        yield
    except Exception:
        check_unchanged(stamped)
        raise
    check_unchanged(stamped)
