"""--out, --plot and plot -o: never onto the model, whole or not at all, all of a run together.

Every refusal is one line and exit 1 before any work, and leaves the
checkpoint, the hub cache and the output directory exactly as they were
(listings with content hashes are compared)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, qwen3_like, write_checkpoint

_spec = importlib.util.spec_from_file_location("hubcache", FIXTURES / "hubcache.py")
hubcache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hubcache)

REPO = "org/tiny"
CONFIG = {"model_type": "qwen3", "num_hidden_layers": 3}


def cli(*args: str, env: dict | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerdiff", *args], capture_output=True, text=True, timeout=300,
                          env=env, preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def tree(*roots: Path) -> dict[str, str]:
    """Every entry below `roots`: symlinks by target, files by content hash."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[str(p)] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir"
    return out


def refused(r: subprocess.CompletedProcess, where: Path | str, problem: str) -> None:
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [f"layerdiff: error: {where}: {problem}"], r.stderr


@pytest.fixture
def src(tmp_path: Path, rng: np.random.Generator) -> Path:
    return write_checkpoint(tmp_path / "src", qwen3_like(rng, layers=3), shards=2, config=CONFIG)


@pytest.fixture
def hub(tmp_path: Path, src: Path) -> dict:
    cache = tmp_path / "hub"
    commit = hubcache.make_hub_cache(cache, REPO, src)
    repo = cache / hubcache.repo_folder_name(REPO)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_CACHE=str(cache))
    return {"cache": cache, "repo": repo, "snapshot": repo / "snapshots" / commit, "env": env}


def test_outputs_onto_the_hub_cache_are_refused(hub, tmp_path):
    snap, repo = hub["snapshot"], hub["repo"]
    shard = snap / "model-00001-of-00002.safetensors"
    blob = Path(os.path.realpath(shard))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "blob.png").symlink_to(blob)  # a plot name, pointing at a shard's blob
    before = tree(hub["cache"], outside)
    cases = [
        (["--out", str(shard)], shard, "is a file of the checkpoint: refusing to overwrite it"),
        (["--out", str(blob)], blob, "is a file of the checkpoint: refusing to overwrite it"),
        (["--out", str(snap / "config.json")], snap / "config.json", "is a file of the checkpoint: refusing to overwrite it"),
        (["--out", str(snap / "new.json")], snap / "new.json",
         "refusing to write into the checkpoint directory or the hub cache"),
        (["--out", str(repo / "blobs" / "new.json")], repo / "blobs" / "new.json",
         "refusing to write into the checkpoint directory or the hub cache"),
        (["--plot", str(outside / "blob.png")], outside / "blob.png", "is a file of the checkpoint: refusing to overwrite it"),
    ]
    for model in (REPO, str(snap)):  # as a repo id, and as a local path to the snapshot
        for args, where, problem in cases:
            refused(cli("scan", model, "--quiet", *args, env=hub["env"]), where, problem)
    assert tree(hub["cache"], outside) == before


def test_out_onto_the_real_file_behind_a_symlinked_shard(src, tmp_path):
    """A checkpoint directory of symlinks: the real shards, index and config live elsewhere."""
    links = tmp_path / "links"
    links.mkdir()
    for f in src.iterdir():
        (links / f.name).symlink_to(f)
    os.link(src / "model-00002-of-00002.safetensors", tmp_path / "hard.safetensors")
    (tmp_path / "via.json").symlink_to(src / "model-00001-of-00002.safetensors")
    before = tree(src, links)
    for out in [src / "model-00001-of-00002.safetensors", src / "model.safetensors.index.json", src / "config.json",
                tmp_path / "hard.safetensors", tmp_path / "via.json"]:
        refused(cli("scan", str(links), "--quiet", "--out", str(out)), out,
                "is a file of the checkpoint: refusing to overwrite it")
    refused(cli("scan", str(links), "--quiet", "--out", str(links / "r.json")), links / "r.json",
            "refusing to write into the checkpoint directory or the hub cache")
    assert tree(src, links) == before
    ok = cli("scan", str(links), "--quiet", "--out", str(src.parent / "r.json"))  # beside the real files: fine
    assert ok.returncode == 0, ok.stderr


