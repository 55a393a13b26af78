"""Safetensors headers -> a lazy index of every tensor, reading no tensor data.

All format rules live here: an 8-byte little-endian header length, a JSON
header, optional `__metadata__`, and `data_offsets` relative to the end of the
header. Everything a broken or hostile file can get wrong is checked before any
later stage trusts an offset.
"""

from __future__ import annotations

import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import LayerdiffError
from .files import Stamp, first_line, open_regular, os_problem  # noqa: F401 (first_line: re-exported)
from .jsonfile import parse_json, read_json

# Same ceiling as the safetensors reference implementation: a longer header is
# refused before anything is allocated for it.
MAX_HEADER_BYTES = 100_000_000
# Largest dimension or byte count a real tensor can have (the reference uses 64-bit sizes).
MAX_COUNT = 2**63 - 1


@dataclass(frozen=True)
class DType:
    """A safetensors dtype code: its item size and whether layerdiff analyses it."""

    name: str
    itemsize: int
    kind: str  # "float" (analysed), "int", "bool", "other" (valid, listed, never analysed)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("BOOL", 1, "bool"),
        DType("U8", 1, "int"),
        DType("I8", 1, "int"),
        DType("U16", 2, "int"),
        DType("I16", 2, "int"),
        DType("U32", 4, "int"),
        DType("I32", 4, "int"),
        DType("U64", 8, "int"),
        DType("I64", 8, "int"),
        DType("F8_E4M3", 1, "float"),
        DType("F8_E5M2", 1, "float"),
        DType("F16", 2, "float"),
        DType("BF16", 2, "float"),
        DType("F32", 4, "float"),
        DType("F64", 8, "float"),
        # Also written by safetensors >= 0.5; accepted so a checkpoint holding them still opens.
        DType("F8_E4M3FNUZ", 1, "other"),
        DType("F8_E5M2FNUZ", 1, "other"),
        DType("F8_E8M0", 1, "other"),
        DType("C64", 8, "other"),
    )
}


@dataclass(frozen=True, slots=True)  # slots: a header may hold 100,000s of them
class TensorInfo:
    """Where one tensor's bytes are: absolute offsets in its shard file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int
    stamp: Stamp | None = field(default=None, compare=False, repr=False)  # the shard when its header was read

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype].kind == "float"


@dataclass
class Shard:
    """One safetensors file: where its data starts, its metadata and tensors, its stamp."""

    path: Path
    size: int
    data_start: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    stamp: Stamp | None = None


class _Object(dict):
    """A JSON object that remembers its first repeated key (json keeps the last silently)."""

    duplicate: str | None = None


class _Entry(tuple):
    """A tensor entry whose keys and value types are right: (dtype, shape, begin, end).

    Made while the header is parsed, instead of a dict and two lists per
    tensor: a header of 100,000 tensors then needs a fraction of the memory."""

    __slots__ = ()


def _object(pairs: list[tuple[str, Any]]) -> _Object | _Entry:
    if len(pairs) == 3:
        entry = _entry(pairs)
        if entry is not None:
            return entry
    out = _Object()
    for key, value in pairs:
        if key in out and out.duplicate is None:
            out.duplicate = key
        out[key] = value
    return out


def _entry(pairs: list[tuple[str, Any]]) -> _Entry | None:
    """The entry these three pairs make, if well-formed; None leaves it to `_tensor`'s messages."""
    d = dict(pairs)
    try:
        dtype, shape, offsets = d["dtype"], d["shape"], d["data_offsets"]
    except KeyError:
        return None
    if type(dtype) is not str or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or begin < 0 or end < 0:
        return None
    for dim in shape:
        if type(dim) is not int or dim < 0:
            return None
    return _Entry((dtype, tuple(shape), begin, end))


