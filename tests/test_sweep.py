"""layerdiff sweep: revisions from a real-layout hub cache, the store, the table against float64, the plot."""

from __future__ import annotations

import csv
import importlib
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import load_all, reference, run_cli
from sweep_helpers import REPO, STEPS, hub_run, training_run

import layerdiff
from layerdiff.errors import LayerdiffError, OutputError, SelectionError
from layerdiff.sweep import revisions as rv
from layerdiff.sweep.table import COLUMNS, read_table

ORDER = ["step0", "step1000", "step3000", "step20000", "step100000"]
MEM = "1G"  # in this (pytest) process, whose resident memory grows over a whole suite run


def sweep(*args, **kwargs):
    """layerdiff.sweep with a budget the pytest process fits in (the budget is not what is tested here)."""
    kwargs.setdefault("max_memory", MEM)
    return layerdiff.sweep(*args, **kwargs)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """A hub cache holding 5 revisions (+ main) of REPO, and HF_HUB_OFFLINE set."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commits = hub_run(cache, tmp_path / "src")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache, commits


# --- revisions -------------------------------------------------------------------------------------

def test_natural_order():
    names = ["step20000", "step1000", "step100000", "step3000", "step0", "v2", "v10"]
    assert sorted(names, key=rv.natural_key) == ["step0", "step1000", "step3000", "step20000", "step100000",
                                                 "v2", "v10"]


def test_revisions_from_the_cache_offline(offline):
    cks = rv.expand([REPO], r"step\d+")
    assert [c.revision for c in cks] == ORDER
    assert [c.spec for c in cks] == [f"{REPO}@{n}" for n in ORDER]
    assert {c.model for c in cks} == {REPO}
    assert [c.revision for c in rv.expand([REPO], "step1.*")] == ["step1000", "step100000"]  # whole-name match
    with pytest.raises(SelectionError, match=r"no branch or tag of org/tiny-run matches 'step9'.*step0, step1000"):
        rv.expand([REPO], "step9")


def test_revisions_from_the_hub_online(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.hf_api import GitRefInfo, GitRefs

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    asked = []

    def refs(repo_id, **kw):
        asked.append(repo_id)
        info = [GitRefInfo(name=n, ref=f"refs/heads/{n}", target_commit="0" * 40) for n in ("main", *STEPS)]
        return GitRefs(branches=info[:4], converts=[], tags=info[4:])

    monkeypatch.setattr(huggingface_hub, "list_repo_refs", refs)
    assert [c.revision for c in rv.expand([REPO, "/no/such/local"], r"step\d+")[:5]] == ORDER
    assert asked == [REPO]


def test_revision_in_the_model_and_local_paths_with_at(tmp_path):
    assert rv.split_spec("org/name@step10") == rv.Checkpoint("org/name@step10", "org/name", "step10")
    odd = tmp_path / "run@3"
    odd.mkdir()
    assert rv.split_spec(str(odd)) == rv.Checkpoint(str(odd), str(odd), None)
    with pytest.raises(SelectionError, match="given twice"):
        rv.expand(["a/b@x", "a/b@x"])
    with pytest.raises(SelectionError, match="not a regular expression"):
        rv.expand(["a/b"], "step(")


# --- the table against float64 ---------------------------------------------------------------------

def _drift64(a: dict, b: dict) -> dict:
    """Per raw name and layer, a against the reference b, in float64 over fully loaded tensors:
    cos, |a - b| / |b|, |a| / |b|, the fraction of equal elements, max |a - b|."""
    out = {}
    for name, x in a.items():
        if not name.startswith("model.layers."):
            continue
        L, rest = name[len("model.layers."):].split(".", 1)
        x, y = np.asarray(x, np.float64), np.asarray(b[name], np.float64)
        out[(rest, int(L))] = {"drift_cos": float((x * y).sum() / math.sqrt((x * x).sum() * (y * y).sum())),
                               "drift_rel_change": float(np.sqrt(((x - y) ** 2).sum() / (y * y).sum())),
                               "drift_norm_ratio": float(np.sqrt((x * x).sum() / (y * y).sum())),
                               "drift_frac_equal": float((x == y).mean()),
                               "drift_max_abs_diff": float(np.abs(x - y).max())}
    return out


def test_table_against_float64(offline, tmp_path):
    cache, commits = offline
    table = tmp_path / "t.csv"
    result = sweep(REPO, revisions=r"step\d+", out_dir=tmp_path / "out", table=table, jobs=2)
    with open(table, newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    rows = read_table(table)
    assert rows == list(result.rows())
    assert {r[7] for r in rows} == {"cos", "resid_norm", "scalar_fit", "norm", "drift_cos", "drift_rel_change",
                                    "drift_norm_ratio", "drift_frac_equal", "drift_max_abs_diff"}
    assert [e.checkpoint for e in result.entries] == [f"{REPO}@{n}" for n in ORDER]
    raw = {f: info.raw for f, info in result.scan(0).main.families.items()}
    src = tmp_path / "src"
    ref_tensors = load_all(src / "step0")
    checked = 0
    for name in ORDER:
        mine = [r for r in rows if r[0] == f"{REPO}@{name}"]
        assert {(r[1], r[2]) for r in mine} == {(name, commits[name])}
        tensors = load_all(src / name)
        norms, cos = reference(tensors)
        drift = _drift64(tensors, ref_tensors)
        for _, _, _, stack, fam, L, L_next, metric, value in mine:
            assert stack == "model.layers"
            r = raw[fam]
            if metric == "norm":
                assert L_next is None and value == pytest.approx(norms[r][L], rel=1e-6)
            elif metric == "cos":
                assert L_next == L + 1 and abs(value - cos[r][L]) < 1e-6  # as test_scan
            elif metric == "resid_norm":
                assert value == pytest.approx(math.sqrt(max(2 - 2 * cos[r][L], 0)), abs=1e-5)
            elif metric == "scalar_fit":
                assert value == pytest.approx(math.sqrt(max(1 - cos[r][L] ** 2, 0)), abs=1e-5)
            elif metric.startswith("drift_"):
                want = drift[(r, L)][metric]
                assert L_next is None and abs(value - want) < 1e-6 * max(1, abs(want)), (name, fam, L, metric)
            checked += 1
        has_drift = any(r[7].startswith("drift_") for r in mine)
        assert has_drift == (name != "step0")  # the reference has no drift against itself
    assert checked == len(rows)
    # The drift grows with the step: the run's weights move away from step0.
    mean_rel = [np.mean([r[8] for r in rows if r[0].endswith("@" + n) and r[7] == "drift_rel_change"])
                for n in ORDER[1:]]
    assert mean_rel == sorted(mean_rel)


def test_parquet_table_equals_csv(offline, tmp_path):
    pytest.importorskip("pyarrow")
    out = tmp_path / "out"
    a = sweep(REPO, revisions=r"step\d+", out_dir=out, table=tmp_path / "t.csv", jobs=1)
    a.write_table(tmp_path / "t.parquet")
    assert read_table(tmp_path / "t.parquet") == read_table(tmp_path / "t.csv")
    import pyarrow.parquet as pq

    schema = pq.read_schema(tmp_path / "t.parquet")
    assert tuple(schema.names) == COLUMNS
    assert str(schema.field("L_next").type) == "int64" and str(schema.field("value").type) == "double"


def test_references(tmp_path):
    dirs = training_run(tmp_path / "src", steps=("step0", "step1000", "step3000"))
    models = [str(d) for d in dirs.values()]
    out = tmp_path / "out"
    prev = sweep(models, out_dir=out, reference="previous", jobs=1)
    assert [e.reference for e in prev.entries] == [None, models[0], models[1]]
    last = sweep(models, out_dir=out, reference="last", jobs=1)
    assert [e.reference for e in last.entries] == [models[2], models[2], None]
    assert not set(last.computed) & {e.scan_file for e in last.entries}  # the scans were done already
    other = sweep(models[1:], out_dir=out, reference=models[0], jobs=1)
    assert [e.reference for e in other.entries] == [models[0], models[0]]
    # Drift against the first checkpoint, named or implied, is the same file.
    first = sweep(models, out_dir=out, jobs=1)
    assert [e.drift_file for e in first.entries[1:]] == [e.drift_file for e in other.entries]
    assert first.drift(models[2]) == other.drift(models[2]) != []


def test_hub_and_local_of_the_same_checkpoint(offline, tmp_path):
    """A hub revision is keyed by its commit, a path by its files: both scanned, same numbers."""
    r = sweep([f"{REPO}@step1000", str(tmp_path / "src" / "step1000")], out_dir=tmp_path / "o", jobs=1)
    a, b = (list(r.scan(i).rows()) for i in range(2))
    assert a == b and r.entries[0].scan_file != r.entries[1].scan_file
    assert r.entries[1].reference == f"{REPO}@step1000"  # another source, the same content: no drift at all
    unchanged = {"cos": 1.0, "rel_change": 0.0, "norm_ratio": 1.0, "frac_equal": 1.0, "max_abs_diff": 0.0}
    drift = [(m, v) for *_, m, v in r.drift(1) if v is not None]
    assert drift and all(v == unchanged[m] for m, v in drift)


# --- the store: reruns and kills -------------------------------------------------------------------

def test_rerun_recomputes_nothing_and_touches_nothing(offline, tmp_path):
    out = tmp_path / "out"
    first = sweep(REPO, revisions=r"step\d+", out_dir=out, jobs=1)
    assert len(first.computed) == 5 + 4 and not first.reused
    files = sorted(out.iterdir())
    before = {p: p.stat().st_mtime_ns for p in files}
    time.sleep(0.02)
    again = sweep(REPO, revisions=r"step\d+", out_dir=out, jobs=1)
    assert again.computed == [] and sorted(again.reused) == files
    assert {p: p.stat().st_mtime_ns for p in sorted(out.iterdir())} == before
    assert list(again.rows()) == list(first.rows())
    # Other options are other results; the budget and the workers are not.
    assert sweep(REPO, revisions=r"step\d+", out_dir=out, max_memory="512M", jobs=2).computed == []
    more = sweep(REPO, revisions=r"step\d+", out_dir=out, jobs=1, layers="0:2")
    assert len(more.computed) == 9


def test_local_checkpoint_changed_on_disk_is_recomputed(tmp_path):
    dirs = training_run(tmp_path / "src", steps=("step0", "step1000"))
    models = [str(d) for d in dirs.values()]
    out = tmp_path / "out"
    sweep(models, out_dir=out, jobs=1)
    shard = dirs["step1000"] / "model.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    again = sweep(models, out_dir=out, jobs=1)
    assert sorted(p.name[:5] for p in again.computed) == ["drift", "scan-"]  # step1000's scan and drift


def test_leftover_temp_files_are_ignored_then_cleaned(tmp_path):
    dirs = training_run(tmp_path / "src", steps=("step0", "step1000"))
    out = tmp_path / "out"
    out.mkdir()
    old = out / ".scan-0123.json.abc.tmp"
    fresh = out / ".scan-4567.json.def.tmp"
    for p in (old, fresh):
        p.write_text('{"schema": "layerdiff.sweep.scan/1", "trunc')
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    sweep([str(d) for d in dirs.values()], out_dir=out, jobs=1)
    assert not old.exists() and fresh.exists()  # a fresh one may be a live writer's


SWEEP_SLOW = """
import sys, time
import layerdiff.sweep.store as store
save = store.Store.save
def slow(self, path, doc):
    save(self, path, doc)
    time.sleep(0.4)
