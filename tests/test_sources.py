"""MODEL argument -> files: local layouts, their errors, and repo ids from a real-layout hub cache (offline)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, qwen3_like, run_cli, write_checkpoint

from layerdiff.errors import LayerdiffError
from layerdiff.checkpoint.index import load_index
from layerdiff.checkpoint.sources import resolve

_spec = importlib.util.spec_from_file_location("hubcache", FIXTURES / "hubcache.py")
hubcache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hubcache)
make_hub_cache = hubcache.make_hub_cache

CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 3}


@pytest.fixture
def tensors(rng):
    return qwen3_like(rng, layers=3, hidden=32, ff=48)


# --- local paths -----------------------------------------------------------------------------------

def test_directory_with_model_safetensors(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "ckpt", tensors, config=CONFIG)
    src = resolve(str(folder))
    assert (src.kind, src.root, src.files, src.index_file) == ("dir", folder, [folder / "model.safetensors"], None)
    assert src.config == CONFIG and src.repo_id is None and src.revision is None and src.commit is None
    assert set(load_index(src.files, src.index_file).tensors) == set(tensors)


def test_directory_with_index_and_shards(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "ckpt", tensors, shards=3)
    src = resolve(str(folder))
    assert (src.kind, src.index_file, src.config) == ("dir", folder / "model.safetensors.index.json", None)
    index = load_index(src.files, src.index_file)
    assert set(index.tensors) == set(tensors)
    assert sorted(s.path for s in index.shards) == sorted(folder.glob("model-*-of-00003.safetensors"))


def test_custom_index_name(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "ckpt", tensors, shards=2)
    custom = folder / "pytorch_model-foo.safetensors.index.json"
    (folder / "model.safetensors.index.json").rename(custom)
    src = resolve(str(folder))
    assert src.index_file == custom
    assert set(load_index(src.files, src.index_file).tensors) == set(tensors)


def test_standard_index_wins_over_other_index_files(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "ckpt", tensors, shards=2)
    (folder / "other.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "nowhere.safetensors"}}))
    assert resolve(str(folder)).index_file == folder / "model.safetensors.index.json"


def test_model_safetensors_wins_over_other_single_files(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "ckpt", tensors)
    write_checkpoint(tmp_path / "other", {"x": tensors["model.norm.weight"]})
    (tmp_path / "other" / "model.safetensors").rename(folder / "extra.safetensors")
    assert resolve(str(folder)).files == [folder / "model.safetensors"]


def test_single_file_and_index_file_paths(tmp_path, tensors):
    single = write_checkpoint(tmp_path / "one", tensors, config=CONFIG) / "model.safetensors"
    src = resolve(str(single))
    assert (src.kind, src.root, src.files, src.index_file, src.config) == ("file", single.parent, [single], None, CONFIG)

    index_file = write_checkpoint(tmp_path / "many", tensors, shards=2) / "model.safetensors.index.json"
    src = resolve(str(index_file))
    assert (src.kind, src.root, src.files, src.index_file) == ("file", index_file.parent, [], index_file)
    assert set(load_index(src.files, src.index_file).tensors) == set(tensors)


def test_a_lone_shard_of_a_sharded_checkpoint_can_be_named(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "ckpt", tensors, shards=2)
    shard = folder / "model-00001-of-00002.safetensors"
    src = resolve(str(shard))
    assert src.files == [shard] and src.index_file is None


def _layout(kind: str, tmp: Path, tensors) -> tuple[Path, str]:
    """Build one broken local layout; return (MODEL argument, the path the error must name)."""
    ckpt = tmp / "ckpt"
    if kind == "nonexistent-dir":
        return tmp / "does" / "not" / "exist", str(tmp / "does" / "not" / "exist")
    if kind == "nonexistent-file":
        return tmp / "missing.safetensors", str(tmp / "missing.safetensors")
    if kind == "no-weights":
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps(CONFIG))
        (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x02")
        return ckpt, str(ckpt)
    if kind == "two-files-no-index":
        write_checkpoint(ckpt, tensors, shards=2).joinpath("model.safetensors.index.json").unlink()
        return ckpt, str(ckpt)
    if kind == "two-indexes":
        write_checkpoint(ckpt, tensors, shards=2).joinpath("model.safetensors.index.json").rename(ckpt / "a.safetensors.index.json")
        (ckpt / "b.safetensors.index.json").write_text((ckpt / "a.safetensors.index.json").read_text())
        return ckpt, str(ckpt)
    if kind == "not-safetensors-file":
        ckpt.mkdir()
        (ckpt / "weights.bin").write_bytes(b"\0" * 64)
        return ckpt / "weights.bin", str(ckpt / "weights.bin")
    if kind in ("config-invalid-json", "config-not-object"):
        write_checkpoint(ckpt, tensors)
        (ckpt / "config.json").write_text('{"model_type": "qwen3",' if kind == "config-invalid-json" else "[1, 2]")
        return ckpt, str(ckpt / "config.json")
    raise AssertionError(kind)


LOCAL_ERRORS = [
    ("nonexistent-dir", "no such file or directory"),
    ("nonexistent-file", "no such file or directory"),
    ("no-weights", "no .safetensors weights in this directory"),
    ("two-files-no-index", "2 .safetensors files but no *.safetensors.index.json to join them"),
    ("two-indexes", "several index files (a.safetensors.index.json, b.safetensors.index.json); name one of them"),
    ("not-safetensors-file", "not a .safetensors file, an index or a checkpoint directory"),
    ("config-invalid-json", "not valid JSON"),
    ("config-not-object", "not a JSON object"),
]


def assert_one_line_error(proc, where: str, problem: str) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"layerdiff: error: {where}: "), lines[0]
    assert problem in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("kind, problem", LOCAL_ERRORS, ids=[k for k, _ in LOCAL_ERRORS])
def test_local_errors(tmp_path, tensors, kind, problem):
    model, where = _layout(kind, tmp_path, tensors)
    with pytest.raises(LayerdiffError) as err:
        resolve(str(model))
    assert (err.value.where, problem in err.value.problem) == (where, True), str(err.value)
    assert_one_line_error(run_cli("inspect", str(model)), where, problem)


def test_revision_is_refused_for_a_local_path(tmp_path, tensors):
    folder = write_checkpoint(tmp_path / "ckpt", tensors)
    assert_one_line_error(run_cli("inspect", str(folder), "--revision", "main"), str(folder),
                          "--revision applies to hub repo ids, not to local paths")


# --- hub cache -------------------------------------------------------------------------------------

REPO = "org/tiny-qwen3"


def offline_env(**hf: str) -> dict:
    """The test's environment without any HF_* setting of the host, offline, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", **hf)
    return env


