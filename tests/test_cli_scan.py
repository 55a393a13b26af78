"""What a person at a terminal sees: the progress bar, and Ctrl-C."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import big_checkpoint


def run_on_pty(args: list[str], interrupt_on: bytes | None = None) -> tuple[int, str]:
    """Run with stderr on a 100-column pseudo-terminal; optionally Ctrl-C the process group."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "layerdiff", *args], stdout=subprocess.DEVNULL, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    seen = b""
    deadline = time.time() + 60
    while time.time() < deadline:
        # select, not a bare read: a process left holding the terminal must fail the test, not hang it
        if not select.select([master], [], [], max(0.0, deadline - time.time()))[0]:
            break
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
        if interrupt_on and interrupt_on in seen:
            os.killpg(proc.pid, signal.SIGINT)
            interrupt_on = None
    os.close(master)
    return proc.wait(timeout=60), seen.decode(errors="replace")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return big_checkpoint(tmp_path_factory.mktemp("big") / "ckpt", layers=6, rows=4096, cols=4096)


def test_progress_bar_on_a_terminal(ckpt, tmp_path):
    code, err = run_on_pty(["scan", str(ckpt), "--out", str(tmp_path / "r.json")])
    assert code == 0
    assert "scan:" in err and "%|" in err and "B/s" in err
    assert (tmp_path / "r.json").exists()


def test_quiet_silences_the_bar(ckpt, tmp_path):
    code, err = run_on_pty(["scan", str(ckpt), "--quiet", "--out", str(tmp_path / "r.json")])
    assert code == 0 and err.strip() == ""


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_ctrl_c_stops_cleanly_and_writes_nothing(ckpt, tmp_path, jobs):
    out = tmp_path / "r.json"
    code, err = run_on_pty(["scan", str(ckpt), "--jobs", jobs, "--out", str(out)], interrupt_on=b"scan:")
    assert code == 130, err
    assert "layerdiff: interrupted; nothing written" in err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_tables_show_all_experts_families_and_the_json_every_expert(tmp_path):
    from conftest import FIXTURES, run_cli

    out = tmp_path / "r.json"
    proc = run_cli("scan", str(FIXTURES / "hf" / "qwen3_moe"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.strip().startswith("L ") and "q_proj" in line)
    assert "experts.gate_proj" in header.split() and "experts.0.gate_proj" not in proc.stdout
    assert "12 per-expert families are in the JSON" in proc.stdout
    families = json.loads(out.read_text())["stacks"]["model.layers"]["families"]
    assert {f"experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")} <= set(families)
