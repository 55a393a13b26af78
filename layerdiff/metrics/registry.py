"""Metric definitions: one entry per metric, read by the tables, JSON, plots and the tidy table.

A pair metric is computed from a pair's base values (`cos`, and whatever the
extra passes measured) by its formula; a metric no pass measured is None,
printed as `-`. A summary is a rule over one pair metric across all pairs of
a family. Adding a metric derived from existing sums is one entry here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

EPS = 1e-12  # the seed's guard: a family with a smaller norm is skipped


@dataclass(frozen=True)
class Metric:
    """A pair metric: its formula, its null value, and how to compute it from a pair's sums."""

    name: str
    label: str  # a column or axis title
    formula: str
    null: str  # what independent and identical matrices give
    compute: Callable[[Mapping[str, float | None]], float | None]
    fmt: str = ".4f"


def _from_cos(f: Callable[[float], float]) -> Callable[[Mapping[str, float | None]], float | None]:
    return lambda v: None if v.get("cos") is None else f(v["cos"])  # type: ignore[arg-type]


def _measured(name: str) -> Callable[[Mapping[str, float | None]], float | None]:
    return lambda v: v.get(name)


PAIR_METRICS: tuple[Metric, ...] = (
    Metric("cos", "raw cos-sim", "<Wa, Wb> / (|Wa| |Wb|)", "1 identical up to scale, 0 orthogonal", _measured("cos"), "+.4f"),
    Metric("resid_norm", "residual norm", "|Wb/|Wb| - Wa/|Wa||  = sqrt(max(2 - 2 cos, 0))",
           "0 identical, sqrt(2) = 1.414 orthogonal", _from_cos(lambda c: math.sqrt(max(2.0 - 2.0 * c, 0.0)))),
    Metric("scalar_fit", "scalar-fit residual", "sqrt(max(1 - cos^2, 0))", "0 identical up to scale, 1 orthogonal",
           _from_cos(lambda c: math.sqrt(max(1.0 - c * c, 0.0)))),
    Metric("resid_eff_rank", "residual effective rank", "exp(H), H = -sum p ln p, p = s^2 / sum s^2 (--rank)",
           "1 for a rank-1 change", _measured("resid_eff_rank"), ".2f"),
    Metric("resid_spec_entropy", "residual spectral entropy", "H (--rank)", "0 for a rank-1 change",
           _measured("resid_spec_entropy")),
    Metric("resid_stable_rank", "residual stable rank", "|D|_F^2 / |D|_2^2 (--rank)", "1 for a rank-1 change",
           _measured("resid_stable_rank"), ".2f"),
    Metric("gram_cos", "centred Gram cosine", "<G~a, G~b> / (|G~a| |G~b|), G on the residual side (--gram)",
           "~0 independent isotropic, 1 same up to scale and a permutation/rotation of the other side",
           _measured("gram_cos"), "+.4f"),
)
METRICS: dict[str, Metric] = {m.name: m for m in PAIR_METRICS}


def pair_values(measured: Mapping[str, float | None]) -> dict[str, float | None]:
    """Every pair metric, in registry order, from what the passes measured."""
    return {m.name: m.compute(measured) for m in PAIR_METRICS}


