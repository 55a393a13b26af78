"""What a caller asks of an analysis: budget, workers, selection, extra passes."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SelectionError

MiB = 1 << 20
RANK_MODES = (None, "exact", "auto", "sketch")


@dataclass(frozen=True)
class ScanOptions:
    """Options of `scan` (and of the scans inside `diff` and `sweep`).

    `all_pairs`: every layer against every other; `gram`: the permutation-
    invariant centred Gram cosine of adjacent layers; `pca_biases`: the scale
    track's PCA over biases as well as matrices and norms. `rank`: residual spectra, None (off), "exact" (Gram matrices; fail up front
    if they do not fit), "auto" (exact where it fits, else a sketch with
    guaranteed bounds) or "sketch" (sketch everywhere); `sketch` is its number
    of columns (0: as many as fit, up to 512)."""

    max_memory: int = 256 * MiB
    jobs: int = 0  # 0: all cores
    stacks: tuple[str, ...] = ()
    families: tuple[str, ...] = ()
    layers: tuple[int, int] | None = None
    rank: str | None = None
    sketch: int = 0
    all_pairs: bool = False  # the L x L cosine matrix of every family (one multi-stream pass)
    gram: bool = False  # gram_cos: the centred Gram cosine on the residual side, per adjacent pair
    pca_biases: bool = False  # the scale track's PCA over biases too (their norms follow other schedules)

    def __post_init__(self) -> None:
        if self.rank not in RANK_MODES:
            raise SelectionError("rank", f"must be one of {', '.join(str(m) for m in RANK_MODES)}, not {self.rank!r}")
        if self.sketch and self.rank not in ("auto", "sketch"):
            raise SelectionError("sketch", "applies to rank='auto' or 'sketch' (--rank-approx)")
        if self.layers is not None and not (0 <= self.layers[0] < self.layers[1]):
            raise SelectionError("layers", f"{self.layers[0]}:{self.layers[1]} selects no layers")
        if self.max_memory <= 0 or self.jobs < 0:
            raise SelectionError("max_memory" if self.max_memory <= 0 else "jobs", "must be positive")
