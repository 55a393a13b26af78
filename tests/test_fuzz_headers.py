"""Thousands of broken headers at `read_header`: it returns a sound Shard or raises LayerdiffError, nothing else.

(a) mutates the bytes of real files written by safetensors (flips, digit and dtype swaps, insertions,
deletions, truncation, forged header lengths); (b) generates JSON headers from strategies, from valid to
junk, and also checks them against the reference parser: whatever safetensors itself accepts, layerdiff
accepts with the same tensors. Deterministic (derandomize) so CI sees the same examples every run.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from layerdiff.errors import LayerdiffError
from layerdiff.checkpoint.index import DTYPES, MAX_HEADER_BYTES, read_header

FUZZ = settings(max_examples=1500, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def workdir():
    # tmpfs when there is one: rewriting a file thousands of times on ext4 can cost milliseconds each.
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="layerdiff-fuzz-", dir=shm if os.access(shm, os.W_OK) else None) as d:
        yield Path(d)


_serial = itertools.count()


KINDS = ["too small", "exceeds the", "runs past the end", "UTF-8", "not valid JSON", "nested too deeply",
         "not a JSON object", "duplicate tensor name", "__metadata__", "entry is not", "given twice", "key",
         "unknown dtype", "shape must", "too large", "data_offsets must", "wrong order", "needs", "run past the end",
         "overlap"]


def check_sound(path: Path, content: bytes):
    """read_header's contract: a Shard whose tensors are in the file and disjoint, or a one-line LayerdiffError."""
    path.write_bytes(content)  # a fresh name each time (see the callers): no truncation of an old file
    try:
        shard = read_header(path)
    except LayerdiffError as e:
        assert e.where == str(path)
        assert "\n" not in str(e) and len(e.problem) < 400
        event("rejected: " + next((k for k in KINDS if k in e.problem), "other"))
        return None
    event("accepted")
    (n,) = struct.unpack("<Q", content[:8])
    assert shard.size == len(content) and shard.data_start == 8 + n <= len(content)
    assert isinstance(shard.metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in shard.metadata.items())
    spans = []
    for name, t in shard.tensors.items():
        assert t.name == name and t.file == path and t.dtype in DTYPES
        assert all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in t.shape)
        assert t.nbytes == math.prod(t.shape) * DTYPES[t.dtype].itemsize
        assert shard.data_start <= t.start and t.start + t.nbytes <= len(content)
        if t.nbytes:
            spans.append((t.start, t.start + t.nbytes))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    return shard


# --- (a) mutations of real files ----------------------------------------------------------------------

def _real_files() -> list[bytes]:
    rng = np.random.default_rng(7)
    return [
        save({"model.layers.0.w": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
              "model.layers.1.w": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
              "norm": np.ones(4, np.float32), "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
              "mask": np.array([True, False, True]), "empty": np.zeros((0, 3), np.float16)},
             metadata={"format": "pt"}),
        save({"a": rng.standard_normal(5).astype(ml_dtypes.float8_e4m3fn), "b": np.zeros((2, 2), np.uint8),
              "c": rng.standard_normal((2, 1)).astype(np.float64), "d": np.array(3, np.int16)}),
        save({"only": rng.standard_normal((2, 3)).astype(np.float32)}, metadata={"k": "v", "x": ""}),
    ]


REAL = _real_files()
TOKENS = [b'"', b",", b":", b"{", b"}", b"[", b"]", b"-", b"-1", b"0", b"1e999", b"null", b"true", b"1.5",
          b'"F32"', b'"BOOL"', b'"F7"', b"99999999999999999999", b" ", b"\\u0000", b"\xff", b"\x00"]
DTYPE_WORDS = sorted(DTYPES) + ["F7", "f32", "", "I4", "F4"]


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _set_len(data: bytearray, n: int) -> None:
    data[:8] = struct.pack("<Q", n)


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(REAL)))
    for op in draw(st.lists(st.sampled_from(["digit", "digit", "dtype", "flip", "insert", "delete", "length",
                                             "truncate"]), min_size=1, max_size=3)):
        n, before = (_header_len(data) if len(data) >= 8 else 0), len(data)
        header_end = min(8 + n, len(data))
        fix = draw(st.booleans())  # keep the header length right, so the JSON itself gets parsed
        if op == "digit":
            digits = [i for i in range(8, header_end) if 48 <= data[i] <= 57]
            if digits:
                i = draw(st.sampled_from(digits))
                data[i:i + 1] = draw(st.sampled_from([b"0", b"1", b"2", b"7", b"9", b"", b"99", b"-", b"00"]))
        elif op == "dtype":
            spots = [m.span(1) for m in re.finditer(rb'"dtype":\s*"([A-Z0-9_]*)"', bytes(data[8:header_end]))]
            if spots:
                a, b = draw(st.sampled_from(spots))
                data[8 + a:8 + b] = draw(st.sampled_from(DTYPE_WORDS)).encode()
        elif op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1) if draw(st.booleans()) else st.integers(0, max(0, header_end - 1)))
            data[i] = draw(st.integers(0, 255))
            fix = False
        elif op == "insert":
            i = draw(st.integers(min(8, len(data)), header_end))
            data[i:i] = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=6))
        elif op == "delete" and header_end > 8:
            i = draw(st.integers(8, header_end - 1))
            del data[i:i + draw(st.integers(1, 4))]
        elif op == "length":
            _set_len(data, draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 16), min(n + 16, 2**64 - 1))
                                | st.sampled_from([0, 1, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1])))
            fix = False
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))):]
            fix = False
        if fix and len(data) >= 8 and op in ("digit", "dtype", "insert", "delete"):
            _set_len(data, min(2**64 - 1, max(0, n + len(data) - before)))  # the edit was inside the header
    return bytes(data)


