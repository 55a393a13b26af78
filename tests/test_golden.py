"""The seed's JSON keys are what they were before the pipeline rebuild.

`tests/golden/seed_keys.json` holds, for every fixture, the seed keys of
`layerdiff scan FIXTURE --out` as written by layerdiff 0.1.0 (commit 70dfe3a,
before the rebuild; made by `tests/golden/make_golden.py` against that commit).
Keys, their order and every non-float value must match exactly. Floats match
to what the old kernel got right: it summed F32 weights in float32 (cosines
off by up to 1.4e-7, residual norms, which cancel, by up to 1e-5 relative),
where the fused kernel sums them in float64 (exact to ~1e-16). A scale-PCA
component with a zero singular value (1e-16) is an arbitrary direction: its
loadings and scores are not compared; the others to 1e-5.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

import layerdiff
from conftest import EXAMPLE, FIXTURES

GOLDEN = json.loads((Path(__file__).parent / "golden" / "seed_keys.json").read_text())


def _folder(name: str) -> Path:
    return EXAMPLE if name == "layerdiff/example" else FIXTURES / name


def _null_components(golden: dict[str, Any]) -> set[int]:
    sv = golden.get("scale_pca_singvals") or []
    top = max((abs(v) for v in sv if v is not None), default=0.0)
    return {j for j, v in enumerate(sv) if v is not None and abs(v) <= 1e-9 * top}


def _drop(m: Any, null: set[int]) -> Any:
    """Loadings or scores (rows of per-component values) without the null components."""
    return [[v for j, v in enumerate(row) if j not in null] for row in m] if isinstance(m, list) else m


def _same(a: Any, b: Any, where: str, abs_tol: float = 2e-7) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(b)} != {list(a)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}", abs_tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]", abs_tol)
    elif isinstance(a, float):
        assert isinstance(b, float) and math.isclose(a, b, rel_tol=1e-5, abs_tol=abs_tol), f"{where}: {b} != {a}"
    else:
        assert a == b and type(a) is type(b), f"{where}: {b!r} != {a!r}"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_seed_keys_unchanged_by_the_rebuild(name):
    doc = layerdiff.scan(str(_folder(name)), jobs=1, max_memory="1G").to_dict()
    null = _null_components(GOLDEN[name])
    for key, want in GOLDEN[name].items():
        got = doc[key]
        if key in ("scale_pca_loadings", "scale_pca_scores"):
            # Eigenvectors amplify the old 1e-7 errors by 1 / (gap between singular values).
            _same(_drop(want, null), _drop(got, null), f"{name}:{key}", abs_tol=1e-5)
        else:
            _same(want, got, f"{name}:{key}")
