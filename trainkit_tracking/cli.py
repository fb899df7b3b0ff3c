"""The ``trainkit-tracking`` command line, also ``python -m trainkit_tracking``.

Exit codes: 0 ok, 1 a problem found, 2 bad usage or invalid input. Errors are one line
(``error: ...``) unless ``--debug``. mlflow is imported only by the commands that need it.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from trainkit_tracking._cli.common import (
    EXIT_PROBLEM,
    EXIT_USAGE,
    CliError,
    Duration,
    all_experiments,
    describe,
    find_experiment,
    one_line,
    open_store,
    progressbar,
)
from trainkit_tracking._cli.policy import policy
from trainkit_tracking._cli.push import push_command
from trainkit_tracking._cli.tree import render_tree
from trainkit_tracking._core.spec import RunKind
from trainkit_tracking._version import __version__

__all__ = ["cli", "main", "render_tree"]

F = TypeVar("F", bound=Callable[..., Any])

# Live runs refresh their heartbeat every 30 s: a shorter reap window could end them.
_MIN_SAFE_REAP = 60.0


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    click.echo(f"warning: {one_line(str(message))}", err=True)


class _Cli(click.Group):
    """A group whose errors are one line, with a traceback only under ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except (click.ClickException, click.exceptions.Exit, click.Abort):
                raise
            except Exception as exc:
                if ctx.params.get("debug"):
                    raise
                raise CliError(f"{describe(exc)} (rerun with --debug for the traceback)") from exc

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CliError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as exc:
            click.echo(f"error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(EXIT_PROBLEM)
        sys.exit(code if isinstance(code, int) else 0)


def _timeout_option(func: F) -> F:
    return click.option(
        "--timeout",
        type=Duration(),
        default="30s",
        show_default=True,
        metavar="DURATION",
        help="The most any call to the store waits, retries included: 90s, 2m.",
    )(func)


def _store_options(*, experiment_help: str) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        func = _timeout_option(func)
        func = click.option(
            "--experiment",
            "-e",
            envvar="MLFLOW_EXPERIMENT_NAME",
            show_envvar=True,
            help=experiment_help,
        )(func)
        return click.option(
            "--tracking-uri",
            metavar="URI",
            help="The MLflow tracking URI. Default: MLFLOW_TRACKING_URI, the Azure ML "
            "workspace when configured, else the embedded local store (./mlruns/mlflow.db).",
        )(func)

    return decorate


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.version_option(__version__, "--version", prog_name="trainkit-tracking")
def cli(debug: bool) -> None:
    """Name, inspect and repair MLflow runs tracked with trainkit-tracking.

    Exit codes: 0 ok, 1 a problem found, 2 bad usage or invalid input.
    """
    if debug:
        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


# doctor ---------------------------------------------------------------------------


@cli.command(short_help="Check the tracking setup: store, versions, spool.")
@_store_options(experiment_help="The experiment to check.")
@click.option(
    "--spool-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The spool to count (default: TRAINKIT_SPOOL_DIR, else ~/.cache/trainkit-tracking/spool).",
)
def doctor(
    tracking_uri: str | None, experiment: str | None, spool_dir: Path | None, timeout: float
) -> None:
    """Show the platform, tracking store, versions and spool, and check the store answers.

    Exits 1 when a problem is found. Secrets are masked.
    """
    from trainkit_tracking._cli.doctor import doctor as run_doctor

    report = run_doctor(tracking_uri, experiment, spool_dir=spool_dir, timeout=timeout)
    click.echo(report.render())
    if report.problems:
        sys.exit(EXIT_PROBLEM)


# name -----------------------------------------------------------------------------

_KINDS = tuple(kind.value for kind in RunKind)


@cli.command(short_help="Print the name the naming policy gives a run.")
@click.option("--kind", "-k", required=True, type=click.Choice(_KINDS, case_sensitive=False))
@click.option("--model", "-m", required=True, help="The model name (normalised in the name).")
@click.option("--study-key-hash")
@click.option("--study-name", help="Gives the sweep name its semantic suffix.")
@click.option("--trial-key-hash")
@click.option("--trial-number", type=int)
@click.option("--fold-idx", type=int)
@click.option("--spec-fp")
@click.option("--exec-fp")
@click.option("--variant", type=int)
@click.option("--conv-fp")
@click.option("--parent-training-id", help="spec_<fp>_exec_<fp>/v<n> (conversion).")
@click.option("--benchmark-config-hash")
@click.option("--env", help="The environment (default: the detected platform).")
@click.option("--storage-env", help="{env} in names (default: --env).")
@click.option("--run-id", help="Fills {run_id} in patterns that use it (else 'unknown').")
@click.option(
    "--policy",
    metavar="FILE",
    help="A naming policy YAML file, or 'default' or 'seed' (default: TRAINKIT_NAMING_POLICY, "
    "else the default policy).",
)
def name(kind: str, model: str, run_id: str | None, policy: str | None, **fields: Any) -> None:
    """Print the base name (without version) the naming policy gives a run.

    An invalid spec exits 2 with one line naming the field.
    """
    from trainkit_tracking._cli.naming import build_spec, load_policy
    from trainkit_tracking.errors import PolicyError

    spec = build_spec(kind, model, fields)
    try:
        click.echo(load_policy(policy).base_name(spec, run_id=run_id))
    except (PolicyError, OSError, UnicodeDecodeError) as exc:
        raise CliError(str(exc), EXIT_USAGE) from exc


# tree -----------------------------------------------------------------------------


@cli.command(short_help="Draw the run tree with status, duration and a metric.")
@_store_options(experiment_help="The experiment whose runs to draw.")
@click.option("--run", "run_id", metavar="ID", help="Draw only this run and its descendants.")
@click.option(
    "--metric",
    help="The metric to show (default: the first of val_loss, eval_loss, loss, accuracy; "
    "for trials the study's metric first). Trials show mean ± std over their folds.",
)
@click.option("--ids", is_flag=True, help="Show each run's id.")
@click.option("--ascii", "use_ascii", is_flag=True, help="Draw with ASCII characters only.")
def tree(
    tracking_uri: str | None,
    experiment: str | None,
    run_id: str | None,
    metric: str | None,
    ids: bool,
    use_ascii: bool,
    timeout: float,
) -> None:
    """Draw the run tree with status, duration and a metric, ordered by start time."""
    from trainkit_tracking._cli.tree import draw

    click.echo(draw(tracking_uri, experiment, run_id, metric, ids, use_ascii, timeout))


# sync -----------------------------------------------------------------------------


@cli.command(short_help="Store what the journal holds, now, with a progress bar.")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send nothing.")
@click.option(
    "--retry-set-aside",
    is_flag=True,
    help="Also send again what was set aside (after restoring a deleted run, say).",
)
@click.option(
    "--spool-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The spool to send (default: TRAINKIT_SPOOL_DIR, else ~/.cache/trainkit-tracking/spool).",
)
@click.option(
    "--tracking-uri",
    metavar="URI",
    help="Send only the records of this store (default: all). Needed for a store whose URI "
    "holds credentials: the spool never keeps them.",
)
@click.option("--experiment", "-e", help="Send only the runs of this experiment (a name or an id).")
@_timeout_option
def sync(
    dry_run: bool,
    retry_set_aside: bool,
    spool_dir: Path | None,
    tracking_uri: str | None,
    experiment: str | None,
    timeout: float,
) -> None:
    """Store everything the journal holds, exactly once, with a progress bar.

    For each store: send it here, or wake the store's sender when one runs, and return
    once every entry is stored or set aside, or once the store has not answered for
    --timeout. Exits 1 when something is left (the store did not answer) or was set aside.
    """
    from trainkit_tracking._cli.ops import sync_lines
    from trainkit_tracking._journal.run_logger import default_spool_dir
    from trainkit_tracking._journal.run_logger import sync as run_sync

    bar: Any = None
    shown = 0

    def progress(done: int, total: int) -> None:
        nonlocal bar, shown
        if bar is None:
            label = "checking" if dry_run else "sending"
            bar = progressbar(total, label).__enter__()
        bar.update(done - shown)
        shown = done

    directory = spool_dir or default_spool_dir()
    try:
        report = run_sync(
            directory,
            tracking_uri=tracking_uri,
            experiment=experiment,
            dry_run=dry_run,
            progress=progress,
            timeout=timeout,
            retry_set_aside=retry_set_aside,
        )
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    for line in sync_lines(report, directory):
        click.echo(one_line(line))
    if report.errors or report.dropped or report.refused:
        sys.exit(EXIT_PROBLEM)


# reap -----------------------------------------------------------------------------


@cli.command(short_help="End RUNNING runs whose process is gone, as KILLED.")
@_store_options(experiment_help="Only this experiment (default: every experiment).")
@click.option(
    "--older-than",
    required=True,
    type=Duration(),
    metavar="DURATION",
    help="End runs not seen alive (heartbeat, else start time) for this long: 90s, 30m, 2h, 1d.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be ended; change nothing.")
def reap(
    tracking_uri: str | None,
    experiment: str | None,
    older_than: float,
    dry_run: bool,
    timeout: float,
) -> None:
    """End RUNNING runs whose process is gone as KILLED, with code.interrupted=true.

    A run is gone when its heartbeat tag (code.heartbeat, refreshed every 30 s while its
    process lives) is older than --older-than; a run without one is judged by its start
    time.
    """
    from trainkit_tracking._cli.ops import find_running, reap_lines
    from trainkit_tracking._cli.ops import reap as run_reap

    if older_than < _MIN_SAFE_REAP:
        click.echo(
            f"warning: live runs refresh their heartbeat every 30 s; --older-than under "
            f"{_MIN_SAFE_REAP:g}s may end runs that are still alive",
            err=True,
        )
    store, _ = open_store(tracking_uri, timeout)
    experiments = [find_experiment(store, experiment)] if experiment else all_experiments(store)
    running = find_running(store, experiments)
    label = "checking running runs" if dry_run else "reaping"
    with progressbar(len(running), label) as bar:
        report = run_reap(store, running, older_than, dry_run=dry_run, progress=bar.update)
    for line in reap_lines(report):
        click.echo(one_line(line))
    if report.errors:
        sys.exit(EXIT_PROBLEM)


cli.add_command(push_command)
cli.add_command(policy)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``trainkit-tracking`` script."""
    cli.main(args=args, prog_name=None if args is None else "trainkit-tracking")