def _median(x: np.ndarray) -> float:
    """np.median's value (NaN if any is NaN), without the ~15 ms import of numpy.ma it triggers."""
    v = np.sort(x)
    if len(v) == 0 or np.isnan(v[-1]):
        return float("nan")
    return float((v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2)


@dataclass(frozen=True)
class Summary:
    """A per-family summary over a stack's pairs (a mean, a median, a count)."""

    name: str
    metric: str  # the pair metric it summarises ("" for a count or a derived rule)
    rule: Callable[[np.ndarray], float]
    optional: bool = False  # None when no pair has the metric (e.g. mean_SE without --rank)


SUMMARIES: tuple[Summary, ...] = (
    Summary("n_pairs", "cos", lambda x: len(x)),
    Summary("mean_cos", "cos", lambda x: float(x.mean())),
    Summary("median_cos", "cos", lambda x: _median(x)),
    Summary("raw_resid", "resid_norm", lambda x: float(x.mean())),
    Summary("scalar_fit", "scalar_fit", lambda x: float(x.mean())),
    Summary("mean_SE", "resid_spec_entropy", lambda x: float(x.mean()), optional=True),
    Summary("mean_eff_rank", "resid_eff_rank", lambda x: float(x.mean()), optional=True),
    Summary("mean_gram_cos", "gram_cos", lambda x: float(x.mean()), optional=True),
)
# Derived from other summaries, placed after the named one: (name, after, formula).
DERIVED_SUMMARIES: tuple[tuple[str, str, Callable[[dict[str, float | None]], float | None]], ...] = (
    ("improve_frac", "scalar_fit", lambda s: (s["raw_resid"] - s["scalar_fit"]) / max(s["raw_resid"], EPS)),  # type: ignore[operator]
)


def summarise(pairs: list[Mapping[str, float | None]]) -> dict[str, float | None]:
    """A family's summary over its adjacent pairs (each a mapping of pair metrics)."""
    out: dict[str, float | None] = {}
    for s in SUMMARIES:
        vals = np.array([p[s.metric] for p in pairs if p.get(s.metric) is not None], dtype=np.float64)
        out[s.name] = None if s.optional and not len(vals) else s.rule(vals)
        for name, after, formula in DERIVED_SUMMARIES:
            if after == s.name:
                out[name] = formula(out)
    return out


# --- two checkpoints: one tensor (or one part of it) in A and in B -----------------

DiffSums = Mapping[str, float]  # aa, bb, ab, dd (= |B - A|^2), equal, n, max_abs


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 and math.isfinite(num) and math.isfinite(den) else None


def _diff_cos(s: DiffSums) -> float | None:
    ok = s["aa"] > 0 and s["bb"] > 0 and all(math.isfinite(s[k]) for k in ("aa", "bb", "ab"))
    return float(s["ab"] / math.sqrt(s["aa"] * s["bb"])) if ok else None


@dataclass(frozen=True)
class DiffMetric:
    """A metric of one tensor in A against the same tensor in B, from the diff kernel's sums."""

    name: str
    label: str
    formula: str
    null: str
    compute: Callable[[DiffSums], float | bool | None]


DIFF_METRICS: tuple[DiffMetric, ...] = (
    DiffMetric("cos", "cos(A, B)", "<A, B> / (|A| |B|)", "1 unchanged up to scale", _diff_cos),
    DiffMetric("rel_change", "relative change", "|B - A|_F / |A|_F", "0 unchanged",
               lambda s: None if s["aa"] <= 0 else _ratio(math.sqrt(s["dd"]), math.sqrt(s["aa"]))),
    DiffMetric("norm_a", "|A|_F", "|A|_F", "", lambda s: math.sqrt(s["aa"]) if math.isfinite(s["aa"]) else None),
    DiffMetric("norm_b", "|B|_F", "|B|_F", "", lambda s: math.sqrt(s["bb"]) if math.isfinite(s["bb"]) else None),
    DiffMetric("norm_ratio", "|B| / |A|", "|B|_F / |A|_F", "1 same scale",
               lambda s: None if s["aa"] <= 0 else _ratio(math.sqrt(s["bb"]), math.sqrt(s["aa"]))),
    DiffMetric("frac_equal", "fraction equal", "elements whose decoded values are equal / all elements",
               "1 identical", lambda s: s["equal"] / s["n"] if s["n"] else None),
    DiffMetric("max_abs_diff", "max |B - A|", "max over elements of |B - A|", "0 identical",
               lambda s: s["max_abs"] if math.isfinite(s["max_abs"]) else None),
    DiffMetric("identical", "identical", "every element equal", "true", lambda s: bool(s["n"]) and s["equal"] == s["n"]),
)
# With --rank, the spectrum of D = B - A (None where not computed).
# and with --gram, the centred Gram cosine of A and B.
# With --rank-approx, `delta_rank_bounds` holds the sketch's guaranteed intervals.
DELTA_METRICS = ("delta_eff_rank", "delta_stable_rank", "delta_rank_90", "delta_rank_99", "delta_rank_bounds",
                 "gram_cos")
DELTA_FROM_SPECTRUM = {"delta_eff_rank": "resid_eff_rank", "delta_stable_rank": "resid_stable_rank",
                       "delta_rank_90": "resid_rank_90", "delta_rank_99": "resid_rank_99",
                       "delta_rank_bounds": "resid_rank_bounds", "gram_cos": "gram_cos"}


def diff_values(sums: DiffSums, spectrum: Mapping[str, object] | None = None) -> dict[str, object]:
    """Every diff metric, in registry order, from one tensor's (or part's) sums."""
    out: dict[str, object] = {m.name: m.compute(sums) for m in DIFF_METRICS}
    for name in DELTA_METRICS:
        out[name] = spectrum.get(DELTA_FROM_SPECTRUM[name]) if spectrum else None
    return out
