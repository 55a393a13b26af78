"""Typed results, from the engine's sums to the JSON document and back.

Frozen dataclasses all the way to the output: the CLI, the tables and the
plot read these, not string keys. `to_dict()` is the JSON document (the seed
script's keys included, derived from the main stack), `from_dict()` reads one
back, checking the schema version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .checkpoint.jsonfile import read_json
from .errors import FormatError
from .layout import SEED_FAMILIES
from .metrics.registry import METRICS
from .metrics.scale import scale_pca

SCHEMA = "layerdiff.scan/1"  # the result document's format, written into it and checked on reading
_SEED_PAIR_KEYS = ("cos", "resid_norm", "resid_eff_rank", "resid_spec_entropy")


@dataclass(frozen=True)
class Skip:
    """Something left out of the analysis, and why. One shape for every kind:
    a tensor of one layer (`layer`), or a pair of layers (`L`, `L_next`), of a
    raw tensor name (`raw`) or a family (`family`)."""

    stack: str
    reason: str
    raw: str | None = None
    family: str | None = None
    layer: int | None = None
    L: int | None = None
    L_next: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Skip:
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class FamilyInfo:
    """What a family is made of: the raw tensor, its shape and dtype, the part taken."""

    raw: str  # the raw tensor name (after the layer number) it comes from
    shape: tuple[int, ...]  # of the raw tensor
    dtype: str
    part_shape: tuple[int, ...] | None = None  # of the family's part, when the raw tensor is fused
    experts: int | None = None  # for an all-experts family: how many experts it sums over

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"raw": self.raw, "shape": list(self.shape), "dtype": self.dtype}
        if self.part_shape is not None:
            d["part_shape"] = list(self.part_shape)
        if self.experts is not None:
            d["experts"] = self.experts
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FamilyInfo:
        ps = d.get("part_shape")
        return cls(d["raw"], tuple(d["shape"]), d["dtype"], tuple(ps) if ps is not None else None, d.get("experts"))


@dataclass(frozen=True)
class PairStats:
    """One family's numbers for one pair: the registry's metrics (None where
    not computed) and what a pass adds about how (rank bounds, notes)."""

    values: dict[str, float | None]
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name] if name in self.values else self.extra[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, self.extra.get(name, default))

    def to_dict(self) -> dict[str, Any]:
        return {**self.values, **self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairStats:
        return cls({k: v for k, v in d.items() if k in METRICS}, {k: v for k, v in d.items() if k not in METRICS})


@dataclass(frozen=True)
class Pair:
    """The statistics of every family between layer L and layer L_next."""

    L: int
    L_next: int
    families: dict[str, PairStats]

    def to_dict(self) -> dict[str, Any]:
        return {"L": self.L, "L_next": self.L_next, "families": {f: s.to_dict() for f, s in self.families.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pair:
        return cls(d["L"], d["L_next"], {f: PairStats.from_dict(s) for f, s in d["families"].items()})


@dataclass(frozen=True)
class StackResult:
    """One stack's result: its families, the pairs, the summaries and the scale track."""

    name: str
    layers: list[int]
    families: dict[str, FamilyInfo]
    unmapped: list[str]
    pairs: list[Pair]
    summary: dict[str, dict[str, float | None]]
    scales: dict[str, list[float | None]]
    pca: dict[str, Any]
    skipped: list[Skip]
    all_pairs: dict[str, dict[str, Any]] = field(default_factory=dict)  # family -> {"layers", "cos", ...}

    def pair_map(self) -> dict[int, dict[str, PairStats]]:
        """L -> family -> stats, for lookups by layer."""
        return {p.L: p.families for p in self.pairs}

    def to_dict(self) -> dict[str, Any]:
        d = {
            "layers": self.layers,
            "families": {f: i.to_dict() for f, i in self.families.items()},
            "unmapped": self.unmapped,
            "pairs": [p.to_dict() for p in self.pairs],
            "summary": self.summary,
            "scales": self.scales,
            "pca": self.pca,
            "skipped": [s.to_dict() for s in self.skipped],
        }
        if self.all_pairs:
            d["all_pairs"] = self.all_pairs
        return d

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> StackResult:
        return cls(
            name, list(d["layers"]), {f: FamilyInfo.from_dict(i) for f, i in d["families"].items()},
            list(d.get("unmapped", [])), [Pair.from_dict(p) for p in d["pairs"]], dict(d["summary"]),
            dict(d["scales"]), dict(d["pca"]), [Skip.from_dict(s) for s in d.get("skipped", [])],
            dict(d.get("all_pairs", {})),
        )

    def seed_view(self) -> dict[str, Any]:
        """The seed script's JSON keys, holding exactly what the seed would: its families only."""
        seed_pairs = [
            {"L": p.L, "L_next": p.L_next,
             "families": {f: {k: p.families[f].get(k) for k in _SEED_PAIR_KEYS} for f in SEED_FAMILIES if f in p.families}}
            for p in self.pairs
        ]
        scales = {f: self.scales.get(f, [None] * len(self.layers)) for f in SEED_FAMILIES}
        pca = scale_pca(scales)
        return {
            "pair_results": seed_pairs,
            "scales": scales,
            "scale_pca_singvals": pca["singvals"],
            "scale_pca_loadings": pca["loadings"],
            "scale_pca_scores": pca["scores"],
            "fam_used": pca["fam_used"],
        }


