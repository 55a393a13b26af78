"""Diff results -> text that fits a terminal: what changed at a glance, then where."""

from __future__ import annotations

from typing import Any

from ..compare.result import DiffResult
from .escape import lines as text_lines

WIDTH = 160  # tables wrap their family columns into blocks this wide
MOST = 12  # most-changed tensors listed
LISTED = 6  # names listed per "only in" / mismatched line


def _num(v: Any, width: int, fmt: str = ".4f") -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, bool):
        return f"{'yes' if v else 'no':>{width}}"
    return f"{v:>{width}{fmt}}" if isinstance(v, float) else f"{v:>{width}}"


def _names(names: list[str]) -> str:
    more = f" (and {len(names) - LISTED} more in the JSON)" if len(names) > LISTED else ""
    return ", ".join(names[:LISTED]) + more


def _source(label: str, s: dict[str, Any]) -> str:
    if not s:
        return f"{label}: (a layout given in Python)"
    rev = f" @ {s['revision']} ({s['commit']})" if s.get("repo_id") else ""
    return f"{label}: {s['spec']}{rev}  [{s['kind']}: {s['root']}]"


def _family_table(fams: dict[str, dict[str, list[Any]]], metric: str, fmt: str) -> list[str]:
    """Rows = layers, columns = families, wrapped into blocks of at most WIDTH columns."""
    names = list(fams)
    layers = sorted({L for a in fams.values() for L in a["layers"]})
    widths = [max(9, len(f)) for f in names]
    out: list[str] = []
    start = 0
    while start < len(names):
        end, used = start, 5
        while end < len(names) and (end == start or used + widths[end] + 1 <= WIDTH):
            used += widths[end] + 1
            end += 1
        block = list(range(start, end))
        out.append("  " + f"{'L':>3}" + "".join(f" {names[i]:>{widths[i]}}" for i in block))
        for L in layers:
            cells = []
            for i in block:
                a = fams[names[i]]
                v = a[metric][a["layers"].index(L)] if L in a["layers"] else None
                cells.append(" " + _num(v, widths[i], fmt))
            out.append(f"  {L:>3}" + "".join(cells))
        out.append("")
        start = end
    return out


def diff_text(r: DiffResult) -> str:
    tensors = list(r.tensors.values())
    identical = [t for t in tensors if t.values.get("identical")]
    unread = [t for t in identical if t.note]
    out = [_source("A", r.a), _source("B", r.b), ""]
    out.append(f"compared {len(tensors)} tensors: {len(identical)} identical"
               + (f" ({len(unread)} without reading: the same bytes)" if unread else "")
               + f", {len(tensors) - len(identical)} changed")
    if r.only_in_a:
        out.append(f"  only in A ({len(r.only_in_a)}): {_names(r.only_in_a)}")
    if r.only_in_b:
        out.append(f"  only in B ({len(r.only_in_b)}): {_names(r.only_in_b)}")
    for m in r.mismatched[:LISTED]:
        out.append(f"  not compared: {m['name']}: {m['reason']}")
    if len(r.mismatched) > LISTED:
        out.append(f"  (and {len(r.mismatched) - LISTED} more not compared, in the JSON)")
    if r.not_weights:
        out.append(f"  {len(r.not_weights)} scales and buffers compared through the weights they belong to")
    changed = sorted((t for t in tensors if t.values.get("rel_change")), key=lambda t: -t.values["rel_change"])
    if changed:
        ranked = any(t.values.get("delta_rank_90") is not None for t in changed)
        width = min(max(len(t.name) for t in changed[:MOST]), 70)
        out += ["", f"=== Most changed tensors (of {len(changed)} changed; all in the JSON) ===",
                f"  {'tensor':<{width}} {'rel_change':>10} {'cos':>8} {'|B|/|A|':>8} {'equal':>7} {'max|B-A|':>9}"
                + (f" {'rank90':>6} {'rank99':>6} {'eff_rank':>8}" if ranked else "")]
        for t in changed[:MOST]:
            v = t.values
            name = t.name if len(t.name) <= width else "..." + t.name[-(width - 3):]
            line = (f"  {name:<{width}} {_num(v['rel_change'], 10)} {_num(v['cos'], 8)} {_num(v['norm_ratio'], 8)} "
                    f"{_num(v['frac_equal'], 7, '.3f')} {_num(v['max_abs_diff'], 9, '.3g')}")
            if ranked:
                line += (f" {_num(v['delta_rank_90'], 6)} {_num(v['delta_rank_99'], 6)} "
                         f"{_num(v['delta_eff_rank'], 8, '.2f')}")
            out.append(line)
    for stack, fams in r.layers.items():
        out += ["", f"=== {stack}: relative change |B - A| / |A| per family and layer ===", ""]
        out += _family_table(fams, "rel_change", ".4f")
        out += [f"=== {stack}: per-family summary ===",
                f"  {'family':<22} {'layers':>6} {'identical':>9} {'mean_rel':>9} {'max_rel':>9} {'mean_cos':>9}"
                "  most changed layers"]
        for fam, s in r.summary.get(stack, {}).items():
            out.append(f"  {fam:<22} {s['n_layers']:>6} {s['identical']:>9} {_num(s['mean_rel_change'], 9)} "
                       f"{_num(s['max_rel_change'], 9)} {_num(s['mean_cos'], 9)}  "
                       f"{', '.join(map(str, s['most_changed_layers'])) or '-'}")
    run = r.run
    out += ["", f"read {run['bytes_analysed_a'] / 1e9:.3f} GB of A and {run['bytes_analysed_b'] / 1e9:.3f} GB of B "
            f"in {run['seconds']:.2f} s ({r.settings['jobs']} worker(s))"]
    return text_lines(out)  # names from the files: control characters escaped
