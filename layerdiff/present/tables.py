"""Scan results -> text: the seed's tables (same layout and rounding), then what layerdiff adds."""

from __future__ import annotations

import re
import textwrap
from typing import Any

from ..layout.model import family_kind, is_bias
from ..result import PairStats, ScanResult, StackResult
from .escape import lines as text_lines


WIDTH = 160  # a table wider than this is cut into blocks of family columns


def _cols(families: list[str]) -> list[tuple[str, int]]:
    return [(f, max(12, len(f))) for f in families]


def _blocks(cols: list[tuple[str, int]], lead: int) -> list[list[tuple[str, int]]]:
    """Family columns in blocks that keep every line within WIDTH characters."""
    out: list[list[tuple[str, int]]] = [[]]
    used = lead
    for f, w in cols:
        if out[-1] and used + w + 1 > WIDTH:
            out.append([])
            used = lead
        out[-1].append((f, w))
        used += w + 1
    return out


def grouped(st: StackResult, families: list[str]) -> list[str]:
    """Matrices first, then norms and other 1-D families, then biases; each in the given order."""
    return sorted(families, key=lambda f: family_kind(f, len(st.families[f].shape)))


def _num(v: float | None, width: int, fmt: str) -> str:
    """A number right-aligned, or `-` for a value that was not computed."""
    return f"{v:>{width}{fmt}}" if v is not None else f"{'-':>{width}}"


def _grid_table(rows: list[int], families: list[str], value: Any, sign: str) -> list[str]:
    """Rows = layers (or pairs), columns = families; `-` where a value was not computed."""
    lines: list[str] = []
    for i, cols in enumerate(_blocks(_cols(families), 5)):
        if i:
            lines.append("")
        lines.append(f"  {'L':>3}" + "".join(f" {f:>{w}}" for f, w in cols))
        for L in rows:
            cells = []
            for f, w in cols:
                v = value(L, f)
                cells.append(f" {v:>{sign}{w}.4f}" if v is not None else f" {'-':>{w}}")
            lines.append(f"  {L:>3}" + "".join(cells))
    return lines


_EXPERT = re.compile(r"^(?P<pre>.*)experts\.\d+\.(?P<post>.+)$")


def _shown(families: list[str]) -> list[str]:
    """The families a text table shows: an all-experts family stands for its
    experts (hundreds of columns otherwise); every one of them is in the JSON."""
    known = set(families)
    return [f for f in families if not ((m := _EXPERT.match(f)) and f"{m['pre']}experts.{m['post']}" in known)]


def stack_tables(st: StackResult) -> list[str]:
    pairs = st.pair_map()
    paired = grouped(st, _shown([f for f in st.families if any(f in p for p in pairs.values())]))
    out = ["", "=== Adjacent-layer raw cos-sim per family ===",
           "  null interpretation: 1.0 = identical matrices up to scale, 0 = orthogonal", ""]
    out += _grid_table(list(pairs), paired, lambda L, f: _value(pairs[L], f, "cos"), "+")
    hidden = len(st.families) - len(_shown(list(st.families)))
    if hidden:
        out.append(f"  ({hidden} per-expert families are in the JSON; the tables show experts.* over all experts)")
    name_w = max([14] + [len(f) for f in st.summary])
    out += ["", "=== Per-family summary (across all adjacent pairs) ===",
            "  random baseline = sqrt(2) ≈ 1.414 (what we'd see with no relationship)", "",
            f"  {'family':>{name_w}} {'mean_cos':>10} {'median_cos':>11} {'raw_resid':>10} "
            f"{'scalar_fit':>11} {'improve_frac':>13} {'mean_SE':>8}"]
    for f in grouped(st, _shown(list(st.summary))):
        s = st.summary[f]
        out.append(
            f"  {f:>{name_w}} {s['mean_cos']:>+10.4f} {s['median_cos']:>+11.4f} {s['raw_resid']:>10.4f} "
            f"{s['scalar_fit']:>11.4f} {s['improve_frac']:>13.4f} {_num(s['mean_SE'], 8, '.4f')}"
        )
    out += _rank_tables(st, pairs)
    out += _gram_tables(st, pairs)
    idx = {L: i for i, L in enumerate(st.layers)}
    out += ["", "=== Scale track: ||W_family||_F across layers ==="]
    out += _grid_table(st.layers, grouped(st, _shown(list(st.scales))), lambda L, f: st.scales[f][idx[L]], "")
    pca = st.pca
    out += ["", "=== PCA of log-scale-track (dimensionality of schedule) ===", "  explained variance by mode:"]
    for i, share in enumerate(pca["explained"]):
        loads = ", ".join(f"{f}={pca['loadings'][j][i]:+.2f}" for j, f in enumerate(pca["fam_used"]))
        out += textwrap.wrap(f"mode {i + 1:>2}: {share * 100:>6.2f}% (loadings per family: {loads})", WIDTH - 4,
                             initial_indent="    ", subsequent_indent="               ")
    if pca.get("left_out_biases"):
        out.append(f"  over matrices and norms; biases left out: {len(pca['left_out_biases'])} families "
                   "(--pca-biases includes them)")
    elif any(is_bias(f) for f in pca["fam_used"]):
        out.append("  over matrices, norms and biases (--pca-biases)")
    if pca["left_out_zero_norm"]:
        out.append(f"  left out (a zero norm in some layer): {', '.join(pca['left_out_zero_norm'])}")
    return out


