"""Reading the small JSON files layerdiff is given (config.json, index files, results).

Refused before opening: anything that is not a regular file (a FIFO would
hang, /dev/zero would grow without end); refused before parsing: more than
`limit` bytes. Too deep nesting is an error, not a RecursionError; so are
integers past Python's digit limit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import FormatError
from .files import first_line, open_regular, os_problem

# Real config.json and index files are a few hundred KB; results grow with the
# model (a 100,000-tensor index is ~10 MB), so the cap leaves room for those.
MAX_JSON_BYTES = 256 << 20


def read_bytes(path: Path, what: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """The whole content of a regular file of at most `limit` bytes."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise FormatError(path, f"{what} of {size} bytes is larger than the {limit} bytes allowed")
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise FormatError(path, os_problem(e, what)) from None
    finally:
        os.close(fd)
    if len(raw) > limit:  # it grew while being read
        raise FormatError(path, f"{what} is larger than the {limit} bytes allowed")
    return raw


def parse_json(path: Path, raw: bytes | str, what: str,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """JSON text (UTF-8 bytes, or str) -> Python values; every problem is one FormatError naming `path`."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw, object_pairs_hook=object_pairs_hook)
    except UnicodeDecodeError:
        raise FormatError(path, f"{what} is not UTF-8 text") from None
    except RecursionError:
        raise FormatError(path, f"{what} is JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and ints past Python's digit limit
        raise FormatError(path, f"{what} is not valid JSON: {first_line(e)}") from None


def read_json(path: Path, what: str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
              limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a regular JSON file of at most `limit` bytes; every problem is one FormatError."""
    return parse_json(path, read_bytes(path, what, limit), what, object_pairs_hook)
