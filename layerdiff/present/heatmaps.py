"""Heatmaps that stay readable with 40 families: family x layer(-pair) grids and L x L matrices.

Every family with a value gets a row (matrices, then norms, then biases, each
group in the result's order); a family with no value in a panel is named in
that panel's note, never dropped silently.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Callable

from ..layout.model import family_kind
from ..result import PairStats, StackResult

MATRIX_COLS = 6  # small multiples per row of L x L matrices


def _grouped(families: dict[str, Any]) -> list[str]:
    """Matrices, then norms (1-D, not biases), then biases (`families`: name -> its shape)."""
    return sorted(families, key=lambda f: family_kind(f, len(families[f])))


def grid_panel(ax: Any, rows: list[str], cols: list[Any], value: Callable[[str, Any], float | None], title: str,
               col_label: str, cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None) -> Any:
    """One family x column heatmap; missing values are blank (NaN), named in the title when a row is empty."""
    import numpy as np

    data = np.array([[np.nan if (v := value(r, c)) is None else float(v) for c in cols] for r in rows], dtype=float)
    shown = [r for r, row in zip(rows, data) if not np.all(np.isnan(row))]
    empty = [r for r in rows if r not in shown]
    data = data[[rows.index(r) for r in shown]] if shown else np.full((1, max(len(cols), 1)), np.nan)
    im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(shown)), shown, fontsize=max(5, min(9, 300 // max(len(shown), 1))))
    step = max(1, len(cols) // 24)
    ax.set_xticks(range(0, len(cols), step), [str(c) for c in cols][::step], fontsize=8)
    ax.set_xlabel(col_label)
    note = ""
    if empty:  # named, never dropped silently; wrapped to the panel's width
        note = "\n" + "\n".join(textwrap.wrap(f"not drawn (no value): {', '.join(empty)}", 70, max_lines=3,
                                               placeholder=f" ... ({len(empty)} in all)"))
    ax.set_title(title + note, fontsize=8)
    return im


def scan_heatmaps(container: Any, st: StackResult) -> None:
    """Adjacent cos (and gram_cos) per family x pair, then every family's L x L cosine matrix."""
    pairs = st.pair_map()
    fams = _grouped({f: i.shape for f, i in st.families.items()})
    has_gram = any(s.get("gram_cos") is not None for p in pairs.values() for s in p.values())
    all_pairs = st.all_pairs
    mat_rows = matrix_count(st)
    top, bottom = container.subfigures(2, 1, height_ratios=[max(4, len(fams) * 0.18), 2.3 * mat_rows or 0.1])
    axes = top.subplots(1, 2 if has_gram else 1, squeeze=False)[0]
    pair_keys = list(pairs)
    im = grid_panel(axes[0], fams, pair_keys, lambda f, L: _value(pairs[L], f, "cos"),
                    "Adjacent-layer cosine per family", "layer pair L \u2192 L+1")
    top.colorbar(im, ax=axes[0], shrink=0.8, label="cos")
    if has_gram:
        im = grid_panel(axes[1], fams, pair_keys, lambda f, L: _value(pairs[L], f, "gram_cos"),
                        "Adjacent-layer centred Gram cosine (blind to head / unit order)", "layer pair L \u2192 L+1")
        top.colorbar(im, ax=axes[1], shrink=0.8, label="gram_cos")
    if not mat_rows:
        return
    mats = bottom.subplots(mat_rows, MATRIX_COLS, squeeze=False)
    names = [f for f in fams if f in all_pairs] + [f for f in all_pairs if f not in fams]
    panels = [(f, "cos") for f in names] + [(f, "gram_cos") for f in names if "gram_cos" in all_pairs[f]]
    low = min((v for f, k in panels for row in all_pairs[f][k] for v in row if v is not None), default=0.0)
    for ax, (fam, key) in zip(mats.ravel(), panels):
        ap = all_pairs[fam]
        layers = ap["layers"]
        data = [[math.nan if v is None else v for v in row] for row in ap[key]]
        im = ax.imshow(data, cmap="viridis", vmin=min(low, 0.0), vmax=1, interpolation="nearest")
        step = max(1, len(layers) // 6)
        ax.set_xticks(range(0, len(layers), step), [str(L) for L in layers][::step], fontsize=6)
        ax.set_yticks(range(0, len(layers), step), [str(L) for L in layers][::step], fontsize=6)
        ax.set_title(fam if key == "cos" else f"{fam} (gram_cos)", fontsize=8)
    for ax in mats.ravel()[len(panels):]:
        ax.set_visible(False)
    bottom.colorbar(im, ax=mats, shrink=0.6, label="cos / gram_cos of (W_i, W_j)")
    left = [f for f in names if "gram_cos_left_out" in all_pairs[f]]
    note = f"; no L x L gram_cos for {', '.join(left)} (too large for --max-memory, see the JSON)" if left else ""
    bottom.suptitle("Every pair of layers (--all-pairs): cos, then gram_cos, per family, one colour scale" + note,
                    fontsize=10)


def _value(stats: dict[str, PairStats], family: str, key: str) -> float | None:
    s = stats.get(family)
    return s.get(key) if s is not None else None


def matrix_count(st: StackResult) -> int:
    """Rows of L x L small multiples below the scan plot."""
    ap = st.all_pairs
    return -(-(len(ap) + sum("gram_cos" in a for a in ap.values())) // MATRIX_COLS)


def diff_figure(result: Any) -> Any:
    """Per stack: family x layer heatmaps of rel_change and cos, and the delta ranks when computed."""
    from matplotlib.figure import Figure

    stacks = result.layers
    panels = []
    for stack, fams in stacks.items():
        ranked = any(v is not None for a in fams.values() for v in a["delta_rank_90"])
        gram = any(v is not None for a in fams.values() for v in a["gram_cos"])
        panels.append((stack, fams, ranked, gram))
    height = sum(max(3.5, len(f) * 0.2) * (2 if r or g else 1) + 0.8 for _, f, r, g in panels) or 3
    fig = Figure(figsize=(15, height + 1), layout="constrained")
    subs = fig.subfigures(max(len(panels), 1), 1, squeeze=False).ravel()
    for sub, (stack, fams, ranked, gram) in zip(subs, panels):
        order = list(fams)
        metrics = [("rel_change", "relative change |B - A| / |A|", "magma_r", 0, None),
                   ("cos", "cos(A, B)", "viridis", None, None)]
        if ranked:
            metrics.append(("delta_rank_90", "rank holding 90% of |B - A|^2 (--rank)", "viridis", 0, None))
        if gram:
            metrics.append(("gram_cos", "centred Gram cosine of A and B (--gram)", "viridis", None, None))
        axes = sub.subplots(-(-len(metrics) // 2), 2, squeeze=False).ravel()
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        layers = sorted({L for a in fams.values() for L in a["layers"]})
        for ax, (key, title, cmap, lo, hi) in zip(axes, metrics):
            def value(f: str, L: int, key: str = key) -> float | None:
                a = fams[f]
                return a[key][a["layers"].index(L)] if L in a["layers"] else None
            im = grid_panel(ax, order, layers, value, title, "layer L", cmap, lo, hi)
            sub.colorbar(im, ax=ax, shrink=0.8)
        sub.suptitle(f"stack {stack}", fontsize=10)
    a, b = result.a.get("spec", "A"), result.b.get("spec", "B")
    fig.suptitle(f"diff  A = {a}  \u2192  B = {b}  ({len(result.tensors)} tensors compared)", fontsize=12)
    return fig
