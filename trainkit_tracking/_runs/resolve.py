"""Where a Tracker's runs go: the tracking URI (argument, environment, Azure ML, local) and
the experiment, resolved once, with the fallback to the local store when Azure or the
tracking store is not there."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.platform import Platform, local_store_path, local_store_uri
from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._core.uris import check_tracking_uri
from trainkit_tracking._store import azure as _azure
from trainkit_tracking._store.store import Store, sqlite_path
from trainkit_tracking.errors import StoreUnavailableError, TrackingError


class Resolution:
    """The store and experiment of one Tracker; nothing is contacted before ``setup()``."""

    def __init__(
        self,
        environ: dict[str, str],
        *,
        experiment: str | None,
        tracking_uri: str | None,
        project: str | None,
        platform: Platform,
        cwd: Path | None,
        fallback_to_local: bool,
        timeout: float,
        azure_timeout: float,
        azure_args: tuple[str | None, str | None, str | None],
        warn_once: Callable[[str, str], None],
    ) -> None:
        self._environ = environ
        self.experiment_arg = experiment
        self.uri_arg = tracking_uri
        self._project = project
        self._platform = platform
        self._cwd = cwd
        self.fallback_to_local = fallback_to_local
        self._timeout = timeout
        self._azure_timeout = azure_timeout
        self._azure_args = azure_args
        self._warn_once = warn_once
        self.lock = threading.RLock()
        self.store: Store | None = None
        self.tracking_uri: str | None = None
        self.uri_source: str | None = None
        self.experiment_id: str | None = None
        self.experiment_name: str | None = None
        self.fell_back = False  # Azure was not available: the local store instead
        self.push_to: str | None = None  # offline: the store the runs are meant for (redacted)

    def shown(self) -> tuple[str, str]:
        """(store, experiment) as known without setup(): no network, no disk; credentials masked."""
        store = (
            self.tracking_uri
            or self.uri_arg
            or self._environ.get(_env.MLFLOW_TRACKING_URI)
            or "(resolved on first use)"
        )
        experiment = (
            self.experiment_name
            or self.experiment_arg
            or self._environ.get(_env.MLFLOW_EXPERIMENT_NAME)
            or "(not set)"
        )
        if self.experiment_id is not None:
            experiment = f"{experiment} (id {self.experiment_id})"
        return redact_value(store), experiment

    def local_uri(self) -> str:
        cwd = self._cwd or Path.cwd()
        return local_store_uri(local_store_path(self._platform, cwd=cwd, project=self._project))

    def resolve_tracking_uri(self) -> tuple[str, str]:
        """Resolve (uri, source) without creating anything (Azure is checked, bounded)."""
        uri, source = self.uri_arg, "argument"
        if not uri:
            uri, source = (
                self._environ.get(_env.MLFLOW_TRACKING_URI) or None,
                _env.MLFLOW_TRACKING_URI,
            )
        if uri:
            # A typo gets the forms that work, not MLflow's words about another backend.
            shown_source = "" if source == "argument" else source
            check_tracking_uri(uri, shown_source, {**os.environ, **self._environ}, plugin_schemes)
        workspace = None if uri else _azure.workspace_configured(self._environ, *self._azure_args)
        if workspace is not None or _azure.is_azure_uri(uri):
            try:
                uri = _azure.connect(uri, workspace, timeout=self._azure_timeout)
            except Exception as exc:
                self._azure_failed(exc)
                uri = None
            else:
                source = "azure workspace" if workspace is not None else source
                timeout = self._environ.setdefault(
                    _env.AZUREML_ARTIFACTS_DEFAULT_TIMEOUT, _azure.ARTIFACTS_TIMEOUT_DEFAULT
                )
                # The one documented write to os.environ: azureml-mlflow reads it there.
                os.environ.setdefault(_env.AZUREML_ARTIFACTS_DEFAULT_TIMEOUT, timeout)
        if not uri:
            uri, source = self.local_uri(), "local store"
        return uri, source

    def _azure_failed(self, exc: BaseException) -> None:
        failure = _azure.explain(exc)
        if not self.fallback_to_local:
            raise failure from exc
        self.fell_back = True
        self._warn_once(
            "azure",
            f"Azure ML tracking is not available: {failure.reason}; using the local store "
            f"instead (fallback_to_local=True); to fix it, {failure.fix}",
        )

    def setup(self) -> tuple[str, str]:
        """(uri, experiment id), resolved and opened on the first call."""
        with self.lock:
            if self.store is not None and self.experiment_id is not None:
                assert self.tracking_uri is not None
                return self.tracking_uri, self.experiment_id
            uri, source = self.resolve_tracking_uri()
            try:
                self._open(uri, source)
            except StoreUnavailableError as exc:
                self.go_offline(uri, exc)
            assert self.tracking_uri is not None and self.experiment_id is not None
            return self.tracking_uri, self.experiment_id

    def _open(self, uri: str, source: str) -> None:
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        store = Store(uri, timeout=self._timeout)
        name = self.experiment_arg or self._environ.get(_env.MLFLOW_EXPERIMENT_NAME)
        experiment_id = self._environ.get(_env.MLFLOW_EXPERIMENT_ID) if not name else None
        if self.fell_back or self.push_to is not None:
            experiment_id = None  # an id of the other store means nothing in the local one
        if not name and not experiment_id:
            raise TrackingError(
                "no experiment given: pass Tracker(experiment='name') or set MLFLOW_EXPERIMENT_NAME"
            )
        try:
            if name:
                experiment_id = store.get_or_create_experiment(name)
            else:
                assert experiment_id is not None
                name = store.experiment_name(experiment_id)
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(
                f"the tracking store {redact_value(uri)} refused to open experiment "
                f"{name or experiment_id!r}: {redact_value(str(exc))}"
            ) from exc
        self.tracking_uri, self.uri_source = uri, source
        self.experiment_id, self.experiment_name = experiment_id, name
        self.store = store

    def go_offline(self, target: str, exc: StoreUnavailableError) -> None:
        """Create runs in the local store from now on, marked for a push to ``target``."""
        local = self.local_uri()
        if not self.fallback_to_local or target == local or Store(target).is_local:
            raise exc  # a local file store that does not answer: another one would not help
        if not (self.experiment_arg or self._environ.get(_env.MLFLOW_EXPERIMENT_NAME)):
            raise TrackingError(
                f"{exc}; the local store cannot stand in for it without an experiment name "
                "(pass Tracker(experiment=...) or set MLFLOW_EXPERIMENT_NAME)"
            ) from exc
        self.push_to = redact_value(target)
        self.store = None
        self._open(local, "local store (offline)")
        self._warn_once(
            "offline",
            f"{exc}. Training goes on: runs are created in the local store {local} and marked "
            f"for `trainkit-tracking push` to {self.push_to} (fallback_to_local=True)",
        )

    def store_failed(self, exc: StoreUnavailableError) -> None:
        """A call to the opened store timed out: go offline, unless already there."""
        with self.lock:
            if self.push_to is None:
                assert self.tracking_uri is not None
                self.go_offline(self.tracking_uri, exc)

    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        """The run's page in the store's UI (http stores and Azure ML), else None."""
        assert self.tracking_uri is not None
        return run_url(self.tracking_uri, experiment_id, run_id)

    def handover_env(self, spool_dir: Path) -> dict[str, str]:
        """The variables every subprocess gets: store, experiment, spool."""
        uri = self.tracking_uri
        assert uri is not None and self.experiment_name and self.experiment_id
        env = {
            _env.MLFLOW_TRACKING_URI: uri,
            _env.MLFLOW_EXPERIMENT_NAME: self.experiment_name,
            _env.MLFLOW_EXPERIMENT_ID: self.experiment_id,
            _env.TRAINKIT_SPOOL_DIR: str(spool_dir),
        }
        if self._project:
            env[_env.TRAINKIT_PROJECT] = self._project
        if _azure.is_azure_uri(uri):
            env[_env.AZUREML_ARTIFACTS_DEFAULT_TIMEOUT] = self._environ.get(
                _env.AZUREML_ARTIFACTS_DEFAULT_TIMEOUT, _azure.ARTIFACTS_TIMEOUT_DEFAULT
            )
            # Keeps azureml-mlflow's job-token sign-in working in the child (join mode
            # replaces it with the joined run); never set after a fallback to local.
            auth_run = _azure.token_auth_run_id(self._environ, uri)
            if auth_run is not None:
                env[_env.MLFLOW_RUN_ID] = auth_run
        return env


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the UI of the store ``uri`` (http stores and Azure ML), else None."""
    if _azure.is_azure_uri(uri):
        return _azure.studio_url(uri, run_id)
    if uri.startswith(("http://", "https://")):
        # Without user:password@: a link is shown and shared; the browser asks instead.
        parts = urlsplit(uri)
        base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


def plugin_schemes() -> list[str]:
    """Tracking-store schemes that installed MLflow plugins register (entry points)."""
    from importlib.metadata import entry_points

    return [entry.name for entry in entry_points(group="mlflow.tracking_store")]