def _value(stats: dict[str, PairStats], family: str, metric: str) -> float | None:
    s = stats.get(family)
    return s.get(metric) if s is not None else None


def _gram_tables(st: StackResult, pairs: dict[int, dict[str, PairStats]]) -> list[str]:
    """The centred Gram cosines (scan --gram), when there are any."""
    fams = _shown([f for f in st.families if any(_value(p, f, "gram_cos") is not None for p in pairs.values())])
    if not fams:
        return []
    out = ["", "=== Adjacent-layer centred Gram cosine per family (--gram) ===",
           "  G = W^T W (reads the residual stream) or W W^T (writes it), centred; invariant to permutations and",
           "  rotations of heads / hidden units. ~0 = independent isotropic, 1 = the same up to such a change", ""]
    return out + _grid_table(list(pairs), fams, lambda L, f: _value(pairs[L], f, "gram_cos"), "+")


def all_pairs_tables(st: StackResult, families: list[str]) -> list[str]:
    """The L x L matrices of each family asked for (scan --all-pairs [--gram] --family F)."""
    out: list[str] = []
    for fam in families:
        ap = st.all_pairs.get(fam)
        if ap is None:
            continue
        for key, what in (("cos", "cosine"), ("gram_cos", "centred Gram cosine")):
            if key not in ap:
                continue
            layers = ap["layers"]
            out += ["", f"=== {fam}: {what} of every pair of layers (--all-pairs) ==="]
            out.append("  " + f"{'L':>4}" + "".join(f" {L:>6}" for L in layers))
            for L, row in zip(layers, ap[key]):
                out.append(f"  {L:>4}" + "".join(f" {v:>+6.3f}" if v is not None else f" {'-':>6}" for v in row))
        if "gram_cos_left_out" in ap:
            out.append(f"  {fam}: no L x L gram_cos: {ap['gram_cos_left_out']}")
    return out


def _rank_tables(st: StackResult, pairs: dict[int, dict[str, PairStats]]) -> list[str]:
    """The residual spectra (scan --rank), when there are any."""
    ranked = _shown([f for f in st.families if any(_value(p, f, "resid_eff_rank") is not None for p in pairs.values())])
    if not ranked:
        return []
    out = ["", "=== Residual spectrum: effective rank exp(H) per family (--rank) ===",
           "  H = spectral entropy of W_L+1/|W_L+1| - W_L/|W_L|; stable rank = |D|_F^2 / |D|_2^2", ""]
    out += _grid_table(list(pairs), ranked, lambda L, f: _value(pairs[L], f, "resid_eff_rank"), "")
    name_w = max([14] + [len(f) for f in ranked])
    out += ["", f"  {'family':>{name_w}} {'dim':>6} {'mean_SE':>8} {'mean_eff_rank':>14} {'mean_stable_rank':>17}  method"]
    for f in ranked:
        rs = [p[f] for p in pairs.values() if _value(p, f, "resid_eff_rank") is not None]
        sr = [r["resid_stable_rank"] for r in rs if r.get("resid_stable_rank") is not None]
        bounds = [r["resid_rank_bounds"] for r in rs if r.get("resid_rank_bounds")]
        method = "exact (Gram eigenvalues)"
        if bounds:
            method = f"sketch: H within +-{max(b['spec_entropy_err'] for b in bounds):.3f} (guaranteed bounds in the JSON)"
        summ = st.summary.get(f, {})
        dim = rs[0].get("resid_rank_dim", "-")
        out.append(
            f"  {f:>{name_w}} {dim:>6} {_num(summ.get('mean_SE'), 8, '.4f')} {_num(summ.get('mean_eff_rank'), 14, '.2f')} "
            f"{_num(sum(sr) / len(sr) if sr else None, 17, '.2f')}  {method}"
        )
    return out


def _labels_line(labels: dict[str, Any]) -> list[str]:
    """One line: the config's model_type, the main stack and why, and what named each stack
    (each stack on a line of its own when one line would be wider than WIDTH)."""
    if not labels:
        return []
    main = labels.get("main_stack") or {}
    head = f"model_type {labels.get('model_type') or 'unknown'}; main stack {main.get('rule') or main.get('name')}"
    names = [f"{s}: {m.get('label')}" for s, m in (labels.get("stacks") or {}).items()]
    line = f"{head}; names: {'; '.join(names)}"
    return [line] if len(line) <= WIDTH else [f"{head}; names:"] + [f"  {n}" for n in names]


def scan_text(result: ScanResult) -> str:
    out: list[str] = _labels_line(result.labels)
    names = [result.main_stack] + [s for s in result.stacks if s != result.main_stack]
    for name in names:
        st = result.stacks[name]
        out.append(f"##### stack {name}: layers {st.layers[0]}..{st.layers[-1]}")
        out += stack_tables(st)
        out += all_pairs_tables(st, result.settings.get("families") or [])
        for s in st.skipped:
            where = f"layer {s.layer}" if s.layer is not None else f"pair {s.L}->{s.L_next}"
            out.append(f"  skipped {s.family or s.raw} {where}: {s.reason}")
        if st.unmapped:
            out.append(f"  unmapped families (raw names): {', '.join(st.unmapped)}")
        out.append("")
    run = result.run
    out.append(
        f"scanned {run['bytes_analysed'] / 1e9:.3f} GB in {run['seconds']:.2f} s "
        f"({result.settings['jobs']} worker(s), blocks of {result.settings['block_elements']} values)"
    )
    return text_lines(out)  # names from the file: control characters escaped
