"""Results -> text: the seed's tables (same layout and rounding) and inspect's listing."""

from __future__ import annotations

import re
from typing import Any

from .index import TensorIndex
from .layout import Layout, aggregate_raw, family_order, grid
from .sources import Source


def _cols(families: list[str]) -> list[tuple[str, int]]:
    return [(f, max(12, len(f))) for f in families]


def _grid_table(rows: list[int], families: list[str], value: Any, sign: str) -> list[str]:
    cols = _cols(families)
    lines = [f"  {'L':>3}" + "".join(f" {f:>{w}}" for f, w in cols)]
    for L in rows:
        cells = []
        for f, w in cols:
            v = value(L, f)
            cells.append(f" {v:>{sign}{w}.4f}" if v is not None else f" {'':>{w}}")
        lines.append(f"  {L:>3}" + "".join(cells))
    return lines


_EXPERT = re.compile(r"^(?P<pre>.*)experts\.\d+\.(?P<post>.+)$")


def _shown(families: list[str]) -> list[str]:
    """The families a text table shows: an all-experts family stands for its
    experts (hundreds of columns otherwise); every one of them is in the JSON."""
    known = set(families)
    return [f for f in families if not ((m := _EXPERT.match(f)) and f"{m['pre']}experts.{m['post']}" in known)]


def stack_tables(st: dict[str, Any]) -> list[str]:
    pairs = {pr["L"]: pr["families"] for pr in st["pairs"]}
    paired = _shown([f for f in st["families"] if any(f in p for p in pairs.values())])
    out = ["", "=== Adjacent-layer raw cos-sim per family ===",
           "  null interpretation: 1.0 = identical matrices up to scale, 0 = orthogonal", ""]
    out += _grid_table(list(pairs), paired, lambda L, f: pairs[L].get(f, {}).get("cos"), "+")
    hidden = len(st["families"]) - len(_shown(list(st["families"])))
    if hidden:
        out.append(f"  ({hidden} per-expert families are in the JSON; the tables show experts.* over all experts)")
    out += ["", "=== Per-family summary (across all adjacent pairs) ===",
            "  random baseline = sqrt(2) ≈ 1.414 (what we'd see with no relationship)", "",
            f"  {'family':>14} {'mean_cos':>10} {'median_cos':>11} {'raw_resid':>10} "
            f"{'scalar_fit':>11} {'improve_frac':>13} {'mean_SE':>8}"]
    for f in _shown(list(st["summary"])):
        s = st["summary"][f]
        out.append(
            f"  {f:>14} {s['mean_cos']:>+10.4f} {s['median_cos']:>+11.4f} {s['raw_resid']:>10.4f} "
            f"{s['scalar_fit']:>11.4f} {s['improve_frac']:>13.4f} {s['mean_SE'] or 0:>8.4f}"
        )
    out += _rank_tables(st, pairs)
    idx = {L: i for i, L in enumerate(st["layers"])}
    out += ["", "=== Scale track: ||W_family||_F across layers ==="]
    out += _grid_table(st["layers"], _shown(list(st["scales"])), lambda L, f: st["scales"][f][idx[L]], "")
    pca = st["pca"]
    out += ["", "=== PCA of log-scale-track (dimensionality of schedule) ===", "  explained variance by mode:"]
    for i, share in enumerate(pca["explained"]):
        loads = ", ".join(f"{f}={pca['loadings'][j][i]:+.2f}" for j, f in enumerate(pca["fam_used"]))
        out.append(f"    mode {i + 1:>2}: {share * 100:>6.2f}% (loadings per family: {loads})")
    if pca["left_out_zero_norm"]:
        out.append(f"  left out (a zero norm in some layer): {', '.join(pca['left_out_zero_norm'])}")
    return out


