"""Special files where a regular one belongs: a FIFO would block the first read
forever, /dev/zero never ends. Each is refused before it is read, in one line;
JSON files are refused past their size cap before they are parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLE, qwen3_like, write_checkpoint

TIMEOUT = 60  # a hang fails the test instead of the suite


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerdiff", *args], capture_output=True, text=True, timeout=TIMEOUT)


def one_line_error(r: subprocess.CompletedProcess, where: Path | str, problem: str) -> None:
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [f"layerdiff: error: {where}: {problem}"], r.stderr
    assert r.stdout == ""


@pytest.fixture
def ckpt(tmp_path: Path, rng: np.random.Generator) -> Path:
    return write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=3), shards=2,
                            config={"model_type": "qwen3", "num_hidden_layers": 3})


def replace_with_fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("command", ["inspect", "scan"])
def test_a_fifo_as_a_shard(ckpt, command):
    shard = replace_with_fifo(ckpt / "model-00002-of-00002.safetensors")
    one_line_error(cli(command, str(ckpt)), shard, "is a FIFO (named pipe), not a safetensors file")


def test_a_fifo_as_the_single_weights_file(tmp_path, rng):
    folder = write_checkpoint(tmp_path / "one", qwen3_like(rng, layers=2))
    shard = replace_with_fifo(folder / "model.safetensors")
    one_line_error(cli("scan", str(folder)), shard, "is a FIFO (named pipe), not a safetensors file")
    one_line_error(cli("inspect", str(shard)), shard,
                   "is a FIFO (named pipe), not a .safetensors file, an index or a checkpoint directory")


def test_a_fifo_as_the_index(ckpt):
    index = replace_with_fifo(ckpt / "model.safetensors.index.json")
    one_line_error(cli("inspect", str(ckpt)), index, "is a FIFO (named pipe), not an index")
    one_line_error(cli("inspect", str(index)), index,
                   "is a FIFO (named pipe), not a .safetensors file, an index or a checkpoint directory")


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/null"])
def test_a_special_config_json(ckpt, special):
    cfg = ckpt / "config.json"
    cfg.unlink()
    if special == "fifo":
        os.mkfifo(cfg)
        problem = "is a FIFO (named pipe), not a config.json"
    else:
        cfg.symlink_to(special)
        problem = "is a character device, not a config.json"
    one_line_error(cli("scan", str(ckpt), "--quiet"), cfg, problem)


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "/dev/stdin"])
def test_a_special_plot_input(tmp_path, special):
    pytest.importorskip("matplotlib")
    src = tmp_path / "r.json"
    if special == "fifo":
        os.mkfifo(src)
    else:
        src.symlink_to(special)
    r = cli("plot", str(src), "-o", str(tmp_path / "p.png"))
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"layerdiff: error: {src}: is a "), r.stderr
    assert r.stderr.rstrip().endswith(", not a scan result")
    assert not (tmp_path / "p.png").exists()


def test_json_files_past_their_cap_are_refused_unread(ckpt, tmp_path):
    from layerdiff.checkpoint.sources import MAX_CONFIG_BYTES

    cfg = ckpt / "config.json"
    with open(cfg, "r+b") as f:  # sparse: costs nothing on disk
        f.truncate(MAX_CONFIG_BYTES + 1)
    one_line_error(cli("inspect", str(ckpt)), cfg,
                   f"config.json of {MAX_CONFIG_BYTES + 1} bytes is larger than the {MAX_CONFIG_BYTES} bytes allowed")
    from layerdiff.checkpoint.index import MAX_HEADER_BYTES

    cfg.write_text(json.dumps({"model_type": "qwen3"}))
    index = ckpt / "model.safetensors.index.json"
    with open(index, "r+b") as f:
        f.truncate(MAX_HEADER_BYTES + 1)
    one_line_error(cli("inspect", str(ckpt)), index,
                   f"index of {MAX_HEADER_BYTES + 1} bytes is larger than the {MAX_HEADER_BYTES} bytes allowed")


def test_a_directory_where_a_shard_belongs(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "model.safetensors").mkdir()
    one_line_error(cli("inspect", str(folder)), folder / "model.safetensors",
                   "is a directory, not a safetensors file")


def test_the_example_still_reads(tmp_path):
    r = cli("inspect", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
