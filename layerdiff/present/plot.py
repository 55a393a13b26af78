"""Trajectories across depth, from a scan result: one image that drops nothing silently.

  cos-sim per family:  matrices | norms | biases   (null references 0 and 1 dashed)
  scale track |W|_F:   matrices | norms | biases   (log y)
  residual effective rank (matrices)  | PCA of the log scale track (explained variance)

Each kind of family has its own panels (a norm's cosine near 1 would flatten the
matrices' near 0). Every family keeps one style in every panel, a colour and a
marker (and a line style per ten colours), so 70 lines stay distinguishable;
per-expert families give way to their all-experts aggregate when there are many,
and whatever is not drawn is named on the figure. matplotlib is an optional extra
(`pip install 'layerdiff[plot]'`), imported only here, with the Agg canvas.
"""

from __future__ import annotations

import importlib.util
import math
import re
import textwrap
from pathlib import Path
from typing import Any

from ..errors import LayerdiffError, SelectionError
from ..layout.model import FAMILY_KINDS, family_kind
from ..output import atomic
from ..result import Pair, ScanResult, StackResult
from .heatmaps import diff_figure, matrix_count, scan_heatmaps

FORMATS = {".png": "png", ".svg": "svg"}
EXPERT = re.compile(r"(^|\.)experts\.\d+\.")  # a per-expert family (its aggregate has no number)
MAX_FAMILIES = 16  # more lines than this: per-expert families give way to their aggregate
MARKERS = ("o", "s", "^", "D", "v", "P", "X")  # 7 markers x 10 colours: 70 distinct styles
LINESTYLES = ("-", "--", "-.", ":")
MAX_LINES = len(MARKERS) * 10  # lines per panel before styles repeat: the rest are named, not drawn


MISSING = "matplotlib is not installed: pip install 'layerdiff[plot]'"


def require_matplotlib() -> Any:
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


def _families(st: StackResult) -> tuple[dict[str, list[str]], list[str]]:
    """Per kind, the families to draw, in the result's order, and those left out: per-expert
    families give way to their all-experts aggregate when there are many; past MAX_LINES in
    a panel, styles would repeat."""
    fams = list(st.families)
    if len(fams) > MAX_FAMILIES and any(st.families[f].experts is not None for f in fams):
        fams = [f for f in fams if not EXPERT.search(f)]
    by_kind = {k: [f for f in fams if kind(st, f) == k][:MAX_LINES] for k in FAMILY_KINDS}
    drawn = {f for v in by_kind.values() for f in v}
    return by_kind, [f for f in st.families if f not in drawn]


def kind(st: StackResult, fam: str) -> str:
    """matrices (2-D and up), norms (other 1-D weights) or biases."""
    return FAMILY_KINDS[family_kind(fam, len(st.families[fam].shape))]


