"""The scale track (Frobenius norm of every family in every layer) and its PCA."""

from __future__ import annotations

from typing import Any

import numpy as np


def scale_pca(scales: dict[str, list[float | None]], drop_null: bool = False) -> dict[str, Any]:
    """PCA of the log scale track, as the seed does it, over complete families.

    Families with a zero norm somewhere are left out (log 0 would poison it).
    With `drop_null`, modes whose singular value is zero to rounding (centring
    leaves at most layers - 1 of them) are not reported; the seed's keys keep them.
    """
    used = [f for f, v in scales.items() if v and all(x is not None and x > 0 for x in v)]
    usable = set(used)  # a set: `in` a list of 50,000 experts made this quadratic (32 s)
    zero = [f for f, v in scales.items() if v and all(x is not None for x in v) and f not in usable]
    out: dict[str, Any] = {"fam_used": used, "left_out_zero_norm": zero}
    if not used:
        return out | {"singvals": [], "loadings": [], "scores": [], "explained": []}
    m = np.log(np.array([scales[f] for f in used], dtype=np.float64))
    u, s, vh = np.linalg.svd(m - m.mean(axis=1, keepdims=True), full_matrices=False)
    if drop_null:
        keep = s > 1e-10 * max(float(s.max()) if len(s) else 0.0, 1e-300)
        u, s, vh = u[:, keep], s[keep], vh[keep]
    total = float((s**2).sum())
    return out | {
        "singvals": s.tolist(),
        "loadings": u.tolist(),
        "scores": (np.diag(s) @ vh).tolist(),
        "explained": [float(x**2 / max(total, 1e-20)) for x in s],
    }
