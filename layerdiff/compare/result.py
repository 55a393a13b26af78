"""What `layerdiff.diff` returns: per tensor, per family and layer, per family summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError

SCHEMA = "layerdiff.diff/1"
TRACKED = ("cos", "rel_change", "norm_ratio", "frac_equal", "max_abs_diff", "delta_eff_rank", "delta_stable_rank",
           "delta_rank_90", "delta_rank_99", "gram_cos")  # the per-layer arrays kept per stack and family


@dataclass(frozen=True)
class TensorDiff:
    """One stored tensor in A and B: the diff metrics of the whole tensor, and of
    each family it holds when it is fused (q/k/v in one matrix, experts in bands)."""

    name: str
    stack: str | None
    layer: int | None
    family: str  # its family, or its raw name when it holds several
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    values: dict[str, Any]  # the registry's diff metrics (None: not computed)
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)  # family -> values, for fused tensors
    note: str | None = None  # e.g. identical without reading (the same bytes of the same file)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"stack": self.stack, "layer": self.layer, "family": self.family, "shape": list(self.shape),
                             "dtype_a": self.dtype_a, "dtype_b": self.dtype_b, **self.values}
        if self.parts:
            d["parts"] = self.parts
        if self.note:
            d["note"] = self.note
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> TensorDiff:
        fixed = {"stack", "layer", "family", "shape", "dtype_a", "dtype_b", "parts", "note"}
        return cls(name, d["stack"], d["layer"], d["family"], tuple(d["shape"]), d["dtype_a"], d["dtype_b"],
                   {k: v for k, v in d.items() if k not in fixed}, dict(d.get("parts") or {}), d.get("note"))


@dataclass(frozen=True)
class DiffResult:
    a: dict[str, Any]  # resolved sources
    b: dict[str, Any]
    tensors: dict[str, TensorDiff]
    only_in_a: list[str]
    only_in_b: list[str]
    mismatched: list[dict[str, str]]
    not_weights: list[str]
    layers: dict[str, dict[str, dict[str, list[Any]]]]  # stack -> family -> {"layers": [...], metric: [...]}
    summary: dict[str, dict[str, dict[str, Any]]]  # stack -> family -> summary
    settings: dict[str, Any]
    run: dict[str, Any]
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "a": self.a, "b": self.b,
            "tensors": {n: t.to_dict() for n, t in self.tensors.items()},
            "only_in_a": self.only_in_a, "only_in_b": self.only_in_b, "mismatched": self.mismatched,
            "not_weights": self.not_weights, "stacks": self.layers, "summary": self.summary,
            "settings": self.settings, "run": self.run,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any, where: str = "result") -> DiffResult:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise FormatError(where, f"not a layerdiff diff result (no \"schema\": \"{SCHEMA}\")")
        try:
            return cls(dict(d["a"]), dict(d["b"]), {n: TensorDiff.from_dict(n, t) for n, t in d["tensors"].items()},
                       list(d["only_in_a"]), list(d["only_in_b"]), list(d["mismatched"]), list(d["not_weights"]),
                       dict(d["stacks"]), dict(d["summary"]), dict(d["settings"]), dict(d["run"]))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise FormatError(where, f"not a valid diff result ({type(e).__name__}: {e})") from None

    def rows(self) -> list[tuple[str, str, int, str, Any]]:
        """Tidy rows (stack, family, layer, metric, value) of the per-layer arrays."""
        out: list[tuple[str, str, int, str, Any]] = []
        for stack, fams in self.layers.items():
            for fam, arrays in fams.items():
                for metric, values in arrays.items():
                    if metric != "layers":
                        out += [(stack, fam, L, metric, v) for L, v in zip(arrays["layers"], values)]
        return out

    def to_frame(self) -> Any:
        """A tidy pandas table (stack, family, L, metric, value); needs layerdiff[frame]."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_frame() needs pandas: pip install 'layerdiff[frame]'") from None
        return pd.DataFrame(self.rows(), columns=["stack", "family", "L", "metric", "value"])
