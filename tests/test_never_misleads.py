"""Output that never misleads (issue 14): what was not computed, not stored or not counted is
said so, and every number shown is checked against safetensors / numpy over the loaded fixture."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, load_all, run_cli, write_checkpoint
from safetensors import safe_open

HF = FIXTURES / "hf"


def stored_names(folder: Path) -> set[str]:
    out: set[str] = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="numpy") as h:
            out |= set(h.keys())
    return out


def inspect_json(folder: Path) -> dict:
    proc = run_cli("inspect", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# --- 1. values not computed print as `-`, are null in JSON ------------------------------------------


def summary_rows(text: str) -> dict[str, list[str]]:
    block = text.split("=== Per-family summary", 1)[1].split("\n===", 1)[0]
    return {cells[0]: cells[1:] for line in block.splitlines()[4:] if len(cells := line.split()) == 7}


def test_scan_without_rank_or_gram_prints_dashes_and_writes_nulls(tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("scan", str(HF / "bert"), "--jobs", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    st = doc["stacks"]["encoder.layer"]
    t = load_all(HF / "bert")
    q = [t[f"encoder.layer.{L}.attention.self.query.weight"] for L in range(5)]
    rows = summary_rows(proc.stdout)
    assert set(rows) == set(st["summary"]) and len(rows) == 16
    for fam, cells in rows.items():
        assert cells[-1] == "-", (fam, cells)  # mean_SE: no --rank
        assert st["summary"][fam]["mean_SE"] is None and st["summary"][fam]["mean_gram_cos"] is None
    # the values that were computed are the real ones
    want = np.mean([cos(q[L], q[L + 1]) for L in range(4)])
    assert float(rows["q_proj"][0]) == pytest.approx(want, abs=1e-4)
    for p in st["pairs"]:
        fams = p["families"]
        assert fams["q_proj"]["cos"] == pytest.approx(cos(q[p["L"]], q[p["L"] + 1]), abs=1e-9)
        assert all(s["resid_eff_rank"] is None and s["gram_cos"] is None for s in fams.values())
    assert "0.0000" not in "".join(c[-1] for c in rows.values())
    assert "Gram cosine" not in proc.stdout and "effective rank" not in proc.stdout


def test_scan_rank_leaves_1d_families_as_dashes(tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli("scan", str(HF / "bert"), "--jobs", "1", "--rank", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    st = json.loads(out.read_text())["stacks"]["encoder.layer"]
    rows = summary_rows(proc.stdout)
    for fam, cells in rows.items():
        matrix = len(st["families"][fam]["shape"]) == 2
        assert (cells[-1] != "-") == matrix, (fam, cells)
        assert (st["summary"][fam]["mean_SE"] is not None) == matrix


def test_diff_text_prints_dashes_for_ranks_of_1d_tensors(tmp_path):
    t = load_all(HF / "bert")
    rng = np.random.default_rng(5)
    b = {k: (v + rng.uniform(0, 2) * v.std() * rng.standard_normal(v.shape).astype(v.dtype)) if v.dtype.kind == "f"
         else v for k, v in t.items()}
    write_checkpoint(tmp_path / "b", b)
    proc = run_cli("diff", str(HF / "bert"), str(tmp_path / "b"), "--rank", "--jobs", "1", "--out", str(tmp_path / "d.json"))
    assert proc.returncode == 0, proc.stderr
    d = json.loads((tmp_path / "d.json").read_text())
    for name, row in d["tensors"].items():
        a64, b64 = t[name].astype(np.float64), b[name].astype(np.float64)
        assert row["rel_change"] == pytest.approx(np.linalg.norm(b64 - a64) / np.linalg.norm(a64), rel=1e-6)
        assert (row["delta_rank_90"] is None) == (t[name].ndim < 2)
    lines = proc.stdout.split("=== Most changed tensors", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert {len(t[line.split()[0]].shape) for line in lines} == {1, 2}  # both kinds are listed
    for line in lines:
        name, *cells = line.split()
        assert (cells[-3:] == ["-", "-", "-"]) == (t[name].ndim < 2), line



def test_sweep_table_has_no_rows_for_values_not_computed(tmp_path):
    import csv

    table = tmp_path / "t.csv"
    proc = run_cli("sweep", str(HF / "bert"), str(HF / "mpnet"), "--out-dir", str(tmp_path / "d"), "--table", str(table),
                   "--quiet", "--jobs", "1")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(table.open()))
    assert rows and all(r["value"] != "" for r in rows)  # never an empty value standing for 0
    metrics = {r["metric"] for r in rows}
    assert "cos" in metrics and not metrics & {"resid_eff_rank", "resid_spec_entropy", "resid_stable_rank", "gram_cos"}
    t = load_all(HF / "bert")
    q = {int(r["L"]): float(r["value"]) for r in rows
         if r["checkpoint"] == str(HF / "bert") and r["family"] == "q_proj" and r["metric"] == "cos"}
    want = {L: cos(t[f"encoder.layer.{L}.attention.self.query.weight"], t[f"encoder.layer.{L + 1}.attention.self.query.weight"])
            for L in range(4)}
    assert q == pytest.approx(want, abs=1e-9)

# --- 2. tied embeddings: only with a head class and the config's flag --------------------------------


HEADS = ("lm_head.weight", "embed_out.weight")


@pytest.mark.parametrize("name", ["bert", "mpnet", "vit", "clip", "modernbert", "qwen2", "gemma", "llama", "gpt_neox"])
def test_tied_only_when_the_config_says_so_for_a_class_with_a_head(name):
    folder = HF / name
    config = json.loads((folder / "config.json").read_text())
    flag = config.get("tie_word_embeddings")
    base = all(c.endswith("Model") and not c.endswith("LMHeadModel") for c in config["architectures"])
    head = [n for n in stored_names(folder) if n.endswith(HEADS)]
    emb = inspect_json(folder)["embeddings"]
    assert emb["tied"] is (flag is True and not base)
    assert emb["output_head"] == (head[0] if head else None)
    text = run_cli("inspect", str(folder)).stdout
    line = next(x for x in text.splitlines() if x.startswith("embeddings: "))
    if emb["tied"]:
        assert line.startswith("embeddings: tied: ") and config["architectures"][0] in line and "config.json" in line
    elif head:
        assert line == f"embeddings: untied: output head {head[0]} is stored (matched by name)"
    else:
        assert line.startswith("embeddings: no output head stored (nothing to tie)")
        if base and flag is True:  # BERT, MPNet: the flag is true, but the class has no head
            assert f"{config['architectures'][0]} is a base model class" in line


def test_no_config_and_no_head_is_not_guessed_tied(tmp_path, rng):
    t = {"model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
         "model.layers.0.mlp.up_proj.weight": rng.standard_normal((8, 8)).astype(np.float32),
         "model.layers.1.mlp.up_proj.weight": rng.standard_normal((8, 8)).astype(np.float32)}
    emb = inspect_json(write_checkpoint(tmp_path / "c", t))["embeddings"]
    assert emb["tied"] is False and emb["note"].endswith("; no config.json")


# --- 4. fused families: the part's shape next to the stored tensor's ----------------------------------


def _fused_parts(name: str, t: dict[str, np.ndarray], L: int) -> dict[str, tuple[str, np.ndarray]]:
    """family -> (raw name, the part as transformers slices it), from the config."""
    c = json.loads((HF / name / "config.json").read_text())
    h = c.get("hidden_size") or c["n_embd"]
    if name == "phi3":
        hd = h // c["num_attention_heads"]
        q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
        qkv, gu = t[f"model.layers.{L}.self_attn.qkv_proj.weight"], t[f"model.layers.{L}.mlp.gate_up_proj.weight"]
        i = c["intermediate_size"]
        return {"q_proj": ("self_attn.qkv_proj.weight", qkv[:q]), "k_proj": ("self_attn.qkv_proj.weight", qkv[q:q + kv]),
                "v_proj": ("self_attn.qkv_proj.weight", qkv[q + kv:]), "gate_proj": ("mlp.gate_up_proj.weight", gu[:i]),
                "up_proj": ("mlp.gate_up_proj.weight", gu[i:])}
    if name == "modernbert":
        qkv, wi = t[f"model.layers.{L}.attn.Wqkv.weight"], t[f"model.layers.{L}.mlp.Wi.weight"]
        i = c["intermediate_size"]
        return {"q_proj": ("attn.Wqkv.weight", qkv[:h]), "k_proj": ("attn.Wqkv.weight", qkv[h:2 * h]),
                "v_proj": ("attn.Wqkv.weight", qkv[2 * h:]), "gate_proj": ("mlp.Wi.weight", wi[:i]),
                "up_proj": ("mlp.Wi.weight", wi[i:])}
    w = t[f"transformer.h.{L}.attn.c_attn.weight"]  # gpt2 Conv1D [in, out]: q/k/v are column thirds
    return {f: ("attn.c_attn.weight", w[:, k * h:(k + 1) * h]) for k, f in enumerate(("q_proj", "k_proj", "v_proj"))}


@pytest.mark.parametrize("name,stack", [("phi3", "model.layers"), ("modernbert", "model.layers"),
                                        ("gpt2", "transformer.h")])
def test_fused_families_give_their_part_shape_in_the_scan_json(tmp_path, name, stack):
    out = tmp_path / "r.json"
    assert run_cli("scan", str(HF / name), "--jobs", "1", "--quiet", "--out", str(out)).returncode == 0
    st = json.loads(out.read_text())["stacks"][stack]
    t = load_all(HF / name)
    for L in (1, 2):
        for fam, (raw, part) in _fused_parts(name, t, L).items():
            info = st["families"][fam]
            assert info["raw"] == raw and info["shape"] == list(t[f"{stack}.{L}.{raw}"].shape)
            assert info["part_shape"] == list(part.shape), fam
            norm = float(np.linalg.norm(part.astype(np.float64)))
            assert st["scales"][fam][st["layers"].index(L)] == pytest.approx(norm, rel=1e-6)
    fused = {raw for raw, _ in _fused_parts(name, t, 1).values()}
    assert all(("part_shape" in i) == (i["raw"] in fused) for f, i in st["families"].items() if not f.endswith(".bias"))


# --- 5. run.bytes_mapped covers every pass ------------------------------------------------------------


def layer_bytes(folder: Path, prefix: str) -> tuple[int, dict[str, list[int]]]:
    """Bytes of the 1-D layer tensors, and per 2-D raw name the bytes of each layer's tensor (safetensors' offsets)."""
    one, two = 0, {}
    for f in folder.glob("*.safetensors"):
        n = int.from_bytes(f.read_bytes()[:8], "little")
        for name, e in json.loads(f.read_bytes()[8:8 + n]).items():
            if name.startswith(prefix) and name != "__metadata__":
                size = e["data_offsets"][1] - e["data_offsets"][0]
                if len(e["shape"]) == 1:
                    one += size
                else:
                    two.setdefault(name.split(".", 3)[3], []).append(size)
    return one, two


@pytest.mark.parametrize("flags", [["--rank"], ["--gram"], ["--rank", "--gram"]])
def test_bytes_mapped_adds_the_rank_and_gram_passes(tmp_path, flags):
    out = tmp_path / "r.json"
    assert run_cli("scan", str(HF / "bert"), "--quiet", "--out", str(out), *flags).returncode == 0
    run = json.loads(out.read_text())["run"]
    one, two = layer_bytes(HF / "bert", "encoder.layer.")
    pairs = sum(2 * (len(v) - 1) * v[0] for v in two.values())  # each pair reads both layers
    matrices = sum(sum(v) for v in two.values())
    rank = matrices + pairs  # --rank: a norm pass over every layer, then each pair
    chain = one if "--rank" in flags else one + matrices  # --rank takes the 2-D chain
    want = chain + (rank if "--rank" in flags else 0) + (pairs if "--gram" in flags else 0)
    assert run["bytes_analysed"] == one + matrices
    assert run["bytes_mapped"] == want == sum(run["bytes_mapped_by_pass"].values())
    assert run["bytes_mapped_by_pass"].get("rank", 0) == (rank if "--rank" in flags else 0)
    assert run["bytes_mapped_by_pass"].get("gram", 0) == (pairs if "--gram" in flags else 0)


def test_bytes_mapped_counts_a_fused_parts_whole_rows(tmp_path):
    """phi3's q/k/v parts are row ranges of qkv_proj: the rank pass reads each part's rows, at least."""
    out = tmp_path / "r.json"
    assert run_cli("scan", str(HF / "phi3"), "--quiet", "--rank", "--out", str(out)).returncode == 0
    run = json.loads(out.read_text())["run"]
    one, two = layer_bytes(HF / "phi3", "model.layers.")
    assert run["bytes_mapped_by_pass"]["chain"] == one
    assert run["bytes_mapped"] >= one + run["rank_bytes_decoded"] >= one + sum(2 * (len(v) - 1) * v[0] for v in two.values())


# --- 6. tables grouped matrices, norms, biases; the PCA over matrices and norms -----------------------


def header_families(text: str, title: str) -> list[str]:
    """The family columns of a printed table, over all its blocks."""
    block = text.split(title, 1)[1].split("\n===", 1)[0]
    return [f for line in block.splitlines() if line.split()[:1] == ["L"] for f in line.split()[1:]]


def pca_reference(norms: dict[str, list[float]]) -> np.ndarray:
    """Singular values of the log scale track centred per family, the all-zero last mode dropped."""
    m = np.log(np.array(list(norms.values())))
    s = np.linalg.svd(m - m.mean(axis=1, keepdims=True), compute_uv=False)
    return s[s > 1e-10 * s.max()]


@pytest.mark.parametrize("biases", [False, True])
def test_tables_group_matrices_norms_biases_and_the_pca_leaves_biases_out(tmp_path, biases):
    out = tmp_path / "r.json"
    proc = run_cli("scan", str(HF / "bert"), "--out", str(out), *(["--pca-biases"] if biases else []))
    assert proc.returncode == 0, proc.stderr
    st = json.loads(out.read_text())["stacks"]["encoder.layer"]
    t = load_all(HF / "bert")
    shapes = {f: t[f"encoder.layer.0.{i['raw']}"].shape for f, i in st["families"].items()}
    kind = {f: 2 if f.endswith(".bias") else 0 if len(s) == 2 else 1 for f, s in shapes.items()}
    for title in ("=== Adjacent-layer raw cos-sim", "=== Scale track"):
        cols = header_families(proc.stdout, title)
        assert sorted(cols) == sorted(st["families"]) and [kind[f] for f in cols] == sorted(kind[f] for f in cols)
    assert all(len(line) <= 160 for line in proc.stdout.splitlines())
    norms = {f: [float(np.linalg.norm(t[f"encoder.layer.{L}.{i['raw']}"].astype(np.float64))) for L in range(5)]
             for f, i in st["families"].items() if biases or kind[f] < 2}
    pca = st["pca"]
    assert sorted(pca["fam_used"]) == sorted(norms)
    assert pca["left_out_biases"] == ([] if biases else sorted(f for f in st["families"] if kind[f] == 2))
    want = pca_reference({f: norms[f] for f in pca["fam_used"]})
    assert len(want) == 4 and pca["singvals"] == pytest.approx(want.tolist(), rel=1e-6)  # 5 layers: 4 modes
    assert pca["explained"] == pytest.approx((want**2 / (want**2).sum()).tolist(), rel=1e-6)
    note = "over matrices, norms and biases (--pca-biases)" if biases else "over matrices and norms; biases left out: 8"
    assert note in proc.stdout


# --- 8. the README's accuracy claim, per family kind and dtype ---------------------------------------


def raw_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor decoded from the bytes its header points at (ml_dtypes for bf16/fp8)."""
    import ml_dtypes

    dtypes = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "BOOL": np.bool_}
    out = {}
    for f in folder.glob("*.safetensors"):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        for name, e in json.loads(raw[8:8 + n]).items():
            if name != "__metadata__":
                a, b = e["data_offsets"]
                out[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtypes[e["dtype"]]).reshape(e["shape"])
    return out