def _rank_tables(st: dict[str, Any], pairs: dict[int, dict[str, Any]]) -> list[str]:
    """The residual spectra (scan --rank), when there are any."""
    ranked = _shown([f for f in st["families"] if any(p.get(f, {}).get("resid_eff_rank") is not None for p in pairs.values())])
    if not ranked:
        return []
    out = ["", "=== Residual spectrum: effective rank exp(H) per family (--rank) ===",
           "  H = spectral entropy of W_L+1/|W_L+1| - W_L/|W_L|; stable rank = |D|_F^2 / |D|_2^2", ""]
    out += _grid_table(list(pairs), ranked, lambda L, f: pairs[L].get(f, {}).get("resid_eff_rank"), "")
    out += ["", f"  {'family':>14} {'dim':>6} {'mean_SE':>8} {'mean_eff_rank':>14} {'mean_stable_rank':>17}  method"]
    for f in ranked:
        rs = [p[f] for p in pairs.values() if p.get(f, {}).get("resid_eff_rank") is not None]
        sr = [r["resid_stable_rank"] for r in rs if r.get("resid_stable_rank") is not None]
        bounds = [r["resid_rank_bounds"] for r in rs if r.get("resid_rank_bounds")]
        method = "exact (Gram eigenvalues)"
        if bounds:
            method = f"sketch: H within +-{max(b['spec_entropy_err'] for b in bounds):.3f} (guaranteed bounds in the JSON)"
        summ = st["summary"].get(f, {})
        dim = rs[0].get("resid_rank_dim", "")
        out.append(
            f"  {f:>14} {dim:>6} {summ.get('mean_SE') or 0:>8.4f} {summ.get('mean_eff_rank') or 0:>14.2f} "
            f"{sum(sr) / len(sr) if sr else 0:>17.2f}  {method}"
        )
    return out


def scan_text(result: dict[str, Any]) -> str:
    out: list[str] = []
    names = [result["main_stack"]] + [s for s in result["stacks"] if s != result["main_stack"]]
    for name in names:
        st = result["stacks"][name]
        out.append(f"##### stack {name}: layers {st['layers'][0]}..{st['layers'][-1]}")
        out += stack_tables(st)
        for s in st["skipped"]:
            where = f"layer {s['layer']}" if "layer" in s else f"pair {s['L']}->{s['L_next']}"
            out.append(f"  skipped {s.get('family', s.get('raw'))} {where}: {s['reason']}")
        if st["unmapped"]:
            out.append(f"  unmapped families (raw names): {', '.join(st['unmapped'])}")
        out.append("")
    run = result["run"]
    out.append(
        f"scanned {run['bytes_analysed'] / 1e9:.3f} GB in {run['seconds']:.2f} s "
        f"({result['settings']['jobs']} worker(s), blocks of {result['settings']['block_elements']} values)"
    )
    return "\n".join(out)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def _share(members: list[Any]) -> tuple[int, int]:
    """Elements and bytes per layer of a family (its part of a fused tensor)."""
    m = members[0]
    rows, cols = grid(m.tensor.shape)
    n = (sum(b - a for a, b in m.rows) if m.rows is not None else rows) * (m.cols[1] - m.cols[0] if m.cols else cols)
    return n, m.tensor.nbytes * n // max(m.tensor.numel, 1)


def _ranges(m: Any) -> str | None:
    """Where a family sits in its fused raw tensor, in grid rows/cols."""
    out = []
    if m.rows is not None:
        if len(m.rows) <= 2:
            out.append("rows " + ",".join(f"{a}:{b}" for a, b in m.rows))
        else:
            out.append(f"rows {m.rows[0][0]}:{m.rows[0][1]},{m.rows[1][0]}:{m.rows[1][1]},... ({len(m.rows)} ranges)")
    if m.cols is not None:
        out.append(f"cols {m.cols[0]}:{m.cols[1]}")
    return " ".join(out) or None


def inspect_doc(source: Source, index: TensorIndex, layout: Layout) -> dict[str, Any]:
    stacks = {}
    for name, st in layout.stacks.items():
        fams = {}
        for fam in family_order(list(st.families)):
            members = st.families[fam]
            t = members[0].tensor
            n, nbytes = _share(members)
            raw = st.raw[fam]
            fams[fam] = {
                "raw": raw,
                "shape": list(t.shape),
                "dtype": t.dtype,
                "bytes_per_layer": nbytes,
                "layers": len(members),
                "part": _ranges(members[0]),
                "dequant": st.dequant.get(raw),
                "transposed": raw in st.transposed,
            }
        aggregates = {
            agg: {"raw": aggregate_raw(st, agg), "experts": len(ms), "families": ms,
                  "bytes_per_layer": sum(fams[f]["bytes_per_layer"] for f in ms)}
            for agg, ms in st.aggregates.items()
        }
        layers = st.layers
        stacks[name] = {
            "arch": st.arch,
            "layers": [layers[0], layers[-1]] if layers else None,
            "n_layers": len(layers),
            "families": fams,
            "aggregates": aggregates,
            "splits": st.splits,
            "dequant": st.dequant,
            "transposed": st.transposed,
            "unmapped": list(st.unmapped),
            "consumed": st.consumed,
            "refused": {r: {"format": x.format, "example": x.example, "layers": list(x.layers), "message": x.message}
                        for r, x in st.refused.items()},
            "notes": st.notes,
        }
    return {
        "source": source.describe(),
        "architecture": layout.arch,
        "num_hidden_layers": layout.num_hidden_layers,
        "shards": [{"file": str(s.path), "bytes": s.size, "tensors": len(s.tensors)} for s in index.shards],
        "stacks": stacks,
        "nonlayer": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes} for t in layout.nonlayer],
        "embeddings": layout.tied,
        "notes": layout.notes,
        "total_params": index.total_params,
        "total_bytes": index.total_bytes,
    }