def tree(root: Path) -> dict[str, tuple]:
    """Every entry under root with what a write would change (symlinks as links, not their targets)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, os.readlink(p) if p.is_symlink() else None)
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache holding REPO at three commits: main (sharded), tag v1 (single file), and a detached one."""
    base = tmp_path_factory.mktemp("hub")
    sharded = write_checkpoint(base / "src-main", qwen3_like(np.random.default_rng(1), layers=3, hidden=32, ff=48),
                               shards=2, config=CONFIG)
    single = write_checkpoint(base / "src-v1", qwen3_like(np.random.default_rng(2), layers=4, hidden=32, ff=48),
                              config={**CONFIG, "num_hidden_layers": 4})
    detached = write_checkpoint(base / "src-detached", qwen3_like(np.random.default_rng(3), layers=2, hidden=32, ff=48),
                                config={**CONFIG, "num_hidden_layers": 2})
    cache = base / "hf-home" / "hub"
    commits = {
        "main": make_hub_cache(cache, REPO, sharded),
        "v1": make_hub_cache(cache, REPO, single, revision_names=("v1",)),
        "detached": make_hub_cache(cache, REPO, detached, revision_names=()),
    }
    # A second repo whose snapshot lost a shard: the cached tree listing says it is incomplete.
    broken = make_hub_cache(cache, "org/broken", sharded)
    (cache / "models--org--broken" / "snapshots" / broken / "model-00002-of-00002.safetensors").unlink()
    return {"cache": cache, "home": cache.parent, "commits": commits, "src": {"main": sharded, "v1": single}}


@pytest.fixture
def unchanged(hub):
    """Fails the test if anything under the hub cache or HF_HOME was added, removed or modified."""
    before = tree(hub["home"])
    yield
    assert tree(hub["home"]) == before


