"""Command line: parses, calls the library, prints. No analysis lives here."""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import LayerdiffError
from .present.escape import printable

# Library option names -> the flags that set them, for error messages.
FLAGS = {"max_memory": "--max-memory", "layers": "--layers", "stack": "--stack", "family": "--family",
         "rank": "--rank", "sketch": "--sketch", "jobs": "--jobs", "revision": "--revision",
         "revisions": "--revisions", "reference": "--reference", "dask": "--dask", "gram": "--gram"}

# Exit statuses (README, Errors): 0 done, 1 bad input, 2 usage error, 130 interrupted.
EXIT_BAD_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def clean_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input -> one line on stderr and exit 1; Ctrl-C -> exit 130."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LayerdiffError as e:
            where = FLAGS.get(e.where, e.where)
            message, code = f"layerdiff: error: {printable(where)}: {printable(e.problem)}", EXIT_BAD_INPUT
        except KeyboardInterrupt:
            message, code = "layerdiff: interrupted; nothing written", EXIT_INTERRUPTED
        # Out of the `except`: the traceback is gone, and with it the frames that
        # held a pass's worker pool open; its workers are ended before the exit.
        click.echo(message, err=True)
        sys.exit(code)

    return wrapper


class _Main(click.Group):
    """click's usage errors as one line, `layerdiff: usage error: ...`, exit 2 (no usage block)."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.exceptions.NoArgsIsHelpError as e:  # plain `layerdiff`: the help, as click shows it
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:
            names, ctx = [], e.ctx
            while ctx is not None and ctx.parent is not None:
                names.append(ctx.info_name or "")
                ctx = ctx.parent
            command = " ".join(["layerdiff", *reversed(names)])
            click.echo(f"layerdiff: usage error: {printable(e.format_message())} (see {command} --help)", err=True)
            sys.exit(EXIT_USAGE)
        except click.Abort:
            click.echo("layerdiff: interrupted; nothing written", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as e:
            click.echo(f"layerdiff: error: {printable(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--cache-dir", type=click.Path(file_okay=False), help="Hub cache (default: HF_HUB_CACHE).")(fn)
    fn = click.option("--revision", help="Hub branch, tag or commit (hub repo ids only).")(fn)
    return click.argument("model")(fn)


def rank_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
                      help="Also plot the trajectories across depth to this .png or .svg (needs layerdiff[plot]).")(fn)
    fn = click.option("--sketch", type=click.IntRange(min=0), default=0,
                      help="Columns of the --rank-approx sketch (default: up to 512, as memory allows).")(fn)
    fn = click.option("--rank-approx", is_flag=True,
                      help="Like --rank, but families whose Gram matrices exceed --max-memory get a sketch "
                           "with guaranteed error bounds instead of an error.")(fn)
    return click.option("--rank", is_flag=True,
                        help="Also the spectrum of each residual: spectral entropy, effective and stable rank "
                             "(exact; reads each 2-D tensor three times).")(fn)


def rank_mode(rank: bool, rank_approx: bool, sketch: int) -> str | None:
    if rank_approx:
        return "auto"
    if sketch:
        raise click.UsageError("--sketch applies to --rank-approx")
    return "exact" if rank else None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="layerdiff")
def main() -> None:
    """Compare transformer layers straight from safetensors shards."""


@main.command()
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@clean_errors
def inspect(model: str, revision: str | None, cache_dir: str | None, as_json: bool) -> None:
    """List shards, stacks, families and sizes, reading headers only."""
    from .present.inspect import inspect_text

    from .api import inspect as inspect_model

    doc = inspect_model(model, revision, cache_dir)
    click.echo(json.dumps(doc, indent=2) if as_json else inspect_text(doc))


@main.command()
@model_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON here.")
@click.option("--max-memory", default="256M", show_default=True, help="Peak resident memory of all processes.")
@click.option("--stack", "stacks", multiple=True, help="Only this stack (repeatable).")
@click.option("--family", "families", multiple=True, help="Only this family, canonical or raw name (repeatable).")
@click.option("--layers", help="Only layers A..B-1, as A:B.")
@click.option("--jobs", type=click.IntRange(min=0), default=0, help="Worker processes (default: all cores).")
@click.option("--quiet", is_flag=True, help="No progress bar and no tables.")
@click.option("--all-pairs", is_flag=True, help="Also the L x L cosine matrix of every family (printed for --family).")
@click.option("--gram", is_flag=True,
              help="Also gram_cos: the centred Gram cosine on the residual side, blind to permutations of heads "
                   "and hidden units (reads 2-D tensors again).")
@click.option("--pca-biases", is_flag=True, help="The scale track's PCA over biases too (default: matrices and norms).")
@rank_options
@clean_errors
def scan(model: str, revision: str | None, cache_dir: str | None, out: Path | None, max_memory: str,
         stacks: tuple[str, ...], families: tuple[str, ...], layers: str | None, jobs: int, quiet: bool,
         all_pairs: bool, gram: bool, pca_biases: bool, rank: bool, rank_approx: bool, sketch: int,
         plot: Path | None) -> None:
    """The null test: cosine, residual and scale track of adjacent layers."""
    from .api import open_model, scan_options

    options = scan_options(max_memory, jobs, stacks, families, layers, rank_mode(rank, rank_approx, sketch), sketch,
                           all_pairs, gram, pca_biases)
    _run_scan(open_model(model, revision, cache_dir), options, out, quiet, plot)


@main.command()
@click.argument("a")
@click.argument("b")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON here.")
@click.option("--max-memory", default="256M", show_default=True, help="Peak resident memory of all processes.")
@click.option("--stack", "stacks", multiple=True, help="Only this stack (repeatable).")
@click.option("--family", "families", multiple=True, help="Only this family, canonical or raw name (repeatable).")
@click.option("--layers", help="Only layers A..B-1, as A:B.")
@click.option("--jobs", type=click.IntRange(min=0), default=0, help="Worker processes (default: all cores).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Hub cache (default: HF_HUB_CACHE).")
@click.option("--quiet", is_flag=True, help="No progress bar and no tables.")
@click.option("--gram", is_flag=True, help="Also gram_cos(A, B): the centred Gram cosine on the residual side.")
@rank_options
@clean_errors
def diff(a: str, b: str, out: Path | None, max_memory: str, stacks: tuple[str, ...], families: tuple[str, ...],
         layers: str | None, jobs: int, cache_dir: str | None, quiet: bool, gram: bool, rank: bool,
         rank_approx: bool, sketch: int, plot: Path | None) -> None:
    """What changed from checkpoint A to B, tensor by tensor (A, B: paths or hub ids, org/name@REV)."""
    from .api import open_model, scan_options
    from .compare.run import plan_diff
    from .output import check_outputs
    from .present.diff_text import diff_text

    options = scan_options(max_memory, jobs, stacks, families, layers, rank_mode(rank, rank_approx, sketch), sketch,
                           gram=gram)
    ma, mb = open_model(a, None, cache_dir), open_model(b, None, cache_dir)
    for m in (ma, mb):
        check_outputs([out, plot], m.source, [s.path for s in m.index.shards] if m.index else [])
    if plot is not None:
        from .present.plot import check_plot_path

        check_plot_path(plot)
    job = plan_diff(ma, mb, options)
    result = _with_progress(job, quiet, "diff")
    if not quiet:
        click.echo(diff_text(result))
    _save(result.to_dict(), out, plot, lambda path: _plot_diff(result, path), quiet)


def _with_progress(job: Any, quiet: bool, desc: str) -> Any:
    """job.run() with a progress bar on a terminal (none, and no tqdm import, otherwise)."""
    if quiet or not sys.stderr.isatty():
        return job.run()
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: workers are forked
    with tqdm(total=job.total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
              leave=False) as bar:
        return job.run(bar.update)


@main.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the result as JSON here.")
@rank_options
@clean_errors
def example(out: Path | None, rank: bool, rank_approx: bool, sketch: int, plot: Path | None) -> None:
    """Scan the small Qwen3-shaped checkpoint that ships with layerdiff."""
    from importlib import resources

    from .api import open_model, scan_options

    options = scan_options(rank=rank_mode(rank, rank_approx, sketch), sketch=sketch)
    _run_scan(open_model(str(resources.files("layerdiff") / "example")), options, out, quiet=False, plot=plot)


@main.command()
@click.argument("result", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Image to write: .png or .svg.")
@click.option("--stack", help="Stack to plot (default: the result's main stack).")
@clean_errors
def plot(result: Path, out: Path, stack: str | None) -> None:
    """Plot a scan result: cosines, residual rank and scale track across depth."""
    from .output import check_outputs
    from .present.plot import check_plot_path, plot_result
    from .result import ScanResult

    check_plot_path(out)
    check_outputs([out], inputs=[result])
    doc = ScanResult.from_json(result)
    try:
        plot_result(doc, out, stack)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:  # a result edited by hand
        raise LayerdiffError(result, f"not a valid scan result ({type(e).__name__}: {e})") from None
    click.echo(f"Saved: {out}")


@main.command()
@click.argument("models", nargs=-1, required=True, metavar="MODEL [MODEL ...]")
@click.option("--revisions", metavar="REGEX", help="Every branch and tag of a hub MODEL whose whole name matches "
              "(from the hub; from the hub cache with HF_HUB_OFFLINE=1), in natural order (step1000 < step20000).")
@click.option("--reference", default="first", show_default=True, metavar="first|previous|last|MODEL",
              help="What each checkpoint's drift is measured against.")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Per-checkpoint results (JSON); a rerun reuses what is there.")
@click.option("--table", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the tidy table: .csv, or .parquet (needs layerdiff[parquet]).")
@click.option("--dask", "dask_address", metavar="ADDRESS",
              help="Run on this dask.distributed scheduler, e.g. tcp://host:8786 (needs layerdiff[dask]).")
@click.option("--max-memory", default="256M", show_default=True,
              help="Peak resident memory: of all local processes, or of each task on its dask worker.")
@click.option("--jobs", type=click.IntRange(min=0), default=0, help="Local worker processes (default: all cores).")
@click.option("--stack", "stacks", multiple=True, help="Only this stack (repeatable).")
@click.option("--family", "families", multiple=True, help="Only this family, canonical or raw name (repeatable).")
@click.option("--layers", help="Only layers A..B-1, as A:B.")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Hub cache (default: HF_HUB_CACHE).")
@click.option("--rank", is_flag=True, help="Also the spectra of adjacent pairs' residuals and of the change from the "
              "reference (as scan --rank and diff --rank).")
@click.option("--gram", is_flag=True, help="Also gram_cos, the centred Gram cosine, of adjacent pairs and against "
              "the reference (as scan --gram and diff --gram).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Plot drift per family and a checkpoint x layer heatmap to .png or .svg (needs layerdiff[plot]).")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary.")
@clean_errors
def sweep(models: tuple[str, ...], revisions: str | None, reference: str, out_dir: Path, table: Path | None,
          dask_address: str | None, max_memory: str, jobs: int, stacks: tuple[str, ...], families: tuple[str, ...],
          layers: str | None, cache_dir: str | None, rank: bool, gram: bool, plot: Path | None, quiet: bool) -> None:
    """Scan many checkpoints or revisions, with drift against a reference: one tidy table."""
    from .sweep.run import check_outputs, plan_sweep

    check_outputs(table, plot, dask_address)
    job = plan_sweep(list(models), out_dir=out_dir, revisions=revisions, reference=reference, cache_dir=cache_dir,
                     max_memory=max_memory, jobs=jobs, stacks=stacks, families=families, layers=layers,
                     rank="exact" if rank else None, gram=gram)
    if quiet or not sys.stderr.isatty():
        result = job.run(dask=dask_address)
    else:
        from tqdm import tqdm

        tqdm.monitor_interval = 0
        n = len(job.entries)
        with tqdm(total=job.total, unit="B", unit_scale=True, unit_divisor=1024, desc="sweep", file=sys.stderr,
                  leave=False, postfix=f"{job.done_before}/{n} checkpoints") as bar:
            def progress(nbytes: int, done: int) -> None:
                bar.set_postfix_str(f"{done}/{n} checkpoints", refresh=False)
                bar.update(nbytes)

            result = job.run(progress, dask_address)
    rows = result.write_table(table) if table is not None else None
    if plot is not None:
        from .sweep.plot import plot_sweep

        plot_sweep(result, plot)
    if not quiet:
        click.echo(f"sweep: {len(result.entries)} checkpoints; {len(result.computed)} results computed, "
                   f"{len(result.reused)} reused from {out_dir}")
        if table is not None:
            click.echo(f"Saved: {table} ({rows} rows)")
        if plot is not None:
            click.echo(f"Saved: {plot}")


def _run_scan(model: Any, options: Any, out: Path | None, quiet: bool, plot: Path | None = None) -> None:
    from .api import plan
    from .output import check_outputs

    if plot is not None:
        from .present.plot import check_plot_path

        check_plot_path(plot)  # the format, and matplotlib there, before a long scan
    check_outputs([out, plot], model.source, [s.path for s in model.index.shards] if model.index else [])
    result = _with_progress(plan(model, options), quiet, "scan")  # plan fails up front if it cannot fit
    if not quiet:
        from .present.tables import scan_text

        click.echo(scan_text(result))
    _save(result.to_dict(), out, plot, lambda path: _plot_scan(result, path), quiet)


def _plot_scan(result: Any, path: Path) -> None:
    from .present.plot import plot_result

    plot_result(result, path)


def _plot_diff(result: Any, path: Path) -> None:
    from .present.plot import plot_diff

    plot_diff(result, path)


def _save(doc: dict[str, Any], out: Path | None, plot: Path | None, draw: Callable[[Path], None], quiet: bool) -> None:
    """Both outputs appear, or neither does (a full disk, a failed plot)."""
    from .output import together, write_json

    with together():
        if plot is not None:
            draw(plot)
        if out is not None:
            write_json(out, doc)
    if not quiet:
        for saved in (out, plot):
            if saved is not None:
                click.echo(f"Saved: {saved}")


def run() -> None:
    """The `layerdiff` program: `main`, then a quick exit.

    By the time `main` returns, the outputs are written, synced and renamed and
    the workers are gone; the interpreter's teardown that would follow (freeing
    numpy and every other module) cost ~40 ms of a 0.5 s scan, so it is skipped."""
    try:
        main(prog_name="layerdiff")
        code = 0
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise
        code = e.code or 0
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe, say: Python's own exit reports it
        sys.exit(code)
    os._exit(code)
