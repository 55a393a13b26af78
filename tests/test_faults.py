"""Faults during a scan: shards truncated, rewritten or replaced while they are read, workers that die.

Each ends in one line naming the shard, exit status 1, nothing written, within
seconds, in every mode (in-process and worker processes, chain and --rank)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import qwen3_like, write_checkpoint
from layerdiff.api import open_model, plan, scan_options
from layerdiff.errors import FormatError, LayerdiffError

# Run the CLI with a fault injected into the N-th block read of any process
# (workers inherit the patch: they are forked). A flag file makes it happen once.
HOOK = r"""
import os, signal, sys, time
import layerdiff.engine.budget as budget
budget.MAX_BLOCK = int(os.environ.get("T_BLOCK", budget.MAX_BLOCK))
from layerdiff.checkpoint import reader
_rows, calls = reader.Reader.rows, [0]

def rows(self, t, r0, r1):
    calls[0] += 1
    if calls[0] >= int(os.environ.get("T_AT", "0")) and t.file.name == os.environ.get("T_SHARD"):
        try:
            fd = os.open(os.environ["T_FLAG"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, repr(time.monotonic()).encode())
            os.close(fd)
            action = os.environ["T_ACTION"]
            if self.mapped:
                self._map(t)  # mapped before it changes: a SIGBUS, not a failed mmap
            if action == "truncate":
                os.truncate(t.file, int(os.environ["T_SIZE"]))
                if os.environ.get("T_TOUCH"):  # the mapping's last page, as a scan would next
                    m = self._map(t)
                    m[len(m) - 1]
            elif action == "replace":
                tmp = t.file.with_name("replacement.tmp")
                tmp.write_bytes(t.file.read_bytes()[: int(os.environ["T_SIZE"])])
                os.replace(tmp, t.file)
            elif action == "rewrite":
                with open(t.file, "r+b") as f:
                    f.seek(int(os.environ["T_SIZE"]))
                    f.write(b"\0" * 8)
            elif action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
    return _rows(self, t, r0, r1)

reader.Reader.rows = rows
from layerdiff.cli import main
main(prog_name="layerdiff")
"""


def run_hooked(args: list[str], timeout: float = 120, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI with the fault hook; and when it ended (time.monotonic)."""
    r = subprocess.run([sys.executable, "-c", HOOK, *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **env})
    return r, time.monotonic()


def listing(*folders: Path) -> dict[str, str]:
    """Every file below `folders` with a hash of its content: what a failed run must leave as it was."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def sharded(tmp_path: Path, rng: np.random.Generator) -> Path:
    return write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=4), shards=2)


MODES = {
    "jobs1": ["--jobs", "1"],
    "jobs2": ["--jobs", "2"],
    "jobs2-sigbus": ["--jobs", "2"],
    "rank-jobs1": ["--jobs", "1", "--rank"],
    "rank-jobs2": ["--jobs", "2", "--rank"],
}


@pytest.mark.parametrize("mode, action", [(m, "truncate") for m in MODES] + [("jobs2", "replace"), ("jobs1", "rewrite")])
def test_a_shard_changed_while_being_read_is_one_line_naming_it(sharded, tmp_path, mode, action):
    shard = sharded / "model-00002-of-00002.safetensors"
    size = shard.stat().st_size
    out = tmp_path / "out" / "r.json"
    out.parent.mkdir()
    before = listing(tmp_path)
    r, ended = run_hooked(["scan", str(sharded), "--quiet", "--out", str(out), *MODES[mode]],
                          T_BLOCK="64", T_AT="3", T_SHARD=shard.name, T_FLAG=str(tmp_path / "flag"),
                          T_ACTION=action, T_SIZE=str(size // 2), T_TOUCH="1" if "sigbus" in mode else "")
    assert (tmp_path / "flag").exists(), "the fault was never injected"
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    what = {"truncate": f"it shrank from {size} to {size // 2} bytes", "replace": "it was replaced by another file",
            "rewrite": "it was modified"}[action]
    assert lines[0] == f"layerdiff: error: {shard}: the file changed during the scan: {what}"
    assert ended - float((tmp_path / "flag").read_text()) < 20  # seconds from the fault to the exit, on a busy machine
    # Nothing written (no result, no temporary file), nothing else in the checkpoint touched.
    changed = (str(shard), str(tmp_path / "flag"))
    assert {k: v for k, v in listing(tmp_path).items() if k not in changed} == \
        {k: v for k, v in before.items() if k not in changed}


@pytest.mark.parametrize("mode", ["jobs2", "rank-jobs2"])
def test_a_worker_killed_is_one_line_and_never_waited_on(sharded, tmp_path, mode):
    shard = sharded / "model-00001-of-00002.safetensors"
    out = tmp_path / "r.json"
    # In a worker only: the patch kills whichever process makes the read, and the
    # in-process part of --rank reads in the parent, so the kill is in the chain pass.
    r, ended = run_hooked(["scan", str(sharded), "--quiet", "--out", str(out), *MODES[mode]],
                          T_BLOCK="64", T_AT="2", T_SHARD=shard.name, T_FLAG=str(tmp_path / "flag"), T_ACTION="kill")
    if r.returncode == -signal.SIGKILL:
        pytest.skip("the read that was killed ran in the parent (no worker pass in this plan)")
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == "layerdiff: error: scan: a worker process died (killed by SIGKILL: out of memory?); " \
                               "nothing written"
    assert not out.exists() and ended - float((tmp_path / "flag").read_text()) < 20


def test_a_shard_truncated_by_another_process_during_a_scan(tmp_path, rng):
    """No hook in the reading process: another process truncates a shard while the scan runs."""
    # Large enough that one-row blocks keep the workers busy for ~0.7 s after they start.
    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=8, hidden=512, ff=768), shards=2)
    shard = ckpt / "model-00001-of-00002.safetensors"
    out = tmp_path / "r.json"
    slow = "import layerdiff.engine.budget as b; b.MAX_BLOCK = 1; from layerdiff.cli import main; main()"
    proc = subprocess.Popen([sys.executable, "-c", slow, "scan", str(ckpt), "--quiet", "--jobs", "2",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 60
    while not children.read_text().split() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # imports and headers: the workers start once they are read
    time.sleep(0.1)
    assert proc.poll() is None, "the scan ended before the shard was truncated"
    size = shard.stat().st_size
    os.truncate(shard, size // 3)
    truncated = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - truncated < 20
    assert proc.returncode == 1
    assert err.strip().splitlines() == [f"layerdiff: error: {shard}: the file changed during the scan: it shrank "
                                        f"from {size} to {size // 3} bytes"]
    assert not out.exists()


@pytest.mark.parametrize("change", ["truncate", "empty", "replace", "remove"])
def test_a_shard_changed_after_its_header_was_read(sharded, change):
    """Between opening the model and reading a block (the last moment a mapping used to fail)."""
    model = open_model(str(sharded))
    job = plan(model, scan_options(jobs=1))
    shard = sharded / "model-00001-of-00002.safetensors"
    size = shard.stat().st_size
    if change == "truncate":
        os.truncate(shard, size - 1)
    elif change == "empty":
        os.truncate(shard, 0)
    elif change == "replace":
        tmp = shard.with_name("x.tmp")
        tmp.write_bytes(shard.read_bytes())
        os.replace(tmp, shard)
    else:
        shard.unlink()
    with pytest.raises(FormatError) as e:
        job.run()
    assert e.value.where == str(shard)
    assert e.value.problem.startswith("the file changed during the scan: ")
    expected = {"truncate": f"it shrank from {size} to {size - 1} bytes", "empty": f"it shrank from {size} to 0 bytes",
                "replace": "it was replaced by another file", "remove": "it was removed"}[change]
    assert expected in e.value.problem or change == "remove" and "no such file" in e.value.problem


def test_layerdiff_errors_survive_pickling():
    """A worker's error reaches the parent as the same one-line error."""
    import pickle

    e = pickle.loads(pickle.dumps(FormatError("a/b.safetensors", "the file changed")))
    assert type(e) is FormatError and (e.where, e.problem) == ("a/b.safetensors", "the file changed")
    assert isinstance(e, LayerdiffError) and str(e) == "a/b.safetensors: the file changed"


def test_ctrl_c_while_the_workers_start_leaves_none_behind(sharded, tmp_path):
    """SIGINT is blocked while the pool forks; delivered when it is unblocked, it
    used to escape before the code that ends the workers, which lived on."""
    hook = (
        "import os, signal\n"
        "from layerdiff.engine import pool\n"
        "start = pool._Worker.__init__\n"
        "def first(self, *a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGINT)  # pending: blocked until the workers exist\n"
        "    pool._Worker.__init__ = start\n"
        "    start(self, *a, **k)\n"
        "pool._Worker.__init__ = first\n"
        "from layerdiff.cli import main\n"
        "main(prog_name='layerdiff')\n"
    )
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-c", hook, "scan", str(sharded), "--jobs", "2", "--quiet", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # A worker left alive keeps the pipes open: communicate() would wait for it.
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "layerdiff: interrupted; nothing written"
    assert not out.exists()
    leftover = subprocess.run(["pgrep", "-f", str(sharded)], capture_output=True, text=True).stdout.split()
    assert leftover == []


def test_the_main_process_reuses_its_read_buffers(tmp_path, rng, monkeypatch):
    """In-process blocks are read into a few kept buffers, not a fresh allocation per block
    (a reference held by the loop that looked for a free one made every buffer look busy)."""
    import layerdiff.engine.budget as budget
    from layerdiff.checkpoint import reader

    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=4), shards=2)
    monkeypatch.setattr(budget, "MAX_BLOCK", 256)  # hundreds of blocks
    made = []
    allocate = reader._allocate
    monkeypatch.setattr(reader, "_allocate", lambda n: made.append(n) or allocate(n))
    job = plan(open_model(str(ckpt)), scan_options(jobs=1))
    job.run()
    blocks = sum(1 for _ in job.plan.items())
    assert blocks > 100 and len(made) <= 16, (blocks, len(made))  # a few kept buffers, grown as blocks grow
    big = reader._allocate(3 << 20)
    assert big.ctypes.data % (2 << 20) == 0 and big.size == 4 << 20  # whole aligned 2 MiB pages