def family_styles(fams: list[str]) -> dict[str, dict[str, Any]]:
    """One style per family of a panel: (colour, marker) pairs are distinct for the first
    MAX_LINES families; the line style changes every ten for a second cue."""
    colors = family_colors(10)
    return {f: {"color": colors[i % 10], "marker": MARKERS[i % len(MARKERS)],
                "linestyle": LINESTYLES[(i // 10) % len(LINESTYLES)]} for i, f in enumerate(fams)}


def _left_out_names(names: list[str]) -> str:
    """Names not drawn, per-expert ones collapsed to `experts.{E}.x (N experts)`."""
    groups: dict[str, int] = {}
    for f in names:
        key = EXPERT.sub(lambda m: f"{m.group(1)}experts.{{E}}.", f)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(k if "{E}" not in k else f"{k} ({n} experts)" for k, n in groups.items())


def _title(result: ScanResult, name: str, st: StackResult) -> str:
    """Where the weights are (the resolved path, and the repo and revision) and what named them."""
    src = result.source or {}
    where = str(src.get("root") or result.model or "model")
    if src.get("repo_id"):
        where = f"{src['repo_id']}@{src.get('revision')} ({where})"
    elif result.model and result.model != where:
        where = f"{result.model} ({where})"
    labels = result.labels or {}
    per = labels.get("stacks") if isinstance(labels.get("stacks"), dict) else {}
    named = per.get(name, {}).get("label") if isinstance(per.get(name), dict) else None
    arch = f"model_type {labels.get('model_type') or 'unknown'}; names: {named or result.architecture or 'raw'}"
    title = f"{where} \u2014 stack {name} ({len(st.layers)} layers) \u2014 {arch}"
    return title.encode("utf-8", "backslashreplace").decode("utf-8")  # a path that is not UTF-8


def make_figure(result: ScanResult | dict[str, Any], stack: str | None = None) -> Any:
    """The figure (a matplotlib Figure, not attached to any window), with heatmaps below
    when the result has all-pairs matrices or gram_cos."""
    if isinstance(result, dict):
        result = ScanResult.from_dict(result)
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    name, st = _stack(result, stack)
    by_kind, left_out = _families(st)
    styles = {f: style for k in FAMILY_KINDS for f, style in family_styles(by_kind[k]).items()}  # per kind: its panels
    kinds = [k for k in FAMILY_KINDS if by_kind[k]]
    pairs = st.pairs
    xs = [pr.L for pr in pairs]
    most = max((len(v) for v in by_kind.values()), default=0)
    width = 6.5 * max(len(kinds), 2) + 1.2 * max(1, math.ceil(most / 22))
    extras = bool(st.all_pairs) or any(s.get("gram_cos") is not None for pr in pairs for s in pr.families.values())
    if extras:  # --all-pairs / --gram: heatmaps below, in the same image
        low = max(4, len(st.families) * 0.18) + 2.3 * matrix_count(st)
        fig = Figure(figsize=(width, 13 + low), layout="constrained")
        main, below = fig.subfigures(2, 1, height_ratios=[13, low])
        scan_heatmaps(below, st)
    else:
        fig = main = Figure(figsize=(width, 13), layout="constrained")
    # A column per kind, wider by its legend's columns (22 names each); rank and PCA below.
    legend_cols = {k: max(1, math.ceil(len(by_kind[k]) / 22)) for k in kinds}
    top, bottom = main.subfigures(2, 1, height_ratios=[2, 1])
    grid = top.add_gridspec(2, len(kinds), width_ratios=[1 + 0.3 * legend_cols[k] for k in kinds])
    ax_cos = {k: top.add_subplot(grid[0, i]) for i, k in enumerate(kinds)}
    ax_scale = {k: top.add_subplot(grid[1, i]) for i, k in enumerate(kinds)}
    ax_rank, ax_pca = bottom.subplots(1, 2)
    for k in kinds:
        ax_cos[k].set_label(f"cos:{k}")
        ax_scale[k].set_label(f"scale:{k}")
    ax_rank.set_label("rank")
    ax_pca.set_label("pca")

    def series(fam: str, key: str) -> list[float]:
        out = []
        for pr in pairs:
            s = pr.families.get(fam)
            v = s.get(key) if s is not None else None
            out.append(float("nan") if v is None else float(v))
        return out

    def draw(ax: Any, x: list[int], y: list[float], fam: str) -> bool:
        if not any(not math.isnan(v) for v in y):
            return False
        ax.plot(x, y, markersize=4, linewidth=1.2, label=fam, **styles[fam])
        return True

    no_cos: list[str] = []
    for k in kinds:
        ax = ax_cos[k]
        ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.0, label="_null: identical up to scale (1)")
        ax.axhline(0.0, color="0.35", linestyle=":", linewidth=1.0, label="_null: orthogonal (0)")
        values = []
        for fam in by_kind[k]:
            y = series(fam, "cos")
            if not draw(ax, xs, y, fam):
                no_cos.append(fam)
            values += [v for v in y if not math.isnan(v)]
        ax.set_ylim(min(-0.05, min(values, default=0.0) - 0.05), 1.05)
        ax.set_title(f"Adjacent-layer cosine: {k} ({len(by_kind[k])} families)\n"
                     "dashed: 1 = same up to scale; dotted: 0 = orthogonal", fontsize=9)
        ax.set_xlabel("layer pair L \u2192 L+1")
        ax.set_ylabel("cos(W_L, W_L+1)")

        ax = ax_scale[k]
        for fam in by_kind[k]:
            y = [float("nan") if v is None or v <= 0 else float(v) for v in st.scales.get(fam, [])]
            draw(ax, st.layers[: len(y)], y, fam)
        # One legend per kind: every family drawn in either of its panels, in the result's order.
        drawn = {ln.get_label(): ln for a in (ax_scale[k], ax_cos[k]) for ln in a.get_lines()}
        shown = [f for f in by_kind[k] if f in drawn]
        ax_cos[k].legend([drawn[f] for f in shown], shown, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
                         ncol=legend_cols[k], title=k, title_fontsize=8, borderaxespad=0.0)
        ax.set_yscale("log")
        ax.set_title(f"Scale track: Frobenius norm of the {k}\nacross layers (log scale)", fontsize=9)
        ax.set_xlabel("layer L")
        ax.set_ylabel("||W_L||_F")

    ranked = [f for f in by_kind.get("matrices", []) if draw(ax_rank, xs, series(f, "resid_eff_rank"), f)]
    if ranked:
        values = [v for f in ranked for v in series(f, "resid_eff_rank") if not math.isnan(v) and v > 0]
        any_bounds = False
        for fam in ranked:
            bounds = [_get(pr, fam, "resid_rank_bounds") for pr in pairs]
            if any(bounds):
                any_bounds = True
                lo_b = [b["eff_rank"][0] if b else float("nan") for b in bounds]
                hi_b = [b["eff_rank"][1] if b else float("nan") for b in bounds]
                ax_rank.fill_between(xs, lo_b, hi_b, color=styles[fam]["color"], alpha=0.15, linewidth=0)
                values += [v for v in lo_b + hi_b if not math.isnan(v) and v > 0]
        if values and max(values) / max(min(values), 1e-300) > 20:
            ax_rank.set_yscale("log")
        ax_rank.set_title("Residual effective rank exp(H) of the matrices, H = spectral entropy of W_L+1/|W_L+1| - "
                          "W_L/|W_L|" + (" (bands: sketch bounds)" if any_bounds else ""), fontsize=9)
    else:
        ax_rank.text(0.5, 0.5, "residual spectra not computed\n(run: layerdiff scan MODEL --rank)",
                     ha="center", va="center", transform=ax_rank.transAxes, fontsize=11, color="0.4")
        ax_rank.set_title("Residual effective rank exp(H)", fontsize=9)
    ax_rank.set_xlabel("layer pair L \u2192 L+1")
    ax_rank.set_ylabel("effective rank of the residual")

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
    over = f"over {len(pca.get('fam_used', []))} families"
    if pca.get("left_out_biases"):
        over += f" (matrices and norms; {len(pca['left_out_biases'])} biases left out)"
    if pca.get("left_out_zero_norm"):
        over += f"; left out, a zero norm: {', '.join(pca['left_out_zero_norm'])}"
    ax_pca.set_title(f"PCA of the log scale track {over}: explained variance per mode", fontsize=9)
    ax_pca.set_xlabel("mode")
    ax_pca.set_ylabel("explained variance (%)")

    for ax in [*ax_cos.values(), *ax_scale.values(), ax_rank]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(xs) == 1 and ax not in ax_scale.values():  # one pair: its layer number, not ticks of +-0.05
            ax.set_xlim(xs[0] - 0.5, xs[0] + 0.5)
            ax.set_xticks(xs)
        ax.grid(True, alpha=0.3)
    ax_pca.grid(True, axis="y", alpha=0.3)
    notes = []
    if left_out:
        notes.append(f"not drawn ({len(left_out)} families): {_left_out_names(left_out)}"
                     + (" (per-expert families: drawn as their all-experts aggregates)"
                        if any(EXPERT.search(f) for f in left_out) else ""))
    if no_cos:
        notes.append(f"no adjacent-layer cosine (scale track only): {', '.join(no_cos)}")
    if notes:
        main.supxlabel("\n".join(textwrap.fill(n, 220) for n in notes), fontsize=8, color="0.25")
    fig.suptitle(_title(result, name, st), fontsize=11)
    return fig


def family_colors(n: int) -> list[Any]:
    """Distinct colours: tab10, then Dark2 and Set1 (tab20's light/dark pairs look alike)."""
    from matplotlib import colormaps

    pool = [c for name in ("tab10", "Dark2", "Set1") for c in colormaps[name].colors]
    return [pool[i % len(pool)] for i in range(n)]


def save_figure(fig: Any, path: Path) -> None:
    """Write a figure to `path` (.png or .svg) atomically (temp file + rename); SVG text stays text."""
    path = Path(path)
    fmt = check_plot_path(path)
    matplotlib = require_matplotlib()
    with atomic(path, "wb") as f, matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(f, format=fmt, dpi=110)


def plot_diff(result: Any, path: Path) -> None:
    """Render a diff result's heatmaps to `path` (.png or .svg), atomically."""
    check_plot_path(path)
    save_figure(diff_figure(result), path)


def _get(pair: Pair, family: str, key: str) -> Any:
    s = pair.families.get(family)
    return s.get(key) if s is not None else None


def plot_result(result: ScanResult | dict[str, Any], path: Path, stack: str | None = None) -> None:
    """Render `result` to `path` (.png or .svg), atomically (temp file + rename)."""
    check_plot_path(path)
    save_figure(make_figure(result, stack), path)
