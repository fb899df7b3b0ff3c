"""What the CLI commands share: one-line errors, durations, store and experiment lookup.

Nothing here imports mlflow at module level: ``--help`` must stay fast.
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

import click

from trainkit_tracking._core.redact import get_logger, redact_value
from trainkit_tracking._core.suggest import close_names, did_you_mean
from trainkit_tracking._store.store import Store, sqlite_path
from trainkit_tracking.errors import TrackingError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2

log = get_logger(__name__)

HIDDEN_EXPERIMENT_PREFIX = ".trainkit"
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CliError(click.ClickException):
    """An error the CLI reports as one line (``error: ...``) with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_PROBLEM) -> None:
        super().__init__(one_line(message))
        # click declares exit_code a ClassVar; one error class with a per-instance code is simpler.
        self.exit_code = exit_code  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=file is None, file=file)


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 run``, ``2 runs`` (``words`` for irregular plurals)."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line, credentials masked, cut to ``limit`` characters."""
    flat = " ".join(redact_value(str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """One line about an unexpected exception: our own errors by message, others by type too."""
    if isinstance(exc, (TrackingError, ValueError, OSError)):
        return one_line(str(exc) or type(exc).__name__)
    return one_line(f"{type(exc).__name__}: {exc}")


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``2h``, ``1d`` (or a sum such as ``1h30m``)."""
    cleaned = text.strip().lower()
    if not cleaned or _DURATION_PART.sub("", cleaned):
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit, e.g. 90s, 30m, 2h or 1d"
        )
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(cleaned))
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be longer than 0s")
    return float(seconds)


# Unsubscripted: ParamType is generic only in newer click, and mlflow allows click 7 and 8.
class Duration(click.ParamType):  # type: ignore[type-arg]
    """A click parameter type for durations (``90s``, ``30m``, ``2h``, ``1d``) in seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, float)):
            return float(value)
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def probe_tcp(uri: str, timeout: float) -> None:
    """Connect to an http(s) store's port: a refused connection fails at once, with OSError,
    instead of after MLflow's minutes of retries."""
    parts = urlsplit(uri)
    host = parts.hostname or "localhost"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((host, port), timeout=timeout):
        pass


@dataclass(frozen=True)
class Resolved:
    """The tracking URI a command uses and where it came from."""

    uri: str
    source: str
    fell_back: bool
    warnings: tuple[str, ...] = ()

    @property
    def shown(self) -> str:
        return redact_value(self.uri)


SOURCE_LABELS = {
    "argument": "--tracking-uri",
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
    "azure workspace": "Azure ML workspace (AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, "
    "AZUREML_WORKSPACE_NAME)",
    "local store": "default: the embedded local store",
}


def resolve_uri(tracking_uri: str | None) -> Resolved:
    """SPEC section 6 resolution through the Tracker, with its warnings collected."""
    import warnings

    from trainkit_tracking._core.naming import NamingPolicy
    from trainkit_tracking._runs.tracker import Tracker

    # Only the URI is wanted: a bad TRAINKIT_NAMING_POLICY must not stop every command.
    tracker = Tracker(None, tracking_uri, policy=NamingPolicy.default(), cv_metrics=())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        uri, source = tracker.resolve_tracking_uri()
    messages = tuple(one_line(str(w.message)) for w in caught)
    return Resolved(uri, source, tracker.fell_back_to_local, messages)