def dequantised(t: dict[str, np.ndarray], name: str) -> np.ndarray:
    w = t[name].astype(np.float64)
    scale = t.get(name[: -len("weight")] + "weight_scale_inv")
    if scale is not None:  # one scale per 128 x 128 block
        w = w * np.kron(scale.astype(np.float64), np.ones((128, 128)))[: w.shape[0], : w.shape[1]]
    return w


ACCURACY = {"F32": 1e-12, "F64": 1e-12, "BF16": 2e-8, "F16": 2e-8, "F8_E4M3": 2e-8, "F8_E5M2": 2e-8}


@pytest.mark.parametrize("name", ["hf/bert", "hf/gpt2", "hf/qwen2", "hf/mistral", "hf/mbart", "st/fp8_block",
                                  "st/dtypes"])
def test_cosines_and_norms_are_as_accurate_as_the_readme_says(name):
    import layerdiff

    folder = FIXTURES / name
    result = layerdiff.scan(str(folder), jobs=1)
    t = raw_tensors(folder)
    seen = set()
    for sname, st in result.stacks.items():
        for fam, info in st.families.items():
            if info.part_shape is not None or info.experts is not None:
                continue  # parts and expert sums: test_archs slices them
            kind = "bias" if fam.endswith(".bias") else "matrix" if len(info.shape) >= 2 else "norm"
            tol = ACCURACY[info.dtype]
            w = {L: dequantised(t, f"{sname}.{L}.{info.raw}") for L in st.layers if f"{sname}.{L}.{info.raw}" in t}
            for i, L in enumerate(st.layers):
                if st.scales[fam][i]:
                    assert st.scales[fam][i] == pytest.approx(np.linalg.norm(w[L]), rel=tol), (fam, L)
            for p in st.pairs:
                if fam in p.families:
                    assert abs(p.families[fam]["cos"] - cos(w[p.L], w[p.L_next])) <= tol, (fam, p.L)
                    seen.add((info.dtype, kind))
    assert seen  # something of this fixture was compared