@FUZZ
@given(content=mutated_files())
def test_mutated_real_files(workdir, content):
    path = workdir / f"mutated-{next(_serial)}.safetensors"
    try:
        check_sound(path, content)
    finally:
        path.unlink()


# --- (b) generated JSON headers ---------------------------------------------------------------------

JUNK = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats(allow_nan=False) | st.text(max_size=4),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
                    max_leaves=6)
DTYPE = st.sampled_from(sorted(DTYPES)) | st.sampled_from(["F7", "f32", "", "F4", "float32"]) | JUNK
NAMES = st.text(max_size=10).filter(lambda s: s != "__metadata__")
FAULTS = ["none"] * 8 + ["shape", "offsets", "span", "overlap", "order", "missing", "junk", "dtype", "gap", "extra"]


@st.composite
def generated_files(draw) -> bytes:
    header: dict = {}
    place_meta = draw(st.sampled_from(["absent", "first", "last"]))
    meta = draw(st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3) | JUNK)
    if place_meta == "first":
        header["__metadata__"] = meta
    cursor, prev_begin = 0, 0
    for name in draw(st.lists(NAMES, max_size=6, unique=True)):
        fault = draw(st.sampled_from(FAULTS))
        dtype = draw(st.sampled_from(sorted(DTYPES))) if fault != "dtype" else draw(DTYPE)
        itemsize = DTYPES[dtype].itemsize if isinstance(dtype, str) and dtype in DTYPES else 1
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        begin = cursor + (draw(st.integers(1, 9)) if fault == "gap" else 0)
        end = begin + math.prod(shape) * itemsize
        if fault == "shape":
            shape = draw(st.lists(st.integers(-2, 2**64) | st.booleans() | st.floats(0, 3) | st.just("2"), min_size=1, max_size=3)
                         | JUNK)
        elif fault == "offsets":
            begin, end = draw(st.integers(-4, 2**65)), draw(st.integers(-4, 2**65))
        elif fault == "span":
            end += draw(st.sampled_from([-3, -2, -1, 1, 2, 3]))
        elif fault == "overlap":
            begin, end = prev_begin, prev_begin + (end - begin)
        elif fault == "order":
            begin, end = end, begin
        entry: object = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if fault == "missing":
            del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
        elif fault == "junk":
            entry = draw(JUNK)
        elif fault == "extra":
            entry["data_offsets"] = draw(st.lists(st.integers(0, 64), max_size=4))
            entry["note"] = draw(JUNK)
        header[name] = entry
        if fault != "offsets" and 0 <= begin <= end:
            prev_begin, cursor = begin, max(cursor, end)
    if place_meta == "last":
        header["__metadata__"] = meta
    if draw(st.integers(0, 19)) == 0:
        header = draw(JUNK)  # not even an object, now and then
    text = json.dumps(header, ensure_ascii=draw(st.booleans())).encode() + b" " * draw(st.integers(0, 7))
    data_len = max(0, cursor + draw(st.sampled_from([0, 0, 0, 0, -1, 1, -8, 5])))
    n = len(text) if draw(st.integers(0, 9)) else draw(st.integers(0, len(text) + 8))
    return struct.pack("<Q", n) + text + bytes(range(256)) * (data_len // 256) + bytes(data_len % 256)


def reference(path: Path) -> dict | None:
    """What safetensors itself makes of the file: {name: (dtype, shape)} and metadata, or None if it refuses."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
            return {"tensors": tensors, "metadata": f.metadata() or {}}
    except (SafetensorError, OSError, ValueError, TypeError):
        return None


@FUZZ
@given(content=generated_files())
def test_generated_headers(workdir, content):
    path = workdir / f"generated-{next(_serial)}.safetensors"
    try:
        shard = check_sound(path, content)
        ref = reference(path)
    finally:
        path.unlink()
    if ref is not None and all(dt in DTYPES for dt, _ in ref["tensors"].values()):
        event("reference accepts")
        # Whatever the reference implementation accepts, layerdiff accepts and reads the same way.
        assert shard is not None, f"safetensors accepts a header layerdiff refuses: {content[:300]!r}"
        assert {k: (t.dtype, t.shape) for k, t in shard.tensors.items()} == ref["tensors"]
        assert shard.metadata == ref["metadata"]