def inspect_json(*args: str, env: dict) -> dict:
    proc = run_cli("inspect", *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_resolved(doc: dict, hub: dict, revision: str, commit_key: str) -> None:
    commit = hub["commits"][commit_key]
    snapshot = hub["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit
    src = doc["source"]
    assert (src["kind"], src["repo_id"], src["revision"], src["commit"]) == ("hub", REPO, revision, commit)
    assert Path(src["root"]) == snapshot
    files = [Path(s["file"]) for s in doc["shards"]]
    assert files and all(f.parent == snapshot for f in files)
    blobs = snapshot.parent.parent / "blobs"
    for f, s in zip(files, doc["shards"]):
        assert f.is_symlink() and Path(os.path.realpath(f)).parent == blobs  # the cache's own layout, untouched
        assert s["bytes"] == os.stat(f).st_size


@pytest.mark.parametrize("revision, commit_key", [
    (None, "main"), ("main", "main"), ("v1", "v1"), ("commit:main", "main"), ("commit:detached", "detached"),
])
def test_repo_id_by_revision(hub, unchanged, revision, commit_key):
    args = [REPO]
    if revision is not None:
        args += ["--revision", hub["commits"][revision[7:]] if revision.startswith("commit:") else revision]
    doc = inspect_json(*args, env=offline_env(HF_HUB_CACHE=str(hub["cache"])))
    shown = args[-1] if revision else "main"
    check_resolved(doc, hub, shown, commit_key)
    layers = {"main": 3, "v1": 4, "detached": 2}[commit_key]
    assert doc["stacks"]["model.layers"]["layers"] == [0, layers - 1]
    src = hub["src"].get(commit_key)
    if src is not None:
        assert sorted(Path(s["file"]).name for s in doc["shards"]) == sorted(p.name for p in src.glob("*.safetensors"))


def test_cache_found_through_hf_home(hub, unchanged):
    check_resolved(inspect_json(REPO, env=offline_env(HF_HOME=str(hub["home"]))), hub, "main", "main")


def test_cache_dir_option_beats_the_environment(hub, unchanged, tmp_path):
    env = offline_env(HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    doc = inspect_json(REPO, "--revision", "v1", "--cache-dir", str(hub["cache"]), env=env)
    check_resolved(doc, hub, "v1", "v1")
    assert not (tmp_path / "empty-cache").exists()


def test_text_output_names_repo_revision_and_commit(hub, unchanged):
    proc = run_cli("inspect", REPO, "--revision", "v1", env=offline_env(HF_HUB_CACHE=str(hub["cache"])))
    assert proc.returncode == 0, proc.stderr
    assert f"repo {REPO}  revision v1  commit {hub['commits']['v1']}" in proc.stdout


def test_scan_from_the_cache_writes_only_the_output(hub, unchanged, tmp_path):
    out = tmp_path / "result.json"
    proc = run_cli("scan", REPO, "--out", str(out), "--quiet", "--jobs", "1",
                   env=offline_env(HF_HUB_CACHE=str(hub["cache"])))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["source"]["commit"] == hub["commits"]["main"]
    assert os.listdir(tmp_path) == ["result.json"]


def test_scan_refuses_to_write_into_the_cache(hub, unchanged):
    snapshot = hub["cache"] / f"models--{REPO.replace('/', '--')}" / "snapshots" / hub["commits"]["main"]
    for out in (snapshot / "out.json", hub["cache"] / f"models--{REPO.replace('/', '--')}" / "out.json"):
        proc = run_cli("scan", REPO, "--out", str(out), "--quiet", env=offline_env(HF_HUB_CACHE=str(hub["cache"])))
        assert_one_line_error(proc, str(out), "refusing to write into the checkpoint directory or the hub cache")


HUB_ERRORS = [
    # args,                                       the error names,  problem text
    (["org/not-cached"],                          "org/not-cached", "not in the hub cache at {cache}, and HF_HUB_OFFLINE is set"),
    ([REPO, "--revision", "v2"],                  REPO,             "revision 'v2' is not in the hub cache at {cache} (cached revisions: main, v1)"),
    ([REPO, "--revision", "0" * 40],              REPO,             f"revision '{'0' * 40}' is not in the hub cache at {{cache}}"),
    ([REPO, "--revision", "../../refs/main"],     REPO,             "--revision '../../refs/main' is not a branch, tag or commit name"),
    ([REPO, "--revision", ""],                    REPO,             "--revision '' is not a branch, tag or commit name"),
    (["org/broken"],                              "org/broken",     "is incomplete (files are missing), and HF_HUB_OFFLINE is set"),
    (["org--bad/na..me"],                         "org--bad/na..me", "not a path and not a valid repo id"),
]


@pytest.mark.parametrize("args, where, problem", HUB_ERRORS, ids=[" ".join(a) for a, _, _ in HUB_ERRORS])
def test_hub_errors(hub, unchanged, args, where, problem):
    proc = run_cli("inspect", *args, env=offline_env(HF_HUB_CACHE=str(hub["cache"])))
    assert_one_line_error(proc, where, problem.format(cache=hub["cache"]))


def test_not_cached_names_the_hf_home_cache(hub, unchanged):
    proc = run_cli("inspect", "org/not-cached", env=offline_env(HF_HOME=str(hub["home"])))
    assert_one_line_error(proc, "org/not-cached", f"not in the hub cache at {hub['cache']}, and HF_HUB_OFFLINE is set")


def test_not_cached_with_a_missing_cache_dir_creates_nothing(hub, tmp_path):
    missing = tmp_path / "no-cache-here"
    proc = run_cli("inspect", REPO, "--cache-dir", str(missing), env=offline_env(HF_HUB_CACHE=str(hub["cache"])))
    assert_one_line_error(proc, REPO, f"not in the hub cache at {missing}, and HF_HUB_OFFLINE is set")
    assert not missing.exists()


def test_unreadable_path_is_a_clean_error():
    name = "a" * 300  # longer than any file name the file system allows
    with pytest.raises(LayerdiffError, match="cannot read: File name too long"):
        resolve(name)
    assert_one_line_error(run_cli("inspect", name, env=offline_env()), name, "cannot read: File name too long")
