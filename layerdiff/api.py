"""The Python API: open a MODEL, plan the passes within the budget, run them, get typed results.

    import layerdiff
    result = layerdiff.scan("path/to/checkpoint", max_memory="256M", rank=True)
    result.main.summary["q_proj"]["mean_cos"]
    result.to_frame()            # a tidy pandas table (layerdiff[frame])

Every step fails up front with a LayerdiffError subclass: resolving the model
(SourceError), reading headers (FormatError), planning within the budget
(BudgetError), the selection (SelectionError).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .checkpoint.files import watching
from .checkpoint.index import TensorIndex, load_index
from .checkpoint.reader import dropping
from .checkpoint.sources import Source, resolve
from .engine import chain, multi
from .engine.plan import Plan, plan_scan
from .errors import SelectionError
from .layout import Layout, build_layout
from .metrics.allpairs import chain_totals, with_all_pairs
from .metrics.stack import stack_result
from .options import MiB, ScanOptions
from .result import ScanResult
from .sizes import parse_layers, parse_size

if TYPE_CHECKING:  # --rank and --gram only: imported when asked for (start-up time)
    from .engine import centred, gram

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Model:
    """A resolved checkpoint: where its files are, its header index, its layout.

    A layout built by hand (another tool's index, a test) has no source."""

    layout: Layout
    source: Source | None = None
    index: TensorIndex | None = None


def open_model(model: str, revision: str | None = None, cache_dir: str | None = None) -> Model:
    """Resolve MODEL (path, index file, hub id, `org/name@REV`) and read its headers."""
    source = resolve(model, revision, cache_dir)
    index = load_index(source.files, source.index_file)
    return Model(build_layout(index, source.config), source, index)


def inspect(model: str, revision: str | None = None, cache_dir: str | None = None) -> dict[str, Any]:
    """What `layerdiff inspect --json` prints: shards, stacks, families, the mapping used."""
    from .present.inspect import inspect_doc

    m = open_model(model, revision, cache_dir)
    assert m.source is not None and m.index is not None
    return inspect_doc(m.source, m.index, m.layout)


def scan_options(max_memory: int | str = 256 * MiB, jobs: int = 0, stacks: tuple[str, ...] | list[str] = (),
                 families: tuple[str, ...] | list[str] = (), layers: tuple[int, int] | str | None = None,
                 rank: bool | str | None = None, sketch: int = 0, all_pairs: bool = False,
                 gram: bool = False, pca_biases: bool = False) -> ScanOptions:
    """ScanOptions from friendly values: sizes as '256M', layers as '4:12', rank=True for exact."""
    memory = parse_size(max_memory) if isinstance(max_memory, str) else max_memory
    layer_range = parse_layers(layers) if isinstance(layers, str) else layers
    mode = "exact" if rank is True else (rank or None)
    return ScanOptions(memory, jobs, tuple(stacks), tuple(families), layer_range, mode, sketch, all_pairs, gram,
                       pca_biases)


@dataclass
class ScanJob:
    """A scan planned within its budget, not yet run: `total` progress units, then `run()`."""

    model: Model
    options: ScanOptions
    plan: Plan
    rank_plan: gram.RankPlan | None
    centred_plan: centred.CentredPlan | None = None

    @property
    def total(self) -> int:
        more = self.centred_plan.total_bytes(self.plan) if self.centred_plan else 0
        if self.rank_plan is None:
            return self.plan.bytes_total + more
        extra = self.plan.bytes_total if self.options.all_pairs else 0  # all-pairs reads everything once more
        return self.rank_plan.total_bytes(self.plan) + extra + more

    def run(self, progress: Progress | None = None) -> ScanResult:
        # A shard that changed while it was read is the error, whatever else happened.
        with watching(self.model.index.stamps() if self.model.index else []), \
                dropping(self.plan.paging(self.total, self.options.max_memory)):
            return self._run(progress)

    def _run(self, progress: Progress | None) -> ScanResult:
        started = time.perf_counter()
        plan, rplan = self.plan, self.rank_plan
        ranks = grams = None
        passes: dict[str, int] = {}  # bytes each pass's readers handed out: run.bytes_mapped is their sum
        if self.options.all_pairs:
            # Every layer's block at once: all inner products, the adjacent ones among them.
            grams, io = multi.execute(plan, progress=progress)
            passes["all_pairs"] = io["bytes_mapped"]
            totals = [chain_totals(g) for g, _ in grams]
            if rplan is not None:
                from .engine import gram

                _, ranks, rank_io = gram.run_rank(plan, rplan, progress)
                io, passes["rank"] = io | rank_io, rank_io["rank_bytes_mapped"]
        elif rplan is not None:
            # 2-D families: one pair-major pass gives norms, cosines and spectra (each
            # tensor read twice); the rest (1-D) takes the chain pass.
            done = rplan.segments
            rest = [s for i, s in enumerate(plan.segments) if i not in done]
            part_totals, io = (chain.execute(Plan(rest, plan.skipped, plan.jobs, plan.block), progress) if rest
                               else ([], {"bytes_mapped": 0, "read_bytes": 0}))
            passes["chain"] = io["bytes_mapped"]
            from .engine import gram

            rank_totals, ranks, rank_io = gram.run_rank(plan, rplan, progress)
            it = iter(part_totals)
            totals = [rank_totals[i] if i in done else next(it) for i in range(len(plan.segments))]
            io, passes["rank"] = io | rank_io, rank_io["rank_bytes_mapped"]
        else:
            totals, io = chain.execute(plan, progress)
            passes["chain"] = io["bytes_mapped"]
        gram_mats: dict[tuple[int, int], Any] = {}
        if self.centred_plan is not None:
            from .engine import centred

            values, passes["gram"] = centred.run_centred(plan, self.centred_plan, progress)
            for key, v in values.items():
                ranks = ranks or {}
                ranks[key] = ranks.get(key, {}) | v
            if self.centred_plan.matrix_tasks:
                gram_mats, passes["gram_all_pairs"] = centred.run_matrices(plan, self.centred_plan)
        io = io | {"bytes_mapped": sum(passes.values()), "bytes_mapped_by_pass": passes}
        return self.result(totals, io, ranks, time.perf_counter() - started, grams, gram_mats)

    def result(self, totals: chain.Totals, io: dict[str, int], ranks: dict[Any, Any] | None = None,
               seconds: float = 0.0, grams: Any = None, gram_mats: dict[tuple[int, int], Any] | None = None
               ) -> ScanResult:
        """The typed result from the passes' per-segment sums (which may come from
        several runs over parts of the plan, added up: a sweep's distributed tasks)."""
        plan, rplan = self.plan, self.rank_plan
        layout = self.model.layout
        stacks = {name: stack_result(name, layout, plan, totals, ranks, self.options.pca_biases)
                  for name in sorted({s.stack for s in plan.segments})}
        if grams is not None:
            left = self.centred_plan.matrix_left_out if self.centred_plan else {}
            stacks = {name: with_all_pairs(st, layout, plan, grams, gram_mats or {}, left) for name, st in stacks.items()}
        main = layout.main_stack()
        main_name = main.name if main and main.name in stacks else next(iter(stacks))
        o = self.options
        settings = {
            "max_memory": o.max_memory, "jobs": plan.jobs, "block_elements": plan.block,
            "stacks": list(o.stacks), "families": list(o.families), "layers": list(o.layers) if o.layers else None,
            "rank": rplan.describe() if rplan else None, "all_pairs": o.all_pairs,
            "gram": self.centred_plan.describe() if self.centred_plan else None, "pca_biases": o.pca_biases,
        }
        run = {"seconds": seconds, "bytes_analysed": plan.bytes_total, **io}
        source = self.model.source
        return ScanResult(source.spec if source else "", source.describe() if source else {}, layout.arch,
                          main_name, stacks, settings, run, layout.labels(list(stacks), main_name))


def plan(model: Model, options: ScanOptions) -> ScanJob:
    """Plan a scan: segments, workers, blocks and (with rank) the spectra, all within the budget."""
    p = plan_scan(model.layout, options)
    rank_plan = centred_plan = None
    if options.rank:
        from .engine import gram

        rank_plan = gram.plan_rank(p, options)
    if options.gram:
        from .engine import centred

        centred_plan = centred.plan_centred(p, model.layout, options)
    return ScanJob(model, options, p, rank_plan, centred_plan)


def scan(model: str | Model, progress: Progress | None = None, revision: str | None = None,
         cache_dir: str | None = None, **options: Any) -> ScanResult:
    """The null test of one checkpoint: adjacent-layer cosines, residuals, scale track.

    Options as `scan_options` takes them (max_memory, jobs, stacks, families,
    layers, rank, sketch); `progress` is called with bytes done."""
    m = model if isinstance(model, Model) else open_model(model, revision, cache_dir)
    if isinstance(model, Model) and (revision or cache_dir):
        raise SelectionError("revision", "applies to a MODEL string, not to an opened Model")
    return plan(m, scan_options(**options)).run(progress)