def _short(x: Any, limit: int = 60) -> str:
    """repr() cut to one short line: messages quote hostile values, never megabytes of them."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_json(path: Path, raw: bytes | str, what: str) -> Any:
    return parse_json(path, raw, what, object_pairs_hook=_object)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """OS errors while reading `path` -> one-line LayerdiffErrors."""
    try:
        yield
    except OSError as e:
        raise LayerdiffError(path, os_problem(e, what)) from None


def read_header(path: Path) -> Shard:
    """Parse and validate one shard's header; touch no tensor bytes."""
    fd = open_regular(path, "safetensors file")
    with _reading(path, "safetensors file"):
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            size = st.st_size
            head = f.read(8)
            if len(head) < 8:
                raise LayerdiffError(path, f"file of {size} bytes is too small for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise LayerdiffError(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit (not a safetensors file?)")
            if 8 + n > size:
                raise LayerdiffError(path, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
            header = _read_header_json(path, f, n)
    if not isinstance(header, dict):
        raise LayerdiffError(path, f"header is not a JSON object (got {type(header).__name__})")
    if header.duplicate == "__metadata__":
        raise LayerdiffError(path, "__metadata__ given twice in the header")
    if header.duplicate is not None:
        raise LayerdiffError(path, f"duplicate tensor name {_short(header.duplicate)} in the header")
    data_start = 8 + n
    metadata = header.pop("__metadata__", None)
    if metadata is None:  # the reference implementation accepts null
        metadata = _Object()
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LayerdiffError(path, "__metadata__ must map strings to strings")
    if metadata.duplicate is not None:
        raise LayerdiffError(path, f"__metadata__ has the key {_short(metadata.duplicate)} twice")
    shard = Shard(path, size, data_start, dict(metadata), stamp=Stamp.of(st))
    for name in list(header):  # each entry freed as its TensorInfo is made
        shard.tensors[name] = _tensor(path, name, header.pop(name), data_start, size, shard.stamp)
    reach, owner = 0, ""
    for t in sorted(shard.tensors.values(), key=_span):
        start, end = t.start, t.start + t.nbytes
        if start < reach and end > start:
            raise LayerdiffError(
                path,
                f"tensors {_short(owner)} and {_short(t.name)} overlap "
                f"(data bytes {start - data_start}..{min(end, reach) - data_start} are claimed by both)",
            )
        if end > reach:
            reach, owner = end, t.name
    return shard


def _span(t: TensorInfo) -> tuple[int, int, str]:
    return t.start, t.start + t.nbytes, t.name


def _read_header_json(path: Path, f: Any, n: int) -> Any:
    """The header's n bytes from `f`, parsed; its bytes and text are dropped as
    soon as they are used (a 100 MB header must not be held three times)."""
    raw = f.read(n)
    if len(raw) != n:
        raise LayerdiffError(path, f"header length {n} runs past the end of the file (it shrank while being read)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LayerdiffError(path, "header is not UTF-8 text") from None
    del raw
    return _parse_json(path, text, "header")


def _nbytes(shape: list[int], itemsize: int) -> int | None:
    """Byte size of a tensor, or None if a dimension or the product of the non-zero ones passes 2**63-1.

    Stops at the first overflow, so a header of millions of dimensions costs linear time.
    """
    size = itemsize
    for d in shape:
        if d > MAX_COUNT:
            return None
        if d:
            size *= d
            if size > MAX_COUNT:
                return None
    return 0 if 0 in shape else size


def _tensor(path: Path, name: str, entry: Any, data_start: int, size: int, stamp: Stamp | None = None) -> TensorInfo:
    def where() -> str:  # only when it fails: quoting 100,000 names costs
        return f"tensor {_short(name)}"

    if type(entry) is _Entry:
        dtype, shape, begin, end = entry
    else:
        dtype, shape, begin, end = _checked(path, where(), entry)
    if dtype not in DTYPES:
        raise LayerdiffError(path, f"{where()}: unknown dtype {_short(dtype)}")
    expected = _nbytes(shape, DTYPES[dtype].itemsize)
    if expected is None:
        raise LayerdiffError(path, f"{where()}: shape {_short(list(shape))} is too large to exist")
    if begin > end:
        raise LayerdiffError(path, f"{where()}: data_offsets [{begin}, {end}] are in the wrong order (begin > end)")
    if end - begin != expected:
        raise LayerdiffError(
            path, f"{where()}: shape {_short(list(shape))} of {dtype} needs {expected} bytes but data_offsets span "
                  f"{end - begin}"
        )
    if data_start + end > size:
        raise LayerdiffError(
            path, f"{where()}: data_offsets [{begin}, {end}] run past the end of the file ({size - data_start} data bytes)"
        )
    return TensorInfo(name, path, dtype, shape, data_start + begin, end - begin, stamp)


def _checked(path: Path, where: str, entry: Any) -> tuple[str, tuple[int, ...], int, int]:
    """An entry `_entry` did not accept: the first thing wrong with it, as an error."""
    if not isinstance(entry, dict):
        raise LayerdiffError(path, f"{where}: entry is not a JSON object (got {_short(entry)})")
    if entry.duplicate is not None:
        raise LayerdiffError(path, f"{where}: key {_short(entry.duplicate)} given twice")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise LayerdiffError(path, f"{where}: no {key!r} key")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise LayerdiffError(path, f"{where}: unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise LayerdiffError(path, f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise LayerdiffError(path, f"{where}: data_offsets must be two non-negative integers, got {_short(offsets)}")
    return dtype, tuple(shape), offsets[0], offsets[1]


@dataclass
class TensorIndex:
    """Every tensor of a checkpoint, by name, plus the shards they live in."""

    tensors: dict[str, TensorInfo]
    shards: list[Shard]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def total_params(self) -> int:
        """Elements of the floating-point tensors: integer and bool buffers (position_ids, masks)
        are not parameters, and a count including them would overstate the model."""
        return sum(t.numel for t in self.tensors.values() if t.is_float)

    def not_params(self) -> dict[str, dict[str, int]]:
        """What total_params leaves out: per dtype, how many tensors and elements."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors.values():
            if not t.is_float:
                d = out.setdefault(t.dtype, {"tensors": 0, "elements": 0})
                d["tensors"] += 1
                d["elements"] += t.numel
        return dict(sorted(out.items()))

    def stamps(self) -> list[tuple[Path, Stamp | None]]:
        """Every shard and what it was when its header was read."""
        return [(s.path, s.stamp) for s in self.shards]


def load_index(files: list[Path], index_file: Path | None = None) -> TensorIndex:
    """Index a single file, or the shards named by a `*.safetensors.index.json`."""
    if index_file is not None:
        weight_map = read_weight_map(index_file)
        files = sorted({index_file.parent / s for s in weight_map.values()})
        for f in files:
            if not f.exists():
                raise LayerdiffError(index_file, f"weight_map names shard {f.name!r}, which is missing")
    shards = [read_header(f) for f in files]
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in shard.tensors.items():
            if name in tensors:
                raise LayerdiffError(shard.path, f"tensor {name!r} is also in {tensors[name].file.name}")
            tensors[name] = info
    if index_file is not None:
        for name, shard_name in weight_map.items():
            info = tensors.get(name)
            if info is None or info.file.name != Path(shard_name).name:
                raise LayerdiffError(index_file, f"weight_map puts {name!r} in {shard_name}, which lacks it")
    return TensorIndex(tensors, shards)


def read_weight_map(index_file: Path) -> dict[str, str]:
    doc = read_json(index_file, "index", object_pairs_hook=_object, limit=MAX_HEADER_BYTES)
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise LayerdiffError(index_file, "no weight_map mapping tensor names to shard files")
    if not wm:
        raise LayerdiffError(index_file, "weight_map is empty: it names no tensors")
    if wm.duplicate is not None:
        raise LayerdiffError(index_file, f"weight_map lists {_short(wm.duplicate)} twice")
    for shard_name in sorted(set(wm.values())):
        if Path(shard_name).name != shard_name or not shard_name.endswith(".safetensors"):
            raise LayerdiffError(
                index_file, f"weight_map names {_short(shard_name)}, not a .safetensors file beside the index"
            )
    return dict(wm)


def grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as a (rows, cols) matrix: leading axes flattened, 1-D as a column."""
    if len(shape) >= 2:
        cols = shape[-1]
        return (math.prod(shape) // cols if cols else 0, cols)
    return (math.prod(shape), 1)
