"""Trajectories across depth, from a scan result: four panels in one image.

  cos-sim per family (null references 0 and 1 dashed) | residual effective rank per family
  scale track |W|_F per family (log y)                | PCA of the log scale track (explained variance)

One colour per family in every panel; 1-D families (norm weights, biases) are
drawn dashed. matplotlib is an optional extra (`pip install 'layerdiff[plot]'`)
and is imported only here, with the Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import Any

from ..errors import LayerdiffError, SelectionError
from ..output import atomic
from ..result import Pair, ScanResult, StackResult
from .heatmaps import diff_figure, matrix_count, scan_heatmaps

FORMATS = {".png": "png", ".svg": "svg"}
_EXPERT = re.compile(r"(^|\.)experts\.\d+\.")  # a per-expert family (its aggregate has no number)
MAX_FAMILIES = 16  # more lines than this are unreadable: per-expert families give way to their aggregate


MISSING = "matplotlib is not installed: pip install 'layerdiff[plot]'"


def _require_matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise LayerdiffError("plot", MISSING) from None
    return matplotlib


def check_plot_path(path: Path) -> str:
    """The image format from the suffix, and matplotlib present: checked before any scan.

    Only looked up, not imported: an import here would grow the resident memory
    the scan plans its budget from (and every forked worker's)."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise LayerdiffError(path, "the plot format comes from the file name: use a .png or .svg suffix")
    if importlib.util.find_spec("matplotlib") is None:
        raise LayerdiffError("plot", MISSING)
    return fmt


def _stack(result: ScanResult, stack: str | None) -> tuple[str, StackResult]:
    stacks = result.stacks
    if not stacks:
        raise LayerdiffError("plot", "not a layerdiff scan result (no 'stacks')")
    name = stack or result.main_stack or next(iter(stacks))
    if name not in stacks:
        raise SelectionError("stack", f"no stack {name!r} in the result (it has: {', '.join(stacks)})")
    return name, stacks[name]


def _families(st: StackResult) -> tuple[list[str], int]:
    """Families to draw, in the result's order; per-expert families give way to
    their all-experts aggregate when there are too many lines."""
    fams = list(st.families)
    if len(fams) <= MAX_FAMILIES:
        return fams, 0
    aggregates = [f for f in fams if st.families[f].experts is not None]
    members = {f for f in fams if _EXPERT.search(f)} if aggregates else set()
    keep = [f for f in fams if f not in members][:MAX_FAMILIES]
    return keep, len(fams) - len(keep)


def _is_matrix(st: StackResult, fam: str) -> bool:
    return len(st.families[fam].shape) >= 2


def make_figure(result: ScanResult | dict[str, Any], stack: str | None = None) -> Any:
    """The 2x2 figure (a matplotlib Figure, not attached to any window), with heatmaps
    below when the result has all-pairs matrices or gram_cos."""
    if isinstance(result, dict):
        result = ScanResult.from_dict(result)
    _require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    name, st = _stack(result, stack)
    fams, hidden = _families(st)
    pairs = st.pairs
    xs = [pr.L for pr in pairs]
    colors = _colors(len(fams))
    extras = bool(st.all_pairs) or any(s.get("gram_cos") is not None for pr in pairs for s in pr.families.values())
    if extras:  # --all-pairs / --gram: heatmaps below the four panels, in the same image
        low = max(4, len(st.families) * 0.18) + 2.3 * matrix_count(st)
        fig = Figure(figsize=(16, 9.5 + low), layout="constrained")
        main, below = fig.subfigures(2, 1, height_ratios=[9.5, low])
        scan_heatmaps(below, st)
    else:
        fig = main = Figure(figsize=(14, 9.5), layout="constrained")
    ax_cos, ax_rank, ax_scale, ax_pca = main.subplots(2, 2).ravel()

    def series(fam: str, key: str) -> list[float]:
        out = []
        for pr in pairs:
            s = pr.families.get(fam)
            v = s.get(key) if s is not None else None
            out.append(float("nan") if v is None else float(v))
        return out

    # 1. cosine per family
    ax_cos.axhline(1.0, color="0.35", linestyle="--", linewidth=1.0, label="_null: identical up to scale (1)")
    ax_cos.axhline(0.0, color="0.35", linestyle=":", linewidth=1.0, label="_null: orthogonal (0)")
    for fam, c in zip(fams, colors):
        y = series(fam, "cos")
        if any(not math.isnan(v) for v in y):
            ax_cos.plot(xs, y, marker="o", markersize=3, color=c, label=fam,
                        linestyle="-" if _is_matrix(st, fam) else "--")
    ax_cos.set_title("Adjacent-layer cosine similarity (dashed: 1 = same up to scale, dotted: 0 = orthogonal)",
                     fontsize=9)
    ax_cos.set_xlabel("layer pair L \u2192 L+1")
    ax_cos.set_ylabel("cos(W_L, W_L+1)")
    lo = min([0.0] + [v for fam in fams for v in series(fam, "cos") if not math.isnan(v)])
    ax_cos.set_ylim(min(-0.05, lo - 0.05), 1.05)

    # 2. residual effective rank per family
    ranked = [(f, c) for f, c in zip(fams, colors) if any(not math.isnan(v) for v in series(f, "resid_eff_rank"))]
    if ranked:
        values = []
        for fam, c in ranked:
            y = series(fam, "resid_eff_rank")
            values += [v for v in y if not math.isnan(v) and v > 0]
            ax_rank.plot(xs, y, marker="o", markersize=3, color=c, label=fam)
            bounds = [_get(pr, fam, "resid_rank_bounds") for pr in pairs]
            if any(bounds):
                lo_b = [b["eff_rank"][0] if b else float("nan") for b in bounds]
                hi_b = [b["eff_rank"][1] if b else float("nan") for b in bounds]
                ax_rank.fill_between(xs, lo_b, hi_b, color=c, alpha=0.15, linewidth=0)
                values += [v for v in lo_b + hi_b if not math.isnan(v) and v > 0]
        if values and max(values) / max(min(values), 1e-300) > 20:
            ax_rank.set_yscale("log")
        any_bounds = any(_get(pr, f, "resid_rank_bounds") for f, _ in ranked for pr in pairs)
        ax_rank.set_title("Residual effective rank exp(H), H = spectral entropy of W_L+1/|W_L+1| - W_L/|W_L|"
                          + (" (bands: sketch bounds)" if any_bounds else ""), fontsize=9)
    else:
        ax_rank.text(0.5, 0.5, "residual spectra not computed\n(run: layerdiff scan MODEL --rank)",
                     ha="center", va="center", transform=ax_rank.transAxes, fontsize=11, color="0.4")
        ax_rank.set_title("Residual effective rank exp(H)", fontsize=9)
    ax_rank.set_xlabel("layer pair L \u2192 L+1")
    ax_rank.set_ylabel("effective rank of the residual")

    # 3. scale track
    layers = st.layers
    for fam, c in zip(fams, colors):
        y = [float("nan") if v is None or v <= 0 else float(v) for v in st.scales.get(fam, [])]
        if y and any(not math.isnan(v) for v in y):
            ax_scale.plot(layers[: len(y)], y, marker="o", markersize=3, color=c, label=fam,
                          linestyle="-" if _is_matrix(st, fam) else "--")
    ax_scale.set_yscale("log")
    ax_scale.set_title("Scale track: Frobenius norm per family across layers (log scale)", fontsize=9)
    ax_scale.set_xlabel("layer L")
    ax_scale.set_ylabel("||W_L||_F")

    # 4. PCA of the log scale track
    pca = st.pca
    explained = [100.0 * float(v) for v in pca.get("explained", [])]
    if explained:
        modes = list(range(1, len(explained) + 1))
        bars = ax_pca.bar(modes, explained, color="#4c72b0")
        for b, v in zip(bars, explained):
            ax_pca.annotate(f"{v:.1f}%", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax_pca.set_xticks(modes)
        ax_pca.set_ylim(0, max(explained) * 1.12 + 1)
    else:
        ax_pca.text(0.5, 0.5, "no PCA (fewer than one complete family)", ha="center", va="center",
                    transform=ax_pca.transAxes, color="0.4")
    used = pca.get("fam_used", [])
    ax_pca.set_title(f"PCA of the log scale track over {len(used)} families: explained variance per mode", fontsize=9)
    ax_pca.set_xlabel("mode")
    ax_pca.set_ylabel("explained variance (%)")

    for ax in (ax_cos, ax_rank, ax_scale):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    ax_pca.grid(True, axis="y", alpha=0.3)
    # One legend entry per family drawn in any panel (a family with a single layer has no cosine).
    drawn = {ln.get_label() for ax in (ax_cos, ax_rank, ax_scale) for ln in ax.get_lines()}
    handles = [Line2D([], [], color=c, marker="o", markersize=3, linestyle="-" if _is_matrix(st, f) else "--")
               for f, c in zip(fams, colors) if f in drawn]
    labels = [f for f in fams if f in drawn]
    if hidden:
        labels = labels + [f"(+{hidden} more families not drawn)"]
        handles = handles + [_blank(ax_cos)]
    main.legend(handles, labels, loc="outside right center", fontsize=8, title="family", title_fontsize=9)
    model = result.model or result.source.get("spec") or "model"
    arch = _label(result, name)
    model = model.encode("utf-8", "backslashreplace").decode("utf-8")  # a path that is not UTF-8
    fig.suptitle(f"{model} \u2014 stack {name} ({len(layers)} layers{', ' + arch if arch else ''})", fontsize=12)
    return fig


def _label(result: ScanResult, stack: str) -> str | None:
    """The config's model_type and the table that named the stack: never another architecture's name alone."""
    labels = result.labels
    per = labels.get("stacks") if isinstance(labels.get("stacks"), dict) else {}
    table = per[stack].get("table") if isinstance(per.get(stack), dict) else result.architecture
    model_type = labels.get("model_type")
    if isinstance(model_type, str) and isinstance(table, str) and model_type != table:
        return f"{model_type}, table {table}"
    return table if isinstance(table, str) else None


def _blank(ax: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((0, 0), 0, 0, fill=False, edgecolor="none", visible=False)


def _colors(n: int) -> list[Any]:
    """Distinct colours: tab10, then Dark2 and Set1 (tab20's light/dark pairs look alike)."""
    from matplotlib import colormaps

    pool = [c for name in ("tab10", "Dark2", "Set1") for c in colormaps[name].colors]
    return [pool[i % len(pool)] for i in range(n)]


def plot_diff(result: Any, path: Path) -> None:
    """Render a diff result's heatmaps to `path` (.png or .svg), atomically."""
    path = Path(path)
    fmt = check_plot_path(path)
    matplotlib = _require_matplotlib()
    fig = diff_figure(result)
    with atomic(path, "wb") as f, matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(f, format=fmt, dpi=110)


def _get(pair: Pair, family: str, key: str) -> Any:
    s = pair.families.get(family)
    return s.get(key) if s is not None else None


def plot_result(result: ScanResult | dict[str, Any], path: Path, stack: str | None = None) -> None:
    """Render `result` to `path` (.png or .svg), atomically (temp file + rename)."""
    path = Path(path)
    fmt = check_plot_path(path)
    matplotlib = _require_matplotlib()
    fig = make_figure(result, stack)
    with atomic(path, "wb") as f, matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text
        fig.savefig(f, format=fmt, dpi=110)