# --- 9. inspect --json lists every tensor: where its bytes are, what it maps to -----------------------


LAYER_NAME = re.compile(r"^(?P<stack>.+?)\.(?P<layer>0|[1-9]\d{0,8})\.(?P<rest>.+)$")


@pytest.mark.parametrize("name", ["hf/bert", "hf/phi3", "hf/granitemoe", "st/fp8_block", "st/dtypes"])
def test_inspect_json_lists_every_tensor_with_offsets_and_mapping(name):
    import struct

    folder = FIXTURES / name
    doc = inspect_json(folder)
    got = {t["name"]: t for t in doc["tensors"]}
    assert len(got) == len(doc["tensors"])
    want = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        with safe_open(str(f), framework="numpy") as h:
            assert set(h.keys()) == set(header)
            for k, e in header.items():
                sl = h.get_slice(k)
                assert (sl.get_dtype(), sl.get_shape()) == (e["dtype"], e["shape"])
                a, b = 8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1]
                want[k] = {"file": str(f), "dtype": e["dtype"], "shape": e["shape"], "data_offsets": e["data_offsets"],
                           "file_offsets": [a, b]}
                if not e["dtype"].startswith("F8"):  # the absolute offsets hold the tensor safetensors reads
                    ref = h.get_tensor(k)
                    assert np.array_equal(np.frombuffer(raw[a:b], ref.dtype).reshape(ref.shape), ref)
    assert set(got) == set(want)
    for k, w in want.items():
        assert {x: got[k][x] for x in w} == w, k
        m = LAYER_NAME.match(k)
        t = got[k]
        if m is None:
            assert (t["stack"], t["layer"], t["families"], t["not_analysed"]) == (None, None, [], "not a layer tensor")
            continue
        assert t["stack"].split("[")[0] == m["stack"] and t["layer"] == int(m["layer"])
        st = doc["stacks"][t["stack"]]
        for fam in t["families"]:  # the family the tensor maps to has this tensor as its raw name
            assert st["families"][fam["family"]]["raw"] == m["rest"]
            assert fam["part"] == st["families"][fam["family"]]["part"]
        if not t["families"]:
            assert t["not_analysed"], k  # a scale, a buffer no table analyses, a refused format: said why
        elif w["dtype"] in ("I64", "BOOL"):
            assert t["not_analysed"] == f"{w['dtype']} is not a floating-point dtype"
        else:
            assert t["not_analysed"] is None
    fused = [t for t in got.values() if len(t["families"]) > 1]
    assert (len(fused) > 0) == (name in ("hf/phi3", "hf/granitemoe"))


