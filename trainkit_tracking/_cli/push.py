"""The ``push`` command: copy the runs of one store into another, exactly once."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from trainkit_tracking._cli.common import EXIT_PROBLEM, CliError, Duration, one_line, plural

if TYPE_CHECKING:
    from trainkit_tracking._push.push import PushReport

_VERBS = {"create": "would create", "update": "would update", "skipped": "would skip"}


class _Bar:
    """Runs done as a bar, points sent beside it; nothing when stderr is not a terminal."""

    def __init__(self, dry_run: bool) -> None:
        self.label = "checking" if dry_run else "pushing"
        self.bar: Any = None
        self.shown = 0
        self.points = 0

    def __call__(self, runs: int, total: int, points: int) -> None:
        self.points = points
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            self.bar = click.progressbar(
                length=max(total, 1),
                label=self.label,
                file=sys.stderr,
                item_show_func=lambda _: f"{self.points} points",
            ).__enter__()
        self.bar.update(runs - self.shown, current_item=points)
        self.shown = runs

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def report_lines(report: PushReport) -> list[str]:
    """What the command prints: one line per run to write (dry run), then a summary."""
    lines: list[str] = []
    if report.dry_run:
        for run in report.runs:
            if run.action == "unchanged":
                continue
            lines.append(
                f"{_VERBS.get(run.action, run.action)} {run.name or run.source_run_id} "
                f"({run.source_run_id}, experiment {run.experiment!r}) in {run.target}: "
                f"{plural(run.points, 'point')}, {plural(run.params, 'param')}, "
                f"{plural(run.tags, 'tag')}, {plural(run.artifacts, 'artifact')}"
            )
    if not report.runs:
        lines.append(f"nothing to push from {report.source}")
        return lines
    prefix = "dry run, nothing written: would push" if report.dry_run else "pushed"
    verb = "would be " if report.dry_run else ""
    lines.append(
        f"{prefix} {plural(len(report.runs), 'run')} from {report.source} to "
        f"{', '.join(report.targets)}: {report.created} {verb}created, {report.updated} "
        f"{verb}updated, {report.unchanged} unchanged; {plural(report.points, 'point')}, "
        f"{plural(report.artifacts, 'artifact')}"
    )
    if report.experiments_created:
        lines.append(f"created experiments: {', '.join(report.experiments_created)}")
    return lines


@click.command("push", short_help="Copy runs of one store into another, exactly once.")
@click.option(
    "--from",
    "from_uri",
    metavar="URI",
    help="The store to push from (default: this machine's local store, e.g. "
    "./mlruns/mlflow.db, and only the runs marked code.push_to).",
)
@click.option(
    "--to",
    "to_uri",
    metavar="URI",
    help="The store to push into (default: each run's recorded code.push_to target).",
)
@click.option("--experiment", "-e", help="Only this experiment of the source (by name).")
@click.option("--dry-run", is_flag=True, help="List what would be pushed; write nothing.")
@click.option(
    "--verify",
    is_flag=True,
    help="Compare full metric histories even of runs whose sync mark says unchanged.",
)
@click.option(
    "--timeout",
    type=Duration(),
    default="30s",
    show_default=True,
    metavar="DURATION",
    help="The most any one call to a store may take: 90s, 30m, 2h.",
)
@click.option("--project", help="Finds the local store on Colab (as Tracker(project=...)).")
def push_command(
    from_uri: str | None,
    to_uri: str | None,
    experiment: str | None,
    dry_run: bool,
    verify: bool,
    timeout: float,
    project: str | None,
) -> None:
    """Copy runs of one store into another: experiments by name, runs in tree order,
    params, full metric histories, tags, statuses, times and artifacts.

    Exactly once: pushing again sends only what the target lacks; a push that was
    killed completes when run again. Source run ids are mapped to the target's in
    parent ids and lineage tags; each target run records code.pushed_from.
    """
    from trainkit_tracking._push.push import push
    from trainkit_tracking.errors import TrackingError

    bar = _Bar(dry_run)
    try:
        report = push(
            from_uri,
            to_uri,
            experiment,
            dry_run=dry_run,
            progress=bar,
            timeout=timeout,
            verify=verify,
            project=project,
        )
    except TrackingError as exc:
        raise CliError(str(exc)) from exc
    except TimeoutError as exc:
        raise CliError(
            f"{exc}: the store is too slow or does not answer; check it (or pass a longer "
            "--timeout) and push again: nothing is lost or doubled"
        ) from exc
    finally:
        bar.close()
    for line in report_lines(report):
        click.echo(one_line(line))
    for warning in report.warnings:
        click.echo(f"warning: {one_line(warning)}", err=True)
    if any(run.action == "skipped" for run in report.runs):
        sys.exit(EXIT_PROBLEM)
