"""Spectra -> numbers: spectral entropy, effective and stable rank, and their
guaranteed bounds when only a sketch of the spectrum is known.

See `layerdiff.engine.gram` for how the spectra are accumulated.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

SPEC_EPS = 1e-12  # the seed's clip of p in spec_entropy
ROUNDING = 1e-8  # relative margin on the sketch's bounds for floating-point rounding
MASS_FRACTIONS = (0.9, 0.99)  # resid_rank_90, resid_rank_99


def _mass_entropy(mass: np.ndarray) -> float:
    """The seed's `spec_entropy`, from squared singular values (eigenvalues of D^T D)."""
    p = mass / max(float(mass.sum()), SPEC_EPS)
    p = np.clip(p, SPEC_EPS, 1.0)
    return float(-(p * np.log(p)).sum())


def exact_stats(eigenvalues: np.ndarray) -> dict[str, Any]:
    """Entropy, effective and stable rank from all eigenvalues of D^T D."""
    lam = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    total = float(lam.sum())
    if total == 0.0:
        return {"resid_spec_entropy": 0.0, "resid_eff_rank": 0.0, "resid_stable_rank": 0.0,
                "resid_rank_90": 0, "resid_rank_99": 0,
                "resid_rank_note": "zero residual: the layers are equal up to a positive factor"}
    h = _mass_entropy(lam)
    return {"resid_spec_entropy": h, "resid_eff_rank": math.exp(h), "resid_stable_rank": total / float(lam.max()),
            **{f"resid_rank_{round(q * 100)}": mass_rank(lam, q) for q in MASS_FRACTIONS}}


def mass_rank(lam: np.ndarray, q: float) -> int:
    """The fewest singular values whose squares hold a fraction q of |D|_F^2
    (the rank a low-rank update, e.g. LoRA, needs to capture that much)."""
    mass = np.sort(np.clip(np.asarray(lam, dtype=np.float64), 0.0, None))[::-1]
    cum = np.cumsum(mass)
    return int(np.searchsorted(cum, q * cum[-1] * (1 - 1e-12)) + 1)


def mass_rank_bounds(mu: np.ndarray, total: float, q: float) -> tuple[int, int | None]:
    """Guaranteed bounds on `mass_rank` from a sketch: lambda_i >= mu_i (sorted) and
    sum_{i<=j} lambda_i <= sum_{i<=j} mu_i + r, r = total - sum mu. The upper
    bound is None when the sketch's values never reach q * total."""
    mu = np.sort(np.clip(np.asarray(mu, dtype=np.float64), 0.0, None))[::-1]
    cum = np.cumsum(mu) if len(mu) else np.zeros(1)
    r = max(total - float(cum[-1]), 0.0)
    lo = int(np.searchsorted(cum + r, q * total * (1 - 1e-12)) + 1)
    hi = int(np.searchsorted(cum, q * total * (1 - 1e-12)) + 1)
    return lo, hi if hi <= len(mu) else None


def entropy_bounds(mu: np.ndarray, total: float, d: int, slack: float = 0.0) -> tuple[float, float, float, float]:
    """Guaranteed (H_low, H_high, top_low, top_high) for a spectrum of d values
    summing to `total` whose sorted values satisfy lambda_i >= mu_i and, for every
    j, sum_{i<=j} lambda_i <= sum_{i<=j} mu_i + r with r = total - sum mu
    (what a Nystrom approximation G_hat <= G guarantees). `slack` widens r and
    lowers mu for rounding. top_* bound the largest value."""
    mu = np.sort(np.clip(np.asarray(mu, dtype=np.float64) - slack, 0.0, None))[::-1][:d]
    r = max(total - float(mu.sum()), 0.0) + slack * d
    total = float(mu.sum()) + r
    k = len(mu)
    # Least entropy: the missing mass on the largest value (majorises every feasible spectrum).
    low = np.zeros(d)
    low[:k] = mu
    low[0] += r
    # Most entropy: water-filling max(mu_i, c) (majorised by every feasible spectrum).
    full = np.zeros(d)
    full[:k] = mu
    c = _water_level(full, total)
    high = np.maximum(full, c)
    # The seed's clip of p at 1e-12 makes the entropy not quite Schur-concave
    # below 1e-12: allow for it.
    pad = d * SPEC_EPS * -math.log(SPEC_EPS)
    return _mass_entropy(low) - pad, _mass_entropy(high) + pad, float(mu[0] if k else 0.0), float(mu[0] + r if k else r)


