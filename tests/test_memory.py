"""Peak resident memory of the whole process tree stays under --max-memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import big_checkpoint

MiB = 1 << 20


def _tree_rss(root: int) -> int:
    """Sum of VmRSS (anonymous + file-backed pages) over a process and its descendants."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def peak_tree_rss(cmd: list[str]) -> tuple[int, subprocess.CompletedProcess]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.005)
    out, err = proc.communicate()
    return peak, subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("budget_mib, jobs", [(160, 2), (64, 1)])
def test_scan_of_a_checkpoint_4x_the_budget_stays_under_it(tmp_path, budget_mib, jobs):
    budget = budget_mib * MiB
    ckpt = big_checkpoint(tmp_path / "ckpt", layers=10, rows=4096, cols=4096)  # 640 MiB
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert size > 4 * budget
    out = tmp_path / "r.json"
    peak, proc = peak_tree_rss([sys.executable, "-m", "layerdiff", "scan", str(ckpt), "--max-memory", f"{budget_mib}M",
                                "--jobs", str(jobs), "--quiet", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["settings"]["jobs"] == jobs
    assert result["run"]["bytes_mapped"] == result["run"]["bytes_analysed"] == size - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in ckpt.glob("*.safetensors"))
    assert 0 < peak < budget, f"peak tree RSS {peak / MiB:.1f} MiB over the {budget / MiB:.0f} MiB budget"
