"""Odd and hostile input that used to crash or mislead: one line each, or the right output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import EXAMPLE, qwen3_like, run_cli, write_checkpoint


def one_line(r: subprocess.CompletedProcess, start: str, code: int = 1) -> str:
    assert r.returncode == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), r.stderr
    assert r.stdout == ""
    return lines[0]


@pytest.mark.parametrize("flag, value, problem", [
    ("--max-memory", "9" * 400, "is not a size like 256M or 2G"),
    ("--max-memory", "1" + "0" * 30 + "G", "is not a size like 256M or 2G"),
    ("--layers", "1" * 5000 + ":", "is not a layer range like 4:12"),
    ("--layers", ":" + "7" * 5000, "is not a layer range like 4:12"),
])
def test_absurd_numbers_are_one_line_errors(flag, value, problem):
    line = one_line(run_cli("scan", str(EXAMPLE), flag, value), f"layerdiff: error: {flag}: ")
    assert line.endswith(problem) and len(line) < 200


@pytest.mark.parametrize("model", ["", "  "])
def test_an_empty_model_is_refused_not_the_current_directory(model, tmp_path, rng):
    write_checkpoint(tmp_path, qwen3_like(rng, layers=2))  # a checkpoint right here: must not be scanned
    r = subprocess.run([sys.executable, "-m", "layerdiff", "scan", model, "--quiet"], capture_output=True, text=True,
                       cwd=tmp_path)
    one_line(r, "layerdiff: error: MODEL: is empty: name a checkpoint directory")


def test_a_missing_path_shaped_like_a_repo_id(tmp_path):
    (tmp_path / "ckpts").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))

    def run(model: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "layerdiff", "inspect", model], capture_output=True, text=True,
                              cwd=tmp_path, env=env)

    # Its first component is a directory here: a path, missing.
    one_line(run("ckpts/run1"), "layerdiff: error: ckpts/run1: no such file or directory (a path, not a hub repo id: "
                                "ckpts/ is a local directory)")
    for model in ("./ckpts/run1", "ckpts/run1/", "ckpts/a/b", "/abs/org/name", "~/org/name", "org/name.safetensors"):
        one_line(run(model), f"layerdiff: error: {model}: no such file or directory")
    # Nothing local about it: a hub repo id, not in the (empty) cache.
    line = one_line(run("org/name"), "layerdiff: error: org/name: ")
    assert "not in the hub cache" in line


def test_control_characters_in_names_are_escaped_in_text_output(tmp_path, rng):
    evil = "\x1b[2J\x1b]0;pwned\x07"
    tensors = qwen3_like(rng, layers=3)
    for L in range(3):
        tensors[f"model.layers.{L}.mlp.{evil}.weight"] = rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16)
    tensors["lm_head\nfake line: all good"] = rng.standard_normal((4, 4)).astype(ml_dtypes.bfloat16)
    ckpt = write_checkpoint(tmp_path / "ckpt", tensors, config={"model_type": "qwen3", "num_hidden_layers": 3})
    for args in (["inspect", str(ckpt)], ["scan", str(ckpt)]):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        assert not any(ord(c) < 32 and c != "\n" for c in r.stdout), args
        assert "\\x1b[2J" in r.stdout, args
        assert not any(line.startswith("fake line") for line in r.stdout.splitlines())
    assert "lm_head\\nfake line: all good" in run_cli("inspect", str(ckpt)).stdout
    doc = json.loads(run_cli("inspect", str(ckpt), "--json").stdout)  # JSON keeps the names as they are
    assert any(evil in u for st in doc["stacks"].values() for u in st["unmapped"])


def test_control_characters_in_an_error_stay_on_one_line(tmp_path):
    bad = str(tmp_path / "no\nsuch\x1b[31m")
    line = one_line(run_cli("inspect", bad), "layerdiff: error: ")
    assert "\\n" in line and "\\x1b[31m" in line


def test_a_header_of_100000_tensors_is_read_in_bounded_time_and_memory(tmp_path):
    """100,000 one-element expert tensors: the header costs ~1 s and ~70 MiB, linear in its size."""
    import struct

    header, offset = {}, 0
    for L in range(2):
        for e in range(50_000):
            header[f"model.layers.{L}.mlp.experts.{e}.gate_proj.weight"] = {
                "dtype": "BF16", "shape": [1, 1], "data_offsets": [offset, offset + 2]}
            offset += 2
    raw = json.dumps(header).encode()
    ckpt = tmp_path / "moe"
    ckpt.mkdir()
    with open(ckpt / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\x80\x3f" * (offset // 2))  # every value bf16 1.0
    (ckpt / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 2}))
    del header, raw
    # VmHWM, not ru_maxrss: a child forked from this (large) test process inherits its ru_maxrss.
    hwm = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    probe = ("import sys, time; from layerdiff.checkpoint.index import read_header; from pathlib import Path; "
             "t = time.process_time(); s = read_header(Path(sys.argv[1])); "
             f"print(len(s.tensors), time.process_time() - t, {hwm})")
    r = subprocess.run([sys.executable, "-c", probe, str(ckpt / "model.safetensors")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    n, cpu, hwm_kib = r.stdout.split()
    assert int(n) == 100_000
    assert float(cpu) < 10  # 1.0 s here (was 1.5); CPU time, which a busy machine does not inflate much
    assert int(hwm_kib) < 100 * 1024  # 82 MiB here, interpreter included (was 134: a dict and two lists per tensor)


def test_the_scale_pca_of_50000_families_is_not_quadratic():
    """An `in` over a list made it 32 s for 50,000 experts (2,500,000,000 comparisons)."""
    from layerdiff.metrics.scale import scale_pca

    rng = np.random.default_rng(0)
    scales = {f"experts.{e}.gate_proj": [float(x) for x in rng.uniform(0.5, 2, 2)] for e in range(50_000)}
    scales |= {f"experts.{e}.up_proj": [0.0, 1.0] for e in range(50_000)}  # a zero norm: left out
    started = time.process_time()
    pca = scale_pca(scales)
    assert time.process_time() - started < 5  # 0.3 s here
    assert len(pca["fam_used"]) == 50_000 and len(pca["left_out_zero_norm"]) == 50_000
