"""layerdiff plot / scan --plot: real images from real scan results, inspected."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import pytest
from conftest import EXAMPLE, FIXTURES, qwen3_like, run_cli, write_checkpoint

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from layerdiff.errors import LayerdiffError  # noqa: E402
from layerdiff.checkpoint.index import load_index  # noqa: E402
from layerdiff.layout import build_layout  # noqa: E402
from layerdiff.present.plot import make_figure, plot_result  # noqa: E402
from conftest import scan_layout as scan
from layerdiff.options import ScanOptions  # noqa: E402
from layerdiff.checkpoint.sources import resolve  # noqa: E402


def example_result(rank: str | None = "exact") -> dict:
    source = resolve(str(EXAMPLE))
    layout = build_layout(load_index(source.files, source.index_file), source.config)
    return {"model": "layerdiff-example", **scan(layout, ScanOptions(rank=rank))}


def lines(ax) -> list[Line2D]:
    return [x for x in ax.get_lines()]


def panel(fig, label: str):
    """An axes of the scan figure by its label: cos:<kind>, scale:<kind> (matrices, norms, biases), rank, pca."""
    return next(ax for ax in fig.axes if ax.get_label() == label)


def test_figure_has_panels_per_kind_with_one_line_per_family():
    result = example_result()
    st = result["stacks"]["model.layers"]
    fams = list(st["families"])  # 11: 7 matrices, 4 norm vectors
    ranked = [f for f in fams if st["families"][f]["shape"].__len__() == 2]
    norms = [f for f in fams if f not in ranked]
    fig = make_figure(result)
    assert sorted(ax.get_label() for ax in fig.axes) == ["cos:matrices", "cos:norms", "pca", "rank", "scale:matrices",
                                                        "scale:norms"]  # no biases here: no bias panels
    for k, members in (("matrices", ranked), ("norms", norms)):
        ax_cos, ax_scale = panel(fig, f"cos:{k}"), panel(fig, f"scale:{k}")
        # cosines: a line per family of the kind plus the two null references at 1 and 0
        refs = [ln for ln in lines(ax_cos) if ln.get_label().startswith("_")]
        assert sorted(float(ln.get_ydata()[0]) for ln in refs) == [0.0, 1.0]
        assert [ln.get_label() for ln in lines(ax_cos) if ln not in refs] == members
        assert [t.get_text() for t in ax_cos.get_legend().get_texts()] == members
        # scale track on a log axis, one line per family over all layers
        assert ax_scale.get_yscale() == "log" and [ln.get_label() for ln in lines(ax_scale)] == members
        assert all(len(ln.get_xdata()) == len(st["layers"]) for ln in lines(ax_scale))
    # the data drawn are the result's numbers
    q = next(ln for ln in lines(panel(fig, "cos:matrices")) if ln.get_label() == "q_proj")
    assert list(q.get_xdata()) == [pr["L"] for pr in st["pairs"]]
    assert list(q.get_ydata()) == pytest.approx([pr["families"]["q_proj"]["cos"] for pr in st["pairs"]])
    # effective rank: one line per 2-D family
    ax_rank = panel(fig, "rank")
    assert sorted(ln.get_label() for ln in lines(ax_rank)) == sorted(ranked)
    up = next(ln for ln in lines(ax_rank) if ln.get_label() == "up_proj")
    assert list(up.get_ydata()) == pytest.approx([pr["families"]["up_proj"]["resid_eff_rank"] for pr in st["pairs"]])
    # PCA: one bar per mode, heights = explained variance in percent
    heights = [p.get_height() for p in panel(fig, "pca").patches]
    assert heights == pytest.approx([100 * x for x in st["pca"]["explained"]])
    for ax in fig.axes:  # labelled
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    assert "layerdiff-example" in fig._suptitle.get_text() and "model.layers" in fig._suptitle.get_text()


def test_png_and_svg_are_valid_images(tmp_path):
    result = example_result()
    png, svg = tmp_path / "t.png", tmp_path / "t.svg"
    plot_result(result, png)
    plot_result(result, svg)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(png)
    h, w = image.shape[:2]
    assert image.ndim == 3 and w > 1200 and h > 800 and w > h
    assert image[..., :3].std() > 0.05  # not a blank canvas
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    for fam in ("q_proj", "down_proj", "k_norm"):
        assert fam in text  # the legend, as text (svg.fonttype none) or as path ids
    assert not list(tmp_path.glob(".*.tmp"))


def test_without_rank_the_panel_says_how_to_get_it():
    fig = make_figure(example_result(rank=None))
    ax_rank = panel(fig, "rank")
    assert lines(ax_rank) == []
    assert any("--rank" in t.get_text() for t in ax_rank.texts)


def test_sketch_bounds_are_drawn_as_bands(tmp_path, rng):
    write_checkpoint(tmp_path, qwen3_like(rng, layers=4))
    source = resolve(str(tmp_path))
    layout = build_layout(load_index(source.files, source.index_file), source.config)
    result = scan(layout, ScanOptions(rank="sketch", sketch=8))
    fig = make_figure(result)
    ax_rank = panel(fig, "rank")
    assert len(lines(ax_rank)) == 7 and len(ax_rank.collections) == 7
    assert "sketch bounds" in ax_rank.get_title()


def test_other_stack_and_errors(tmp_path):
    result = example_result()
    with pytest.raises(LayerdiffError, match="no stack 'vision'"):
        make_figure(result, "vision")
    with pytest.raises(LayerdiffError, match=r"\.png or \.svg"):
        plot_result(result, tmp_path / "t.jpg")
    with pytest.raises(LayerdiffError, match="not a layerdiff scan result"):
        make_figure({"schema": "x"})


def test_cli_plot_and_scan_plot(tmp_path, rng):
    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng, layers=4),
                            config={"model_type": "qwen3", "num_hidden_layers": 4})
    out, png, svg = tmp_path / "r.json", tmp_path / "a.png", tmp_path / "b.svg"
    proc = run_cli("scan", str(ckpt), "--rank", "--out", str(out), "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert imread(png).shape[2] in (3, 4)
    proc = run_cli("plot", str(out), "-o", str(svg))
    assert proc.returncode == 0, proc.stderr
    assert ET.parse(svg).getroot().tag.endswith("svg")
    doc = json.loads(out.read_text())
    assert str(ckpt) in svg.read_text() or doc["model"]  # title carries the model name
    bad = run_cli("plot", str(out), "-o", str(tmp_path / "c.pdf"))
    assert bad.returncode == 1 and "use a .png or .svg suffix" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("scan", str(ckpt), "--plot", str(ckpt / "p.png"))
    assert bad.returncode == 1 and "refusing to write into the checkpoint" in bad.stderr


def test_missing_matplotlib_is_a_clear_error(tmp_path, rng):
    # A matplotlib that cannot be imported, first on the path.
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    import os

    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = tmp_path / "r.json"
    result.write_text(json.dumps(example_result(rank=None)))
    proc = run_cli("plot", str(result), "-o", str(tmp_path / "x.png"), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "layerdiff: error: plot: matplotlib is not installed: pip install 'layerdiff[plot]'"
    ckpt = write_checkpoint(tmp_path / "ckpt", qwen3_like(rng))
    out = tmp_path / "scan.json"
    proc = run_cli("scan", str(ckpt), "--plot", str(tmp_path / "x.png"), "--out", str(out), env=env)
    assert proc.returncode == 1 and "pip install 'layerdiff[plot]'" in proc.stderr
    assert not out.exists() and not (tmp_path / "x.png").exists()


def test_rank_lines_skip_pairs_without_a_value():
    result = example_result()
    st = result["stacks"]["model.layers"]
    st["pairs"][1]["families"]["q_proj"]["resid_eff_rank"] = None
    fig = make_figure(result)
    q = next(ln for ln in panel(fig, "rank").get_lines() if ln.get_label() == "q_proj")
    assert math.isnan(q.get_ydata()[1])


def test_many_experts_give_way_to_their_aggregate():
    from conftest import FIXTURES

    source = resolve(str(FIXTURES / "hf" / "qwen3_moe"))
    layout = build_layout(load_index(source.files, source.index_file), source.config)
    result = scan(layout, ScanOptions(rank="exact"))
    fig = make_figure(result)
    labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert "experts.gate_proj" in labels and "router" in labels
    assert not any(lbl.startswith("experts.0.") for lbl in labels)
    note = fig._supxlabel.get_text()  # what is not drawn is named on the figure
    assert "not drawn (12 families): experts.{E}.down_proj (4 experts)" in note and "aggregates" in note


@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", 'not a layerdiff scan result (no "schema": "layerdiff.scan/1")'),
    ('{"model": "m", "pair_results": []}', 'not a layerdiff scan result (no "schema": "layerdiff.scan/1")'),
    ('{"schema": "layerdiff.scan/1", "stacks": {"s": {"families": 3}}}', "not a valid scan result"),
    ("{", "scan result is not valid JSON: "),
    ("[" * 100_000, "scan result is JSON nested too deeply"),
])
def test_cli_plot_of_something_else_is_a_clean_error(tmp_path, text, problem):
    pytest.importorskip("matplotlib")
    bad = tmp_path / "r.json"
    bad.write_text(text)
    proc = run_cli("plot", str(bad), "-o", str(tmp_path / "p.png"))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"layerdiff: error: {bad}: {problem}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.png").exists()


def test_heatmaps_of_all_pairs_and_gram_cos_name_every_family(tmp_path):
    import layerdiff
    from matplotlib.image import AxesImage

    result = layerdiff.scan(str(FIXTURES / "hf" / "qwen3_moe"), all_pairs=True, gram=True, max_memory="2G").to_dict()
    st = result["stacks"]["model.layers"]
    fig = make_figure(result)
    images = fig.findobj(AxesImage)
    matrices = len(st["all_pairs"]) + sum("gram_cos" in a for a in st["all_pairs"].values())
    assert len(images) == 2 + matrices  # cos and gram_cos grids, then the L x L matrices (cos, gram_cos)
    grid_axes = [im.axes for im in images[:2]]
    for ax, key in zip(grid_axes, ("cos", "gram_cos")):
        shown = {t.get_text() for t in ax.get_yticklabels()}
        with_value = {f for pr in st["pairs"] for f, s in pr["families"].items() if s.get(key) is not None}
        assert shown == with_value
        missing = set(st["families"]) - with_value
        assert all(f in ax.get_title() for f in list(missing)[:3]) or "in all" in ax.get_title()
    plot_result(result, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 50_000


def test_diff_heatmaps(tmp_path, rng):
    import layerdiff
    from matplotlib.image import AxesImage

    from layerdiff.present.heatmaps import diff_figure
    from layerdiff.present.plot import plot_diff

    r = layerdiff.diff(str(FIXTURES / "hf" / "qwen3"), str(FIXTURES / "hf" / "qwen3"), max_memory="2G")
    fig = diff_figure(r)
    assert len(fig.findobj(AxesImage)) == 2  # rel_change and cos per stack
    plot_diff(r, tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 20_000