def _span(layers: list[int]) -> str:
    return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}..{layers[-1]}"


def inspect_text(doc: dict[str, Any]) -> str:
    src = doc["source"]
    out = [f"model: {src['spec']}  ({src['kind']}: {src['root']})"]
    if src["repo_id"]:
        out.append(f"  repo {src['repo_id']}  revision {src['revision']}  commit {src['commit']}")
    out.append(f"architecture: {doc['architecture'] or 'unknown (raw family names)'}"
               + (f", num_hidden_layers={doc['num_hidden_layers']}" if doc["num_hidden_layers"] is not None else ""))
    if doc.get("embeddings", {}).get("note"):
        out.append(f"embeddings: {doc['embeddings']['note']}")
    for note in doc.get("notes", []):
        out.append(f"note: {note}")
    out.append(f"shards: {len(doc['shards'])}")
    for s in doc["shards"]:
        out.append(f"  {s['file']}  {_human(s['bytes'])}  {s['tensors']} tensors")
    for name, st in doc["stacks"].items():
        span = f"{st['layers'][0]}..{st['layers'][1]}" if st["layers"] else "none analysable"
        table = st.get("arch") or "no table: raw family names"
        out.append(f"stack {name}: {st['n_layers']} layers ({span}), names: {table}")
        per_expert = {f for a in st.get("aggregates", {}).values() for f in a["families"]}
        rows = []
        for fam, f in st["families"].items():
            if fam in per_expert:
                continue
            where = f" [{f['part']}]" if f.get("part") else ""
            raw = "" if f["raw"] == fam else f"  <- {f['raw']}{where}"
            rows.append((fam, str(f["shape"]), f["dtype"], _human(f["bytes_per_layer"]), f"x{f['layers']}{raw}"))
        for agg, a in st.get("aggregates", {}).items():
            first = st["families"][a["families"][0]]
            rows.append((agg, str(first["shape"]), first["dtype"], _human(a["bytes_per_layer"]),
                         f"x{first['layers']}  <- {a['raw']}  (all {a['experts']} experts; per expert "
                         f"{a['families'][0]} .. {a['families'][-1]})"))
        width = max([len(r[0]) for r in rows], default=8)
        for fam, shape, dtype, size, rest in rows:
            out.append(f"  {fam:<{width}}  {shape:<16} {dtype:<8} {size:>10}/layer  {rest}")
        for raw, how in st.get("splits", {}).items():
            out.append(f"  split {raw}: {how}")
        for raw, how in st.get("dequant", {}).items():
            out.append(f"  quantised {raw}: {how}")
        if st.get("transposed"):
            out.append(f"  stored [in, out] (Conv1D; cosines and norms unaffected): {', '.join(st['transposed'])}")
        if st["unmapped"]:
            out.append(f"  unmapped (analysed under their raw names): {', '.join(st['unmapped'])}")
        for raw, why in st.get("consumed", {}).items():
            out.append(f"  not a family: {raw}: {why}")
        for raw, r in st.get("refused", {}).items():
            out.append(f"  refused: {raw} ({_span(r['layers'])}): {r['format']}")
        for note in st.get("notes", []):
            out.append(f"  note: {note}")
    out.append(f"non-layer tensors: {len(doc['nonlayer'])}")
    for t in doc["nonlayer"]:
        out.append(f"  {t['name']}  {t['shape']} {t['dtype']}  {_human(t['bytes'])}")
    out.append(f"total: {doc['total_params']:,} parameters, {_human(doc['total_bytes'])}")
    return "\n".join(out)