store.Store.save = slow
from layerdiff.cli import main
sys.argv = ["layerdiff", *sys.argv[1:]]
main()
"""


def test_sigkill_halfway_resumes_without_partial_files(tmp_path):
    steps = tuple(f"step{i * 1000}" for i in range(6))
    dirs = training_run(tmp_path / "src", steps=steps)
    models = [str(d) for d in dirs.values()]
    out = tmp_path / "out"
    args = ["sweep", *models, "--out-dir", str(out), "--jobs", "1", "--quiet"]
    p = subprocess.Popen([sys.executable, "-c", SWEEP_SLOW, *args])
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.json"))) < 4:
            assert p.poll() is None and time.monotonic() < deadline, "the sweep ended before it was killed"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    done = {f: f.stat().st_mtime_ns for f in out.glob("*.json")}
    assert 4 <= len(done) < 11
    r = run_cli(*args, "--table", str(tmp_path / "t.csv"))
    assert r.returncode == 0, r.stderr
    assert {f: f.stat().st_mtime_ns for f in done} == done  # finished files untouched
    assert len(list(out.glob("*.json"))) == 11 and not list(out.glob(".*.tmp"))
    fresh = sweep(models, out_dir=tmp_path / "fresh", table=tmp_path / "fresh.csv", jobs=1)
    assert read_table(tmp_path / "t.csv") == read_table(tmp_path / "fresh.csv") == list(fresh.rows())


# --- errors, the CLI -------------------------------------------------------------------------------

def test_cli_sweep_offline_revisions(offline, tmp_path):
    cache, _ = offline
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = run_cli("sweep", REPO, "--revisions", r"step\d+", "--out-dir", str(tmp_path / "o"), "--table",
                str(tmp_path / "t.csv"), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # not a tty: no progress bar
    assert "5 checkpoints; 9 results computed, 0 reused" in r.stdout
    r = run_cli("sweep", REPO, "--revisions", r"step\d+", "--out-dir", str(tmp_path / "o"), env=env)
    assert "0 results computed, 9 reused" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--table", "t.xlsx"], "t.xlsx: the table format comes from the file name"),
    (["--reference", "/no/such/ckpt"], "/no/such/ckpt: no such file or directory"),
    (["--revisions", "step("], "--revisions: 'step(' is not a regular expression"),
    (["--dask", "tcp://127.0.0.1:9"], "--dask: cannot reach the scheduler at tcp://127.0.0.1:9 within 5 s"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    dirs = training_run(tmp_path / "src", steps=("step0",))
    r = run_cli("sweep", str(dirs["step0"]), "--out-dir", str(tmp_path / "o"), *args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerdiff: error: ") and message in lines[0], r.stderr


def test_rank_and_gram_add_their_metrics(tmp_path):
    dirs = training_run(tmp_path / "src", steps=("step0", "step50000"))
    r = sweep([str(d) for d in dirs.values()], out_dir=tmp_path / "o", rank=True, gram=True, jobs=1)
    metrics = {row[7] for row in r.rows()}
    assert {"resid_eff_rank", "resid_spec_entropy", "resid_stable_rank", "gram_cos"} <= metrics
    assert {"drift_delta_eff_rank", "drift_delta_stable_rank", "drift_gram_cos"} <= metrics
    with pytest.raises(SelectionError, match="no_such: this layerdiff's scan has no such option"):
        sweep(str(dirs["step0"]), out_dir=tmp_path / "o", no_such=1)


def test_missing_extras_are_one_line_errors(monkeypatch, tmp_path):
    import importlib.util

    from layerdiff.sweep.run import _dask_modules
    from layerdiff.sweep.table import check_table_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pyarrow" else real(n, *a))
    with pytest.raises(OutputError, match=r"needs pyarrow: pip install 'layerdiff\[parquet\]'"):
        check_table_path(tmp_path / "t.parquet")
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(LayerdiffError, match=r"dask: needs dask.distributed: pip install 'layerdiff\[dask\]'"):
        _dask_modules()


def test_out_dir_may_not_be_inside_a_checkpoint(tmp_path):
    dirs = training_run(tmp_path / "src", steps=("step0",))
    with pytest.raises(LayerdiffError, match="refusing to write into the checkpoint directory"):
        sweep(str(dirs["step0"]), out_dir=dirs["step0"] / "sweep")
    with pytest.raises(LayerdiffError, match="refusing to write into the checkpoint directory"):
        sweep(str(dirs["step0"]), out_dir=dirs["step0"])


def test_api_exports():
    assert callable(layerdiff.sweep)
    importlib.import_module("layerdiff.sweep.run")  # the package may be the attribute now: still callable

    assert callable(layerdiff.sweep) and layerdiff.SweepResult is layerdiff.sweep.SweepResult


# --- the plot --------------------------------------------------------------------------------------

def test_plot(offline, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from layerdiff.sweep.plot import make_figure

    png = tmp_path / "sweep.png"
    result = sweep(REPO, revisions=r"step\d+", out_dir=tmp_path / "o", plot=png, jobs=1)
    img = imread(png)
    assert img.shape[0] > 500 and img.shape[1] > 1000 and img[..., :3].std() > 0.05
    fig = make_figure(result)
    ax_cos, ax_rel, ax_heat = fig.axes[:3]
    assert [t.get_text() for t in ax_cos.get_xticklabels()] == ["step0 (ref)", *ORDER[1:]]
    assert len(ax_cos.get_lines()) == 11  # every family of the main stack
    heat = np.ma.filled(ax_heat.get_images()[0].get_array().astype(float), np.nan)
    assert heat.shape == (5, 4) and np.isnan(heat[0]).all() and not np.isnan(heat[1:]).any()
    assert (np.diff(heat[1:], axis=0) > 0).all()  # later steps drift further, at every layer