@dataclass(frozen=True)
class ScanResult:
    """What `layerdiff.scan` returns; `to_dict()` is the CLI's `--out` JSON."""

    model: str
    source: dict[str, Any]
    architecture: str | None
    main_stack: str
    stacks: dict[str, StackResult]
    settings: dict[str, Any]
    run: dict[str, Any]
    labels: dict[str, Any] = field(default_factory=dict)  # model_type, how each stack's table was chosen
    schema: str = SCHEMA

    @property
    def main(self) -> StackResult:
        return self.stacks[self.main_stack]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "source": self.source,
            "schema": self.schema,
            "architecture": self.architecture,
            "main_stack": self.main_stack,
            **self.main.seed_view(),
            "stacks": {n: s.to_dict() for n, s in self.stacks.items()},
            "settings": self.settings,
            "run": self.run,
        }
        if self.labels:
            d["labels"] = self.labels
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any, where: str = "result") -> ScanResult:
        """Read a result document back; a document that is not one is a FormatError."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise FormatError(where, f"not a layerdiff scan result (no \"schema\": \"{SCHEMA}\")")
        try:
            return cls(
                d.get("model", ""), dict(d.get("source") or {}), d.get("architecture"), d["main_stack"],
                {n: StackResult.from_dict(n, s) for n, s in d["stacks"].items()},
                dict(d.get("settings") or {}), dict(d.get("run") or {}), dict(d.get("labels") or {}),
            )
        except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:  # a result edited by hand
            raise FormatError(where, f"not a valid scan result ({type(e).__name__}: {e})") from None

    @classmethod
    def from_json(cls, path: str | Path) -> ScanResult:
        return cls.from_dict(read_json(Path(path), "scan result"), str(path))

    def to_frame(self) -> Any:
        """A tidy pandas table: one row per value (stack, family, L, L_next, metric, value).

        Pair metrics have both L and L_next; the scale track (`norm`) has L only."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_frame() needs pandas: pip install 'layerdiff[frame]'") from None
        return pd.DataFrame(self.rows(), columns=["stack", "family", "L", "L_next", "metric", "value"])

    def rows(self) -> list[tuple[str, str, int, int | None, str, float | None]]:
        """The tidy table's rows, without pandas."""
        out: list[tuple[str, str, int, int | None, str, float | None]] = []
        for st in self.stacks.values():
            for p in st.pairs:
                for fam, stats in p.families.items():
                    out += [(st.name, fam, p.L, p.L_next, m, v) for m, v in stats.values.items()]
            for fam, track in st.scales.items():
                out += [(st.name, fam, L, None, "norm", v) for L, v in zip(st.layers, track)]
        return out
