"""The sweep's tidy table: one row per value, as CSV or Parquet (pyarrow, `layerdiff[parquet]`)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path
from typing import Any, Iterable

from ..errors import OutputError
from ..output import atomic, check_writable

COLUMNS = ("checkpoint", "revision", "commit", "stack", "family", "L", "L_next", "metric", "value")
FORMATS = (".csv", ".parquet")
NO_PYARROW = "writing .parquet needs pyarrow: pip install 'layerdiff[parquet]'"


def check_table_path(path: Path) -> str:
    """The format from the suffix, pyarrow there for Parquet, the folder writable: before any work."""
    fmt = Path(path).suffix.lower()
    if fmt not in FORMATS:
        raise OutputError(path, "the table format comes from the file name: use a .csv or .parquet suffix")
    if fmt == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise OutputError(path, NO_PYARROW)
    check_writable(path)
    return fmt


def write_table(rows: Iterable[tuple[Any, ...]], path: Path) -> int:
    """Write rows (COLUMNS) to path, whole or not at all; returns how many."""
    fmt = check_table_path(path)
    if fmt == ".csv":
        n = 0
        with atomic(path, "w") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow(["" if v is None else v for v in r])  # floats as repr: they read back exactly
                n += 1
        return n
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: list[list[Any]] = [[] for _ in COLUMNS]
    for r in rows:
        for c, v in zip(cols, r):
            c.append(v)
    types = (pa.string(), pa.string(), pa.string(), pa.string(), pa.string(), pa.int64(), pa.int64(), pa.string(),
             pa.float64())
    table = pa.table({name: pa.array(c, type=t) for name, c, t in zip(COLUMNS, cols, types)})
    with atomic(path, "wb") as f:
        pq.write_table(table, f)
    return table.num_rows


def read_table(path: Path) -> list[tuple[Any, ...]]:
    """A written table back as typed rows (for tests and comparisons)."""
    if Path(path).suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        t = pq.read_table(path).to_pydict()
        return list(zip(*(t[c] for c in COLUMNS)))
    out = []
    with open(path, newline="") as f:
        r = csv.reader(f)
        if tuple(next(r)) != COLUMNS:
            raise OutputError(path, "not a layerdiff sweep table")
        for ck, rev, commit, stack, fam, L, L_next, metric, value in r:
            out.append((ck, rev or None, commit or None, stack, fam, int(L), int(L_next) if L_next else None, metric,
                        float(value)))
    return out
