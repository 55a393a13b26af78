"""Same checkpoint, the seed's own way (transformers + float32 numpy) and layerdiff:
the seed's JSON keys and printed tables agree to 1e-5.

Runs only where torch and transformers are installed (CI installs them).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
from conftest import FIXTURES, REPO, run_cli

# Checked without importing: torch in the test process would inflate its RSS, and
# in-process scans plan their budget from it.
pytestmark = pytest.mark.skipif(
    not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")),
    reason="needs torch and transformers",
)


def numbers(text: str, header: str) -> list[list[float | None]]:
    """The numeric rows of one of the printed tables; `-` (a value not computed) is None."""
    block = text.split(header, 1)[1].split("\n===", 1)[0]
    rows = []
    for line in block.splitlines():
        if re.match(r"^\s+\d+\s", line) or re.match(r"^\s+\w+\s+[+-]\d", line):
            rows.append([None if x == "-" else float(x) for x in re.findall(r"[+-]?\d+\.\d+|(?<=\s)-(?=\s|$)", line)])
    return rows


def same(x: float | None, y: float | None) -> bool:
    """Equal to the printed precision. layerdiff prints `-` where the seed prints 0.0000 for
    a value neither computed (mean_SE without --rank)."""
    return abs(x - y) <= 1.5e-4 if x is not None else y == 0.0


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_seed_keys_and_tables_agree_with_the_seed(tmp_path, name):
    ckpt = FIXTURES / "hf" / name
    seed_out, ours_out = tmp_path / "seed.json", tmp_path / "ours.json"
    seed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "seed_way.py"), str(ckpt), "--out", str(seed_out)],
                          capture_output=True, text=True)
    assert seed.returncode == 0, seed.stderr
    ours = run_cli("scan", str(ckpt), "--out", str(ours_out))
    assert ours.returncode == 0, ours.stderr
    s, o = json.loads(seed_out.read_text()), json.loads(ours_out.read_text())

    assert o["fam_used"] == s["fam_used"]
    assert list(o["scales"]) == list(s["scales"])
    for fam, vals in s["scales"].items():
        assert len(o["scales"][fam]) == len(vals)
        for a, b in zip(o["scales"][fam], vals):
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-5 * max(1.0, abs(b)))
    assert [(p["L"], list(p["families"])) for p in o["pair_results"]] == [(p["L"], list(p["families"])) for p in s["pair_results"]]
    for po, ps in zip(o["pair_results"], s["pair_results"]):
        for fam, r in ps["families"].items():
            assert abs(po["families"][fam]["cos"] - r["cos"]) < 1e-5
            assert abs(po["families"][fam]["resid_norm"] - r["resid_norm"]) < 1e-5
    assert o["scale_pca_singvals"] == pytest.approx(s["scale_pca_singvals"], abs=1e-5)

    for header in ("=== Adjacent-layer raw cos-sim per family ===", "=== Per-family summary",
                   "=== Scale track: ||W_family||_F across layers ==="):
        mine, theirs = numbers(ours.stdout, header), numbers(seed.stdout, header)
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs):
            assert len(a) == len(b) and all(same(x, y) for x, y in zip(a, b)), (header, a, b)