def open_store(tracking_uri: str | None, timeout: float = 30.0) -> tuple[Store, Resolved]:
    """A Store for reading: resolved URI, a clear error when a local store does not exist.

    Every call of the store waits at most ``timeout`` seconds (``--timeout``)."""
    resolved = resolve_uri(tracking_uri)
    for message in resolved.warnings:
        click.echo(f"warning: {message}", err=True)
    if resolved.uri.startswith(("http://", "https://")):
        try:
            probe_tcp(resolved.uri, min(timeout, 5.0))
        except OSError as exc:
            raise CliError(
                f"the tracking store {resolved.shown} cannot be reached: {describe(exc)}; "
                "check that the server runs (`trainkit-tracking doctor` helps)"
            ) from exc
    path = sqlite_path(resolved.uri)
    if path is not None and not path.exists():
        source = SOURCE_LABELS.get(resolved.source, resolved.source)
        raise CliError(
            f"no tracking store at {path} (from {source}): nothing has been tracked there "
            "yet; pass --tracking-uri or set MLFLOW_TRACKING_URI"
        )
    return Store(resolved.uri, timeout=timeout), resolved


def find_experiment(store: Store, name_or_id: str) -> tuple[str, str]:
    """(id, name) of the experiment named ``name_or_id`` (or with that id); CliError if none.

    Only a store that answered "no such experiment" gives "not found": a store that could
    not be asked (network, credentials) is reported as such, by the caller's error path.
    """
    experiment = store.find_experiment(name_or_id)
    if experiment is None:
        hint = experiment_hint(store, name_or_id)
        raise CliError(
            f"experiment {name_or_id!r} does not exist (yet) in {store.shown_uri}; "
            f"{hint + ' ' if hint else ''}check the name (or pass --tracking-uri for another "
            "store)"
        )
    if experiment.deleted:
        raise CliError(
            f"experiment {name_or_id!r} is deleted; restore it with `mlflow experiments restore`"
        )
    return experiment.experiment_id, experiment.name


def experiment_hint(store: Store, name: str) -> str:
    """``did you mean 'x'?`` over the store's experiment names, or ``''``."""
    try:
        names = [e.name for e in store.list_experiments()]
    except Exception as exc:  # only the hint is lost; the caller reports the problem
        log.debug("could not list experiments for a hint: %s", exc)
        return ""
    return did_you_mean(name, [n for n in names if not n.startswith(HIDDEN_EXPERIMENT_PREFIX)])


def run_hint(store: Store, given: str, experiment_ids: Sequence[str] | None = None) -> str:
    """``did you mean <id> (<name>)?`` for a run id (or a run name) that matched no run:
    runs whose id starts with ``given``, whose name is ``given``, or whose name or id is
    close to it, in ``experiment_ids`` (default: every experiment); ``''`` when none is."""
    try:
        ids = list(experiment_ids or [e for e, _ in all_experiments(store)])
        records = [r for i in range(0, len(ids), 50) for r in store.search(ids[i : i + 50])]
    except Exception as exc:  # only the hint is lost
        log.debug("could not search runs for a hint: %s", exc)
        return ""
    by_name: dict[str, list[str]] = {}
    for record in records:
        by_name.setdefault(record.name, []).append(record.run_id)
    names = {r.run_id: r.name for r in records}
    low = given.lower()
    found = [r.run_id for r in records if low and r.run_id.startswith(low)]
    found += by_name.get(given, [])
    for close in close_names(given, by_name, n=3):
        found += by_name[close]
    found += close_names(low, names, n=3)
    picked = list(dict.fromkeys(found))[:3]
    if not picked:
        return ""
    listed = " or ".join(f"{run_id} ({names[run_id]!r})" for run_id in picked)
    return f"did you mean {listed}?"


def all_experiments(store: Store) -> list[tuple[str, str]]:
    """(id, name) of every active experiment, without the SDK's hidden ``.trainkit*`` ones."""
    return [
        (e.experiment_id, e.name)
        for e in store.list_experiments()
        if not e.name.startswith(HIDDEN_EXPERIMENT_PREFIX)
    ]


class _NoBar:
    """Stands in for a progress bar when stderr is not a terminal (CI logs stay clean)."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, steps: int) -> None:
        return None


def progressbar(length: int, label: str) -> Any:
    """A click progress bar on stderr, or nothing when stderr is not a terminal."""
    if not sys.stderr.isatty():
        return _NoBar()
    return click.progressbar(length=length, label=label, file=sys.stderr)
