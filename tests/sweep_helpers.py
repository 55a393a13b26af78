"""Shared by the sweep tests: a training run's checkpoints, in a hub cache or on disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_dtypes
import numpy as np
from conftest import FIXTURES, qwen3_like, write_checkpoint

_spec = importlib.util.spec_from_file_location("hubcache", FIXTURES / "hubcache.py")
hubcache = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hubcache)

CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "num_hidden_layers": 4}
REPO = "org/tiny-run"
STEPS = ("step20000", "step1000", "step100000", "step3000", "step0")  # out of order on purpose


def training_run(folder: Path, steps: tuple[str, ...] = STEPS, layers: int = 4, hidden: int = 64, ff: int = 96,
                 seed: int = 3) -> dict[str, Path]:
    """Checkpoints of one run: each step's layer weights drift from step0's by an amount growing with the step."""
    rng = np.random.default_rng(seed)
    base = {k: v.astype(np.float32) for k, v in qwen3_like(rng, layers=layers, hidden=hidden, ff=ff).items()}
    out = {}
    for name in steps:
        t = int(name.removeprefix("step")) / 100000
        tensors = {}
        for k, w in base.items():
            scale = 0.02 if w.ndim == 2 else 0.1
            noise = np.random.default_rng(abs(hash((k, name))) % 2**32).standard_normal(w.shape) * scale
            tensors[k] = (w + (0.3 * t * noise if k.startswith("model.layers.") else 0)).astype(ml_dtypes.bfloat16)
        out[name] = write_checkpoint(folder / name, tensors, config=CONFIG)
    return out


def hub_run(cache: Path, folder: Path, **kwargs: object) -> dict[str, str]:
    """The training run as revisions of REPO in a hub cache (plus main = the last step)."""
    dirs = training_run(folder, **kwargs)  # type: ignore[arg-type]
    last = max(dirs, key=lambda n: int(n.removeprefix("step")))
    return hubcache.make_hub_revisions(cache, REPO, {**dirs, "main": dirs[last]})