# --- 7. the plot: a panel per kind, a style per line, the real path and table in the title ------------


def test_plot_has_panels_per_kind_distinct_styles_and_says_where_and_what(tmp_path):
    pytest.importorskip("matplotlib")
    from layerdiff.present.plot import make_figure
    from layerdiff.result import ScanResult

    out = tmp_path / "r.json"
    assert run_cli("scan", str(HF / "bert"), "--quiet", "--rank", "--out", str(out)).returncode == 0
    result = ScanResult.from_json(out)
    st = result.stacks["encoder.layer"]
    fig = make_figure(result)
    axes = {ax.get_label(): ax for ax in fig.axes}
    assert set(axes) == {f"{p}:{k}" for p in ("cos", "scale") for k in ("matrices", "norms", "biases")} | {"rank", "pca"}
    t = load_all(HF / "bert")
    drawn = set()
    for k, test in (("matrices", lambda f: len(st.families[f].shape) == 2), ("biases", lambda f: f.endswith(".bias")),
                    ("norms", lambda f: len(st.families[f].shape) == 1 and not f.endswith(".bias"))):
        for panel in ("cos", "scale"):
            ax = axes[f"{panel}:{k}"]
            fam_lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
            assert [ln.get_label() for ln in fam_lines] == [f for f in st.families if test(f)]
            styles = [(ln.get_color(), ln.get_marker(), ln.get_linestyle()) for ln in fam_lines]
            assert len(set(styles)) == len(styles)  # every line its own style
            drawn |= {ln.get_label() for ln in fam_lines}
    assert drawn == set(st.families)  # nothing dropped
    qb = next(ln for ln in axes["cos:biases"].get_lines() if ln.get_label() == "q_proj.bias")
    want = [cos(t[f"encoder.layer.{L}.attention.self.query.bias"], t[f"encoder.layer.{L + 1}.attention.self.query.bias"])
            for L in range(4)]
    assert list(qb.get_ydata()) == pytest.approx(want, abs=1e-9)
    title = fig._suptitle.get_text()
    assert str(HF / "bert") in title and "model_type bert" in title and "table bert (matched by model_type bert)" in title


def test_plot_of_40_families_gives_each_line_its_own_style(tmp_path, rng):
    pytest.importorskip("matplotlib")
    from layerdiff.present.plot import make_figure
    from layerdiff.result import ScanResult

    t = {f"model.layers.{L}.blk.w{i:02d}.weight": rng.standard_normal((8, 8)).astype(np.float32)
         for L in range(3) for i in range(40)}
    out = tmp_path / "r.json"
    assert run_cli("scan", str(write_checkpoint(tmp_path / "c", t)), "--quiet", "--out", str(out)).returncode == 0
    fig = make_figure(ScanResult.from_json(out))
    for ax in fig.axes:
        fam_lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
        styles = {(ln.get_color(), ln.get_marker(), ln.get_linestyle()) for ln in fam_lines}
        assert len(styles) == len(fam_lines) == (40 if ax.get_label() in ("cos:matrices", "scale:matrices") else 0)
    assert fig._supxlabel is None  # nothing left out, so no note
