"""The seed's JSON keys are what they were before the pipeline rebuild.

`tests/golden/seed_keys.json` holds, for every fixture, the seed keys of
`layerdiff scan FIXTURE --out` as written by layerdiff 0.1.0 (commit 70dfe3a,
before the rebuild; made by `tests/golden/make_golden.py` against that commit).
Keys, their order and every non-float value must match exactly; floats to
1e-9 relative (the order of float64 additions across workers may differ).
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


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(b)} != {list(a)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: length"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{where}: {b} != {a}"
    else:
        assert a == b and type(a) is type(b), f"{where}: {b!r} != {a!r}"


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_seed_keys_unchanged_by_the_rebuild(name):
    doc = layerdiff.scan(str(_folder(name)), jobs=1, max_memory="1G").to_dict()
    for key, want in GOLDEN[name].items():
        _same(want, doc[key], f"{name}:{key}")
