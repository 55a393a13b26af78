"""Results -> text: the seed's tables (same layout and rounding) and inspect's listing."""

from __future__ import annotations

from typing import Any

from .index import TensorIndex
from .layout import Layout
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


def stack_tables(st: dict[str, Any]) -> list[str]:
    pairs = {pr["L"]: pr["families"] for pr in st["pairs"]}
    paired = [f for f in st["families"] if any(f in p for p in pairs.values())]
    out = ["", "=== Adjacent-layer raw cos-sim per family ===",
           "  null interpretation: 1.0 = identical matrices up to scale, 0 = orthogonal", ""]
    out += _grid_table(list(pairs), paired, lambda L, f: pairs[L].get(f, {}).get("cos"), "+")
    out += ["", "=== Per-family summary (across all adjacent pairs) ===",
            "  random baseline = sqrt(2) ≈ 1.414 (what we'd see with no relationship)", "",
            f"  {'family':>14} {'mean_cos':>10} {'median_cos':>11} {'raw_resid':>10} "
            f"{'scalar_fit':>11} {'improve_frac':>13} {'mean_SE':>8}"]
    for f, s in st["summary"].items():
        out.append(
            f"  {f:>14} {s['mean_cos']:>+10.4f} {s['median_cos']:>+11.4f} {s['raw_resid']:>10.4f} "
            f"{s['scalar_fit']:>11.4f} {s['improve_frac']:>13.4f} {s['mean_SE'] or 0:>8.4f}"
        )
    idx = {L: i for i, L in enumerate(st["layers"])}
    out += ["", "=== Scale track: ||W_family||_F across layers ==="]
    out += _grid_table(st["layers"], list(st["scales"]), lambda L, f: st["scales"][f][idx[L]], "")
    pca = st["pca"]
    out += ["", "=== PCA of log-scale-track (dimensionality of schedule) ===", "  explained variance by mode:"]
    for i, share in enumerate(pca["explained"]):
        loads = ", ".join(f"{f}={pca['loadings'][j][i]:+.2f}" for j, f in enumerate(pca["fam_used"]))
        out.append(f"    mode {i + 1:>2}: {share * 100:>6.2f}% (loadings per family: {loads})")
    if pca["left_out_zero_norm"]:
        out.append(f"  left out (a zero norm in some layer): {', '.join(pca['left_out_zero_norm'])}")
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
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def inspect_doc(source: Source, index: TensorIndex, layout: Layout) -> dict[str, Any]:
    stacks = {}
    for name, st in layout.stacks.items():
        fams = {}
        for fam, members in st.families.items():
            t = members[0].tensor
            fams[fam] = {
                "raw": st.raw[fam],
                "shape": list(t.shape),
                "dtype": t.dtype,
                "bytes_per_layer": t.nbytes,
                "layers": len(members),
            }
        layers = st.layers
        stacks[name] = {"layers": [layers[0], layers[-1]], "n_layers": len(layers), "families": fams, "unmapped": st.unmapped}
    return {
        "source": source.describe(),
        "architecture": layout.arch,
        "num_hidden_layers": layout.num_hidden_layers,
        "shards": [{"file": str(s.path), "bytes": s.size, "tensors": len(s.tensors)} for s in index.shards],
        "stacks": stacks,
        "nonlayer": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes} for t in layout.nonlayer],
        "total_params": index.total_params,
        "total_bytes": index.total_bytes,
    }


def inspect_text(doc: dict[str, Any]) -> str:
    src = doc["source"]
    out = [f"model: {src['spec']}  ({src['kind']}: {src['root']})"]
    if src["repo_id"]:
        out.append(f"  repo {src['repo_id']}  revision {src['revision']}  commit {src['commit']}")
    out.append(f"architecture: {doc['architecture'] or 'unknown (raw family names)'}"
               + (f", num_hidden_layers={doc['num_hidden_layers']}" if doc["num_hidden_layers"] is not None else ""))
    out.append(f"shards: {len(doc['shards'])}")
    for s in doc["shards"]:
        out.append(f"  {s['file']}  {_human(s['bytes'])}  {s['tensors']} tensors")
    for name, st in doc["stacks"].items():
        a, b = st["layers"]
        out.append(f"stack {name}: {st['n_layers']} layers ({a}..{b})")
        width = max(len(f) for f in st["families"])
        for fam, f in st["families"].items():
            raw = "" if f["raw"] == fam else f"  <- {f['raw']}"
            out.append(f"  {fam:<{width}}  {str(f['shape']):<16} {f['dtype']:<8} {_human(f['bytes_per_layer']):>10}/layer  x{f['layers']}{raw}")
        if st["unmapped"]:
            out.append(f"  unmapped: {', '.join(st['unmapped'])}")
    out.append(f"non-layer tensors: {len(doc['nonlayer'])}")
    for t in doc["nonlayer"]:
        out.append(f"  {t['name']}  {t['shape']} {t['dtype']}  {_human(t['bytes'])}")
    out.append(f"total: {doc['total_params']:,} parameters, {_human(doc['total_bytes'])}")
    return "\n".join(out)
