"""layerdiff sweep --dask: a real scheduler and two real workers on 127.0.0.1, against the local run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_cli
from sweep_helpers import REPO, hub_run, training_run

if importlib.util.find_spec("distributed") is None:  # looked up, not imported: 30 MiB more for every later test
    pytest.skip("needs layerdiff[dask]", allow_module_level=True)

import layerdiff  # noqa: E402
from layerdiff.sweep.table import read_table  # noqa: E402

DASK = str(Path(sys.executable).with_name("dask"))
START_TIMEOUT = 90
MEM = "1G"  # the client plans in this (pytest) process, whose resident memory grows over a suite run


def sweep(*args, **kwargs):
    kwargs.setdefault("max_memory", MEM)
    return layerdiff.sweep(*args, **kwargs)


def _stop(procs: list[subprocess.Popen]) -> None:
    """End the processes this fixture started (each leads its own process group: the worker's nanny
    and its worker process go together), politely first."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`dask scheduler` + 2 x `dask worker --nworkers 1 --nthreads 1`, as separate processes. The
    workers have their own view of the hub (HF_HUB_CACHE, offline), like machines of a cluster."""
    root = tmp_path_factory.mktemp("cluster")
    cache = root / "hub"
    commits = hub_run(cache, root / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    sched_file = root / "scheduler.json"
    procs: list[subprocess.Popen] = []
    logs = [open(root / f"{name}.log", "w") for name in ("scheduler", "worker1", "worker2")]
    try:
        procs.append(subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                       "--scheduler-file", str(sched_file)], env=env, stdout=logs[0],
                                      stderr=subprocess.STDOUT, start_new_session=True, cwd=root))
        deadline = time.monotonic() + START_TIMEOUT
        while not sched_file.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, (root / "scheduler.log").read_text()
            time.sleep(0.1)
        for log in logs[1:]:
            procs.append(subprocess.Popen([DASK, "worker", "--scheduler-file", str(sched_file), "--nworkers", "1",
                                           "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                          env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          cwd=root))
        from distributed import Client

        address = json.loads(sched_file.read_text())["address"]
        with Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=START_TIMEOUT)
        yield {"address": address, "cache": cache, "src": root / "src", "commits": commits, "env": env}
    finally:
        _stop(procs)
        for log in logs:
            log.close()


@pytest.fixture
def offline(cluster, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cluster["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cluster["cache"]))
    return cluster


def test_dask_table_equals_the_local_run(offline, tmp_path):
    """One task per checkpoint (5 scans, 4 drifts on 2 workers), read from the workers' own hub cache."""
    local = sweep(REPO, revisions=r"step\d+", out_dir=tmp_path / "local", table=tmp_path / "local.csv",
                            jobs=2)
    remote = sweep(REPO, revisions=r"step\d+", out_dir=tmp_path / "dask", table=tmp_path / "dask.csv",
                             dask=offline["address"])
    assert len(remote.computed) == 9
    assert read_table(tmp_path / "dask.csv") == read_table(tmp_path / "local.csv") == list(local.rows())
    again = sweep(REPO, revisions=r"step\d+", out_dir=tmp_path / "dask", dask=offline["address"])
    assert again.computed == [] and len(again.reused) == 9


def test_one_large_checkpoint_is_cut_into_segment_tasks(offline, tmp_path, monkeypatch):
    """Fewer pieces than twice the worker threads: each scan is cut into tasks over groups of segments,
    whose sums are added up here, giving the local numbers; the workers read the same local paths."""
    import layerdiff.sweep.run as run

    submitted = []

    class Spy:
        def __init__(self, client):
            self.client = client

        def submit(self, fn, *args, **kw):
            submitted.append(args[-1])
            return self.client.submit(fn, *args, **kw)

        def __getattr__(self, name):
            return getattr(self.client, name)

    connect = run._connect
    monkeypatch.setattr(run, "_connect", lambda address: Spy(connect(address)))
    a, b = str(offline["src"] / "step0"), str(offline["src"] / "step100000")
    local = sweep([a, b], out_dir=tmp_path / "local", table=tmp_path / "local.csv", jobs=1)
    remote = sweep([a, b], out_dir=tmp_path / "dask", table=tmp_path / "dask.csv",
                             dask=offline["address"])
    groups = [g for g in submitted if g is not None]
    assert len(groups) == 4 and submitted.count(None) == 1  # 2 scans cut in 2 (4 tasks wanted), the drift whole
    assert read_table(tmp_path / "dask.csv") == read_table(tmp_path / "local.csv")
    assert remote.scan(1).to_dict()["stacks"] == local.scan(1).to_dict()["stacks"]


def test_cli_dask_and_a_worker_that_sees_other_files(offline, tmp_path):
    # A local checkpoint changed after the client keyed it: the workers see other mtimes.
    dirs = training_run(tmp_path / "src", steps=("step0", "step1000"))
    r = run_cli("sweep", *map(str, dirs.values()), "--out-dir", str(tmp_path / "o"), "--dask", offline["address"],
                "--table", str(tmp_path / "t.csv"), env=offline["env"])
    assert r.returncode == 0, r.stderr
    assert "2 checkpoints; 3 results computed" in r.stdout
    import layerdiff.sweep.run as run
    from layerdiff.errors import LayerdiffError

    job = layerdiff.sweep.plan_sweep([str(d) for d in dirs.values()], out_dir=tmp_path / "o2", max_memory=MEM)
    shard = dirs["step1000"] / "model.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    with pytest.raises(LayerdiffError, match="the worker on .* sees other files than the client"):
        job.run(dask=offline["address"])
    assert run.DASK_TIMEOUT <= 10
