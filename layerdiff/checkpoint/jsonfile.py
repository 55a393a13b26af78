"""Reading the small JSON files layerdiff is given (config.json, index files, results).

Refused before opening: anything that is not a regular file (a FIFO would
hang, /dev/zero would grow without end); refused before parsing: more than
MAX_JSON_BYTES. Too deep nesting is an error, not a RecursionError.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import FormatError
from .index import first_line

MAX_JSON_BYTES = 256 << 20


def open_regular(path: Path, what: str) -> int:
    """An fd for reading `path`, refused unless it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise FormatError(path, f"cannot read the {what}: {e.strerror or first_line(e)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FormatError(path, f"the {what} is not a regular file")
    return fd


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file of at most MAX_JSON_BYTES; every problem is one FormatError."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_JSON_BYTES:
            raise FormatError(path, f"the {what} is {size} bytes, more than the {MAX_JSON_BYTES} a JSON file may have")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise FormatError(path, f"cannot read the {what}: {e.strerror or first_line(e)}") from None
    finally:
        os.close(fd)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FormatError(path, f"the {what} is not UTF-8 text ({first_line(e)})") from None
    except RecursionError:
        raise FormatError(path, f"the {what} is nested too deeply") from None
    except ValueError as e:
        raise FormatError(path, f"not a {what} (invalid JSON: {first_line(e)})") from None
