"""Under a memory cap smaller than a run's reads, every process reads its blocks and drops
their file pages: the results are the same, and the checkpoint's pages leave the page cache."""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import load_all, qwen3_like, reference, write_checkpoint
from layerdiff.api import open_model, plan, scan_options
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


def test_dropping_only_when_the_reads_do_not_fit_beside_the_run(monkeypatch):
    monkeypatch.setattr(budget, "memory_cap", lambda: None)
    assert not budget.drop_pages(1 << 40, 256 << 20)  # no cap: the kernel's own reclaim streams fine
    monkeypatch.setattr(budget, "memory_cap", lambda: 300 << 20)
    assert budget.drop_pages(2 << 30, 256 << 20)
    assert not budget.drop_pages(20 << 20, 256 << 20)
