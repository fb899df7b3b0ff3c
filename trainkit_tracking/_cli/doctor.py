"""``trainkit-tracking doctor``: what the SDK would use here, and whether it works.

Secrets in what it shows are masked.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from trainkit_tracking._cli.common import (
    SOURCE_LABELS,
    describe,
    experiment_hint,
    one_line,
    probe_tcp,
    resolve_uri,
)
from trainkit_tracking._core import env as _env
from trainkit_tracking._core.naming import NamingPolicy
from trainkit_tracking._core.platform import detect_platform
from trainkit_tracking._core.redact import get_logger, redact
from trainkit_tracking._store.store import Store, sqlite_path
from trainkit_tracking._version import __version__
from trainkit_tracking.errors import PolicyError

log = get_logger(__name__)

AZURE_HINT = 'pip install "trainkit-tracking[azure]"'
# Variables worth showing when set; any MLFLOW_TRACKING_* (username, password, token...) too.
_SHOWN_VARS = (
    _env.MLFLOW_TRACKING_URI,
    _env.MLFLOW_EXPERIMENT_NAME,
    _env.MLFLOW_EXPERIMENT_ID,
    _env.MLFLOW_RUN_ID,
    _env.TRAINKIT_SPOOL_DIR,
    _env.TRAINKIT_PROJECT,
    _env.AZURE_SUBSCRIPTION_ID,
    _env.AZURE_RESOURCE_GROUP,
    _env.AZUREML_WORKSPACE_NAME,
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
    *_env.AZUREML_PLATFORM_VARS,
)
_ORDER = (
    "platform",
    "tracking URI",
    "experiment",
    "mlflow",
    "azureml-mlflow",
    "store",
    "metric writes",
    "spool",
    "senders",
    "naming policy",
    "environment",
)


@dataclass
class Report:
    """The lines ``doctor`` prints, and the problems (exit 1) and warnings it found."""

    rows: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        self.rows[label] = value

    def render(self) -> str:
        labels = [label for label in _ORDER if label in self.rows]
        labels += [label for label in self.rows if label not in _ORDER]
        width = max(len(label) for label in labels)
        lines = [f"trainkit-tracking {__version__}"]
        lines += [f"  {label.ljust(width)}  {self.rows[label]}" for label in labels]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"problem: {p}" for p in self.problems]
        if self.problems:
            count = len(self.problems)
            lines.append(f"{count} problem{'s' * (count != 1)} found")
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _check_store(uri: str, experiment: str | None, timeout: float, report: Report) -> None:
    path = sqlite_path(uri)
    if path is not None and not path.exists():
        report.add("store", f"not created yet ({path}); it is created on first use")
        if experiment:
            report.add("experiment", f"{experiment} (does not exist yet)")
            report.problems.append(
                f"experiment {experiment!r} does not exist yet: there is no store at {path}; "
                "if you expected runs there, pass --tracking-uri or run from the directory "
                "that holds mlruns/; else it is created when the first run starts"
            )
        return
    if uri.startswith(("http://", "https://")):
        try:
            probe_tcp(uri, min(timeout, 5.0))
        except OSError as exc:
            report.add("store", "does not answer")
            report.problems.append(
                f"the tracking store {redact('uri', uri)} cannot be reached: {describe(exc)}; "
                "check that the server runs and the URI is right"
            )
            return
    store = Store(uri, timeout=timeout)
    started = time.monotonic()
    try:
        store.ping()
    except Exception as exc:
        report.add("store", "does not answer")
        report.problems.append(
            f"the tracking store {redact('uri', uri)} does not answer: {describe(exc)}"
        )
        return
    report.add("store", f"answers ({time.monotonic() - started:.2f} s)")
    try:  # bulk inserts into MLflow's tables, or MLflow's API and why (SPEC section 17)
        report.add("metric writes", store.metric_path())
    except Exception as exc:
        report.add("metric writes", f"(could not tell: {describe(exc)})")
    if experiment:
        _check_experiment(store, experiment, timeout, report)


def _check_experiment(store: Store, name: str, timeout: float, report: Report) -> None:
    try:
        found = store.find_experiment(name)
    except Exception as exc:
        report.problems.append(f"could not look up experiment {name!r}: {describe(exc)}")
        return
    if found is None:
        report.add("experiment", f"{name} (does not exist yet)")
        report.problems.append(_missing_experiment(store, name))
    elif found.deleted:
        report.add("experiment", f"{name} (id {found.experiment_id}, deleted)")
        report.problems.append(
            f"experiment {name!r} is deleted: restore it with `mlflow experiments restore` "
            "or use another name"
        )
    else:
        report.add("experiment", f"{name} (id {found.experiment_id})")


def _missing_experiment(store: Store, name: str) -> str:
    """The problem line for an experiment that is not in the store, with near names."""
    hint = experiment_hint(store, name)
    hint = f"{hint} " if hint else ""
    return (
        f"experiment {name!r} does not exist yet in {store.shown_uri}: {hint}check the "
        "name; if nothing was tracked to it yet, it is created when the first run starts"
    )


def _check_naming(environ: Mapping[str, str], report: Report) -> None:
    """The naming policy a Tracker would use (TRAINKIT_NAMING_POLICY), or why it cannot."""
    raw = environ.get(_env.TRAINKIT_NAMING_POLICY, "").strip()
    try:
        NamingPolicy.from_env(environ)
    except PolicyError as exc:
        report.add("naming policy", "(invalid)")
        report.problems.append(describe(exc))
        return
    shown = raw if len(raw) <= 80 and not raw.startswith("{") else "a policy handed over"
    report.add("naming policy", f"{shown} ({_env.TRAINKIT_NAMING_POLICY})" if raw else "default")


def _check_offline(environ: Mapping[str, str], timeout: float, report: Report) -> None:
    """Runs the local store holds for a push (created while the tracking store was away)."""
    from trainkit_tracking._runs.tracker import Tracker

    local = Tracker(
        None, environ=environ, policy=NamingPolicy.default(), cv_metrics=()
    )._local_uri()
    path = sqlite_path(local)
    if path is None or not path.exists():
        return
    try:
        store = Store(local, timeout=timeout)
        ids = [e.experiment_id for e in store.list_experiments()]
        waiting = store.search(ids, "tags.`code.push_to` LIKE '%'") if ids else []
    except Exception as exc:  # a local store that cannot be read is reported, not fatal
        report.warnings.append(f"could not read the local store {path}: {describe(exc)}")
        return
    if waiting:
        targets = sorted({r.tags["code.push_to"] for r in waiting})
        report.add("offline runs", f"{len(waiting)} in {path}, for {', '.join(targets)}")
        report.warnings.append(
            f"{len(waiting)} run{'s' * (len(waiting) != 1)} in the local store {path} were "
            "created while the tracking store did not answer: merge them with "
            "`trainkit-tracking push` (runs pushed already are skipped)"
        )


def _check_spool(spool_dir: Path | None, report: Report) -> None:
    from trainkit_tracking._journal.ledger import read_set_aside
    from trainkit_tracking._journal.run_logger import default_spool_dir, pending
    from trainkit_tracking._journal.sender_launch import senders

    directory = spool_dir or default_spool_dir()
    try:
        count = pending(directory)
        aside = read_set_aside(directory)
    except Exception as exc:
        report.add("spool", f"{directory} (unreadable)")
        report.problems.append(f"the spool {directory} cannot be read: {describe(exc)}")
        return
    report.add("spool", f"{count} pending record{'s' * (count != 1)} in {directory}")
    running = senders(directory)
    report.add(
        "senders",
        "; ".join(
            f"pid {s.get('pid', '?')} ({s.get('mode', 'process')}) sending to {s.get('uri', '?')}"
            + f", {s.get('files', 0)} file(s)"
            + (" (the store does not answer; retrying)" if s.get("down") else "")
            for s in running
        )
        or "none running",
    )
    if aside:
        runs: dict[str, list[str]] = {}
        for entry in aside:
            runs.setdefault(str(entry.get("run")), []).append(
                f"{entry.get('what')} ({entry.get('origin')}: {entry.get('why')})"
            )
        report.add(
            "set aside",
            f"{len(aside)} record{'s' * (len(aside) != 1)} of {len(runs)} run(s)",
        )
        for run_id, items in runs.items():
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            report.warnings.append(
                f"set aside in run {run_id}: " + "; ".join(items[:3]) + more + ". Fix the cause, "
                "then `trainkit-tracking sync --retry-set-aside`"
            )
    if count:
        report.warnings.append(
            f"{count} spooled record{'s are' if count != 1 else ' is'} not stored yet: "
            + (
                "a sender sends them once the store answers (`trainkit-tracking sync` asks it "
                "to retry now)"
                if running
                else "`trainkit-tracking sync` sends them"
            )
        )


def _environment(environ: Mapping[str, str]) -> list[str]:
    names = [n for n in _SHOWN_VARS if environ.get(n)]
    names += sorted(
        n for n in environ if n.startswith("MLFLOW_TRACKING_") and n not in names and environ[n]
    )
    return [f"{n}={redact(n, environ[n])}" for n in names]


def doctor(
    tracking_uri: str | None,
    experiment: str | None,
    *,
    spool_dir: Path | None = None,
    timeout: float = 10.0,
    environ: Mapping[str, str] | None = None,
) -> Report:
    """Check the platform, store, experiment, versions and spool; never raises."""
    env = os.environ if environ is None else environ
    report = Report()
    report.add("platform", detect_platform(env))
    try:
        resolved = resolve_uri(tracking_uri)
    except Exception as exc:
        report.add("tracking URI", "(cannot be resolved)")
        report.problems.append(f"the tracking URI cannot be resolved: {describe(exc)}")
        resolved = None
    if resolved is not None:
        source = SOURCE_LABELS.get(resolved.source, resolved.source)
        report.add("tracking URI", f"{resolved.shown}  (from {source})")
        if resolved.fell_back:
            report.problems += [
                f"Azure ML was configured but is not usable: {w}" for w in resolved.warnings
            ] or ["Azure ML was configured but is not usable; using the local store"]
        else:
            report.warnings += list(resolved.warnings)
    if not experiment:
        report.add("experiment", "(not set: pass --experiment or set MLFLOW_EXPERIMENT_NAME)")
    mlflow_version = _version("mlflow")
    report.add("mlflow", mlflow_version or "not installed")
    if mlflow_version is None:
        report.problems.append('mlflow is not installed: pip install "trainkit-tracking"')
    azure_version = _version("azureml-mlflow")
    report.add("azureml-mlflow", azure_version or f"not installed (for Azure ML: {AZURE_HINT})")
    if resolved is not None and resolved.uri.startswith("azureml://") and azure_version is None:
        report.problems.append(f"an azureml:// tracking URI needs azureml-mlflow: {AZURE_HINT}")
    if resolved is not None and mlflow_version is not None:
        try:
            _check_store(resolved.uri, experiment, timeout, report)
        except Exception as exc:  # doctor reports; it never crashes on what it checks
            report.add("store", "check failed")
            report.problems.append(f"checking the store failed: {describe(exc)}")
    _check_naming(env, report)
    _check_spool(spool_dir, report)
    _check_offline(env, timeout, report)
    variables = _environment(env)
    report.add("environment", ", ".join(variables) if variables else "(no tracking variables set)")
    report.problems = [one_line(p) for p in report.problems]
    report.warnings = [one_line(w) for w in report.warnings]
    return report