def test_out_and_plot_the_same_file_are_refused(src, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.png").symlink_to(tmp_path / "p.png")  # dangling until written
    cases = [("p.png", "p.png"), ("./p.png", "sub/../p.png"), (str(tmp_path / "p.png"), "link.png")]
    for out, plot in cases:
        refused(cli("scan", str(src), "--quiet", "--out", out, "--plot", plot), plot,
                f"is the same file as the other output {Path(out)}")
    (tmp_path / "a.png").write_bytes(b"old")
    os.link(tmp_path / "a.png", tmp_path / "b.png")
    refused(cli("scan", str(src), "--quiet", "--out", "a.png", "--plot", "b.png"), "b.png",
            "is the same file as the other output a.png")
    assert (tmp_path / "a.png").read_bytes() == b"old" and not (tmp_path / "p.png").exists()


def test_plot_never_overwrites_its_input(src, tmp_path):
    pytest.importorskip("matplotlib")
    r = cli("scan", str(src), "--quiet", "--out", str(tmp_path / "r.png"))
    assert r.returncode == 0, r.stderr
    before = (tmp_path / "r.png").read_bytes()
    refused(cli("plot", str(tmp_path / "r.png"), "-o", str(tmp_path / "r.png")), tmp_path / "r.png",
            "is the input of this run: refusing to overwrite it")
    assert (tmp_path / "r.png").read_bytes() == before


@pytest.mark.parametrize("special", ["/dev/stdout", "/dev/null", "fifo"])
def test_special_files_as_outputs_are_refused_before_the_scan(src, tmp_path, special):
    out = special
    if special == "fifo":
        out = str(tmp_path / "fifo.json")
        os.mkfifo(out)
    r = cli("scan", str(src), "--quiet", "--out", out)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"layerdiff: error: {out}: is a "), r.stderr
    assert r.stderr.rstrip().endswith(": outputs are written to regular files only "
                                      "(whole, by a temporary file renamed onto them)")


@pytest.mark.parametrize("length", [253, 255])
def test_a_long_legal_output_name_is_written(src, tmp_path, length):
    out = tmp_path / ("r" * (length - 5) + ".json")
    r = cli("scan", str(src), "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["schema"] == "layerdiff.scan/1"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", out.name])  # no temporary left


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(src, tmp_path, umask, mode):
    out = tmp_path / "r.json"
    r = cli("scan", str(src), "--quiet", "--out", str(out), umask=umask)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == mode


def test_an_output_replaced_keeps_its_mode(src, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    out.chmod(0o640)
    r = cli("scan", str(src), "--quiet", "--out", str(out), umask=0o077)
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o640 and out.read_text() != "{}"


@pytest.fixture
def small_fs(tmp_path: Path):
    """A tmpfs of a given size (root only), unmounted afterwards."""
    mounted = []

    def mount(kib: int) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(d)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _kib(n: int) -> int:
    return -(-n // 4096) * 4


def test_a_full_disk_leaves_no_output(src, tmp_path, small_fs):
    pytest.importorskip("matplotlib")
    # Sizes of the two outputs of this run.
    free = tmp_path / "free"
    free.mkdir()
    r = cli("scan", str(src), "--quiet", "--out", str(free / "r.json"), "--plot", str(free / "p.png"))
    assert r.returncode == 0, r.stderr
    json_kib, png_kib = _kib((free / "r.json").stat().st_size), _kib((free / "p.png").stat().st_size)

    # --out alone, on a disk too small for it.
    fs = small_fs(max(4, json_kib // 2))
    r = cli("scan", str(src), "--quiet", "--out", str(fs / "r.json"))
    refused(r, fs / "r.json", "cannot write: No space left on device")
    assert list(fs.iterdir()) == []

    # Both: the plot (written first) fits, the JSON does not: neither is left.
    fs = small_fs(png_kib + max(4, json_kib // 2))
    r = cli("scan", str(src), "--quiet", "--out", str(fs / "r.json"), "--plot", str(fs / "p.png"))
    refused(r, fs / "r.json", "cannot write: No space left on device")
    assert list(fs.iterdir()) == []

    # plot -o.
    fs = small_fs(max(4, png_kib // 2))
    r = cli("plot", str(free / "r.json"), "-o", str(fs / "p.png"))
    refused(r, fs / "p.png", "cannot write: No space left on device")
    assert list(fs.iterdir()) == []


def test_out_through_a_symlink_onto_another_filesystem(src, tmp_path, small_fs):
    fs = small_fs(4096)
    link = tmp_path / "r.json"
    link.symlink_to(fs / "real.json")
    r = cli("scan", str(src), "--quiet", "--out", str(link))
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and json.loads((fs / "real.json").read_text())["schema"] == "layerdiff.scan/1"
    assert [p.name for p in fs.iterdir()] == ["real.json"]