def _water_level(x: np.ndarray, total: float) -> float:
    """c with sum(max(x_i, c)) = total, for x sorted in decreasing order."""
    d = len(x)
    if total <= float(x.sum()):
        return 0.0
    suffix = np.cumsum(x[::-1])[::-1]  # suffix[i] = sum x[i:]
    head = float(x.sum()) - suffix  # sum x[:i]
    for i in range(d):  # entries i.. are flooded to c
        c = (total - head[i]) / (d - i)
        if i == 0 or c <= x[i - 1]:
            if c >= x[i]:
                return c
    return (total - float(x.sum())) / d + float(x.max())


def sketch_stats(mu: np.ndarray, total: float, d: int, k: int, slack: float) -> dict[str, Any]:
    if total <= 0.0:
        return exact_stats(np.zeros(1))
    h_lo, h_hi, top_lo, top_hi = entropy_bounds(mu, total, d, slack)
    # Widened by a rounding margin: the extremes are computed in floating point too.
    h_lo = max(h_lo - ROUNDING * max(1.0, h_lo), 0.0)
    h_hi = min(h_hi + ROUNDING * max(1.0, h_hi), math.log(d) + d * SPEC_EPS * -math.log(SPEC_EPS))
    mid = 0.5 * (h_lo + h_hi)
    sr_lo = total / max(top_hi, 1e-300) * (1 - ROUNDING)
    sr_hi = total / max(top_lo, 1e-300) * (1 + ROUNDING)
    ranks = {q: mass_rank_bounds(mu, total, q) for q in MASS_FRACTIONS}
    return {
        "resid_spec_entropy": mid,
        "resid_eff_rank": math.exp(mid),
        "resid_stable_rank": math.sqrt(sr_lo * sr_hi),
        # A point value only where the bounds meet: an interval is in resid_rank_bounds.
        **{f"resid_rank_{round(q * 100)}": lo if lo == hi else None for q, (lo, hi) in ranks.items()},
        "resid_rank_bounds": {
            "method": f"Nystrom sketch of D^T D, {k} columns: guaranteed bounds",
            "spec_entropy": [h_lo, h_hi],
            "spec_entropy_err": 0.5 * (h_hi - h_lo),
            "eff_rank": [math.exp(h_lo), math.exp(h_hi)],
            "stable_rank": [sr_lo, sr_hi],
            "captured": float(min(max(np.clip(mu, 0, None).sum() / total, 0.0), 1.0)),
            **{f"rank_{round(q * 100)}": [lo, hi] for q, (lo, hi) in ranks.items()},
        },
    }


def nystrom_lower(y: np.ndarray, omega: np.ndarray) -> tuple[np.ndarray, float]:
    """Eigenvalues of the Nystrom approximation of G from Y = G Omega (Tropp et al.
    2017, stabilised by a shift nu): each is <= the matching eigenvalue of G.
    Returns (mu, nu)."""
    n = y.shape[0]
    nu = math.sqrt(n) * np.finfo(np.float64).eps * float(np.linalg.norm(y))
    nu = max(nu, 1e-300)
    for _ in range(8):
        y_nu = y + nu * omega
        w = omega.T @ y_nu
        w = 0.5 * (w + w.T)
        try:
            chol = np.linalg.cholesky(w)
        except np.linalg.LinAlgError:
            nu *= 100.0
            continue
        b = np.linalg.solve(chol, y_nu.T).T  # y_nu chol^-T
        sv = np.linalg.svd(b, compute_uv=False)
        return np.clip(sv**2 - nu, 0.0, None), nu
    return np.zeros(0), nu  # no usable sketch: bounds from the total alone
