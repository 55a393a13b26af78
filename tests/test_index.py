"""Header parsing: real files from safetensors' own writer, then a corpus of broken ones through the CLI."""

from __future__ import annotations

import json
import struct
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np
import pytest
from conftest import qwen3_like, run_cli, write_checkpoint
from safetensors.numpy import save_file

from layerdiff.errors import LayerdiffError
from layerdiff.checkpoint.index import DTYPES, MAX_HEADER_BYTES, load_index, read_header

# safetensors dtype code -> numpy dtype, for every dtype the issue requires (and the unsigned ones).
NUMPY = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8), "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16), "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32), "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
FLOATS = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def file_header(path: Path) -> tuple[int, dict, bytes]:
    """Parse a file's header independently of layerdiff: (header length, header, whole file)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data


def check_against_file(shard_path: Path, infos: dict, arrays: dict[str, np.ndarray]) -> None:
    n, header, data = file_header(shard_path)
    for name, arr in arrays.items():
        info = infos[name]
        begin, end = header[name]["data_offsets"]
        assert info.name == name
        assert info.file == shard_path
        assert info.dtype == header[name]["dtype"]
        assert info.shape == arr.shape
        assert info.numel == arr.size
        assert info.nbytes == arr.nbytes == end - begin
        assert info.start == 8 + n + begin
        # The offsets point at exactly the bytes the writer stored for this array.
        assert data[info.start:info.start + info.nbytes] == np.ascontiguousarray(arr).tobytes()  # little-endian host


def test_every_dtype_zero_size_and_metadata(tmp_path, rng):
    arrays: dict[str, np.ndarray] = {}
    for code, dt in NUMPY.items():
        arrays[f"t.{code.lower()}"] = random_array(rng, dt, (3, 5))
        arrays[f"v.{code.lower()}"] = random_array(rng, dt, (7,))
    arrays["empty.rows"] = np.zeros((0, 4), np.float32)
    arrays["empty.middle"] = np.zeros((2, 0, 3), ml_dtypes.bfloat16)
    arrays["scalar"] = np.array(1.5, np.float64)
    path = tmp_path / "model.safetensors"
    save_file(arrays, str(path), metadata={"format": "pt", "note": "écrit par safetensors"})

    shard = read_header(path)
    n, header, data = file_header(path)
    assert shard.path == path and shard.size == len(data) and shard.data_start == 8 + n
    assert shard.metadata == {"format": "pt", "note": "écrit par safetensors"}
    assert set(shard.tensors) == set(arrays)
    check_against_file(path, shard.tensors, arrays)
    for code in NUMPY:
        info = shard.tensors[f"t.{code.lower()}"]
        assert info.dtype == code
        assert DTYPES[code].itemsize == NUMPY[code].itemsize
        assert info.is_float == (code in FLOATS)
    assert shard.tensors["empty.rows"].nbytes == 0 and shard.tensors["empty.middle"].shape == (2, 0, 3)
    assert shard.tensors["scalar"].shape == () and shard.tensors["scalar"].numel == 1

    index = load_index([path])
    assert index.total_bytes == sum(a.nbytes for a in arrays.values())
    floats = {k: a for k, a in arrays.items() if k.split(".")[-1].upper() in FLOATS or a.dtype == np.float64}
    assert index.total_params == sum(a.size for a in floats.values())  # integer and bool buffers are not parameters
    assert index.not_params() == {code: {"tensors": 2, "elements": 22} for code in sorted(set(NUMPY) - FLOATS)}


def test_other_dtypes_safetensors_writes_are_accepted_but_not_analysed(tmp_path, rng):
    arrays = {
        "scales": np.ones((4, 2), ml_dtypes.float8_e8m0fnu),
        "fnuz": rng.standard_normal((2, 3)).astype(ml_dtypes.float8_e4m3fnuz),
        "fnuz2": rng.standard_normal((2, 3)).astype(ml_dtypes.float8_e5m2fnuz),
        "complex": (rng.standard_normal(3) + 1j).astype(np.complex64),
    }
    path = tmp_path / "model.safetensors"
    save_file(arrays, str(path))
    shard = read_header(path)
    check_against_file(path, shard.tensors, arrays)
    assert {t.dtype for t in shard.tensors.values()} == {"F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}
    assert not any(t.is_float for t in shard.tensors.values())


def test_sharded_checkpoint(tmp_path, rng):
    arrays = qwen3_like(rng, layers=3)
    folder = write_checkpoint(tmp_path / "ckpt", arrays, shards=3)
    index = load_index([], folder / "model.safetensors.index.json")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.tensors) == set(arrays)
    assert sorted(s.path.name for s in index.shards) == sorted(set(weight_map.values()))
    for shard in index.shards:
        assert shard.size == shard.path.stat().st_size
        mine = {name: arrays[name] for name, f in weight_map.items() if f == shard.path.name}
        assert set(shard.tensors) == set(mine)
        check_against_file(shard.path, index.tensors, mine)
    assert index.total_bytes == sum(a.nbytes for a in arrays.values())


def test_null_metadata_and_header_padding_are_accepted(tmp_path):
    body = json.dumps({"__metadata__": None, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    header = (body + " " * 13).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.array([1, 2], "<f4").tobytes())
    shard = read_header(path)
    assert shard.metadata == {} and shard.tensors["w"].start == 8 + len(header)


@pytest.mark.parametrize("n", [MAX_HEADER_BYTES + 1, 2**40, 2**63, 2**64 - 1])
def test_absurd_header_length_allocates_nothing(tmp_path, n):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", n) + b"{}")
    tracemalloc.start()
    try:
        with pytest.raises(LayerdiffError, match="exceeds the 100000000-byte limit"):
            read_header(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ---------------------------------------------------------------------------------------------------
# The bad-input corpus. Each builder fills a checkpoint directory and returns the file the error must
# name; the table gives the text the one-line error must contain.

F32x2 = np.array([1.0, 2.0], "<f4").tobytes()  # 8 data bytes


def st(header: dict | str | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte little-endian length, header bytes, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


def single(content: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        (folder / "model.safetensors").write_bytes(content)
        return folder / "model.safetensors"
    return build


def good_shard(*names: str) -> bytes:
    return st({n: entry(offsets=(8 * i, 8 * i + 8)) for i, n in enumerate(names)}, F32x2 * len(names))


S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def sharded(weight_map: dict | str | bytes, shards: dict[str, bytes], named: str = "index") -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        doc = weight_map if isinstance(weight_map, (str, bytes)) else json.dumps(weight_map)
        index = folder / "model.safetensors.index.json"
        index.write_bytes(doc.encode() if isinstance(doc, str) else doc)
        for name, content in shards.items():
            (folder / name).write_bytes(content)
        return index if named == "index" else folder / named
    return build


WM = {"metadata": {"total_size": 16}, "weight_map": {"a": S1, "b": S2}}

CORPUS = [
    # id,                       builder,                                                        problem text
    ("empty-file",              single(b""),                                                    "file of 0 bytes is too small for a safetensors header"),
    ("shorter-than-8-bytes",    single(b"\x10\x00\x00"),                                        "file of 3 bytes is too small for a safetensors header"),
    ("header-past-eof",         single(st("{}", n=1000)),                                       "header length 1000 runs past the end of the 10-byte file"),
    ("header-length-2**63",     single(st("{}", n=2**63)),                                      "header length 9223372036854775808 exceeds the 100000000-byte limit"),
    ("header-length-max-u64",   single(b"\xff" * 8 + b"{}"),                                    "header length 18446744073709551615 exceeds the 100000000-byte limit"),
    ("header-not-utf8",         single(st(b'{"\xff\xfe": 1}')),                                 "header is not UTF-8 text"),
    ("invalid-json",            single(st('{"w": {"dtype": "F32",')),                           "header is not valid JSON"),
    ("empty-header",            single(st(b"")),                                                "header is not valid JSON"),
    ("json-not-object",         single(st("[1, 2, 3]")),                                        "header is not a JSON object (got list)"),
    ("json-nested-too-deep",    single(st("[" * 100_000)),                                      "header is JSON nested too deeply"),
    ("duplicate-tensor-name",   single(st('{"w": %s, "w": %s}' % (json.dumps(entry()), json.dumps(entry())), F32x2)),
                                                                                                "duplicate tensor name 'w' in the header"),
    ("entry-not-object",        single(st({"w": [0, 8]}, F32x2)),                               "tensor 'w': entry is not a JSON object"),
    ("entry-duplicate-key",     single(st('{"w": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}', F32x2)),
                                                                                                "tensor 'w': key 'dtype' given twice"),
    ("entry-missing-dtype",     single(st({"w": {"shape": [2], "data_offsets": [0, 8]}}, F32x2)), "tensor 'w': no 'dtype' key"),
    ("entry-missing-offsets",   single(st({"w": {"dtype": "F32", "shape": [2]}}, F32x2)),       "tensor 'w': no 'data_offsets' key"),
    ("unknown-dtype",           single(st({"w": entry(dtype="F7")}, F32x2)),                    "tensor 'w': unknown dtype 'F7'"),
    ("lowercase-dtype",         single(st({"w": entry(dtype="f32")}, F32x2)),                   "tensor 'w': unknown dtype 'f32'"),
    ("dtype-not-a-string",      single(st({"w": entry(dtype=["F32"])}, F32x2)),                 "tensor 'w': unknown dtype ['F32']"),
    ("shape-not-a-list",        single(st({"w": entry(shape=2)}, F32x2)),                       "tensor 'w': shape must be a list of non-negative integers, got 2"),
    ("shape-negative-dim",      single(st({"w": entry(shape=[-2, -1])}, F32x2)),                "tensor 'w': shape must be a list of non-negative integers, got [-2, -1]"),
    ("shape-bool-dim",          single(st({"w": entry(shape=[True, 2])}, F32x2)),               "tensor 'w': shape must be a list of non-negative integers, got [True, 2]"),
    ("shape-float-dim",         single(st({"w": entry(shape=[2.0])}, F32x2)),                   "tensor 'w': shape must be a list of non-negative integers, got [2.0]"),
    ("shape-too-large",         single(st({"w": entry(shape=[2**40, 2**40, 0], offsets=(0, 0))})), "tensor 'w': shape [1099511627776, 1099511627776, 0] is too large to exist"),
    ("offsets-wrong-length",    single(st({"w": entry(offsets=[0, 4, 8])}, F32x2)),             "tensor 'w': data_offsets must be two non-negative integers, got [0, 4, 8]"),
    ("offsets-negative",        single(st({"w": entry(offsets=[-8, 0])}, F32x2)),               "tensor 'w': data_offsets must be two non-negative integers, got [-8, 0]"),
    ("offsets-not-a-list",      single(st({"w": entry(offsets="0-8")}, F32x2)),                 "tensor 'w': data_offsets must be two non-negative integers, got '0-8'"),
    ("offsets-begin-after-end", single(st({"w": entry(offsets=(8, 0))}, F32x2)),                "tensor 'w': data_offsets [8, 0] are in the wrong order"),
    ("span-not-shape-x-size",   single(st({"w": entry(shape=[2, 2])}, F32x2)),                  "tensor 'w': shape [2, 2] of F32 needs 16 bytes but data_offsets span 8"),
    ("span-wrong-for-dtype",    single(st({"w": entry(dtype="BF16")}, F32x2)),                  "tensor 'w': shape [2] of BF16 needs 4 bytes but data_offsets span 8"),
    ("offsets-past-eof",        single(st({"w": entry(offsets=(8, 16))}, F32x2)),               "tensor 'w': data_offsets [8, 16] run past the end of the file (8 data bytes)"),
    ("truncated-data",          single(st({"a": entry(), "b": entry(offsets=(8, 16))}, F32x2 + b"\0\0")),
                                                                                                "tensor 'b': data_offsets [8, 16] run past the end of the file (10 data bytes)"),
    ("overlapping-tensors",     single(st({"a": entry(shape=[4], offsets=(0, 16)), "b": entry(offsets=(8, 16))}, F32x2 * 2)),
                                                                                                "tensors 'a' and 'b' overlap (data bytes 8..16 are claimed by both)"),
    ("tensor-inside-another",   single(st({"a": entry(shape=[4], offsets=(0, 16)), "b": entry(shape=[1], offsets=(4, 8))}, F32x2 * 2)),
                                                                                                "tensors 'a' and 'b' overlap (data bytes 4..8 are claimed by both)"),
    ("same-offsets-twice",      single(st({"a": entry(), "b": entry()}, F32x2)),                "tensors 'a' and 'b' overlap"),
    ("metadata-twice",          single(st('{"__metadata__": {}, "__metadata__": {}}')),         "__metadata__ given twice in the header"),
    ("metadata-duplicate-key",  single(st('{"__metadata__": {"k": "a", "k": "b"}}')),           "__metadata__ has the key 'k' twice"),
    ("metadata-non-string",     single(st({"__metadata__": {"format": "pt", "step": 3}, "w": entry()}, F32x2)),
                                                                                                "__metadata__ must map strings to strings"),
    ("metadata-not-object",     single(st({"__metadata__": ["pt"], "w": entry()}, F32x2)),      "__metadata__ must map strings to strings"),
    # index files
    ("index-invalid-json",      sharded('{"weight_map": {"a": ', {S1: good_shard("a")}),       "index is not valid JSON"),
    ("index-not-utf8",          sharded(b'{"weight_map": {"\xff": "x"}}', {S1: good_shard("a")}), "index is not UTF-8 text"),
    ("index-no-weight-map",     sharded({"metadata": {"total_size": 8}}, {S1: good_shard("a")}), "no weight_map mapping tensor names to shard files"),
    ("index-not-object",        sharded("[]", {S1: good_shard("a")}),                          "no weight_map mapping tensor names to shard files"),
    ("index-map-not-strings",   sharded({"weight_map": {"a": 1}}, {S1: good_shard("a")}),      "no weight_map mapping tensor names to shard files"),
    ("index-empty-weight-map",  sharded({"weight_map": {}}, {S1: good_shard("a")}),            "weight_map is empty"),
    ("index-tensor-twice",      sharded('{"weight_map": {"a": "%s", "a": "%s"}}' % (S1, S2), {S1: good_shard("a"), S2: good_shard("b")}),
                                                                                                "weight_map lists 'a' twice"),
    ("index-missing-shard",     sharded(WM, {S1: good_shard("a")}),                            f"weight_map names shard '{S2}', which is missing"),
    ("index-tensor-shard-lacks", sharded({"weight_map": {"a": S1, "b": S2, "ghost": S2}}, {S1: good_shard("a"), S2: good_shard("b")}),
                                                                                                f"weight_map puts 'ghost' in {S2}, which lacks it"),
    ("index-wrong-shard",       sharded({"weight_map": {"a": S2, "b": S2}}, {S1: good_shard("a"), S2: good_shard("b")}),
                                                                                                f"weight_map puts 'a' in {S2}, which lacks it"),
    ("tensor-in-two-shards",    sharded(WM, {S1: good_shard("a"), S2: good_shard("a", "b")}, named=S2),
                                                                                                f"tensor 'a' is also in {S1}"),
    ("index-shard-with-path",   sharded({"weight_map": {"a": "../x.safetensors"}}, {S1: good_shard("a")}),
                                                                                                "weight_map names '../x.safetensors', not a .safetensors file beside the index"),
    ("index-absolute-shard",    sharded({"weight_map": {"a": "/tmp/x.safetensors"}}, {S1: good_shard("a")}),
                                                                                                "weight_map names '/tmp/x.safetensors', not a .safetensors file beside the index"),
    ("index-shard-not-st",      sharded({"weight_map": {"a": "pytorch_model.bin"}}, {S1: good_shard("a")}),
                                                                                                "weight_map names 'pytorch_model.bin', not a .safetensors file beside the index"),
    ("index-broken-shard",      sharded(WM, {S1: good_shard("a"), S2: st("{}", n=99)}, named=S2), "header length 99 runs past the end of the 10-byte file"),
]


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


COMMANDS = ("inspect", "scan")


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory) -> dict:
    """Every corpus case x command, each in its own directory, run as CLI subprocesses side by side."""
    root = tmp_path_factory.mktemp("corpus")
    jobs = {}
    for case_id, build, _ in CORPUS:
        for command in COMMANDS:
            folder = root / f"{case_id}-{command}" / "ckpt"
            folder.mkdir(parents=True)
            named = build(folder)
            out = folder.parent / "results" / "out.json"
            out.parent.mkdir()
            args = ["inspect", str(folder)] if command == "inspect" else \
                ["scan", str(folder), "--out", str(out), "--jobs", "1"]
            jobs[case_id, command] = (folder, named, listing(folder), out, args)
    with ThreadPoolExecutor(max_workers=8) as pool:
        procs = dict(zip(jobs, pool.map(lambda job: run_cli(*job[-1]), jobs.values())))
    return {key: (*jobs[key][:4], procs[key]) for key in jobs}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case_id, problem", [pytest.param(i, p, id=i) for i, _, p in CORPUS])
def test_bad_input_gives_one_clean_line(corpus_runs, case_id, problem, command):
    folder, named, before, out, proc = corpus_runs[case_id, command]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"layerdiff: error: {named}: "), lines[0]
    assert problem in lines[0]
    assert len(lines[0]) < 400
    assert proc.stdout == ""
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert listing(folder) == before


@pytest.mark.parametrize("build, problem", [pytest.param(b, p, id=i) for i, b, p in CORPUS])
def test_bad_input_in_the_library(tmp_path, build, problem):
    """The same corpus through load_index: a LayerdiffError naming the file, nothing else."""
    named = build(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    with pytest.raises(LayerdiffError) as err:
        if index.exists():
            load_index([], index)
        else:
            load_index([tmp_path / "model.safetensors"])
    assert err.value.where == str(named)
    assert problem in err.value.problem
    assert "\n" not in str(err.value)


def test_messages_quote_hostile_values_briefly(tmp_path):
    name = "n" * 5000 + "\nsecond line"
    path = tmp_path / "model.safetensors"
    path.write_bytes(st({name: entry(dtype="X" * 10_000, shape=list(range(10_000)))}))
    with pytest.raises(LayerdiffError) as err:
        read_header(path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300 + len(str(path))
