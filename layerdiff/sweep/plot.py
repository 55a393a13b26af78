"""The sweep's figure: drift against checkpoint per family, and a checkpoint x layer heatmap.

  drift cos (mean over layers) per family  | drift rel_change (mean over layers) per family
  heatmap: checkpoint x layer, rel_change against the reference, mean over the matrix families

Only the main stack is drawn, per-expert families give way to their all-experts
family, at most MAX_FAMILIES lines; the figure says what it leaves out (other
stacks, families, unlabelled checkpoints), never silently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..output import atomic
from ..present.plot import _EXPERT, MAX_FAMILIES, _colors, _require_matplotlib, check_plot_path

MAX_LABELS = 40  # checkpoint tick labels before only every k-th is written


def check_plot(path: Path) -> str:
    return check_plot_path(path)


def _short(specs: list[str]) -> list[str]:
    """Checkpoint labels: the revision when every checkpoint is a revision of one repo, else the name."""
    repos = {s.rpartition("@")[0] for s in specs if "@" in s}
    if len(repos) == 1 and all("@" in s for s in specs):
        labels = [s.rpartition("@")[2] for s in specs]
    else:
        labels = [s.rstrip("/").rsplit("/", 1)[-1] if s.startswith(("/", ".", "~")) else s for s in specs]
    return [lb if len(lb) <= 28 else lb[:13] + "\u2026" + lb[-13:] for lb in labels]


def make_figure(result: Any) -> Any:
    """The figure of a SweepResult (a matplotlib Figure, not attached to any window)."""
    _require_matplotlib()
    import numpy as np
    from matplotlib.figure import Figure

    entries = result.entries
    first = result.scan(0)
    stack = first.main_stack
    st = first.main
    other_stacks = [n for n in first.stacks if n != stack]
    fams = list(st.families)
    if len(fams) > MAX_FAMILIES and any(st.families[f].experts for f in fams):
        fams = [f for f in fams if not _EXPERT.search(f)]
    hidden = len(st.families) - min(len(fams), MAX_FAMILIES)
    fams = fams[:MAX_FAMILIES]
    matrices = [f for f in fams if len(st.families[f].shape) >= 2]
    layers = list(st.layers)
    n = len(entries)
    cos = {f: [math.nan] * n for f in fams}
    rel = {f: [math.nan] * n for f in fams}
    heat = np.full((n, len(layers)), np.nan)
    col = {L: j for j, L in enumerate(layers)}
    for i in range(n):
        per: dict[tuple[str, str], dict[int, float]] = {}
        for s, fam, L, metric, value in result.drift(i):
            if s == stack and value is not None:
                per.setdefault((fam, metric), {})[L] = value
        for f in fams:
            if per.get((f, "cos")):
                cos[f][i] = float(np.mean(list(per[(f, "cos")].values())))
            if per.get((f, "rel_change")):
                rel[f][i] = float(np.mean(list(per[(f, "rel_change")].values())))
        for L, j in col.items():
            vals = [per[(f, "rel_change")][L] for f in matrices if L in per.get((f, "rel_change"), {})]
            if vals:
                heat[i, j] = float(np.mean(vals))

    labels = _short([e.checkpoint for e in entries])
    refs = [i for i, e in enumerate(entries) if e.reference is None]
    for i in refs:
        labels[i] += " (ref)"
    step = max(1, math.ceil(n / MAX_LABELS))
    x = list(range(n))
    fig = Figure(figsize=(max(12.0, min(18.0, 0.3 * n + 8)), 10), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.15])
    ax_cos, ax_rel = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_heat = fig.add_subplot(grid[1, :])
    colors = _colors(len(fams))
    for f, c in zip(fams, colors):
        style = "-" if len(st.families[f].shape) >= 2 else "--"
        if any(not math.isnan(v) for v in cos[f]):
            ax_cos.plot(x, cos[f], marker="o", markersize=3, color=c, linestyle=style, label=f)
            ax_rel.plot(x, rel[f], marker="o", markersize=3, color=c, linestyle=style, label=f)
    ref_name = {"first": "the first checkpoint", "last": "the last checkpoint",
                "previous": "the previous checkpoint"}.get(result.reference, result.reference)
    ax_cos.set_title(f"Drift: cos(W, W_ref) against {ref_name}, mean over layers", fontsize=9)
    ax_cos.set_ylabel("cos(W, W_ref)")
    ax_rel.set_title(f"Drift: |W - W_ref| / |W_ref| against {ref_name}, mean over layers", fontsize=9)
    ax_rel.set_ylabel("relative change")
    for ax in (ax_cos, ax_rel):
        ax.set_xticks(x[::step], labels[::step], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("checkpoint")
        ax.grid(True, alpha=0.3)
        ax.set_xlim(-0.5, n - 0.5)
    if not any(ax_cos.get_lines()):
        for ax in (ax_cos, ax_rel):
            ax.text(0.5, 0.5, "no drift: every checkpoint is its own reference", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")

    img = ax_heat.imshow(heat, aspect="auto", interpolation="nearest", cmap="viridis",
                         extent=(-0.5, len(layers) - 0.5, n - 0.5, -0.5))
    cb = fig.colorbar(img, ax=ax_heat, pad=0.01)
    cb.set_label("relative change", fontsize=9)
    ax_heat.set_yticks(x[::step], labels[::step], fontsize=8)
    lstep = max(1, math.ceil(len(layers) / 40))
    ax_heat.set_xticks(list(range(len(layers)))[::lstep], [str(L) for L in layers][::lstep], fontsize=8)
    ax_heat.set_xlabel("layer L")
    ax_heat.set_ylabel("checkpoint")
    ax_heat.set_title(f"|W_L - W_L,ref| / |W_L,ref| per checkpoint and layer, mean over the {len(matrices)} matrix "
                      f"families drawn above (blank: no drift, e.g. the reference itself)", fontsize=9)

    handles, names = ax_cos.get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="outside right upper", fontsize=8, title="family (dashed: 1-D)",
                   title_fontsize=9)
    left_out = []
    if hidden:
        left_out.append(f"{hidden} families not drawn (per-expert families, or beyond {MAX_FAMILIES})")
    if other_stacks:
        left_out.append(f"stacks not drawn: {', '.join(other_stacks[:4])}{' ...' if len(other_stacks) > 4 else ''}")
    if step > 1:
        left_out.append(f"one checkpoint in {step} labelled")
    if lstep > 1:
        left_out.append(f"one layer in {lstep} labelled")
    note = f"   [{'; '.join(left_out)}]" if left_out else ""
    fig.suptitle(f"Sweep of {n} checkpoints \u2014 stack {stack} ({len(layers)} layers){note}", fontsize=11)
    return fig


def plot_sweep(result: Any, path: Path) -> None:
    """Render the figure of `result` to `path` (.png or .svg), atomically."""
    path = Path(path)
    fmt = check_plot_path(path)
    matplotlib = _require_matplotlib()
    fig = make_figure(result)
    with atomic(path, "wb") as f, matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(f, format=fmt, dpi=110)
