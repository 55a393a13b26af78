"""Under a memory cap smaller than a run's reads, every process reads its blocks and drops
their file pages: the results are the same, and the checkpoint's pages leave the page cache."""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import load_all, qwen3_like, reference, write_checkpoint
from layerdiff.api import open_model, plan, scan_options
from layerdiff.checkpoint.reader import Reader, dropping
from layerdiff.engine import budget

libc = ctypes.CDLL(None, use_errno=True)


def cached_pages(path: Path) -> int:
    """Pages of `path` in the page cache now: mincore over a mapping of it (apart from layerdiff)."""
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, np.uint8)
        rc = libc.mincore(view.ctypes.data, size, vec)
        del view
    assert rc == 0, os.strerror(ctypes.get_errno())
    return sum(v & 1 for v in vec)


def close(a: object, b: object) -> bool:
    """Equal structure, floats equal to 1e-12 relative (blocks of other sizes group float64 sums otherwise)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(close, a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-12, abs=1e-300)
    return a == b


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


@pytest.fixture
def ckpt(tmp_path, rng):
    folder = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=6, hidden=256, ff=512), shards=2)
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)  # written back: clean pages, which can be dropped
        os.close(fd)
    return folder


@pytest.mark.parametrize("jobs", [1, 2])
def test_dropping_gives_the_same_results_and_empties_the_page_cache(ckpt, monkeypatch, jobs):
    shards = sorted(ckpt.glob("*.safetensors"))
    options = scan_options(max_memory=4 << 30, jobs=jobs)
    kept = plan(open_model(str(ckpt)), options).run().to_dict()
    for f in shards:
        warm(f)
    before = sum(cached_pages(f) for f in shards)

    monkeypatch.setattr(budget, "memory_cap", lambda: 1 << 30)  # a cap below what the run may hold
    dropped = plan(open_model(str(ckpt)), options).run().to_dict()
    after = sum(cached_pages(f) for f in shards)

    total = sum(-(-f.stat().st_size // mmap.PAGESIZE) for f in shards)
    assert before == total  # all cached after reading them
    assert after < 0.05 * total, (after, total)  # the tensor data left the cache (headers stay)
    for key in ("pair_results", "scales"):
        assert close(dropped[key], kept[key]), key
    _, cos = reference(load_all(ckpt))
    for pair in dropped["pair_results"]:
        assert pair["families"]["q_proj"]["cos"] == pytest.approx(cos["self_attn.q_proj.weight"][pair["L"]], rel=1e-8)


def test_dropping_only_when_the_reads_do_not_fit_beside_the_run(monkeypatch, tmp_path):
    monkeypatch.setattr(budget, "memory_cap", lambda: None)
    assert budget.paging(1 << 40, 256 << 20, 2, tmp_path) == budget.Paging()  # no cap: the kernel's own reclaim streams fine
    monkeypatch.setattr(budget, "memory_cap", lambda: 300 << 20)
    assert budget.paging(2 << 30, 256 << 20, 2, tmp_path).drop
    assert not budget.paging(20 << 20, 256 << 20, 2, tmp_path).drop


def test_readahead_off_when_its_windows_would_crowd_the_cap(monkeypatch, tmp_path):
    monkeypatch.setattr(budget, "memory_cap", lambda: 300 << 20)
    monkeypatch.setattr(budget, "readahead_bytes", lambda path: 8 << 20)
    assert budget.paging(2 << 30, 300 << 20, 9, tmp_path) == budget.Paging(True, True)  # 9 x 16 MiB within 150 MiB
    assert budget.paging(8 << 30, 300 << 20, 32, tmp_path) == budget.Paging(True, False)  # 32 x 16 MiB is not


def test_readahead_window_of_the_device(tmp_path):
    ra = budget.readahead_bytes(tmp_path)
    assert ra % 1024 == 0 and 0 <= ra <= 1 << 30


def test_without_readahead_a_block_read_brings_in_only_its_own_pages(ckpt):
    """With readahead off (`POSIX_FADV_RANDOM`), reading a tensor's first rows in two
    blocks caches those rows' pages and none of the rest of the tensor (with it on, the
    second, sequential read brings in a window ahead); the values are the file's."""
    shard = max(ckpt.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    index = open_model(str(ckpt)).index
    t = max((t for t in index.tensors.values() if t.file == shard), key=lambda t: t.nbytes)
    rows, cols = t.shape
    fd = os.open(shard, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    assert cached_pages(shard) == 0
    with dropping(budget.Paging(True, False)):
        reader = Reader()
        got = np.concatenate([reader.rows(t, 0, 8).copy(), reader.rows(t, 8, 16).copy()])  # a stream's reads
        reader.close()
    item = t.nbytes // t.numel
    first = -(-(t.start + 16 * cols * item) // mmap.PAGESIZE) - t.start // mmap.PAGESIZE
    assert cached_pages(shard) <= first + 1, (cached_pages(shard), first)
    assert rows * cols * item >= (128 << 10) + 16 * cols * item  # longer than the kernel's default readahead window
    assert got.tobytes() == load_all(ckpt)[t.name][:16].tobytes()


def test_without_readahead_blocks_are_larger(ckpt, monkeypatch):
    """Each block is then one read from storage, and larger reads keep it busier."""
    model = open_model(str(ckpt))
    options = scan_options(max_memory=4 << 30, jobs=1)
    assert plan(model, options).plan.block == budget.MAX_BLOCK
    monkeypatch.setattr(budget, "memory_cap", lambda: 1 << 30)  # drop pages: the reads do not fit beside 4 GiB
    monkeypatch.setattr(budget, "readahead_bytes", lambda path: 64 << 20)  # 6 layers x 2 x 64 MiB > 512 MiB
    job = plan(model, options)
    assert job.plan.paging(job.total, options.max_memory) == budget.Paging(True, False)
    assert job.plan.block == budget.UNREAD_AHEAD_MAX_BLOCK
    _, cos = reference(load_all(ckpt))
    for pair in job.run().to_dict()["pair_results"]:
        assert pair["families"]["q_proj"]["cos"] == pytest.approx(cos["self_attn.q_proj.weight"][pair["L"]], rel=1e-8)


def test_prefetch_reads_ahead_only_when_readahead_is_off(ckpt):
    """`Reader.prefetch` starts the kernel reading a block (it lands in the page cache
    without a read call) where readahead is off, and leaves it to the kernel otherwise."""
    shard = max(ckpt.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    index = open_model(str(ckpt)).index
    t = max((t for t in index.tensors.values() if t.file == shard), key=lambda t: t.nbytes)
    rows = t.shape[0]
    for readahead, expect in ((True, False), (False, True)):
        fd = os.open(shard, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        with dropping(budget.Paging(True, readahead)):
            reader = Reader()
            reader.prefetch(t, 0, rows)
            reader.close()
        pages = t.nbytes // mmap.PAGESIZE
        for _ in range(200):  # the reads it started finish on their own
            if cached_pages(shard) >= pages or not expect:
                break
            time.sleep(0.01)
        assert (cached_pages(shard) >= pages) == expect, (readahead, cached_pages(shard), pages)
