"""Write tests/golden/seed_keys.json with the layerdiff of another commit (the one before a rebuild).

    git archive 70dfe3a | tar -x -C /tmp/old && python tests/golden/make_golden.py /tmp/old
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIX = REPO / "tests" / "fixtures"
OLD = sys.argv[1]
SEED_KEYS = ("model", "pair_results", "scales", "scale_pca_singvals", "scale_pca_loadings", "scale_pca_scores", "fam_used")
out = {}
targets = sorted([p for p in (FIX/"hf").iterdir() if p.is_dir()] + [p for p in (FIX/"st").iterdir() if p.is_dir()])
targets.append(REPO / "layerdiff" / "example")
for t in targets:
    name = f"{t.parent.name}/{t.name}"
    o = Path(OLD) / f"golden-{t.parent.name}-{t.name}.json"
    env = dict(os.environ, PYTHONPATH=OLD)
    r = subprocess.run([sys.executable, "-m", "layerdiff", "scan", str(t), "--out", str(o), "--quiet", "--jobs", "1", "--max-memory", "1G"], capture_output=True, text=True, env=env, cwd=OLD)
    if r.returncode:
        print(name, "FAILED", r.stderr.strip()); continue
    d = json.loads(o.read_text())
    out[name] = {k: d[k] for k in SEED_KEYS if k != "model"}
(REPO / "tests" / "golden" / "seed_keys.json").write_text(json.dumps(out, separators=(",", ":")))
print(len(out), "fixtures")
